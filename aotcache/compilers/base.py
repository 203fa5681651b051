"""The compiler contract and the artifact container shared by every compiler.

A compiler is ``compiler(gm, example_inputs) -> CompiledGraph``. A CompiledGraph is called with the flat
graph inputs and returns the flat outputs; ``artifact()`` gives bytes that ``load_artifact`` turns back
into an equivalent CompiledGraph in another process, with no compiler toolchain needed. Optional attributes
the AOT runtime reads: ``grad_mode_independent`` (True: its results do not depend on grad mode, NOTE
[Forward under grad mode] in ``aotcache.aot.runtime``) and ``output_strides`` (NOTE [saved activations take
the compiler's layout] in ``aotcache.aot.layouts``) and ``eager_random_draws`` (the generators it draws from,
``None`` standing for the default ones, where it draws exactly as the graph's ATen ops run in order would: NOTE
[Double backward through random ops] in ``aotcache.aot.double_backward``). Compilers written for PyTorch's AOT
Autograd may instead return a *boxed* callable (``_boxed_call = True``, called with one list);
``aotcache.aot.boxed_compilers.unboxed`` adapts it.

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
import logging
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
    "COMPILE_MODES",
    "options_with_mode",
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

# NOTE [torch.compile modes]
# ``mode=`` of torch.compile names a set of Inductor settings. aotcache.compile and the backend accept the same
# names so code ported from torch.compile runs unchanged; for the Inductor-based compilers (inductor, aoti)
# they become config overrides (the options the user passes win), part of the key like any other option.
# aotcache does not capture CUDA graphs, so the cudagraphs part of "reduce-overhead" and "max-autotune" is
# left out (logged once): the graphs run without them, with the same results. Written out here rather than
# read from ``torch._inductor.list_mode_options``, whose import costs over a second on every warm start.
_MODE_OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "reduce-overhead": {},
    "max-autotune-no-cudagraphs": {"max_autotune": True, "coordinate_descent_tuning": True},
    "max-autotune": {"max_autotune": True, "coordinate_descent_tuning": True},
}
_MODES_WITH_CUDA_GRAPHS = ("reduce-overhead", "max-autotune")
COMPILE_MODES = tuple(_MODE_OPTIONS)


def options_with_mode(compiler: Any, mode: str | None, options: Any, api: str) -> dict[str, Any] | None:
    """The options a named ``compiler`` gets for torch.compile's ``mode`` plus the user's ``options`` (which
    win); None when there are none (NOTE [torch.compile modes]).

    :raises ValueError: an unknown mode (the message lists the accepted ones).
    """
    if mode is None:
        return dict(options) if options else None
    if mode not in _MODE_OPTIONS:
        raise ValueError(f"{api}: unknown mode {mode!r}; use one of {', '.join(COMPILE_MODES)} or None")
    from aotcache.logs import log_once

    if mode in _MODES_WITH_CUDA_GRAPHS:
        log_once(logging.INFO, f"mode:cudagraphs:{mode}", "%s: mode=%r: aotcache does not capture CUDA graphs; "
                 "its Inductor settings apply, the graphs run without CUDA graphs (same results)", api, mode)
    if compiler not in ("inductor", "aoti"):
        log_once(logging.INFO, f"mode:compiler:{compiler!r}", "%s: mode=%r sets Inductor options; the %s "
                 "compiler takes none, so it changes nothing", api, mode, compiler)
        return dict(options) if options else None
    merged = {**_MODE_OPTIONS[mode], **(options or {})}
    return merged or None


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

