"""Writes a functionalized trace cannot give eager's results for: in-place ops reading their own target through
another argument, and ``.data`` assignments to traced tensors.

NOTE [In-place ops reading their target]
Functionalization turns ``t.op_(..., other)`` into ``t = op(t, ..., other)``: every argument is read before
anything is written. Eager's kernel writes ``t`` while it reads ``other``, and where ``other`` is ``t`` itself or
another view of its memory the result depends on that kernel: ``t.masked_scatter_(m, t)`` reads elements it has
already written (other values than the functional form, silently: a custom backward doing it gave other
gradients), ``t.index_copy_(0, idx, t)`` and partial overlaps (``t[1:].copy_(t[:-1])``) raise in eager ("some
elements of the input tensor and the written-to tensor refer to a single memory location") where the graph
computed a value. While a function is traced (forward, and the backward with its custom ``autograd.Function``
backwards), :class:`RefuseAliasedWrites` looks at each in-place call (a name ending in ``_``) whose other
tensor argument shares memory with the written tensor: allowed where the functional form gives eager's
result -- a pointwise op (or ``copy_``) whose other argument has exactly the written tensor's layout
(``t.add_(t)``, ``t.mul_(t.view_as(t))``, ``t.copy_(t)``: each element reads only itself), or memory ranges that
are known not to overlap (``buf[0].copy_(buf[1])``) -- and refused otherwise (``unsupported_construct``), so the
fallback runs the call as eager does, with eager's values or error. Not seen: ``t[idx] = t...`` (``__setitem__``,
whose written region is only ``t[idx]``), ``out=`` arguments (``torch.addmm(c, a, b, out=c)`` accumulates as
the functional form computes; torch's chunked ``linear_cross_entropy`` backward does it), and in-place ops
called from inside torch's own Python functions. Custom Functions torch defines are checked as the user's are
(Dynamo's graph of a user's Function, which the fallback runs, holds its backward in one of them).

NOTE [.data assignments in a trace]
``h.data = y`` swaps the tensor under ``h`` without autograd seeing it (``h`` keeps its history). On a trace
tensor it replaced the functional wrapper's storage only: the ops after it still read the value ``h`` had
before, so the forward returned ``2 * x * x`` where eager returned ``y * x``, silently (and a custom backward's
``grad.data = ...`` was lost the same way). An input's ``.data =`` was refused already (the caller's tensor cannot
be swapped by a graph: NOTE [Metadata mutations] in input_mutations.py); an intermediate's, a saved tensor's or a
gradient's is refused too now, so the fallback runs the call as written. Reading ``.data`` (``grad.data.mul_(2)``)
is an alias like ``detach()``, which functionalization traces. The refusal is not Dynamo-safe: torch.compile's
graph of ``h2 = h * h; h.data = zeros; return h2`` gave other gradients than eager's (eager's backward of ``h * h``
reads the swapped ``h``), so the fallback runs the call eagerly.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from aotcache.aot.errors import CaptureError

__all__ = ["RefuseAliasedWrites", "in_custom_backwards"]


@functools.lru_cache(maxsize=None)
def _reads_only_its_own_element(name: str) -> bool:
    """Whether the in-place op ``name`` computes each written element from the same element of its other tensor
    arguments only (ATen's pointwise tag, or ``copy_``), so that an argument laid out exactly as the target
    reads what the functional form reads."""
    if name == "copy_":
        return True
    packet = getattr(torch.ops.aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    return any(torch.Tag.pointwise in getattr(packet, overload).tags for overload in packet.overloads())


def _storage(tensor: torch.Tensor) -> StorageWeakRef | None:
    try:
        return StorageWeakRef(tensor.untyped_storage())
    except (RuntimeError, NotImplementedError):  # a tensor without a storage to read (a wrapper subclass)
        return None


def _known(condition: Any) -> bool:
    """Whether ``condition`` (a bool or SymBool) is known to hold, without adding a guard."""
    if isinstance(condition, torch.SymBool):
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(condition))
    return bool(condition)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.dim() != b.dim():
        return False
    return all(_known(x == y) for x, y in zip((*a.shape, *a.stride(), a.storage_offset()),
                                                 (*b.shape, *b.stride(), b.storage_offset())))


def _extent(tensor: torch.Tensor) -> tuple[Any, Any] | None:
    """``[first, last]`` element offsets ``tensor`` reaches in its storage (None for negative strides)."""
    if any(_known(stride < 0) or not _known(stride >= 0) for stride in tensor.stride()):
        return None
    last = tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.storage_offset(), last


def _disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one storage) are known to reach no common byte."""
    if _known(a.numel() == 0) or _known(b.numel() == 0):
        return True
    ea, eb = _extent(a), _extent(b)
    if ea is None or eb is None:
        return False
    size_a, size_b = a.element_size(), b.element_size()
    # byte ranges [first * size, (last + 1) * size)
    return (_known((ea[1] + 1) * size_a <= eb[0] * size_b)
            or _known((eb[1] + 1) * size_b <= ea[0] * size_a))


def _is_data_setter(func: Any) -> bool:
    return getattr(func, "__name__", "") == "__set__" and getattr(func, "__self__", None) is torch._C.TensorBase.data


def _traced(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value) is not torch.Tensor and type(value) is not torch.nn.Parameter


class RefuseAliasedWrites(torch.overrides.TorchFunctionMode):
    """While tracing: refuse in-place calls whose other arguments overlap the written tensor where the
    functional form would read otherwise than eager's kernel (NOTE [In-place ops reading their target]), and
    ``.data`` assignments to trace tensors (NOTE [.data assignments in a trace])."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        kwargs = kwargs or {}
        if _is_data_setter(func) and args and _traced(args[0]):
            # not Dynamo-safe: torch.compile gets it wrong too (NOTE [.data assignments in a trace])
            raise CaptureError("aotcache: the function assigns to a tensor's .data (h.data = y) inside the "
                               "compiled function (its forward, or a custom autograd.Function's backward); a "
                               "captured graph would go on reading the old value. Write h = y (or "
                               "h.copy_(y) under torch.no_grad()) instead.", reason="unsupported_construct",
                               dynamo_safe=False)
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor):
            self._check(name, args[0], (args[1:], kwargs))
        return func(*args, **kwargs)

    @staticmethod
    def _check(name: str, target: torch.Tensor, others: Any) -> None:
        if not _traced(target):
            return
        storage = _storage(target)
        if storage is None:
            return
        for other in pytree.tree_leaves(others):
            if not isinstance(other, torch.Tensor) or _storage(other) != storage:
                continue
            if _reads_only_its_own_element(name) and _same_layout(other, target):
                continue
            if _disjoint(other, target):
                continue
            raise CaptureError(f"aotcache: the in-place call {name} reads the tensor it writes through another "
                               f"argument sharing its memory (e.g. t.masked_scatter_(m, t), t.index_copy_(0, i, t), "
                               f"t[1:].copy_(t[:-1])), inside the compiled function or a custom autograd.Function's "
                               f"backward; eager's kernel then reads elements it has already written (or raises), "
                               f"which a captured graph does not reproduce. Pass a clone (t.op_(..., t.clone())).",
                               reason="unsupported_construct")


@contextlib.contextmanager
def in_custom_backwards(outputs: Sequence[Any]) -> Iterator[None]:
    """:class:`RefuseAliasedWrites` on while each custom ``autograd.Function`` backward reached from ``outputs``
    runs (the joint trace's ``torch.autograd.grad`` in this block).

    NOTE [Checks inside custom backwards]
    A torch-function mode is off while it handles a call, so a mode around ``torch.autograd.grad`` is off for the
    whole backward, and the Python of a custom backward (``grad.data = ...``, ``t.masked_scatter_(m, t)``) ran
    unchecked. Each custom Function's node in the traced outputs' autograd graph gets a pre-hook that pushes a
    mode of its own and a hook that pops it after the node ran; a node that raises leaves its mode pushed, which
    the block's exit pops. Autograd's own formulas (C++) are torch's, and not checked.
    """
    mode = RefuseAliasedWrites()
    depth = torch._C._len_torch_function_stack()
    handles, nodes, seen = [], [], set()
    stack = [out.grad_fn for out in outputs if isinstance(out, torch.Tensor) and out.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)  # alive while the ids in ``seen`` are
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            handles.append(node.register_prehook(functools.partial(_push, mode)))
            handles.append(node.register_hook(functools.partial(_pop_after, mode)))
        stack.extend(next_node for next_node, _ in node.next_functions)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while torch._C._len_torch_function_stack() > depth and _pop(mode):
            pass


def _push(mode: RefuseAliasedWrites, grad_outputs: Any) -> None:
    torch._C._push_on_torch_function_stack(mode)


def _pop_after(mode: RefuseAliasedWrites, grad_inputs: Any, grad_outputs: Any) -> None:
    _pop(mode)


def _pop(mode: RefuseAliasedWrites) -> bool:
    """Pop ``mode`` if it is the innermost torch-function mode; whether it was."""
    length = torch._C._len_torch_function_stack()
    if length and torch._C._get_function_stack_at(length - 1) is mode:
        torch._C._pop_torch_function_stack()
        return True
    return False
