"""Calls a captured function makes that a graph cannot hold, refused before they run, and torch's errors while the
capture runs the function turned into ``CaptureError``s that name the construct, where the model makes it, and
the fix.

:class:`ExplainUnsupportedOps` (the analysis pass's torch function mode) refuses storage reads of traced tensors,
``backward()`` inside the function, in-place writes into tensors outside the trace, tensor hooks and nested-tensor
constructors, and names the op behind a non-strided result or a kernel that reads tensor data;
:func:`explain_data_dependent_ops` turns fake tensors' data-dependent errors into ``CaptureError``s;
:func:`refuse_optimizer_steps` refuses an optimizer step before it runs.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from aotcache.aot.checkpoint_refusals import CHECKPOINT_MUTATION_ERROR, checkpoint_mutation_error
from aotcache.aot.error_sites import call_site, first_line, site_of
from aotcache.aot.errors import CaptureError
from aotcache.aot.tensor_state_reads import STATE_READERS, input_storages, refuse_autograd_state_read
from aotcache.aot.unsupported_tensors import (
    NESTED_CONSTRUCTORS,
    in_nested_tensor_code,
    nested_tensor_error,
    unsupported_layout_error,
)

__all__ = ["ExplainUnsupportedOps", "explain_data_dependent_ops", "refuse_optimizer_steps", "outside_mutation_error"]


_DATA_DEPENDENT_FIX = ("aotcache traces with fake tensors, which have no data. Move the data-dependent part out of "
                       "the compiled function, or make it shape-static (e.g. torch.where instead of boolean "
                       "indexing).")


# Python-level calls whose result depends on an input's storage offset (absolute offsets, storage reads)
_OFFSET_READERS = frozenset({torch.Tensor.storage_offset, torch.Tensor.as_strided, torch.as_strided,
                             torch.Tensor.as_strided_, torch.Tensor.as_strided_scatter, torch.as_strided_scatter,
                             torch.Tensor.set_, torch.Tensor.untyped_storage, torch.Tensor.storage,
                             torch.Tensor.data_ptr})
_STORAGE_GETTERS = frozenset({torch.Tensor.untyped_storage, torch.Tensor.storage})


class ExplainUnsupportedOps(torch.overrides.TorchFunctionMode):
    """Names the torch function behind two failures that the dispatcher cannot attribute (analysis pass).

    * an op whose result has a non-strided layout (``to_sparse``, ``to_mkldnn``): functionalization drops
      autograd through it, so gradients would silently vanish (NOTE [Output requires_grad] in runtime);
    * (not a failure) whether the function reads storage offsets in Python (``reads_offsets``);
    * a Python read of a traced tensor's storage (NOTE [Storages seen in Python]);
    * a C++ kernel that reads tensor data directly, bypassing the dispatcher (``tensor_split`` with a tensor of
      indices): fake tensors have no data, and torch only says "data is not allocated yet";
    * a read of an argument's autograd state (``inputs``: the probes; NOTE [Autograd state read by the function]).
    """

    def __init__(self, inputs: Sequence[Any] = ()) -> None:
        super().__init__()
        self.inputs = frozenset(id(value) for value in inputs if isinstance(value, torch.Tensor))
        self.input_storages = frozenset(input_storages(inputs))  # their aliases share them
        self.reads_offsets = False  # NOTE [Storage offsets are not part of the signature] in aot/signature.py
        self.raised: list[Exception] = []  # NOTE [Capture errors the function catches]

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        try:
            return self._call(func, args, kwargs)
        except Exception as exc:
            self.raised.append(exc)
            raise

    def raise_caught(self) -> None:
        """NOTE [Capture errors the function catches]
        A data-dependent op raises while capturing (fake tensors have no data) where eager computes a value. A
        function that catches it (``try: s = float(x.sum()) except Exception: s = 0.0``, a library's ``try`` around
        ``.item()`` or ``.numpy()``) took its ``except`` branch in the trace only, and the graph returned that
        branch's result at every call, silently (``x * 0`` where eager gives ``x * 3``). So once the function has
        returned, a capture refusal or data-dependent error raised by a torch function it called (and caught) is
        raised again, as the CaptureError it stands for; the fallback then runs the call as written. Errors that
        do not depend on data (a shape check the function catches) are the trace's as they are eager's."""
        for exc in self.raised:
            if isinstance(exc, CaptureError):
                raise exc
            if _data_dependent_error(exc):
                with explain_data_dependent_ops():
                    raise exc

    def _call(self, func: Any, args: tuple, kwargs: Mapping | None) -> Any:
        if func in STATE_READERS:
            refuse_autograd_state_read(func, args, self.inputs, self.input_storages)
        if func in NESTED_CONSTRUCTORS:
            raise nested_tensor_error(f"the result of {_function_name(func)}")
        if func in _OFFSET_READERS:
            self.reads_offsets = True
            if func in _STORAGE_GETTERS and args and _is_traced(args[0]):
                raise _storage_read_error()
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            raise _backward_inside_error()
        if args and _writes_outside_the_trace(func, args[0]):
            raise outside_mutation_error()
        if func is torch.Tensor.register_hook or func is torch.Tensor.register_post_accumulate_grad_hook:
            # NOTE [Module backward hooks] applies to a hook registered in the function too: Python run at every
            # eager backward, which a compiled backward would run only while capturing
            raise CaptureError("aotcache: the function registers a tensor hook (Tensor.register_hook), which is "
                               "Python run at every backward; a compiled backward would run it only while "
                               "capturing (a hook's log or counter would miss every later backward). Register "
                               "it on the compiled function's output instead.")
        try:
            result = func(*args, **(kwargs or {}))
        except RuntimeError as exc:
            if "data is not allocated yet" not in str(exc):
                raise
            raise CaptureError(f"aotcache: {_function_name(func)} reads tensor data inside its kernel (a "
                               f"data-dependent op, e.g. split indices or sizes given as a tensor), which cannot "
                               f"be captured; pass them as Python ints instead. {_DATA_DEPENDENT_FIX}",
                               reason="data_dependent") from exc
        for value in pytree.tree_leaves(result):
            if isinstance(value, torch.Tensor) and value.layout != torch.strided:
                raise unsupported_layout_error(f"the result of {_function_name(func)}", value.layout)
        return result


def _data_dependent_error(exc: Exception) -> bool:
    """Whether ``exc`` is torch's error for a data-dependent op on fake tensors (see explain_data_dependent_ops)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    if isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException, GuardOnDataDependentSymNode)):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _DATA_ACCESS_ERRORS)


# NOTE [Storages seen in Python]
# ``x.untyped_storage()`` (or ``x.storage()``) inside a captured function returns the storage of a capture
# tensor, not of the caller's: the analysis's probe has a storage just large enough for the input's view, so
# ``x.untyped_storage().nbytes()`` of a view into a larger tensor gave 16 where eager gives 40, and a graph
# returning or branching on it was wrong for the first call and for every later one (the storage's size is
# part of neither the signature, nor the call fingerprint, nor the cache key). Its memory (``data_ptr``) and
# ``set_`` onto it fail anyway. So a storage read from a traced tensor is refused before it returns
# (``data_dependent``, with the model's source line): the fallback runs the call, where Dynamo breaks the graph
# at the read and runs it eagerly. A real tensor the function closes over (a constant) keeps its own storage
# and is not refused.
def _is_traced(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value) is not torch.Tensor and type(value) is not torch.nn.Parameter


def _storage_read_error() -> CaptureError:
    stack = traceback.extract_stack()[:-1]
    if in_nested_tensor_code(stack):  # a nested tensor's constructor
        return nested_tensor_error("a tensor the function builds")
    site = site_of(stack)
    return CaptureError(f"aotcache: the function reads a tensor's memory directly through its storage "
                        f"(x.untyped_storage() or x.storage(), for its nbytes(), size or data_ptr()){site}, which "
                        f"cannot be captured: the capture's tensors have storages of their own, whose sizes are not "
                        f"the caller's (a view of a larger tensor), and a compiled graph would keep what it read. "
                        f"Read the storage outside the compiled function and pass what it needs as an argument.",
                        reason="data_dependent")


# NOTE [Backward inside a compiled function]
# A whole training step compiled as one function (``step(x, y)``: zero_grad, forward, ``loss.backward()``,
# ``opt.step()``, the model and optimizer from its closure) is a common torch.compile pattern. ``backward()``
# accumulates gradients into the ``.grad`` of tensors that are not the function's arguments, and the optimizer
# then updates them in place: state outside the graph, which a capture on fake tensors cannot write (it failed
# with torch's internal "mutating a non-functional tensor with a functional tensor" assertion). The call is a
# CaptureError instead, so aotcache.compile runs the step through torch.compile(backend="aotcache"), whose Dynamo
# breaks the graph around the backward and the optimizer step, and aot_function takes its fallback.
def _backward_inside_error() -> CaptureError:
    return CaptureError("aotcache: the function calls .backward() (a training step compiled whole), which writes "
                        "gradients into the .grad of tensors that are not its arguments and cannot be captured as "
                        "one graph. Compile the model instead (aotcache.compile(model)) and call backward() and the "
                        "optimizer outside it; aotcache.compile(step) runs such a step through "
                        "torch.compile(backend='aotcache').", reason="unsupported_construct")


# NOTE [Optimizer steps inside a capture]
# A function that calls an optimizer's step (``def step(): opt.step(); sched.step()`` given to aotcache.compile or
# aot_function) is refused anyway (the step updates parameters and state that are not its arguments: NOTE [Writes
# outside the trace]), but only once the step has run part of its Python on trace tensors: its first step creates
# the optimizer's state lazily (``state[p]["step"] = torch.tensor(0.0)``, ``exp_avg``...), and those entries stayed
# behind holding functional tensors (the optimizer is opaque to NOTE [State changed by a capture]). Eager's first
# step then found a state it did not create, and the Dynamo way failed ("'NoneType' object has no attribute
# 'export'"). So while this thread captures, a global step pre-hook refuses any optimizer step before it runs.
_optimizer_steps = threading.local()  # .refused: depth of refuse_optimizer_steps() in this thread


def _refuse_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    if torch.compiler.is_dynamo_compiling() or not getattr(_optimizer_steps, "refused", 0):
        return
    raise CaptureError(f"aotcache: the function calls {type(optimizer).__name__}.step(), which updates parameters and "
                       "optimizer state that are not its arguments in place and cannot be captured. Compile the "
                       "model instead (aotcache.compile(model)) and step the optimizer outside it; aotcache.compile "
                       "runs such a function through torch.compile(backend='aotcache').",
                       reason="unsupported_construct")


@contextlib.contextmanager
def refuse_optimizer_steps() -> Iterator[None]:
    """While the captured function's Python runs in this thread: an optimizer step it calls raises a CaptureError
    before the step runs (NOTE [Optimizer steps inside a capture])."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = None
    _optimizer_steps.refused = getattr(_optimizer_steps, "refused", 0) + 1
    try:
        handle = register_optimizer_step_pre_hook(_refuse_optimizer_step)
        yield
    finally:
        _optimizer_steps.refused -= 1
        if handle is not None:
            handle.remove()


# NOTE [Writes outside the trace]
# While a function is captured, its arguments and every tensor it makes are functional (fake) tensors; a plain
# tensor it reaches is a global, a closure tensor or a module's buffer or parameter not passed in (a module run
# by an aot_function, an optimizer). Reading one is fine (a constant, NOTE [Program guards]); an in-place op on
# one would change real state during the capture itself: BatchNorm's ``num_batches_tracked.add_(1)`` ran for
# real, then the capture failed and the fallback ran the step again (one batch counted twice). Such a write is
# refused before it runs (then the fallback runs the call once, as eager).
# Inside ``torch.vmap`` (or a torch.func grad level) every tensor is a functorch wrapper whose Python type is plain
# ``torch.Tensor``, the traced ones included: a tensor the vmapped code makes and then writes (flex attention's
# ``create_block_mask`` fills ``dense_mask[rows, cols] = 1`` so) was refused as an outside one. The wrappers are
# looked through, so the innermost tensor decides: functional (made or taken by the trace) or plain (real state,
# such as a global tensor vmapped over, still refused).
_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                              "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                              "__irshift__", "__imatmul__"})


def _writes_outside_the_trace(func: Any, target: Any) -> bool:
    name = getattr(func, "__name__", "")
    if not (name.endswith("_") and not name.endswith("__")) and name not in _INPLACE_DUNDERS:
        return False
    targets = target if isinstance(target, (list, tuple)) else (target,)
    return any(type(value) is torch.Tensor or type(value) is torch.nn.Parameter
               for value in map(_inside_functorch_wrappers, targets))


def _inside_functorch_wrappers(value: Any) -> Any:
    """The tensor under ``value``'s vmap / grad wrappers (``value`` itself when it has none)."""
    functorch = torch._C._functorch
    while isinstance(value, torch.Tensor) and functorch.is_functorch_wrapped_tensor(value):
        value = functorch.get_unwrapped(value)
    return value


def outside_mutation_error() -> CaptureError:
    """The error of NOTE [Writes outside the trace]."""
    return CaptureError("aotcache: the function writes in place into a tensor that is not one of its arguments (a "
                        "global or closure tensor, or a module's buffer or parameter reached other than as an "
                        "input: an optimizer step, a BatchNorm run inside a function), which cannot be captured. "
                        "Pass the tensor as an argument, or compile the module itself (aotcache.compile(model)).",
                        reason="unsupported_construct")


def _function_name(func: Any) -> str:
    try:
        return torch.overrides.resolve_name(func) or repr(func)
    except (AttributeError, TypeError):
        return repr(func)


# NOTE [Data-dependent sizes in a symbolic trace]
# With symbolic sizes (``dynamic=True``, or Dynamo's automatic dynamic), an op whose output size depends on data
# (``nonzero`` returned as it is, ``x.split(t.tolist())``, a ``torch.cond`` whose branches make such a size: PyTorch's
# test_misc ``test_aot_autograd_propagate_unbacked_symints_shape``, ``test_validate_outputs_unbacked``,
# ``test_cond_runtime_assert_generation``) binds an unbacked symbol that the capture's trace does not return as
# ``make_fx`` expects, which raises ``PendingUnbackedSymbolNotFound``: the user's torch.compile failed
# (``BackendCompilerFailed``) where ``aot_eager`` compiles. With static sizes the same ops are refused as
# data-dependent (``DynamicOutputShapeException`` above); so they are here: the Dynamo graph runs eagerly (eager's
# results, eager's ``torch._check`` errors).
@contextlib.contextmanager
def explain_data_dependent_ops() -> Iterator[None]:
    """Turn fake-tensor errors about data-dependent ops into a :class:`CaptureError` naming the op and where the
    model calls it."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, PendingUnbackedSymbolNotFound

    fix = _DATA_DEPENDENT_FIX
    try:
        yield
    except DynamicOutputShapeException as exc:
        raise CaptureError(f"aotcache: operator {exc.func}{call_site(exc)} has an output shape that depends on "
                           f"tensor data (e.g. nonzero, masked_select, boolean indexing), which cannot be captured. "
                           f"{fix}", reason="data_dependent") from exc
    except DataDependentOutputException as exc:
        raise CaptureError(f"aotcache: operator {exc.func}{call_site(exc)} returns a value that depends on tensor "
                           f"data (e.g. .item(), .tolist(), Python control flow on a tensor), which cannot be "
                           f"captured. {fix}", reason="data_dependent") from exc
    except GuardOnDataDependentSymNode as exc:
        raise CaptureError(f"aotcache: the function branches on or sizes by a data-dependent value{call_site(exc)} "
                           f"({exc}). {fix}", reason="data_dependent") from exc
    except PendingUnbackedSymbolNotFound as exc:  # NOTE [Data-dependent sizes in a symbolic trace]
        raise CaptureError(f"aotcache: an operator makes a size that depends on tensor data{call_site(exc)} (e.g. "
                           f"nonzero, tolist() sizes, such an op inside torch.cond), which cannot be captured with "
                           f"symbolic sizes ({first_line(exc)}). {fix}", reason="data_dependent") from exc
    except RuntimeError as exc:
        if _OUTSIDE_MUTATION_ERROR in str(exc):
            raise outside_mutation_error() from exc
        if CHECKPOINT_MUTATION_ERROR in str(exc):  # NOTE [In-place ops in a checkpointed region]
            raise checkpoint_mutation_error(exc) from exc
        if not any(marker in str(exc) for marker in _DATA_ACCESS_ERRORS):
            raise
        raise CaptureError(f"aotcache: the function reads a tensor's memory directly{call_site(exc)} (.numpy(), "
                           f"numpy.asarray, .data_ptr(), a storage's data_ptr(), set_ onto a storage), which "
                           f"cannot be captured ({exc}). "
                           f"{fix}", reason="data_dependent") from exc


# torch's internal assertion when the traced function mutates a tensor outside the functionalized inputs
_OUTSIDE_MUTATION_ERROR = "mutating a non-functional tensor with a functional tensor is not allowed"


# torch's errors for reading the memory of a fake / functional tensor: eager runs such code, so they are
# CaptureErrors (the fallback runs the call), not crashes
_DATA_ACCESS_ERRORS = ("Cannot access data pointer of Tensor", ".numpy() is not supported for tensor subclasses",
                       "Attempted to access the data pointer on an invalid python storage",
                       # y.set_(x.untyped_storage(), ...): the capture's fake y cannot take x's real storage
                       "Attempted to set the storage of a tensor on device")
