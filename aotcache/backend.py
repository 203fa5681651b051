"""``torch.compile(model, backend="aotcache")``: Dynamo's graphs through aotcache's AOT Autograd and cache.

Registered as the ``aotcache`` entry point of ``torch_dynamo_backends`` (pyproject.toml), so it works by name
once the package is installed. Options come as keyword arguments (``functools.partial``), or through
``torch.compile(..., options={...})`` with the same names::

    torch.compile(model, backend="aotcache", options={"compiler": "nop", "partition": "min_cut"})

NOTE [default compiler]
``compiler=None`` means ``"inductor"`` when a C++ compiler is on PATH (Inductor needs one to build CPU
kernels, and to load them again), else ``"nop"`` (the graphs run as Python): a default that always works.
Pass ``compiler="aoti"`` for artifacts that load without Inductor or a compiler on the target machine.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from aotcache.aot.dynamo_progress import marks_region_calls
from aotcache.aot.partition import PARTITIONER_NAMES as PARTITIONERS
from aotcache.logs import logger

__all__ = ["aotcache_backend", "default_compiler_name", "PARTITIONERS"]
_OPTION_NAMES = ("compiler", "dynamic", "cache", "partition", "compiler_options")


@functools.lru_cache(maxsize=1)
def _cxx_available() -> bool:
    # NOTE: memo of one PATH probe per process (documented module state, see the module NOTE).
    return any(shutil.which(name) for name in (os.environ.get("CXX") or "g++", "c++", "clang++"))


def default_compiler_name() -> str:
    """The backend's default compiler here: ``"inductor"`` with a C++ compiler on PATH, else ``"nop"``."""
    if _cxx_available():
        return "inductor"
    logger.info("aotcache backend: no C++ compiler on PATH; compiling with the nop compiler")
    return "nop"


def _partition_fn(partition: str | Callable) -> Callable:
    from aotcache.aot.partition import resolve_partition

    return resolve_partition(partition, "backend") if partition is not None else resolve_partition("default")


@marks_region_calls  # NOTE [Dynamo failures after part of the call ran]
def aotcache_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, compiler: str | Callable | None = None,
                     dynamic: bool | None = None, cache: Any = True, partition: str | Callable = "default",
                     compiler_options: Mapping[str, Any] | None = None, mode: str | None = None,
                     options: Mapping[str, Any] | None = None) -> Callable:
    """Compile Dynamo's ``gm`` for ``example_inputs`` with aotcache; returns the function Dynamo calls.

    ``compiler``: "inductor", "aoti", "nop" or a compiler callable (default: NOTE [default compiler]);
    ``partition``: "default" or "min_cut"; ``cache``: True / False / an ``AOTAutogradCache``;
    ``compiler_options``: passed to a named compiler (e.g. Inductor config overrides); ``mode``: torch.compile's
    ``mode=``, as Inductor settings under the compiler options (NOTE [torch.compile modes]); ``options``: the
    same settings as a dict (``torch.compile(..., options=...)``).

    :raises ValueError: an unknown option, compiler, mode or partition name.
    """
    settings: dict[str, Any] = {"compiler": compiler, "dynamic": dynamic, "cache": cache, "partition": partition,
                                "compiler_options": compiler_options}
    if options:
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise ValueError(f"aotcache backend: unknown options {unknown}; known: {', '.join(_OPTION_NAMES)}")
        settings.update(options)
    chosen = settings["compiler"] if settings["compiler"] is not None else default_compiler_name()
    if isinstance(chosen, str):
        from aotcache.compilers.base import COMPILER_NAMES

        if chosen not in COMPILER_NAMES:
            raise ValueError(f"aotcache backend: unknown compiler {chosen!r}; use one of {', '.join(COMPILER_NAMES)}")
    from aotcache.aot.aliased_writes import drop_dynamo_data_self_assignments
    from aotcache.aot.container_inputs import flatten_container_inputs, with_flat_inputs
    from aotcache.aot.errors import CaptureError
    from aotcache.aot.signed_zero_guards import guard_signed_zeros, retrace_baked_zero_floats
    from aotcache.api import aot_module_simplified
    from aotcache.compilers.base import options_with_mode

    compiler_options = options_with_mode(chosen, mode, settings["compiler_options"], "aotcache backend")
    retrace_baked_zero_floats()  # NOTE [Zero floats Dynamo baked in]
    drop_dynamo_data_self_assignments(gm)  # NOTE [A tensor's .data set to itself]
    try:
        flat = flatten_container_inputs(gm, example_inputs)  # NOTE [Container inputs of a Dynamo graph]
        compiled = aot_module_simplified(flat.gm if flat else gm, flat.example_inputs if flat else example_inputs,
                                         fw_compiler=chosen, partition_fn=_partition_fn(settings["partition"]),
                                         dynamic=bool(settings["dynamic"]), cache=settings["cache"],
                                         compiler_options=compiler_options, on_capture_error="raise")
        return with_flat_inputs(flat, compiled) if flat else compiled
    except CaptureError as exc:  # NOTE [Dynamo graphs aotcache cannot capture] in aot/fallback.py
        from aotcache.aot.fallback import eager_dynamo_graph

        return eager_dynamo_graph(gm, exc)
    except Exception as exc:
        from aotcache.aot.fallback import eager_dynamo_graph_after_trace_failure

        return eager_dynamo_graph_after_trace_failure(gm, exc)
    finally:
        guard_signed_zeros()  # NOTE [Signed zeros in Dynamo's guards]: after the floats specialized in the compile
