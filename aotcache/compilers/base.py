"""The compiler contract and the artifact container shared by every compiler.

A compiler is ``compiler(gm, example_inputs) -> CompiledGraph``. A CompiledGraph is called with the flat
graph inputs and returns the flat outputs; ``artifact()`` gives bytes that ``load_artifact`` turns back
into an equivalent CompiledGraph in another process, with no compiler toolchain needed. Optional attributes
the AOT runtime reads: ``grad_mode_independent`` (True: its results do not depend on grad mode, NOTE
[Forward under grad mode] in ``aotcache.aot.runtime``) and ``output_strides`` (NOTE [saved activations take
the compiler's layout] in ``aotcache.aot.layouts``). Compilers written for PyTorch's AOT Autograd may
instead return a *boxed* callable (``_boxed_call = True``, called with one list); ``aotcache.aot.runtime.unboxed`` adapts it.

Artifact container layout (little-endian):

    0   4   magic b"AOTA"
    4   4   JSON header length H
    8   H   JSON header: {"compiler": name, "format": int, "meta": {...}, "blobs": [[name, length], ...]}
    8+H ... the blobs, concatenated in header order

NOTE [artifacts are code]
An artifact is executable (Python source, a shared library): loading one is running code. The store's
checksums and optional HMAC signatures (AOTCACHE_SECRET) decide whether bytes are trusted; this module
only refuses containers that are malformed or name an unknown compiler.
"""

from __future__ import annotations

import importlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

__all__ = [
    "ArtifactError",
    "Artifact",
    "CompiledGraph",
    "Compiler",
    "pack_artifact",
    "unpack_artifact",
    "load_artifact",
    "get_compiler",
    "COMPILER_NAMES",
]

ARTIFACT_MAGIC = b"AOTA"
_LENGTH = struct.Struct("<I")


class ArtifactError(ValueError):
    """Bytes that are not a loadable artifact (malformed, unknown compiler, incompatible build)."""


@runtime_checkable
class CompiledGraph(Protocol):
    compiler_name: str

    def __call__(self, *args: Any) -> Sequence[Any]: ...

    def artifact(self) -> bytes: ...


Compiler = Callable[..., CompiledGraph]


@dataclass
class Artifact:
    """A compiler's serialized output: JSON-able ``meta`` plus named binary ``blobs``."""

    compiler: str
    meta: dict[str, Any] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    format: int = 1


def pack_artifact(artifact: Artifact) -> bytes:
    """Serialize an :class:`Artifact` into the container layout above."""
    header = {
        "compiler": artifact.compiler,
        "format": artifact.format,
        "meta": artifact.meta,
        "blobs": [[name, len(data)] for name, data in artifact.blobs.items()],
    }
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return b"".join([ARTIFACT_MAGIC, _LENGTH.pack(len(encoded)), encoded, *artifact.blobs.values()])


def unpack_artifact(blob: bytes | memoryview) -> Artifact:
    """Parse the container. :raises ArtifactError: malformed or truncated bytes."""
    view = memoryview(blob)
    if len(view) < 8 or bytes(view[:4]) != ARTIFACT_MAGIC:
        raise ArtifactError("not an aotcache compiler artifact (bad magic)")
    (header_length,) = _LENGTH.unpack_from(view, 4)
    try:
        header = json.loads(bytes(view[8:8 + header_length]))
        names_lengths = [(str(name), int(length)) for name, length in header["blobs"]]
        compiler, fmt, meta = str(header["compiler"]), int(header["format"]), dict(header["meta"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"artifact header is malformed: {exc}") from exc
    offset = 8 + header_length
    blobs: dict[str, bytes] = {}
    for name, length in names_lengths:
        if offset + length > len(view):
            raise ArtifactError(f"artifact is truncated in blob {name!r}")
        blobs[name] = bytes(view[offset:offset + length])
        offset += length
    if offset != len(view):
        raise ArtifactError("artifact has trailing bytes")
    return Artifact(compiler, meta, blobs, fmt)


# name -> (module, compiler attribute, loader attribute). Static on purpose: a stored artifact can only
# name one of these, never an arbitrary import path.
_COMPILERS: dict[str, tuple[str, str, str]] = {
    "nop": ("aotcache.compilers.nop", "nop_compiler", "load"),
    "inductor": ("aotcache.compilers.inductor", "inductor_compiler", "load"),
    "aoti": ("aotcache.compilers.aoti", "aoti_compiler", "load"),
}
COMPILER_NAMES = tuple(_COMPILERS)


def get_compiler(name: str) -> Compiler:
    """The compiler called ``name`` (nop, inductor, aoti). :raises ValueError: unknown name."""
    try:
        module, attr, _ = _COMPILERS[name]
    except KeyError:
        raise ValueError(f"unknown compiler {name!r}; choose one of {', '.join(COMPILER_NAMES)}") from None
    return getattr(importlib.import_module(module), attr)


def load_artifact(blob: bytes | memoryview) -> CompiledGraph:
    """Rebuild a CompiledGraph from :meth:`CompiledGraph.artifact` bytes.

    :raises ArtifactError: malformed bytes, unknown compiler, or the compiler's loader refused them.
    """
    artifact = unpack_artifact(blob)
    try:
        module, _, loader = _COMPILERS[artifact.compiler]
    except KeyError:
        raise ArtifactError(f"artifact names unknown compiler {artifact.compiler!r}") from None
    return getattr(importlib.import_module(module), loader)(artifact)

