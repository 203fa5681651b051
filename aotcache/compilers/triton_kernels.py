"""Triton kernels in ``inductor`` artifacts: collected at compile time, written back to Triton's cache at load.

NOTE [inductor artifacts carry Triton kernels]
Inductor's wrapper for a GPU graph defines each Triton kernel by its source (``async_compile.triton(name,
source)``); loading the wrapper compiles every kernel through Triton, whose cache (``TRITON_CACHE_DIR``, by
default ``<TORCHINDUCTOR_CACHE_DIR>/triton/<device>``) holds per kernel a directory ``<hash>/`` with the binary
(``.cubin`` / ``.hsaco``), its launch metadata (``.json``) and intermediate IRs. On a new machine that cache is
empty and every kernel is compiled again. So the inductor compiler records the kernels it compiled with
torch's own ``TritonBundler`` (switched on for the compile with ``bundle_triton_into_fx_graph_cache``) and
stores each file as a blob with its sha256; ``load`` checks them and writes them back with
``TritonBundler.read_and_emit`` (which puts each directory in place atomically, leaves an existing one alone,
and restores the absolute paths in the ``.json`` metadata) before the wrapper is imported, and imports it with
``compile_threads=1``: the kernels are then Triton cache hits in this process, with no compile worker pool.

Not carried: autotuning results. A kernel with several configs is benchmarked at its first call (on the GPU,
milliseconds per kernel); its binaries for every config are carried, so nothing is compiled. Where this torch
has no ``TritonBundler`` nothing is collected and loading compiles the kernels as before (logged once).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from aotcache.compilers.base import ArtifactError
from aotcache.logs import log_once

__all__ = ["TRITON_PREFIX", "TritonKernels", "collecting", "from_compiled", "to_artifact", "from_artifact",
           "restore"]

TRITON_PREFIX = "triton:"  # blob name: "triton:<kernel hash>/<file name>"


@dataclass
class TritonKernels:
    """Triton kernel cache directories: ``(kernel hash, device index, {file name: bytes})`` each."""

    kernels: list[tuple[str, int, dict[str, bytes]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.kernels)


def _bundler() -> Any | None:
    try:
        from torch._inductor.triton_bundler import TritonBundler
    except ImportError:
        log_once(logging.INFO, "triton-bundler-missing", "aotcache: this torch has no TritonBundler; inductor "
                                                         "artifacts do not carry Triton kernels")
        return None
    return TritonBundler


def _inductor_bundles_itself() -> bool:
    """True when ``compile_fx_inner`` opens a bundle of its own: under ``bundled_autograd_cache`` (torch's
    precompile flow) or with Inductor's FX graph cache on (a user's ``fx_graph_cache=True``). A second
    ``begin_compile`` would fail its assertion, so we collect nothing then and take the kernels Inductor
    bundled into the compiled graph (:func:`from_compiled`)."""
    try:
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config
    except ImportError:
        return False
    if getattr(functorch_config, "bundled_autograd_cache", False):
        return True
    fx_cache = getattr(inductor_config, "fx_graph_cache", False) or getattr(inductor_config,
                                                                            "fx_graph_remote_cache", False)
    return bool(fx_cache) and not getattr(inductor_config, "force_disable_caches", False)


def _add_bundle(result: TritonKernels, bundle: Any) -> None:
    """Append the kernel directories of a ``TritonBundle`` (``kernel_artifacts``) to ``result``."""
    for kernel in getattr(bundle, "kernel_artifacts", None) or ():
        result.kernels.append((str(kernel.kernel_hash), int(kernel.device),
                               {str(item.filename): bytes(item.payload) for item in kernel.artifacts}))


def from_compiled(compiled: Any) -> TritonKernels:
    """The kernels Inductor bundled itself into a compiled graph (``_triton_bundle``, set when its FX graph
    cache or ``bundled_autograd_cache`` is on, also on an FX-cache hit); empty when it did not."""
    result = TritonKernels()
    _add_bundle(result, getattr(compiled, "_triton_bundle", None))
    return result


def _keep_every_config(bundler: Any) -> None:
    """NOTE [every autotuning config is carried]: from torch 2.13 ``collect`` keeps only the kernels marked as
    autotuning winners (``_winners``) whenever any kernel was, dropping every other kernel of the graph too; a
    kernel benchmarked during the compile (``benchmark_fusion``, ...) would thus leave the rest to be compiled
    at load. The wrapper autotunes at its first call and needs every config's binary, so the marks are
    dropped: ``collect`` then keeps everything, as torch 2.11 and 2.12 do."""
    winners = getattr(bundler, "_winners", None)
    if winners:
        winners.clear()


@contextlib.contextmanager
def collecting(enabled: bool = True) -> Iterator[TritonKernels]:
    """Record the Triton kernels compiled inside the block into the yielded :class:`TritonKernels`.

    A no-op (empty result) when ``enabled`` is false, torch has no ``TritonBundler``, or a bundle is already
    being collected or will be by Inductor itself (``bundled_autograd_cache``).
    """
    result = TritonKernels()
    bundler = _bundler() if enabled else None
    if bundler is None or getattr(bundler, "_entries", None) is not None or _inductor_bundles_itself():
        yield result
        return
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"bundle_triton_into_fx_graph_cache": True}):
        bundler.begin_compile()
        try:
            yield result
            _keep_every_config(bundler)
            bundle, _ = bundler.collect()
            _add_bundle(result, bundle)
        finally:
            bundler.end_compile()


def _check_name(kernel_hash: str, filename: str) -> None:
    for part in (kernel_hash, filename):
        if not part or part != PurePosixPath(part).name or part.startswith(".") or "\\" in part:
            raise ArtifactError(f"inductor artifact names an unsafe Triton kernel file {kernel_hash!r}/{filename!r}")


def to_artifact(kernels: TritonKernels) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """``(meta, blobs)``: per kernel its hash, device and file digests; one blob per file."""
    meta: list[dict[str, Any]] = []
    blobs: dict[str, bytes] = {}
    for kernel_hash, device, files in kernels.kernels:
        meta.append({"hash": kernel_hash, "device": device,
                     "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}})
        for name, data in sorted(files.items()):
            blobs[f"{TRITON_PREFIX}{kernel_hash}/{name}"] = data
    return meta, blobs


def from_artifact(meta: Any, blobs: dict[str, bytes]) -> TritonKernels:
    """The kernels recorded by :func:`to_artifact`, every file checked against its sha256.

    :raises ArtifactError: malformed record, unsafe names, a file missing or not matching its digest.
    """
    if meta is None:
        return TritonKernels()
    kernels = TritonKernels()
    for record in meta if isinstance(meta, list) else [None]:
        try:
            kernel_hash, device, digests = str(record["hash"]), int(record["device"]), dict(record["files"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"inductor artifact has a malformed Triton kernel record: {exc!r}") from exc
        files = {}
        for name, digest in digests.items():
            _check_name(kernel_hash, name)
            data = blobs.get(f"{TRITON_PREFIX}{kernel_hash}/{name}")
            if data is None:
                raise ArtifactError(f"inductor artifact is missing Triton kernel file {kernel_hash}/{name}")
            if hashlib.sha256(data).hexdigest() != digest:
                raise ArtifactError(f"Triton kernel file {kernel_hash}/{name} does not match its sha256")
            files[name] = data
        kernels.kernels.append((kernel_hash, device, files))
    return kernels


def restore(kernels: TritonKernels) -> int:
    """Write ``kernels`` into Triton's cache (directories already there are kept); the number of kernels.

    :raises ArtifactError: this torch has no ``TritonBundler`` to write them with.
    """
    if not kernels:
        return 0
    bundler = _bundler()
    if bundler is None:
        raise ArtifactError("inductor artifact carries Triton kernels but this torch has no TritonBundler")
    from torch._inductor import config as inductor_config
    from torch._inductor.triton_bundler import TritonBundle, TritonKernelArtifact, TritonKernelArtifacts

    bundle = TritonBundle([TritonKernelArtifacts(kernel_hash, device, [TritonKernelArtifact(name, data)
                                                                        for name, data in sorted(files.items())])
                           for kernel_hash, device, files in kernels.kernels], [])
    with inductor_config.patch({"bundle_triton_into_fx_graph_cache": True, "force_disable_caches": False}):
        bundler.read_and_emit(bundle)
    return len(kernels.kernels)
