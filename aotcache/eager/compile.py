"""Precompile one op overload for one call signature with AOTInductor, and persist it in the op's index.

The kernel is the op applied to the call's tensors (its graph inputs, tensor lists flattened, in schema
order) with every non-tensor argument (scalars, strings, dtypes, ...) baked in as a constant; the entry's
``meta_info`` records all of them, and a later call runs the kernel only when every one of them matches.
This module is the cold path: it imports ``torch._inductor`` (through ``aoti_lib.compile_library``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import torch
import torch.fx

from aotcache import config
from aotcache.compilers import aoti_lib
from aotcache.eager.counters import STATS, compiling
from aotcache.eager.index import KernelEntry, OpIndex
from aotcache.eager.meta import (
    binder_for,
    check_op_supported,
    current_default_dtype,
    extract_call_metadata,
    flat_tensor_inputs,
    op_file_name,
)
from aotcache.eager.versions import build_versions
from aotcache.logs import logger
from aotcache.torch_modes import torch_modes_kept

__all__ = ["EagerCompileError", "PrecompileResult", "SUPPORTED_DEVICES", "precompile", "precompile_bound",
           "build_op_graph", "check_device"]

#: Devices the per-op kernel cache can load kernels for (the AOTI CPU runner; see docs/eager.md).
SUPPORTED_DEVICES = ("cpu",)

DYNAMIC_REFUSAL = (
    "dynamic=True is not supported by the per-op kernel cache: a dynamic kernel would need its shape guards "
    "evaluated on every eager call, which costs more than a single op's kernel saves, and a wrong guard "
    "silently gives wrong results. Precompile each static signature you need instead (see docs/eager.md)")


class EagerCompileError(RuntimeError):
    """AOTInductor failed to compile an op for a signature (the cause is chained)."""


@dataclass(frozen=True)
class PrecompileResult:
    """What :func:`precompile` did: ``status`` is ``"compiled"`` or ``"exists"`` (already in the index)."""

    status: str
    entry: KernelEntry
    library_path: Path
    seconds: float


def check_device(device: str | torch.device) -> str:
    """The device type string, if the cache supports it.

    :raises ValueError: a device other than those in :data:`SUPPORTED_DEVICES`.
    """
    device_type = torch.device(device).type
    if device_type not in SUPPORTED_DEVICES:
        raise ValueError(f"the per-op kernel cache supports devices {list(SUPPORTED_DEVICES)}, not {device!r}: "
                         "its kernels are loaded with the AOTInductor CPU runner")
    return device_type


def _output_count(op: torch._ops.OpOverload, result: Any) -> int:
    returns = op._schema.returns
    if len(returns) == 1 and str(returns[0].type) == "Tensor":
        return 1
    return len(result)


def build_op_graph(op: torch._ops.OpOverload, values: Sequence[Any], num_outputs: int) -> torch.fx.GraphModule:
    """An FX graph calling ``op`` once: tensor arguments are placeholders, the rest constants; flat outputs."""
    graph = torch.fx.Graph()
    counter = iter(range(1 << 30))

    def placeholder() -> torch.fx.Node:
        return graph.placeholder(f"arg{next(counter)}")

    graph_values: list[Any] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            graph_values.append(placeholder())
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            graph_values.append([placeholder() for _ in value])
        else:
            graph_values.append(list(value) if isinstance(value, tuple) else value)
    args, kwargs = binder_for(op).split(graph_values)
    call = graph.call_function(op, tuple(args), kwargs)
    returns = op._schema.returns
    if len(returns) == 1 and str(returns[0].type) == "Tensor":
        outputs = (call,)
    else:
        import operator

        outputs = tuple(graph.call_function(operator.getitem, (call, index)) for index in range(num_outputs))
    graph.output(outputs)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _check_tensors_on(values: Sequence[Any], device_type: str, op_name: str) -> None:
    for tensor in flat_tensor_inputs(values):
        if tensor.device.type != device_type:
            raise ValueError(f"precompile of {op_name} for device {device_type!r} got a tensor on "
                             f"{tensor.device}; move the example tensors to {device_type!r}")


def precompile_bound(op: torch._ops.OpOverload, values: Sequence[Any], *, device: str = "cpu",
                     cache_dir: Path | str | None = None) -> PrecompileResult:
    """:func:`precompile` for a call already bound to the op's schema (``OpBinder.bind``); same errors."""
    device_type = check_device(device)
    op = check_op_supported(op)
    meta_info = extract_call_metadata(op, values, dynamic=False, device_type=device_type)
    default_dtype = current_default_dtype()  # baked into the kernel: NOTE [Default dtype of a kernel]
    _check_tensors_on(values, device_type, op.name())
    index = OpIndex(op.namespace, op_file_name(op), device_type, cache_dir=cache_dir)
    started = time.perf_counter()
    # Example inputs: detached (the kernel runs below autograd), same sizes / strides / storage offset.
    example_values = [value.detach() if isinstance(value, torch.Tensor)
                      else [item.detach() for item in value]
                      if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor)
                      else value for value in values]
    with compiling():
        versions = build_versions(device_type)
        # The entry's digest does not depend on the output count: compute it from a placeholder first.
        probe = index.new_entry(meta_info, versions, num_outputs=0, default_dtype=default_dtype)
        index.device_dir.mkdir(parents=True, exist_ok=True)
        index.lib_dir.mkdir(parents=True, exist_ok=True)
        # NOTE [single-flight compile]: processes compiling the same signature serialize on a per-digest lock;
        # the second finds the entry in the index and skips its compile.
        compile_lock = filelock.FileLock(str(index.lib_dir / f"{probe.digest}.compile.lock"),
                                         timeout=config.get("lock_timeout"))
        try:
            compile_lock.acquire()
            locked = True
        except filelock.Timeout:
            logger.warning("aotcache: waited %ss for another process compiling %s; compiling here too",
                           config.get("lock_timeout"), op.name())
            locked = False
        try:
            for existing in index.read().entries:
                if existing.digest == probe.digest and index.library_path(existing).is_file():
                    return PrecompileResult("exists", existing, index.library_path(existing),
                                            time.perf_counter() - started)
            args, kwargs = binder_for(op).split(example_values)
            with torch.no_grad():
                eager_result = op(*args, **kwargs)
            num_outputs = _output_count(op, eager_result)
            graph_module = build_op_graph(op, example_values, num_outputs)
            try:
                # NOTE [Modes left by an interrupted capture]: Inductor's export and fake tensors, interrupted
                # (Ctrl-C, pytest-timeout), leave no mode on this thread; the index is written only after.
                with torch_modes_kept():
                    library = aoti_lib.compile_library(graph_module, flat_tensor_inputs(example_values))
            except Exception as exc:  # Inductor / the C++ toolchain can fail in many ways; all are "compile failed"
                STATS.add(compile_errors=1)
                raise EagerCompileError(f"AOTInductor could not compile {op.name()} for this signature: "
                                        f"{type(exc).__name__}: {exc}") from exc
            entry = index.new_entry(meta_info, versions, num_outputs, default_dtype=default_dtype)
            index.add(entry, library)
            STATS.add(compiles=1)
        finally:
            if locked:
                compile_lock.release()
    seconds = time.perf_counter() - started
    logger.info("aotcache: precompiled %s (%s) in %.1fs -> %s", op.name(), entry.digest, seconds,
                index.library_path(entry))
    return PrecompileResult("compiled", entry, index.library_path(entry), seconds)


def precompile(op: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any] | None = None, *,
               device: str | torch.device = "cpu", dynamic: bool = False,
               cache_dir: Path | str | None = None) -> PrecompileResult:
    """Compile ``op(*args, **kwargs)``'s signature with AOTInductor and persist it in the op's index.

    :raises TypeError: ``op`` is not an OpOverload, or the arguments do not bind to its schema.
    :raises UnsupportedOperatorError: the op aliases / mutates inputs, is random, or returns non-tensors.
    :raises UnsupportedArgumentError: an argument of a type the cache cannot describe (named in the message).
    :raises NotImplementedError: ``dynamic=True`` (see :data:`DYNAMIC_REFUSAL`).
    :raises ValueError: an unsupported device, or tensors on another device.
    :raises EagerCompileError: AOTInductor failed (counted in ``stats()["compile_errors"]``).
    """
    if dynamic:
        raise NotImplementedError(DYNAMIC_REFUSAL)
    op = check_op_supported(op)
    values = binder_for(op).bind(tuple(args), kwargs)
    return precompile_bound(op, values, device=device, cache_dir=cache_dir)
