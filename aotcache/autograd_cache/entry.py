"""The compiled-graph cache entry: one self-describing container of bytes (no pickle).

Byte layout (little-endian)::

    0    4   magic b"AOTE"
    4    4   manifest length M
    8    M   manifest: UTF-8 JSON (see :class:`CacheEntry`), listing the blobs as [name, length, sha256]
    8+M ...  the artifact blobs (compiler output, see ``aotcache.compilers.base``), concatenated in manifest order

The store frames the container (checksum, optional HMAC signature, compression); the per-blob sha256 here
guards entries that travel outside the store (``export`` / ``import``) and catches a mismatched manifest.

NOTE [what an entry promises]
An entry is valid for exactly one key digest (recorded in the manifest and checked on load) and, with
dynamic shapes, only for inputs that satisfy its guard expression. Everything needed to rebuild a runnable
function in a fresh process is inside: the runtime metadata (JSON) and one compiler artifact per role
(``forward`` + ``backward`` for training, ``inference`` otherwise).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ENTRY_MAGIC",
    "ENTRY_FORMAT",
    "ARTIFACT_ROLES",
    "EntryError",
    "CacheEntry",
    "pack_entry",
    "unpack_entry",
    "read_manifest",
    "current_versions",
]

ENTRY_MAGIC = b"AOTE"
ENTRY_FORMAT = 1
ARTIFACT_ROLES = ("forward", "backward", "inference")
_LENGTH = struct.Struct("<I")
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024


class EntryError(ValueError):
    """Bytes that are not a usable entry here; ``reason`` is a short category for counters and logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def current_versions() -> dict[str, str]:
    """The versions an entry records and is checked against on load (torch, aotcache, Python)."""
    import torch

    import aotcache

    return {"torch": str(torch.__version__), "torch_git": str(getattr(torch.version, "git_version", "")),
            "aotcache": aotcache.__version__,
            "python": f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}"}


@dataclass
class CacheEntry:
    """A compiled function: key record, guards, runtime metadata (JSON) and compiler artifacts (bytes)."""

    key: dict[str, Any]  # CacheKey.to_json(): digest plus every part (with details) for explaining misses
    metadata: dict[str, Any]  # RuntimeMetadata.to_json()
    artifacts: dict[str, bytes]  # role ("forward", "backward", "inference") -> compiler artifact bytes
    guards: str | None = None  # guard expression over the graph inputs (aotcache grammar), None = always
    compilers: dict[str, str] = field(default_factory=dict)  # role -> compiler name
    created: float = field(default_factory=time.time)
    compile_seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)  # name, kind, node / op counts: for `aotcache ls/show`
    versions: dict[str, str] = field(default_factory=current_versions)
    format: int = ENTRY_FORMAT

    @property
    def digest(self) -> str:
        """The key digest this entry belongs to."""
        return str(self.key.get("digest", ""))

    def manifest(self) -> dict[str, Any]:
        """Everything but the blobs, JSON-ready (what listings show)."""
        return {"format": self.format, "digest": self.digest, "key": self.key, "guards": self.guards,
                "metadata": self.metadata, "compilers": dict(self.compilers), "created": self.created,
                "compile_seconds": self.compile_seconds, "summary": self.summary, "versions": dict(self.versions),
                "artifact_bytes": {role: len(blob) for role, blob in self.artifacts.items()}}


def pack_entry(entry: CacheEntry) -> bytes:
    """The container bytes of ``entry``.

    :raises EntryError: an unknown artifact role or a manifest that is not JSON-serializable.
    """
    unknown = sorted(set(entry.artifacts) - set(ARTIFACT_ROLES))
    if unknown:
        raise EntryError("malformed", f"unknown artifact roles {unknown}; use {', '.join(ARTIFACT_ROLES)}")
    roles = [role for role in ARTIFACT_ROLES if role in entry.artifacts]
    manifest = entry.manifest()
    manifest["blobs"] = [[role, len(entry.artifacts[role]), hashlib.sha256(entry.artifacts[role]).hexdigest()]
                         for role in roles]
    try:
        encoded = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise EntryError("malformed", f"the manifest is not JSON-serializable: {exc}") from exc
    return b"".join([ENTRY_MAGIC, _LENGTH.pack(len(encoded)), encoded, *(entry.artifacts[r] for r in roles)])


def _parse_manifest(view: memoryview) -> tuple[dict[str, Any], int]:
    if len(view) < 8 or bytes(view[:4]) != ENTRY_MAGIC:
        raise EntryError("foreign", "not an aotcache compiled-graph entry (bad magic)")
    (length,) = _LENGTH.unpack_from(view, 4)
    if length > _MAX_MANIFEST_BYTES or 8 + length > len(view):
        raise EntryError("truncated", f"manifest of {length} bytes does not fit in {len(view)} bytes")
    try:
        manifest = json.loads(bytes(view[8:8 + length]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EntryError("malformed", f"manifest is not JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise EntryError("malformed", "manifest is not a JSON object")
    if manifest.get("format") != ENTRY_FORMAT:
        raise EntryError("format", f"entry format {manifest.get('format')!r}, this aotcache reads {ENTRY_FORMAT}")
    return manifest, 8 + length


def read_manifest(blob: bytes | memoryview) -> dict[str, Any]:
    """The manifest of an entry without copying or checking its blobs (for listings).

    :raises EntryError: not an entry, truncated header, malformed manifest, other entry format.
    """
    manifest, _ = _parse_manifest(memoryview(blob))
    return manifest


def _check_versions(recorded: Any) -> None:
    here = current_versions()
    if not isinstance(recorded, Mapping):
        raise EntryError("malformed", "manifest has no versions")
    for name in ("torch", "torch_git", "python"):
        if recorded.get(name) != here[name]:
            raise EntryError("version", f"entry built with {name} {recorded.get(name)!r}, this process has "
                                        f"{here[name]!r}")


def unpack_entry(blob: bytes | memoryview, *, check_versions: bool = True, verify_blobs: bool = True) -> CacheEntry:
    """Parse and check an entry container: layout, blob lengths and sha256, versions.

    ``verify_blobs=False`` skips the per-blob sha256 for bytes the store already verified (its frame
    checksum, and signature when a secret is set): the warm-load path. Entries from outside the store
    (``import``) keep it.

    :raises EntryError: with ``reason`` one of foreign, truncated, malformed, format, version, checksum.
    """
    view = memoryview(blob)
    manifest, offset = _parse_manifest(view)
    try:
        blobs = [(str(role), int(length), str(digest)) for role, length, digest in manifest["blobs"]]
        key, metadata = manifest["key"], manifest["metadata"]
        guards = manifest.get("guards")
        compilers = {str(k): str(v) for k, v in dict(manifest.get("compilers") or {}).items()}
        created = float(manifest.get("created", 0.0))
        compile_seconds = float(manifest.get("compile_seconds", 0.0))
        summary = dict(manifest.get("summary") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise EntryError("malformed", f"manifest field missing or of the wrong type: {exc}") from exc
    if not isinstance(key, dict) or not isinstance(metadata, dict) or not (guards is None or isinstance(guards, str)):
        raise EntryError("malformed", "manifest key / metadata / guards have the wrong type")
    if check_versions:
        _check_versions(manifest.get("versions"))
    artifacts: dict[str, bytes] = {}
    for role, length, digest in blobs:
        if role not in ARTIFACT_ROLES or role in artifacts:
            raise EntryError("malformed", f"unexpected artifact role {role!r}")
        if offset + length > len(view):
            raise EntryError("truncated", f"artifact {role!r} is cut short")
        data = bytes(view[offset:offset + length])
        if verify_blobs and hashlib.sha256(data).hexdigest() != digest:
            raise EntryError("checksum", f"artifact {role!r} does not match its sha256")
        artifacts[role] = data
        offset += length
    if offset != len(view):
        raise EntryError("malformed", f"{len(view) - offset} trailing bytes after the artifacts")
    return CacheEntry(key=key, metadata=metadata, artifacts=artifacts, guards=guards, compilers=compilers,
                      created=created, compile_seconds=compile_seconds, summary=summary,
                      versions=dict(manifest.get("versions") or {}), format=ENTRY_FORMAT)
