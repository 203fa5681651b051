"""Reading compiled-graph cache entries for the command line, without importing torch.

The compiled-graph cache (:mod:`aotcache.autograd_cache.cache`) stores each entry under the store key
``aot/<key digest>/<slot>`` of namespace ``aot``; its value is the entry container of
:mod:`aotcache.autograd_cache.entry` (magic, manifest length, JSON manifest, artifact blobs). Listing,
``show`` and ``explain`` only need the JSON manifest, so this module reads it straight from the persistent
tiers (disk, Redis) with the store layer, which imports no torch (``AOTAutogradCache`` itself imports the
runtime, hence torch: 1.3 s here).

NOTE [manifest without torch]
``aotcache.autograd_cache.entry.read_manifest`` cannot be imported without torch (the package's
``__init__`` imports the key module). :func:`parse_manifest` reads the same documented layout (see the
docstring of entry.py); ``tests/test_cli_graphs.py`` checks that both agree on real entries.

NOTE [reading does not count as use]
The disk tier's ``get`` moves an entry's LRU recency to now. A listing that read every manifest through it
would make every entry look just used (and ``last used`` would show the time of the previous ``ls``). Here
disk values are read the way ``OnDiskCache.entries()`` reads keys: files opened with ``O_NOATIME``
(``entryfiles.read_value`` decodes and checks the frame), rows through ``SmallPack.get``, which does not
count as use. The layout (``<root>/<digest[:2]>/<digest>``, rows by raw digest) is the one documented in
aotcache/store/disk.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aotcache import config

__all__ = [
    "DEFAULT_NAMESPACE",
    "GraphEntry",
    "ManifestError",
    "EntrySelectionError",
    "parse_manifest",
    "parse_store_key",
    "store_key",
    "list_graph_entries",
    "read_graph_entry",
    "read_entry_bytes",
    "select_entries",
    "parse_entry_ref",
    "read_last_miss",
    "last_miss_path",
    "nearest_entry",
    "differing_parts",
    "installed_torch_version",
]

DEFAULT_NAMESPACE = "aot"  # AOTAutogradCache's default namespace (cache.DEFAULT_NAMESPACE)
_STORE_KEY_RE = re.compile(r"^aot/([0-9a-f]{64})/(\d+)$")  # cache.entry_store_key's form
_ENTRY_MAGIC = b"AOTE"
_ENTRY_FORMAT = 1
_LENGTH = struct.Struct("<I")
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_HEX_RE = re.compile(r"^[0-9a-f]{1,64}$")


class ManifestError(ValueError):
    """Bytes that are not a compiled-graph entry container of the format this aotcache reads."""


class EntrySelectionError(ValueError):
    """A key reference that matches no entry, or several where one is needed; ``bad_input`` marks a reference
    that is malformed or ambiguous (exit status 2) rather than absent (exit status 1)."""

    def __init__(self, message: str, *, bad_input: bool) -> None:
        super().__init__(message)
        self.bad_input = bad_input


#: Store keys of fingerprint alias records (``fingerprint_cache.ALIAS_PREFIX`` + digest; repeated here, where
#: nothing may import torch).
ALIAS_KEY_PREFIX = "aot/fp/"
_ALIAS_KEY_RE = re.compile(r"^aot/fp/([0-9a-f]{64})(?:/([1-7]))?$")  # slot 0 has no suffix (MAX_ALIAS_SLOTS 8)


def store_key(digest: str, slot: int) -> str:
    """The store key of one entry (``cache.entry_store_key``'s form)."""
    return f"aot/{digest}/{slot}"


def parse_store_key(text: str) -> tuple[str, int] | None:
    """``(digest, slot)`` of a compiled-graph store key, or None for any other key (e.g. fingerprint aliases)."""
    match = _STORE_KEY_RE.match(text)
    return (match.group(1), int(match.group(2))) if match else None


def parse_manifest(blob: bytes | memoryview) -> dict[str, Any]:
    """The JSON manifest of an entry container (see NOTE [manifest without torch]); blobs are not checked.

    :raises ManifestError: not an entry, a truncated header, a manifest that is not a JSON object, or
        another entry format.
    """
    view = memoryview(blob)
    if len(view) < 8 or bytes(view[:4]) != _ENTRY_MAGIC:
        raise ManifestError("not an aotcache compiled-graph entry (bad magic)")
    (length,) = _LENGTH.unpack_from(view, 4)
    if length > _MAX_MANIFEST_BYTES or 8 + length > len(view):
        raise ManifestError(f"truncated: a manifest of {length} bytes does not fit in {len(view)} bytes")
    try:
        manifest = json.loads(bytes(view[8:8 + length]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"the manifest is not JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ManifestError("the manifest is not a JSON object")
    if manifest.get("format") != _ENTRY_FORMAT:
        raise ManifestError(f"entry format {manifest.get('format')!r}; this aotcache reads {_ENTRY_FORMAT}")
    return manifest


@dataclass
class GraphEntry:
    """One stored compiled-graph entry: where it is, its size, times, and its manifest."""

    digest: str
    slot: int
    tiers: list[str]
    size: int  # bytes on the first tier listed, framing included
    created: float  # unix time (the manifest's, else the tier's)
    last_access: float  # unix time of the last read or write in the fastest tier holding it (0: unknown)
    manifest: dict[str, Any] = field(repr=False)

    @property
    def ref(self) -> str:
        """``<digest>/<slot>``: how commands name this entry exactly."""
        return f"{self.digest}/{self.slot}"

    @property
    def name(self) -> str:
        """The function or graph name recorded in the summary (``-`` when none)."""
        return str((self.manifest.get("summary") or {}).get("name") or "-")

    @property
    def compiler(self) -> str:
        """The compiler(s) of the artifacts, e.g. ``nop`` or ``forward=aoti, backward=inductor``."""
        compilers = self.manifest.get("compilers") or {}
        names = sorted(set(map(str, compilers.values())))
        if len(names) <= 1:
            return names[0] if names else "-"
        return ", ".join(f"{role}={name}" for role, name in sorted(compilers.items()))

    @property
    def torch_version(self) -> str | None:
        """The torch version the entry was built with."""
        return (self.manifest.get("versions") or {}).get("torch")

    stored_at: float = 0.0  # when the tier stored it (unix time): equal to last_access until first read

    @property
    def never_used(self) -> bool:
        """True when no read was recorded since the entry was stored."""
        return self.last_access <= 0 or abs(self.last_access - self.stored_at) < 1e-3


@dataclass
class _Handle:
    tier: str
    cache: Any


def _open_tiers(namespace: str, tier: str) -> list[_Handle]:
    """Disk and/or Redis tiers of ``namespace`` (``tier``: disk, redis or all); never creates directories.

    :raises CacheError: a bad namespace, ``--tier redis`` with no Redis configured, or a bad Redis URL.
    """
    from aotcache.store.factory import open_tier, redis_prefix
    from aotcache.store.interface import CacheError

    redis_prefix(namespace)  # validates the namespace (same rule as open_tiers)
    handles: list[_Handle] = []
    if tier in ("disk", "all"):
        if (Path(config.get("cache_dir")) / "store" / namespace).is_dir():
            handles.append(_Handle("disk", open_tier("disk", namespace=namespace)))
    if tier in ("redis", "all"):
        redis = open_tier("redis", namespace=namespace)
        if redis is not None:
            handles.append(_Handle("redis", redis))
        elif tier == "redis":
            raise CacheError("no Redis tier is configured: set AOTCACHE_REDIS_URL or pass --redis-url")
    return handles


def _close(handles: Iterable[_Handle]) -> None:
    for handle in handles:
        handle.cache.close()


def read_entry_bytes(handle_cache: Any, tier: str, digest: str, slot: int) -> bytes | None:
    """The entry container stored in one tier under ``(digest, slot)``, or None when absent or unreadable.

    Disk entries are read without moving their LRU recency (see NOTE [reading does not count as use]).
    """
    return read_value_bytes(handle_cache, tier, store_key(digest, slot))


def read_value_bytes(handle_cache: Any, tier: str, key: str) -> bytes | None:
    """The bytes stored in one tier under store key ``key`` (disk: without moving its recency), or None."""
    if tier != "disk":
        value = handle_cache.get(key)
        return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None
    return _peek_disk(handle_cache, key)


def read_alias_records(namespace: str, tier: str, digests: Iterable[str]) -> dict[str, bytes]:
    """The fingerprint alias records of ``namespace`` (``aot/fp/<fingerprint>`` and its further slots
    ``aot/fp/<fingerprint>/<n>``, see :mod:`aotcache.autograd_cache.fingerprint_cache`) that name one of the
    key ``digests``: alias name (``<fingerprint>`` or ``<fingerprint>/<n>``, the store key after ``aot/fp/``)
    -> record bytes. Records that do not parse are left out (a job's lookup deletes them).

    :raises CacheError: as :func:`list_graph_entries`.
    """
    wanted = set(digests)
    found: dict[str, bytes] = {}
    handles = _open_tiers(namespace, tier)
    try:
        for handle in handles:
            for info in handle.cache.entries():
                match = _ALIAS_KEY_RE.match(info.key)
                if match is None or info.key[len(ALIAS_KEY_PREFIX):] in found:
                    continue
                blob = read_value_bytes(handle.cache, handle.tier, info.key)
                try:  # the JSON fields only (torch-free); import checks the key parts
                    record = json.loads(blob.decode("utf-8")) if blob is not None else None
                except (UnicodeDecodeError, ValueError):
                    continue
                if (isinstance(record, dict) and record.get("fingerprint") == match.group(1)
                        and record.get("key") in wanted):
                    found[info.key[len(ALIAS_KEY_PREFIX):]] = blob  # type: ignore[assignment]
    finally:
        _close(handles)
    return found


def _peek_disk(disk: Any, key: str) -> bytes | None:
    import hashlib

    from aotcache.store import entryfiles, frame
    from aotcache.store.interface import encode_key
    from aotcache.store.smallpack import PackFault, SmallPack

    encoded = encode_key(key)
    raw_digest = hashlib.sha256(encoded).digest()
    name = raw_digest.hex()
    secret = config.get("secret")
    path = f"{disk.root}/{name[:2]}/{name}"
    try:
        fd = os.open(path, os.O_RDONLY | entryfiles.O_CLOEXEC | getattr(os, "O_NOATIME", 0))
    except PermissionError:  # O_NOATIME needs the file's owner
        fd = os.open(path, os.O_RDONLY | entryfiles.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        fd = -1
    except OSError:
        return None
    if fd >= 0:
        try:
            value = entryfiles.read_value(fd, os.fstat(fd).st_size, encoded, secret)
        except (OSError, frame.FrameError):
            return None  # unreadable or corrupt: a lookup by a job counts and removes it
        finally:
            os.close(fd)
        return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None
    pack = SmallPack(Path(disk.root))
    try:
        found = pack.get(raw_digest)
    except (PackFault, OSError):
        return None
    finally:
        pack.close()
    if found is None:
        return None
    try:
        value = frame.decode_value(found[0], secret=secret, expected_key=encoded)
    except frame.FrameError:
        return None
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def list_graph_entries(namespace: str = DEFAULT_NAMESPACE, tier: str = "disk") -> list[GraphEntry]:
    """Every readable compiled-graph entry of ``namespace`` in the selected persistent tiers, by digest and slot.

    Unreadable or foreign values are skipped (a job's lookup counts and removes them).

    :raises CacheError: bad namespace, Redis not configured (``tier="redis"``) or unreachable.
    """
    handles = _open_tiers(namespace, tier)
    found: dict[tuple[str, int], GraphEntry] = {}
    try:
        for handle in handles:
            for info in handle.cache.entries():
                parsed = parse_store_key(info.key)
                if parsed is None:
                    continue
                existing = found.get(parsed)
                if existing is not None:
                    existing.tiers.append(handle.tier)
                    continue
                blob = read_entry_bytes(handle.cache, handle.tier, *parsed)
                if blob is None:
                    continue
                try:
                    manifest = parse_manifest(blob)
                except ManifestError:
                    continue
                created = float(manifest.get("created") or info.created or 0.0)
                found[parsed] = GraphEntry(parsed[0], parsed[1], [handle.tier], info.size, created,
                                           float(info.last_access or 0.0), manifest, stored_at=info.created)
    finally:
        _close(handles)
    return [found[key] for key in sorted(found)]


def read_graph_entry(namespace: str, tier: str, digest: str, slot: int) -> bytes | None:
    """The container bytes of one entry from the first selected tier that has it (for ``export``).

    :raises CacheError: as :func:`list_graph_entries`.
    """
    handles = _open_tiers(namespace, tier)
    try:
        for handle in handles:
            blob = read_entry_bytes(handle.cache, handle.tier, digest, slot)
            if blob is not None:
                return blob
    finally:
        _close(handles)
    return None


def parse_entry_ref(text: str) -> tuple[str, int | None]:
    """``"d895"`` -> (``"d895"``, None); ``"d895.../1"`` -> (``"d895..."``, 1): a digest prefix and optional slot.

    :raises EntrySelectionError: (bad input) not a hex prefix, or a slot that is not a number.
    """
    prefix, sep, slot_text = text.strip().lower().partition("/")
    if not _HEX_RE.match(prefix):
        raise EntrySelectionError(f"{text!r} is not a key: give a key digest or a unique prefix of one (hex "
                                  "digits, as in the first column of `aotcache graphs`), optionally "
                                  "followed by /SLOT", bad_input=True)
    if not sep:
        return prefix, None
    if not slot_text.isdigit():
        raise EntrySelectionError(f"{text!r}: the slot after '/' must be a number, e.g. {prefix}/0",
                                  bad_input=True)
    return prefix, int(slot_text)


def select_entries(entries: Sequence[GraphEntry], ref: str, *, unique_key: bool = True) -> list[GraphEntry]:
    """The entries ``ref`` (a digest prefix, optionally ``/SLOT``) names; with ``unique_key`` they must all
    belong to one key digest.

    :raises EntrySelectionError: nothing matches (not bad input), or several keys match (bad input).
    """
    prefix, slot = parse_entry_ref(ref)
    matches = [entry for entry in entries
               if entry.digest.startswith(prefix) and (slot is None or entry.slot == slot)]
    if not matches:
        raise EntrySelectionError(f"no compiled-graph entry matches {ref!r} (see `aotcache graphs`)",
                                  bad_input=False)
    digests = sorted({entry.digest for entry in matches})
    if unique_key and len(digests) > 1:
        shown = ", ".join(digest[:16] for digest in digests[:5])
        raise EntrySelectionError(f"{ref!r} matches {len(digests)} keys ({shown}{', ...' if len(digests) > 5 else ''}); "
                                  "give a longer prefix", bad_input=True)
    return matches


# ----------------------------------------------------------------------------------------------------
# Explaining misses: the last recorded miss, the nearest entry
# ----------------------------------------------------------------------------------------------------


def last_miss_path() -> Path:
    """``<cache_dir>/autograd/last_miss.json``, where the cache records the key of the last miss of any process
    (``AOTAutogradCache._remember_miss``; read by ``cache.explain_last_miss``)."""
    return Path(config.get("cache_dir")) / "autograd" / "last_miss.json"


def read_last_miss() -> dict[str, Any]:
    """The last recorded miss: ``{"namespace", "key": key record, "time"}``.

    :raises ValueError: none recorded (or the record is unreadable), naming the file.
    """
    path = last_miss_path()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no compiled-graph cache miss is recorded yet ({path} does not exist); run a job that "
                         "misses, or compare two entries: aotcache explain KEY1 KEY2") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the last-miss record {path}: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("key"), dict):
        raise ValueError(f"the last-miss record {path} has no key record (written by another aotcache version?)")
    return record


def _part_digests(key_record: Any) -> dict[str, str]:
    parts = key_record.get("parts") if isinstance(key_record, dict) else None
    if not isinstance(parts, dict):
        return {}
    return {str(name): str(body.get("digest")) for name, body in parts.items() if isinstance(body, dict)}


def differing_parts(key_a: Any, key_b: Any) -> list[str]:
    """Names of the key parts whose digests differ between two key records (or that only one has)."""
    digests_a, digests_b = _part_digests(key_a), _part_digests(key_b)
    return sorted(name for name in set(digests_a) | set(digests_b) if digests_a.get(name) != digests_b.get(name))


def nearest_entry(key_record: dict[str, Any], entries: Sequence[GraphEntry], name: str | None = None
                  ) -> GraphEntry | None:
    """The stored entry of another key sharing the most part digests with ``key_record`` (first by digest on
    ties), the way ``AOTAutogradCache.explain_miss`` picks it; None when there is none. With ``name``, only
    entries of that function or model are candidates (another model's entry explains nothing)."""
    wanted = _part_digests(key_record)
    own_digest = key_record.get("digest")
    best: GraphEntry | None = None
    best_same = -1
    for entry in entries:
        if entry.digest == own_digest or (name is not None and entry.name != name):
            continue  # saved since the miss, or another model: compare with the others
        digests = _part_digests(entry.manifest.get("key"))
        if not digests:
            continue
        same = sum(1 for name, digest in wanted.items() if digests.get(name) == digest)
        if same > best_same:
            best, best_same = entry, same
    return best


# Input fields that only say how large an input is (and so how it is laid out): when nothing else differs,
# dynamic shapes would have reused the entry.
_SHAPE_FIELDS = frozenset({"shape", "stride", "storage_offset", "memory_format"})
# Key parts that describe settings and versions, not the traced program or its inputs.
_SETTING_PARTS = frozenset({"config", "system", "compiler", "partitioner", "decompositions", "numerics",
                            "autocast", "grad_mode", "extra"})


def _part_details(key_record: Any) -> dict[str, Any]:
    parts = key_record.get("parts") if isinstance(key_record, dict) else None
    return {str(name): body.get("detail") for name, body in (parts or {}).items() if isinstance(body, dict)}


def _without_shapes(inputs: Any) -> Any:
    if not isinstance(inputs, list):
        return inputs
    return [{field: value for field, value in item.items() if field not in _SHAPE_FIELDS}
            if isinstance(item, dict) else item for item in inputs]


def suggest_fix(key_a: Any, key_b: Any) -> str | None:
    """A suggestion for a miss of ``key_b`` next to ``key_a`` (same function), when the differing parts show
    one: only input sizes differ -> dynamic shapes; only settings or versions differ -> say so. None else."""
    parts = set(differing_parts(key_a, key_b))
    if not parts:
        return None
    details_a, details_b = _part_details(key_a), _part_details(key_b)
    if "inputs" in parts and parts <= {"inputs", "graph"}:
        inputs_a, inputs_b = details_a.get("inputs"), details_b.get("inputs")
        if (isinstance(inputs_a, list) and isinstance(inputs_b, list)
                and _without_shapes(inputs_a) == _without_shapes(inputs_b)):
            return ("only input sizes differ: compile with dynamic=True (one graph for every size that "
                    "satisfies its guards), or keep the default dynamic=None, which makes a dimension that "
                    "changes size dynamic at the next compile")
    if parts <= _SETTING_PARTS:
        labels = ", ".join(sorted(parts))
        return (f"only settings or versions differ ({labels}): the program and its inputs are the same, but it "
                "was compiled under another configuration or another torch / aotcache; nothing to change in "
                "the model. Keep those settings equal across runs to share entries")
    return None


_TORCH_VERSION_RE = re.compile(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", re.MULTILINE)


def installed_torch_version() -> str | None:
    """The installed torch's ``torch.__version__`` without importing torch, to flag entries built by another
    torch (entries record ``torch.__version__``).

    NOTE [torch's local version tag]: the package metadata of PyPI's CUDA wheels has no local tag
    (``2.14.1``) while ``torch.__version__`` has it (``2.14.1+cu130``); the download.pytorch.org CPU wheels
    carry it in both (``2.13.0+cpu``). So the generated ``torch/version.py`` is read; the metadata version is
    the answer only when that file is missing or unreadable.
    """
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        text = Path(str(dist.locate_file("torch/version.py"))).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return dist.version
    match = _TORCH_VERSION_RE.search(text)
    return match.group(1) if match else dist.version


# ----------------------------------------------------------------------------------------------------
# Fingerprint records during prune (NOTE [ordered with another entry] in aotcache/store/eviction.py)
# ----------------------------------------------------------------------------------------------------


def _alias_targets(disk: Any, infos: Iterable[Any]) -> dict[str, str]:
    """Storage digest of each readable fingerprint record among ``infos`` -> the key digest it names."""
    targets = {}
    for info in infos:
        if _ALIAS_KEY_RE.match(info.key) is None:
            continue
        blob = _peek_disk(disk, info.key)
        try:
            record = json.loads(blob.decode("utf-8")) if blob is not None else None
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("key"), str):
            targets[info.digest] = record["key"]
    return targets


def alias_recency(disk: Any, infos: Sequence[Any]) -> dict[str, int]:
    """Order times (ns, by storage digest) that put each fingerprint record of the disk tier ``disk`` just
    after the most recently used entry of the key it names, so that ``prune`` never removes the record of an
    entry it keeps (``infos``: the tier's listing)."""
    newest: dict[str, float] = {}
    for info in infos:
        parsed = parse_store_key(info.key)
        if parsed is not None:
            newest[parsed[0]] = max(newest.get(parsed[0], 0.0), float(info.last_access))
    by_digest = {info.digest: info for info in infos}
    order = {}
    for digest, key_digest in _alias_targets(disk, infos).items():
        if key_digest in newest:
            own = int(by_digest[digest].last_access * 1e9)
            order[digest] = max(own, int(newest[key_digest] * 1e9) + 1000)
    return order


def remove_orphan_aliases(disk: Any) -> int:
    """Remove the fingerprint records of the disk tier ``disk`` whose key has no entry left; the number removed
    (a record without its entry only costs a lookup, but prune must not leave them behind)."""
    infos = list(disk.entries())
    present = {parsed[0] for info in infos if (parsed := parse_store_key(info.key)) is not None}
    removed = 0
    for digest, key_digest in _alias_targets(disk, infos).items():
        if key_digest not in present:
            with contextlib.suppress(OSError):
                removed += bool(disk.delete_digest(digest))
    return removed
