"""Dispatch eager op calls to precompiled kernels: ``enable`` / ``enabled`` / ``disable`` / ``stats``.

``enable(ops)`` registers, for each op overload, a Python kernel at the CPU dispatch key (one
``torch.library.Library(ns, "IMPL")`` per op, so that each can be removed alone). The kernel binds the call
to the op's schema, looks its signature up among the op's loaded entries, and runs the matching AOTInductor
library through ``torch._C._aoti``; anything else (no entry, an unsupported argument, a broken library, an
error while running) goes to the stock kernel captured before the override was installed. ``disable()``
destroys the libraries, which restores the stock kernels in the dispatcher.

NOTE [warm path imports]: this module never imports ``torch._inductor``; only compile-on-miss does (through
``aotcache.eager.compile``, imported when the first miss compiles). A process that only loads precompiled
kernels pays torch's import and a dlopen per kernel, nothing more.

NOTE [why the CPU key]: the override sits below autograd: the op's own autograd kernel records the graph and
calls down to us, so gradients keep working, and what a kernel computes does not depend on requires_grad.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import torch

from aotcache import config
from aotcache.eager.counters import STATS, compiling, in_compile
from aotcache.eager.index import IndexCorruptError, IndexStatus, KernelEntry, OpIndex, iter_op_indexes
from aotcache.eager.meta import (
    OpBinder,
    UnsupportedArgumentError,
    binder_for,
    check_op_supported,
    decode_dtype,
    decode_meta_info,
    flat_tensor_inputs,
    op_file_name,
    signature_of_meta,
    signature_of_values,
)
from aotcache.eager.versions import incompatibility
from aotcache.logs import CacheFault, handle_fault, log_once

__all__ = ["enable", "enabled", "disable", "stats", "reset_stats", "enabled_ops", "precompile", "resolve_op",
           "load_runner"]

DISPATCH_KEY = "CPU"
_OVERRIDE_WARNING = r"(?s).*Overriding a previously registered kernel"


def resolve_op(spec: Any) -> torch._ops.OpOverload:
    """An OpOverload from itself or a name: ``"aten::add.Tensor"``, ``"aten.add.Tensor"``, ``"aten::mm"``.

    :raises ValueError: the name does not name an existing op overload.
    """
    if isinstance(spec, torch._ops.OpOverload):
        return spec
    if isinstance(spec, torch._ops.OpOverloadPacket):
        return check_op_supported(spec)  # raises: names the overloads to choose from
    if not isinstance(spec, str):
        raise TypeError(f"expected an op overload or its name (e.g. 'aten::add.Tensor'), got {spec!r}")
    text = spec.strip()
    namespace, sep, rest = text.partition("::")
    if not sep:
        namespace, _, rest = text.partition(".")
    name, _, overload = rest.partition(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        raise ValueError(f"{spec!r} does not name an op overload; write it as 'namespace::name.overload', e.g. "
                         "'aten::add.Tensor' or 'aten::mm' (default overload)") from None


def load_runner(library_path: Path) -> Any:
    """dlopen one kernel library with the AOTI CPU runner (``runner.run(list[Tensor]) -> list[Tensor]``).

    NOTE [loading by path]: ``aoti_lib.load_library`` takes the library's bytes and writes a content-addressed
    copy; our libraries already live in the cache as files, so they are opened in place.

    :raises RuntimeError: the runner could not load the library (not a library, missing symbols, ...).
    """
    return torch._C._aoti.AOTIModelContainerRunnerCpu(str(library_path), 1)


def _original_kernel(op: torch._ops.OpOverload) -> Any:
    getter = getattr(torch._C, "_dispatch_get_computed_kernel_for_dispatch_key", None)
    if getter is None:
        raise RuntimeError(f"torch {torch.__version__} cannot hand out the stock {DISPATCH_KEY} kernel of an op "
                           "(torch._C._dispatch_get_computed_kernel_for_dispatch_key); eager dispatch needs a "
                           "newer torch")
    return getter(op.name(), torch._C.DispatchKey.CPU)


_MAX_PRECISION = {0: torch.bool, 1: torch.int64, 2: torch.float64, 3: torch.complex128}


def _number_category(value: Any) -> int:
    return 0 if isinstance(value, bool) else 1 if isinstance(value, int) else 2 if isinstance(value, float) else 3


def _dtype_category(dtype: torch.dtype) -> int:
    return 3 if dtype.is_complex else 2 if dtype.is_floating_point else 0 if dtype == torch.bool else 1


def _number_as_tensor(number: Any, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim tensor that the stock kernel treats like the wrapped number C++ passed for ``number``.

    NOTE [wrapped numbers]: C++ callers (``isclose`` calling ``add``, ...) pass Python-like numbers as
    "wrapped number" tensors; the dispatcher hands them to a Python kernel as Python numbers, and there is
    no Python API to make a wrapped number again for the stock kernel. A wrapped number never decides the
    result dtype against a dimensioned tensor of its category or above, and otherwise acts as the default
    dtype of its category; a 0-dim tensor does the same when it has, respectively, the widest dtype of its
    category (so no precision is lost before the kernel casts it) or the dtype ``torch.result_type`` gives.
    """
    category = _number_category(number)
    if any(tensor.dim() > 0 and _dtype_category(tensor.dtype) >= category for tensor in tensors):
        dtype = _MAX_PRECISION[category]
    elif tensors:
        dtype = torch.result_type(tensors[0], number)
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype) if tensor.dim() == 0 else dtype
    else:
        dtype = torch.get_default_dtype() if category == 2 else _MAX_PRECISION[category]
    return torch.tensor(number, dtype=dtype)


@dataclass
class _Kernel:
    """A usable entry of an op table; its library is opened on first use."""

    entry: KernelEntry
    library_path: Path
    runner: Any = None


@dataclass
class _OpTable:
    """Everything the override of one op needs: schema binder, stock kernel, loaded entries by signature."""

    op: torch._ops.OpOverload
    binder: OpBinder
    stock: Any
    index: OpIndex
    kernels: dict[tuple, _Kernel] = field(default_factory=dict)
    failed_signatures: set[tuple] = field(default_factory=set)  # compile on miss failed: do not retry
    library: Any = None  # the torch.library.Library holding the override
    lock: threading.Lock = field(default_factory=threading.Lock)
    tensor_positions: tuple[int, ...] = ()  # schema positions typed Tensor / Tensor?

    def __post_init__(self) -> None:
        self.tensor_positions = tuple(position for position, arg in enumerate(self.op._schema.arguments)
                                      if str(arg.type) in ("Tensor", "Optional[Tensor]"))

    def call_stock(self, keyset: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the stock kernel, turning numbers that arrived in Tensor slots back into tensors."""
        if self.tensor_positions:
            arguments = self.binder.arguments
            numbers = [position for position in self.tensor_positions
                       if isinstance(args[position] if position < len(args)
                                     else kwargs.get(arguments[position].name), (bool, int, float, complex))]
            if numbers:
                args, kwargs = list(args), dict(kwargs)
                tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
                for position in numbers:
                    if position < len(args):
                        args[position] = _number_as_tensor(args[position], tensors)
                    else:
                        name = arguments[position].name
                        kwargs[name] = _number_as_tensor(kwargs[name], tensors)
        return self.stock.call_boxed(keyset, *args, **kwargs)

    @property
    def returns_one_tensor(self) -> bool:
        returns = self.op._schema.returns
        return len(returns) == 1 and str(returns[0].type) == "Tensor"

    @property
    def returns_list(self) -> bool:
        returns = self.op._schema.returns
        return len(returns) == 1 and str(returns[0].type) == "List[Tensor]"

    def add_entry(self, entry: KernelEntry) -> bool:
        """Make ``entry`` usable if it loads here; count and log why not otherwise. True if added."""
        if any(meta.get("is_dynamic") for meta in entry.meta_info if isinstance(meta, dict)):
            STATS.add(load_errors=1)
            log_once(logging.WARNING, f"eager-dynamic:{entry.digest}",
                     "aotcache: skipping dynamic-shape entry %s of %s (not supported; see docs/eager.md)",
                     entry.digest, self.op.name())
            return False
        reason = incompatibility(entry.versions, self.index.device)
        if reason is not None:
            STATS.add(load_errors=1, stale_entries=1)
            # Not a fault of this cache: a shared cache legitimately holds entries of other torch builds / CPUs.
            log_once(logging.WARNING, f"eager-stale:{entry.digest}",
                     "aotcache: skipping kernel %s of %s: %s", entry.digest, self.op.name(), reason)
            return False
        library_path = self.index.library_path(entry)
        if not library_path.is_file():
            STATS.add(load_errors=1)
            handle_fault(f"eager-missing:{library_path}",
                         f"kernel library {library_path} of {self.op.name()} is missing (entry skipped; "
                         "`aotcache eager clear` or a new precompile repairs it)")
            return False
        try:
            if entry.default_dtype is None:  # written before entries recorded it (format 1)
                raise ValueError("the entry records no default dtype")
            default_dtype = decode_dtype(entry.default_dtype)
            signature = signature_of_meta(decode_meta_info(entry.meta_info), default_dtype)
        except (ValueError, TypeError) as exc:
            STATS.add(load_errors=1)
            handle_fault(f"eager-meta:{entry.digest}", f"unreadable metadata in entry {entry.digest} of "
                                                       f"{self.op.name()}", exc)
            return False
        with self.lock:
            self.kernels.setdefault(signature, _Kernel(entry, library_path))
        return True

    def load_index(self) -> None:
        """Read the op's index and add its usable entries (faults are counted and logged, never raised
        except in strict mode)."""
        try:
            snapshot = self.index.read()
        except (filelock.Timeout, OSError, IndexCorruptError) as exc:
            STATS.add(load_errors=1)
            handle_fault(f"eager-index:{self.index.index_path}",
                         f"cannot read the kernel index of {self.op.name()} ({self.index.index_path})", exc)
            return
        except CacheFault:
            STATS.add(load_errors=1, index_rebuilds=1)
            raise
        if snapshot.status is IndexStatus.REBUILT:
            STATS.add(load_errors=1, index_rebuilds=1)
        for entry in snapshot.entries:
            self.add_entry(entry)

    def runner_for(self, kernel: _Kernel) -> Any:
        """The kernel's runner, loading its library on first use; None (counted, logged) if it cannot load."""
        runner = kernel.runner
        if runner is not None:
            return runner
        try:
            runner = load_runner(kernel.library_path)
        except RuntimeError as exc:
            STATS.add(load_errors=1)
            self.drop(kernel)
            handle_fault(f"eager-load:{kernel.library_path}",
                         f"cannot load kernel library {kernel.library_path} of {self.op.name()}", exc)
            return None
        STATS.add(kernels_loaded=1)
        kernel.runner = runner
        return runner

    def drop(self, kernel: _Kernel) -> None:
        with self.lock:
            for signature, candidate in list(self.kernels.items()):
                if candidate is kernel:
                    del self.kernels[signature]

    def pack(self, outputs: list[torch.Tensor]) -> Any:
        if self.returns_one_tensor:
            return outputs[0]
        if self.returns_list:
            return list(outputs)
        return tuple(outputs)


class _Dispatcher:
    """The process's override state: one table (and one torch.library.Library) per enabled op.

    NOTE [module state]: the dispatcher's registrations are process-global by nature, so is this object
    (``_DISPATCHER``); every mutation holds ``_lock``.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._compile_lock = threading.Lock()
        self.tables: dict[str, _OpTable] = {}
        self.compile_on_miss = False
        self.cache_dir: Path | None = None

    # -- registration --------------------------------------------------------------------------------

    def enable(self, ops: Iterable[Any], *, compile_on_miss: bool, cache_dir: Path, preload: bool
               ) -> list[str]:
        resolved = [check_op_supported(resolve_op(spec)) for spec in ops]
        added = []
        with self._lock:
            self.compile_on_miss = compile_on_miss
            self.cache_dir = cache_dir
            for op in resolved:
                if op.name() in self.tables:
                    continue
                table = _OpTable(op, binder_for(op), _original_kernel(op),
                                 OpIndex(op.namespace, op_file_name(op), "cpu", cache_dir=cache_dir))
                table.load_index()
                library = torch.library.Library(op.namespace, "IMPL")
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_OVERRIDE_WARNING)
                    library.impl(op, self._make_kernel(table), DISPATCH_KEY, with_keyset=True)
                table.library = library
                self.tables[op.name()] = table
                added.append(op.name())
                if preload:
                    for kernel in list(table.kernels.values()):
                        table.runner_for(kernel)
        return added

    def disable(self, names: Iterable[str] | None = None) -> None:
        with self._lock:
            for name in list(self.tables if names is None else names):
                table = self.tables.pop(name, None)
                if table is not None and table.library is not None:
                    table.library._destroy()
                    table.library = None
            if not self.tables:
                self.compile_on_miss = False

    def on_new_entry(self, op: torch._ops.OpOverload, entry: KernelEntry) -> None:
        table = self.tables.get(op.name())
        if table is not None:
            table.add_entry(entry)

    # -- the override --------------------------------------------------------------------------------

    def _make_kernel(self, table: _OpTable) -> Any:
        call_stock = table.call_stock
        kernels = table.kernels
        bind = table.binder.bind
        get_default_dtype = torch.get_default_dtype

        def precompiled_kernel(keyset: Any, *args: Any, **kwargs: Any) -> Any:
            if in_compile():
                STATS.add(fallbacks=1)
                return call_stock(keyset, args, kwargs)
            try:
                values = bind(args, kwargs)
                signature = signature_of_values(values, get_default_dtype())
            except (UnsupportedArgumentError, TypeError):
                STATS.add(unsupported_calls=1, fallbacks=1)
                return call_stock(keyset, args, kwargs)
            kernel = kernels.get(signature)
            if kernel is None:
                STATS.add(misses=1, fallbacks=1)
                if self.compile_on_miss and signature not in table.failed_signatures:
                    self._compile_on_miss(table, values, signature)
                return call_stock(keyset, args, kwargs)
            tensors = flat_tensor_inputs(values)
            # Conjugate / negative / zero-tensor views can reach a CPU kernel that resolves them itself;
            # a precompiled kernel reads raw memory, so those calls take the stock kernel.
            for tensor in tensors:
                if tensor.is_conj() or tensor.is_neg() or tensor._is_zerotensor():
                    STATS.add(unsupported_calls=1, fallbacks=1)
                    return call_stock(keyset, args, kwargs)
            runner = kernel.runner or table.runner_for(kernel)
            if runner is None:
                STATS.add(fallbacks=1)
                return call_stock(keyset, args, kwargs)
            try:
                outputs = runner.run(tensors)
            except RuntimeError as exc:
                STATS.add(run_errors=1, fallbacks=1)
                table.drop(kernel)
                handle_fault(f"eager-run:{kernel.entry.digest}",
                             f"precompiled kernel {kernel.library_path} of {table.op.name()} failed", exc)
                return call_stock(keyset, args, kwargs)
            if len(outputs) != kernel.entry.num_outputs:
                STATS.add(run_errors=1, fallbacks=1)
                table.drop(kernel)
                handle_fault(f"eager-run:{kernel.entry.digest}",
                             f"precompiled kernel {kernel.library_path} of {table.op.name()} returned "
                             f"{len(outputs)} outputs, its entry records {kernel.entry.num_outputs}")
                return call_stock(keyset, args, kwargs)
            STATS.add(hits=1)
            return table.pack(outputs)

        precompiled_kernel.__name__ = f"aotcache_precompiled_{op_file_name(table.op).replace('.', '_')}"
        return precompiled_kernel

    def _compile_on_miss(self, table: _OpTable, values: list[Any], signature: tuple) -> None:
        """Compile the missing signature now, on a helper thread (fresh dispatcher TLS), and wait for it.

        NOTE [compile on a fresh thread]: we are inside the dispatcher below autograd (autograd keys are
        excluded in this thread's TLS); Inductor must trace with a clean state, which a new thread has.
        The current call still takes the stock kernel; later calls hit.
        """
        from aotcache.eager import compile as eager_compile  # cold path: imports Inductor

        outcome: dict[str, Any] = {}

        def work() -> None:
            with compiling():
                try:
                    outcome["result"] = eager_compile.precompile_bound(table.op, values, device="cpu",
                                                                       cache_dir=self.cache_dir)
                except (eager_compile.EagerCompileError, NotImplementedError, ValueError, OSError,
                        filelock.Timeout) as exc:
                    outcome["error"] = exc

        with self._compile_lock:
            if signature in table.kernels or signature in table.failed_signatures:
                return
            worker = threading.Thread(target=work, name="aotcache-eager-compile", daemon=True)
            worker.start()
            worker.join()
        if "error" in outcome:
            table.failed_signatures.add(signature)
            log_once(logging.WARNING, f"eager-compile:{table.op.name()}:{signature!r}",
                     "aotcache: compile on miss failed for %s (this signature keeps the stock kernel): %s",
                     table.op.name(), outcome["error"])
            return
        if "result" in outcome:
            table.add_entry(outcome["result"].entry)
        else:  # the worker died with an unexpected error (printed by threading's excepthook): do not retry
            table.failed_signatures.add(signature)


_DISPATCHER = _Dispatcher()


def enable(ops: Iterable[Any] | Any | None = None, compile_on_miss: bool = False, *, preload: bool = False
           ) -> list[str]:
    """Route eager CPU calls of ``ops`` whose arguments match a precompiled entry to that kernel.

    ``ops``: op overloads or names (``"aten::add.Tensor"``); None = every op with an index in the cache.
    ``compile_on_miss``: compile a missing signature on first use (that call still runs the stock kernel).
    ``preload``: open every usable kernel library now instead of on first use. Returns the ops newly enabled.

    :raises ValueError / TypeError: an op that does not exist; UnsupportedOperatorError: one that cannot be
        precompiled (aliasing, mutation, random, no CPU kernel).
    """
    cache_dir = Path(config.get("cache_dir"))
    if ops is None:
        ops = sorted({f"{index.namespace}::{index.op_name}" for index in iter_op_indexes(cache_dir, device="cpu")
                      if index.index_path.exists()})
    elif isinstance(ops, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        ops = [ops]
    return _DISPATCHER.enable(ops, compile_on_miss=compile_on_miss, cache_dir=cache_dir, preload=preload)


def disable(ops: Iterable[Any] | None = None) -> None:
    """Restore the stock kernels of ``ops`` (all enabled ops when None)."""
    names = None if ops is None else [resolve_op(spec).name() for spec in
                                      ([ops] if isinstance(ops, (str, torch._ops.OpOverload)) else ops)]
    _DISPATCHER.disable(names)


@contextlib.contextmanager
def enabled(ops: Iterable[Any] | Any | None = None, compile_on_miss: bool = False, *, preload: bool = False
            ) -> Iterator[list[str]]:
    """``with aotcache.eager.enabled(ops): ...``: :func:`enable` for the block; restores what it changed."""
    previous_compile_on_miss = _DISPATCHER.compile_on_miss
    added = enable(ops, compile_on_miss, preload=preload)
    try:
        yield added
    finally:
        _DISPATCHER.disable(added)
        if _DISPATCHER.tables:
            _DISPATCHER.compile_on_miss = previous_compile_on_miss


def enabled_ops() -> list[str]:
    """Names of the ops currently routed to precompiled kernels."""
    return sorted(_DISPATCHER.tables)


def stats() -> dict[str, int]:
    """Counters: ``hits``, ``misses``, ``fallbacks``, ``load_errors``, ``compiles`` and finer ones."""
    return STATS.to_dict()


def reset_stats() -> None:
    """Zero the counters of :func:`stats`."""
    STATS.reset()


def precompile(op: Any, args: Any, kwargs: dict[str, Any] | None = None, *, device: str | torch.device = "cpu",
               dynamic: bool = False) -> Any:
    """Compile ``op(*args, **kwargs)``'s signature with AOTInductor and persist it (see
    :func:`aotcache.eager.compile.precompile` for errors); an enabled op uses the new kernel at once."""
    from aotcache.eager import compile as eager_compile  # cold path: imports Inductor

    op = resolve_op(op)
    result = eager_compile.precompile(op, args, kwargs, device=device, dynamic=dynamic)
    _DISPATCHER.on_new_entry(op, result.entry)
    return result
