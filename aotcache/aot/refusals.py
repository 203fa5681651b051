"""What a capture refuses, and torch's errors during a capture turned into ``CaptureError``s that name the construct
and the fix: data-dependent ops, non-strided layouts, torch.func transforms, backward hooks, closed-over tensors
that require grad; and the fake-tensor mode's own failure logs, kept out of the way while capturing.

Split from ``capture.py`` (the two passes) so that each module does one thing; ``capture.py`` and ``api.py`` use it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import operator
import os
import re
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from aotcache.aot.errors import CaptureError

__all__ = ["ExplainUnsupportedOps", "dispatch_mode_error", "explain_data_dependent_ops", "functorch_transform_error",
           "refuse_optimizer_steps", "quiet_fake_tensor_failures", "refuse_constants_requiring_grad",
           "refuse_data_parallel_wrappers",
           "data_parallel_wrapper", "checkpoint_mutation_error", "checkpoint_input_write_error",
           "refuse_backward_state_inputs", "refuse_module_backward_hooks", "refuse_reentrant_checkpoint",
           "refuse_reentrant_checkpoint_nodes",
           "refuse_changed_argument_containers", "argument_containers", "refuse_script_modules",
           "tensor_subclass_error",
           "unsupported_layout_error"]


def refuse_module_backward_hooks(module: torch.nn.Module) -> None:
    """Refuse a training capture of a module tree with module backward hooks (NOTE [Module backward hooks]).

    NOTE [Module backward hooks]
    ``register_full_backward_hook`` / ``register_full_backward_pre_hook`` hooks (on a submodule, or global) are
    Python run at every eager backward. A capture runs them once, on traced tensors: what they compute on the
    gradients is in the graph, but their side effects (a log, a counter, a list of gradient norms) happen only
    then, and a value they keep is a trace tensor. Such a module goes to the fallback (torch.compile runs the
    hooks at every backward). Under no_grad no backward runs, so nothing is refused there.
    """
    if not torch.is_grad_enabled():
        return
    from torch.nn.modules import module as module_mod

    hooked = [name or type(module).__name__ for name, sub in module.named_modules()
              if sub._backward_hooks or sub._backward_pre_hooks]
    if module_mod._global_backward_hooks or module_mod._global_backward_pre_hooks:
        hooked.append("(global module hooks)")
    if hooked:
        raise CaptureError(
            f"aotcache: module backward hooks on {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''} run "
            f"Python at every backward, which a compiled backward would run only while capturing (a hook's "
            f"log or counter would miss every later backward). To capture the module whole, remove the hooks "
            f"(read gradients from the parameters' .grad after backward instead).")


_REENTRANT_MESSAGE = (
    "aotcache: reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True) runs its backward "
    "with .backward(), which cannot be traced into a compiled backward. Pass use_reentrant=False (transformers: "
    "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})); the call runs through "
    "the fallback meanwhile.")


def refuse_reentrant_checkpoint_nodes(nodes: Sequence[Any]) -> None:
    """Raise a CaptureError if the traced outputs' autograd ``nodes`` (:func:`autograd_nodes`) hold a reentrant
    checkpoint.

    NOTE [Reentrant checkpoints the traced backward skips]
    The joint trace differentiates the outputs with ``torch.autograd.grad`` *with respect to the graph's inputs*;
    autograd then runs only the nodes on a path to them. A reentrant checkpoint's parameters are not inputs of its
    node (its backward recomputes the region and accumulates their ``.grad`` with ``.backward()``), so when no graph
    input flows into the region -- transformers' ``enable_input_require_grads()`` hook makes the frozen embeddings'
    output require grad, peft's LoRA recipe with gradient checkpointing -- the traced backward skipped the node:
    no error, and the compiled backward left the adapters' ``.grad`` None where eager trains them (a LoRA model
    trained nothing, silently). Any ``CheckpointFunctionBackward`` in the traced graph is refused, whether or not
    the backward would reach it. Without an input requiring grad a reentrant checkpoint adds no node, and eager
    leaves its parameters' gradients None too.
    """
    if any(type(node).__name__ == "CheckpointFunctionBackward" for node in nodes):
        raise CaptureError(_REENTRANT_MESSAGE)


def refuse_reentrant_checkpoint(exc: RuntimeError) -> None:
    """Raise a CaptureError for the error reentrant activation checkpointing raises in the traced backward.

    NOTE [Reentrant checkpoints in the joint trace]
    ``torch.utils.checkpoint(..., use_reentrant=True)`` recomputes its forward in its backward with
    ``.backward()``, which refuses to run under ``torch.autograd.grad`` (the joint trace's backward): with an
    input requiring grad, ``aot_module`` of such a model raised that RuntimeError where eager trains. It is a
    construct the capture cannot express, so the call falls back (NOTE [Capture fallback]); without an input
    requiring grad the checkpoint has no backward node and the capture goes on (and is refused later).
    """
    if _CHECKPOINT_MUTATION_ERROR in str(exc):  # not reentrant: an in-place op in a non-reentrant region
        raise checkpoint_mutation_error(exc) from exc
    frames = traceback.extract_tb(exc.__traceback__)
    in_checkpoint = any(_is_checkpoint_file(frame.filename) for frame in frames)
    if _CHECKPOINT_INPUT_VERSION_ERROR in str(exc) and not in_checkpoint:
        raise saved_tensor_modified_error(exc) from exc  # NOTE [Saved tensors modified in place]
    if _CHECKPOINT_INPUT_VERSION_ERROR in str(exc):  # not reentrant: a region writes one of its inputs (a
        raise checkpoint_input_write_error(str(exc)) from exc  # BatchNorm's num_batches_tracked)
    from_checkpoint = bool(frames) and _is_checkpoint_file(frames[-1].filename)
    if from_checkpoint or "use_reentrant=True" in str(exc):
        raise CaptureError(_REENTRANT_MESSAGE) from exc


def _is_checkpoint_file(filename: str) -> bool:
    return filename.replace("\\", "/").endswith("torch/utils/checkpoint.py")


def saved_tensor_modified_error(exc: RuntimeError) -> CaptureError:
    """NOTE [Saved tensors modified in place]
    A tensor autograd saved for the backward, written in place afterwards (a custom autograd.Function that saves
    its output with ``ctx.save_for_backward(out)``, then ``out.add_(1)`` by the caller; ``y = x.exp();
    y.add_(1)``), makes eager's backward raise autograd's version-counter error: a user error, raised when
    ``backward()`` runs. The joint trace meets it while tracing the backward. It was taken for an
    activation-checkpointed region's write (that message, and the fallback through torch.compile), whose Dynamo
    graph then computed gradients silently. It is a refusal now that is not Dynamo-safe (the fallback runs the
    call eagerly, so eager's own error comes at ``backward()``); a checkpointed region's writes keep their own
    refusal (torch.utils.checkpoint's frames in the error's traceback)."""
    return CaptureError(f"aotcache: a tensor saved for the backward is modified in place after it was saved "
                        f"(e.g. the output of a custom autograd.Function that saves it with "
                        f"ctx.save_for_backward(out), then written with out.add_(...)); eager's backward raises "
                        f"for it too ({_first_line(exc)}). The call runs eagerly, so backward() raises eager's "
                        f"error. Fix: write out of place (out = out + 1), or save a clone.",
                        reason="unsupported_construct", dynamo_safe=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# NOTE [Data-parallel wrappers]
# DistributedDataParallel's forward is Python that must run at every call: it broadcasts rank 0's buffers
# (BatchNorm statistics), and under grad mode it prepares its reducer for the backward that all-reduces the
# gradients. A capture of DDP(model) ran that Python once, on fake tensors: later calls ran the graph alone, and
# the ranks trained apart (no error; each rank's own gradients). FSDP and DataParallel are the same kind of
# wrapper. A module tree holding one is refused, so it goes to the fallback (aotcache.compile: torch.compile
# with the aotcache backend, whose Dynamo handles DDP); DDP(aotcache.compile(model)) is captured and correct.
_DATA_PARALLEL_CLASSES = frozenset({"torch.nn.parallel.distributed.DistributedDataParallel",
                                    "torch.nn.parallel.data_parallel.DataParallel",
                                    "torch.distributed.fsdp.fully_sharded_data_parallel.FullyShardedDataParallel",
                                    "torch.distributed.fsdp.FSDPModule",
                                    "torch.distributed.fsdp._fully_shard._fully_shard.FSDPModule"})


def data_parallel_wrapper(module: torch.nn.Module) -> tuple[str, str] | None:
    """``(path, class name)`` of the first data-parallel wrapper in the module tree (NOTE [Data-parallel
    wrappers]; path ``"the module"`` for the root), or None."""
    for name, sub in module.named_modules():
        for cls in type(sub).__mro__:
            if f"{cls.__module__}.{cls.__qualname__}" in _DATA_PARALLEL_CLASSES:
                return name or "the module", cls.__name__
    return None


def refuse_data_parallel_wrappers(module: torch.nn.Module) -> None:
    """Refuse a capture of a module tree holding a data-parallel wrapper (NOTE [Data-parallel wrappers])."""
    found = data_parallel_wrapper(module)
    if found is not None:
        name, kind = found
        raise CaptureError(
            f"aotcache: {name} is a {kind}, whose forward runs Python at every call (buffer broadcast, gradient "
            f"all-reduce setup) that a captured graph would run only once. Compile the model inside it instead: "
            f"{kind}(aotcache.compile(model)), or torch.compile({kind}(model), backend='aotcache').",
            reason="unsupported_construct")


# NOTE [TorchScript submodules]
# A ``torch.jit.script``-ed (or traced) submodule runs TorchScript: its code and its parameters live in a C++
# module, which ``functional_call`` cannot swap for trace tensors, and its registries are C++-backed wrappers that
# the walk and the module snapshot cannot iterate as dicts (a call of such a model failed with "contains():
# incompatible function arguments" or ``KeyError: 0`` where eager runs). A module tree holding one is refused, so
# it takes the fallback (Dynamo runs the scripted part eagerly between compiled regions).
def refuse_script_modules(module: torch.nn.Module) -> None:
    """Refuse a capture of a module tree holding a TorchScript module (NOTE [TorchScript submodules])."""
    for name, sub in module.named_modules():
        if isinstance(sub, torch.jit.ScriptModule):
            raise CaptureError(
                f"aotcache: {name or 'the module'} is a TorchScript module ({type(sub).__name__}), whose code and "
                f"parameters live in C++ where a capture cannot swap them; compile the Python module instead of "
                f"its torch.jit.script / torch.jit.trace result.", reason="unsupported_construct")


# NOTE [Argument containers changed in place]
# A capture calls the function on containers rebuilt from the flattened arguments, so a list or dict the
# caller passed and the function changes in place (``log.append(x.shape[0])``, ``cache["k"] = v``) was changed
# only in the capture's copy: the caller's list stayed as it was, at the first call and every later one, where
# eager appends each time (a silent difference). A graph cannot replay such a change, so a capture after which
# a list or dict of the arguments holds other keys or members than before the call is refused; the fallback
# (Dynamo) replays the change on the caller's own containers at every call. Registered pytree nodes are not
# checked: transformers' cache objects are updated in place by design and written back (NOTE [Cache arguments
# are updated in place]).
_MUTABLE_CONTAINERS = (list, dict, collections.OrderedDict)


def argument_containers(rebuilt: Any) -> list[tuple[Any, tuple, tuple]]:
    """The lists and dicts reachable from ``rebuilt`` through lists, tuples and dicts, each with its keys and
    members now (NOTE [Argument containers changed in place]). Other pytree nodes (transformers' cache
    objects, which the model updates in place and aot_module writes back) are not entered."""
    found = []
    stack = [rebuilt]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind in _MUTABLE_CONTAINERS:
            keys = tuple(value) if kind is not list else ()
            members = tuple(value.values()) if kind is not list else tuple(value)
            found.append((value, keys, members))
            stack.extend(members)
        elif kind is tuple:
            stack.extend(value)
    return found


def refuse_changed_argument_containers(containers: list[tuple[Any, tuple, tuple]]) -> None:
    """Refuse a capture whose function changed one of the argument ``containers`` in place
    (:func:`argument_containers`, taken before the call; NOTE [Argument containers changed in place])."""
    for container, keys, members in containers:
        now = tuple(container.values()) if type(container) is not list else tuple(container)
        if len(now) == len(members) and all(map(operator.is_, now, members)) and (
                type(container) is list or all(map(operator.is_, container, keys))):
            continue
        raise CaptureError("aotcache: the function changes a list or dict it was passed in place (append, item "
                           "assignment, pop, ...): a graph cannot replay that at later calls. Return the new values "
                           "instead, or keep the container outside the compiled function.",
                           reason="unsupported_construct")


def unsupported_layout_error(what: str, layout: Any) -> CaptureError:
    """The error for a tensor with a non-strided layout (sparse, mkldnn): fake tensors and functionalization
    have no support for them, and a graph traced without it would silently drop their gradients."""
    return CaptureError(f"aotcache: {what} is a tensor with layout {layout}; only strided (dense) tensors are "
                        f"supported in a compiled function. Convert it to a dense tensor outside the compiled "
                        f"function (.to_dense(), .dequantize(), .to_padded_tensor(0)), or move the computation on "
                        f"it out of the function.", reason="unsupported_layout")


def nested_tensor_error(what: str) -> CaptureError:
    """NOTE [Nested tensors in a capture]
    A nested tensor (``torch.nested``; the jagged layout, NJT, is a tensor subclass whose ragged size is a nested
    int tied to its offsets) has no place in aotcache's graphs: the capture has no subclass desugaring, a static
    capture has no ShapeEnv to make the ragged size a symbol, and the cache key has nothing that stands for a
    ragged structure. Such a call is refused (``unsupported_layout``) and runs as eager does (the fallback: eagerly,
    or torch.compile's Dynamo with the graph run as Python); nothing of it is stored, so no ragged structure can
    reuse another's graph. This covers a nested argument and a nested tensor built inside the function: the
    latter failed with torch's "self.shape_env must not be None" (static) or was refused as a storage read or a
    non-strided result (symbolic), messages that named no nested tensor (session 16).
    """
    return CaptureError(f"aotcache: {what} is a nested tensor (torch.nested), which aotcache does not capture: a "
                        f"jagged tensor's ragged size has no place in a compiled graph or its cache key. The call "
                        f"runs as eager does. To compile the dense part, compute on nt.values() in the compiled "
                        f"function and rebuild outside it (torch.nested.nested_tensor_from_jagged(out, "
                        f"nt.offsets())).", reason="unsupported_layout")


def raised_in_nested_tensor_code(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside torch's nested-tensor package (a constructor run on the capture's fake
    tensors: "self.shape_env must not be None", a strided nested tensor's unsupported fake op), NOTE [Nested
    tensors in a capture]."""
    return any(frame.filename.startswith(_NESTED_SOURCE) for frame in traceback.extract_tb(exc.__traceback__))


# torch functions that build a nested tensor (NOTE [Nested tensors in a capture]); refused before they run
_NESTED_CONSTRUCTORS = frozenset(getattr(torch, name) for name in (
    "_nested_view_from_jagged", "_nested_view_from_buffer", "_nested_tensor_from_tensor_list",
    "_nested_from_padded", "_nested_from_padded_and_nested_example", "_nested_tensor_from_mask")
    if hasattr(torch, name))


def tensor_subclass_error(what: str, kind: type) -> CaptureError:
    """NOTE [Tensor subclass arguments]: the error for a tensor subclass that wraps other tensors
    (``__tensor_flatten__``: DTensor, TwoTensor, float8 tensors). Capture has no subclass desugaring: the graph
    would be traced on a plain fake counterpart and return plain gradients where eager returns the subclass. With
    the default fallback such a call runs eagerly."""
    return CaptureError(f"aotcache: {what} is a {kind.__name__}, a tensor subclass that wraps other tensors; a "
                        f"compiled graph takes plain tensors only and would return plain gradients for it. Pass its "
                        f"inner tensors instead, or call the function eagerly.", reason="unsupported_layout")


def functorch_transform_error(what: str) -> CaptureError:
    """The error for a tensor wrapped by a torch.func transform: a compiled function called under ``vmap``,
    ``grad``, ``jacrev`` or ``jvp`` (the transforms wrap its arguments; a compiled graph runs on plain tensors, and
    the transform cannot see through its autograd.Function). The call runs eagerly, as the fallback does.

    NOTE [Transforms are the call's, not the function's]
    Found (bench/odd_inputs.py): one call of an ``aotcache.compile`` function under ``torch.func.vmap`` (or jvp,
    grad) sent it to the Dynamo way for good, recorded in the store, so every later plain call, in this process
    and the next, ran through Dynamo instead of the captured graph. A transform is the context of one call:
    ``first_call_only`` runs that call eagerly and decides nothing (the refusal comes from the signature, before
    any trace, so a later call under a transform costs no capture attempt)."""
    return CaptureError(f"aotcache: {what} is a tensor of a torch.func transform (the compiled function is called "
                        f"under vmap, grad, jacrev or jvp), which a compiled graph cannot take. Apply the transform "
                        f"inside the compiled function instead.", reason="unsupported_construct",
                        first_call_only=True)  # NOTE [Transforms are the call's, not the function's]


def dispatch_mode_error(modes: tuple) -> CaptureError:
    """NOTE [Active torch modes] (ambient.py): a torch dispatch mode the compiled function is called under
    (``FlopCounterMode``, a debugging or op-rewriting mode) sees every ATen op eager runs, which a compiled graph
    does not replay as eager does (its kernels bypass the mode, or a graph traced under the mode runs through it a
    second time). The call runs eagerly, as torch.compile does under a dispatch mode; the next call without one is
    compiled again (``first_call_only``: nothing is decided for later calls)."""
    names = ", ".join(sorted({type(getattr(mode, "mode", mode)).__name__ for mode in modes}))
    return CaptureError(f"aotcache: the call runs under a torch dispatch mode ({names}), which a compiled graph "
                        f"cannot replay as eager does; it runs eagerly, as torch.compile does.",
                        reason="unsupported_construct", first_call_only=True)


_DATA_DEPENDENT_FIX = ("aotcache traces with fake tensors, which have no data. Move the data-dependent part out of "
                       "the compiled function, or make it shape-static (e.g. torch.where instead of boolean "
                       "indexing).")


# Python-level calls whose result depends on an input's storage offset (absolute offsets, storage reads)
_OFFSET_READERS = frozenset({torch.Tensor.storage_offset, torch.Tensor.as_strided, torch.as_strided,
                             torch.Tensor.as_strided_, torch.Tensor.as_strided_scatter, torch.as_strided_scatter,
                             torch.Tensor.set_, torch.Tensor.untyped_storage, torch.Tensor.storage,
                             torch.Tensor.data_ptr})
_STORAGE_GETTERS = frozenset({torch.Tensor.untyped_storage, torch.Tensor.storage})
_NESTED_SOURCE = os.path.join(os.path.dirname(torch.nested.__file__), "")  # torch's nested-tensor package


class ExplainUnsupportedOps(torch.overrides.TorchFunctionMode):
    """Names the torch function behind two failures that the dispatcher cannot attribute (analysis pass).

    * an op whose result has a non-strided layout (``to_sparse``, ``to_mkldnn``): functionalization drops
      autograd through it, so gradients would silently vanish (NOTE [Output requires_grad] in runtime);
    * (not a failure) whether the function reads storage offsets in Python (``reads_offsets``);
    * a Python read of a traced tensor's storage (NOTE [Storages seen in Python]);
    * a C++ kernel that reads tensor data directly, bypassing the dispatcher (``tensor_split`` with a tensor of
      indices): fake tensors have no data, and torch only says "data is not allocated yet".
    """

    def __init__(self) -> None:
        super().__init__()
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
        if func in _NESTED_CONSTRUCTORS:
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
    if any(frame.filename.startswith(_NESTED_SOURCE) for frame in stack):  # a nested tensor's constructor
        return nested_tensor_error("a tensor the function builds")
    site = _site_of(stack)
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
_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                              "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                              "__irshift__", "__imatmul__"})


def _writes_outside_the_trace(func: Any, target: Any) -> bool:
    name = getattr(func, "__name__", "")
    if not (name.endswith("_") and not name.endswith("__")) and name not in _INPLACE_DUNDERS:
        return False
    targets = target if isinstance(target, (list, tuple)) else (target,)
    return any(type(value) is torch.Tensor or type(value) is torch.nn.Parameter for value in targets)


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


_OWN_DIRECTORIES = (os.path.dirname(torch.__file__) + os.sep,
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)


def _call_site(exc: BaseException) -> str:
    """`` at <file>:<line> in <function>: `<source>` ``: the innermost frame of the model's code (not torch's,
    not aotcache's) in ``exc``'s traceback, so that a data-dependent op's error says where the model does it
    (DETR's ``if not torch.isfinite(hidden_states).all():``); empty if there is none."""
    return _site_of(traceback.extract_tb(exc.__traceback__))


def _site_of(stack: Any) -> str:
    """`` at <file>:<line> in <function>: `<source>` `` of the innermost frame of ``stack`` in the model's code."""
    frames = [frame for frame in stack
              if not frame.filename.startswith(_OWN_DIRECTORIES) and not frame.filename.startswith("<")]
    if not frames:
        return ""
    frame = frames[-1]
    where = frame.filename
    marker = where.rfind("site-packages" + os.sep)
    if marker >= 0:
        where = where[marker + len("site-packages" + os.sep):]
    source = f": `{frame.line.strip()}`" if frame.line else ""
    return f" (at {where}:{frame.lineno} in {frame.name}{source})"


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
        raise CaptureError(f"aotcache: operator {exc.func}{_call_site(exc)} has an output shape that depends on "
                           f"tensor data (e.g. nonzero, masked_select, boolean indexing), which cannot be captured. "
                           f"{fix}", reason="data_dependent") from exc
    except DataDependentOutputException as exc:
        raise CaptureError(f"aotcache: operator {exc.func}{_call_site(exc)} returns a value that depends on tensor "
                           f"data (e.g. .item(), .tolist(), Python control flow on a tensor), which cannot be "
                           f"captured. {fix}", reason="data_dependent") from exc
    except GuardOnDataDependentSymNode as exc:
        raise CaptureError(f"aotcache: the function branches on or sizes by a data-dependent value{_call_site(exc)} "
                           f"({exc}). {fix}", reason="data_dependent") from exc
    except PendingUnbackedSymbolNotFound as exc:  # NOTE [Data-dependent sizes in a symbolic trace]
        raise CaptureError(f"aotcache: an operator makes a size that depends on tensor data{_call_site(exc)} (e.g. "
                           f"nonzero, tolist() sizes, such an op inside torch.cond), which cannot be captured with "
                           f"symbolic sizes ({_first_line(exc)}). {fix}", reason="data_dependent") from exc
    except RuntimeError as exc:
        if _OUTSIDE_MUTATION_ERROR in str(exc):
            raise outside_mutation_error() from exc
        if _CHECKPOINT_MUTATION_ERROR in str(exc):  # NOTE [In-place ops in a checkpointed region]
            raise checkpoint_mutation_error(exc) from exc
        if not any(marker in str(exc) for marker in _DATA_ACCESS_ERRORS):
            raise
        raise CaptureError(f"aotcache: the function reads a tensor's memory directly{_call_site(exc)} (.numpy(), "
                           f"numpy.asarray, .data_ptr(), a storage's data_ptr(), set_ onto a storage), which "
                           f"cannot be captured ({exc}). "
                           f"{fix}", reason="data_dependent") from exc


def checkpoint_input_write_error(detail: str) -> CaptureError:
    """The CaptureError for a checkpointed region that writes in place into one of its inputs (NOTE [Buffers
    written in a checkpointed region]): eager's recomputation writes it a second time, which a compiled backward
    does not."""
    return CaptureError(
        f"aotcache: an activation-checkpointed region (torch.utils.checkpoint) writes in place into one of its "
        f"inputs (a BatchNorm's num_batches_tracked, a buffer updated in forward), which its recomputation "
        f"cannot replay in a compiled backward ({detail}); the graph runs eagerly, each region as eager's "
        f"torch.utils.checkpoint. Fix: move the BatchNorm (or the buffer update) out of the checkpointed "
        f"region.", reason="unsupported_construct")


def checkpoint_mutation_error(exc: RuntimeError) -> CaptureError:
    """The CaptureError for torch's refusal of an in-place op in a checkpointed region that its own implementation
    runs (NOTE [In-place ops in a checkpointed region]); raised by the joint trace's forward or, for the
    recomputation, its backward."""
    return CaptureError(f"aotcache: an activation-checkpointed region with its own context_fn (dispatch modes "
                        f"other than torch.utils.checkpoint.create_selective_checkpoint_contexts') of a "
                        f"torch.compile graph writes in place into a tensor it computed{_call_site(exc)} (dropout "
                        f"does, drawing its mask in place), which aotcache cannot capture there: the graph runs "
                        f"eagerly, each region as eager's torch.utils.checkpoint (NOTE [Checkpointed regions run "
                        f"eagerly]). Fix: write that line out of place (x = x + y rather than x += y), move dropout "
                        f"out of the region, or use create_selective_checkpoint_contexts (or no context_fn): "
                        f"such regions are captured.", reason="unsupported_construct")


# torch's internal assertion when the traced function mutates a tensor outside the functionalized inputs
_OUTSIDE_MUTATION_ERROR = "mutating a non-functional tensor with a functional tensor is not allowed"

# NOTE [In-place ops in a checkpointed region]
# Dynamo hands a checkpointed region over as a tag_activation_checkpoint call; under a tracer, torch's checkpoint
# caches every op's output of the forward for the backward's recomputation and refuses a cached tensor whose version
# changed. aotcache's functionalization sits below that caching, so an in-place op on a value of the region (T5's
# relative-position buckets, `buckets += ...`; dropout's mask, drawn with bernoulli_ then scaled with div_) bumped
# the cached tensor's version and the trace raised this RuntimeError, failing the job where eager runs. Regions
# without a context_fn or with torch's selective-checkpoint contexts are traced in line now, functionalized before
# anything caches (NOTE [Checkpointed regions traced in line] in checkpoint_regions.py). A region with other
# contexts (its own dispatch modes) still goes through torch's implementation: there the error is a CaptureError,
# and the Dynamo graph runs eagerly (counted as a capture fallback).
_CHECKPOINT_MUTATION_ERROR = "Tensor cached during selective activation checkpoint has been mutated"
_CHECKPOINT_INPUT_VERSION_ERROR = "has been modified by an inplace operation"

# torch's errors for reading the memory of a fake / functional tensor: eager runs such code, so they are
# CaptureErrors (the fallback runs the call), not crashes
_DATA_ACCESS_ERRORS = ("Cannot access data pointer of Tensor", ".numpy() is not supported for tensor subclasses",
                       "Attempted to access the data pointer on an invalid python storage",
                       # y.set_(x.untyped_storage(), ...): the capture's fake y cannot take x's real storage
                       "Attempted to set the storage of a tensor on device")


class _DropFakeMetaFailures(logging.Filter):
    """Drops the fake-tensor mode's own log of an op that failed (the same error is raised to the caller)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed while attempting to run meta")


_FAKE_TENSOR_LOGGER = logging.getLogger("torch._subclasses.fake_tensor")
_DROP_FAKE_META_FAILURES = _DropFakeMetaFailures()
_quiet_lock = threading.Lock()
_quiet_depth = 0


@contextlib.contextmanager
def quiet_fake_tensor_failures() -> Iterator[None]:
    """NOTE [fake-tensor failure logs]: when an op fails on fake tensors during capture (a wrong input shape,
    say), torch's fake-tensor mode logs the whole traceback at ERROR (~20 lines) before raising it; the error
    itself still reaches the caller, so those lines only bury it. They are filtered out while capturing."""
    global _quiet_depth
    counted = False
    try:  # the count is raised inside the try, with the local saying so (NOTE [Interrupted captures])
        with _quiet_lock:
            _quiet_depth, counted = _quiet_depth + 1, True
            _FAKE_TENSOR_LOGGER.addFilter(_DROP_FAKE_META_FAILURES)  # once: a filter already there is not added
        yield
    finally:
        if counted:
            with _quiet_lock:
                _quiet_depth -= 1
                if not _quiet_depth:  # the last capture of any thread (captures nest, e.g. a recapture)
                    _FAKE_TENSOR_LOGGER.removeFilter(_DROP_FAKE_META_FAILURES)


def refuse_constants_requiring_grad(gm: torch.fx.GraphModule) -> None:
    """NOTE [closed-over tensors] A tensor the function reads from a closure or a global (not an argument)
    becomes a constant of the graph, read by reference at run time. One that requires grad would get no
    gradient from the compiled backward while eager gives it one: refuse it rather than drop the gradient.
    """
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(gm, node.target, None)
        if isinstance(value, torch._subclasses.fake_tensor.FakeTensor):
            # a fake tensor has no data: the graph would fail at its first real call with FakeTensorMode's
            # "Please convert all Tensors to FakeTensors"; say what it is now
            raise CaptureError(
                f"aotcache: the function reads a FakeTensor of shape {tuple(value.shape)} from a closure, a global "
                f"or a module attribute (an unexpected fake constant); a compiled graph needs its real value. Pass "
                f"a real tensor, or take it as an argument.")
        if isinstance(value, torch.nn.Parameter) and value.requires_grad:
            raise CaptureError(
                f"aotcache: the function reads a parameter of shape {tuple(value.shape)} that is not one of its "
                f"inputs; its gradient would be lost. Either a function reads a module's parameters from a "
                f"closure or global (compile the module instead: aot_module / aotcache.compile(module) make its "
                f"parameters inputs), or activation checkpointing recomputes the forward while the backward is "
                f"traced, after the module call (torch.utils.checkpoint, transformers' "
                f"gradient_checkpointing_enable()): such a model cannot be captured whole, and aotcache.compile "
                f"runs it through torch.compile(backend='aotcache').")
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise CaptureError(
                f"aotcache: the function reads a tensor of shape {tuple(value.shape)} that requires grad from a "
                f"closure or global instead of taking it as an argument; its gradient would be lost. Pass it "
                f"as an argument, or wrap the code in an nn.Module and use aot_module (parameters are inputs).")


# NOTE [Checkpointed regions without the RNG state]
# ``torch.utils.checkpoint(..., preserve_rng_state=False)`` recomputes a region in the backward without putting
# the generators back: eager's recomputation draws new numbers there (the gradients follow the new draws, and the
# global generator moves in the backward). The partitioners save a region's random draws (NOTE [Activation
# checkpoint regions] in partition.py), so a compiled graph gave the forward's draws' gradients and left the
# generator where the forward did: other gradients and state than eager's. Such a graph is refused; its fallback
# runs each region as eager's checkpoint with the model's own setting (NOTE [Checkpointed regions run eagerly]).
_RANDOM_NAME = re.compile(r"(^|_)(rand\w*|dropout\w*|bernoulli_?|normal_?|multinomial|rrelu\w*|uniform_|"
                          r"exponential_|geometric_|cauchy_|fractional_max_pool\w*|native_dropout)$")


# NOTE [Hooks compiled autograd runs from a forward graph]
# With compiled autograd on when the forward is compiled, Dynamo puts a module's full backward hooks (and hooks
# registered inside the compiled function) into the forward graph as ``trace_wrapped`` calls that hand the hook to
# compiled autograd through a ``BackwardState`` input. The capture has no such state to trace: the user's compile
# failed (``AttributeError: 'BackwardState' object has no attribute 'proxy'``, ``BackendCompilerFailed``, where
# ``aot_eager`` compiles). Such a graph is refused: it runs eagerly as Dynamo's graph, the hooks called as eager
# calls them.
def refuse_backward_state_inputs(example_inputs: Sequence[Any]) -> None:
    """Refuse a Dynamo graph taking a ``BackwardState`` (NOTE [Hooks compiled autograd runs from a forward
    graph])."""
    from torch.fx.experimental._backward_state import BackwardState

    if any(isinstance(value, BackwardState) for value in example_inputs):
        raise CaptureError("aotcache: the graph hands a backward hook to compiled autograd (a BackwardState input: "
                           "a module's full backward hook or a hook registered in the compiled function, compiled "
                           "with compiled autograd on), which the capture cannot trace; the graph runs eagerly.",
                           reason="unsupported_construct")


def refuse_unpreserved_random_regions(gm: torch.nn.Module) -> None:
    """Refuse a Dynamo graph with a checkpointed region that draws random numbers and does not preserve the RNG
    state (NOTE [Checkpointed regions without the RNG state])."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    if hop is None:
        return
    for module in gm.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op != "call_function" or node.target is not hop or node.kwargs.get("preserve_rng_state", True):
                continue
            body = getattr(module, node.args[0].target, None) if node.args and hasattr(node.args[0], "target") \
                else None
            if body is None or _draws_random(body):
                raise CaptureError("aotcache: an activation-checkpointed region with preserve_rng_state=False draws "
                                   "random numbers (dropout): eager's backward recomputes it with new draws, which "
                                   "a compiled backward does not repeat; the graph runs eagerly, each region as "
                                   "eager's torch.utils.checkpoint. Fix: leave preserve_rng_state at True (the "
                                   "compiled graph then saves the draws).", reason="unsupported_construct")


def _draws_random(body: torch.nn.Module) -> bool:
    for submodule in body.modules():
        graph = getattr(submodule, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            if node.op in ("call_function", "call_method"):
                name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
                if _RANDOM_NAME.search(str(name).split(".")[-1]):
                    return True
    return False
