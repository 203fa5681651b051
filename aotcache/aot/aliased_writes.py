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
(``t.add_(t)``, ``t.mul_(t.view_as(t))``, ``t.copy_(t)``: each element reads only itself), blocks known to share
no byte (``buf[0].copy_(buf[1])``; interleaved ones too, whose byte ranges meet: a fused tensor's halves
``t[..., :k].sub_(t[..., k:])``, ``t[:, 0::2].copy_(t[:, 1::2])``, told apart modulo a stride, symbolic sizes
included), or the 0-dim value of a fill (``t.masked_fill_(m, t[0, 0])``: the value's element is written with
itself at most) -- and refused otherwise (``unsupported_construct``), so the fallback runs the call as eager
does, with eager's values or error. ``t[idx] = u`` and ``t += u`` are checked as the copy / op they run
(NOTE [Augmented and indexed assignments]), ``out=`` arguments as the write they are (NOTE [out= arguments reading
their target]). Not seen: in-place ops called from inside torch's own Python functions. Custom Functions torch
defines are checked as the user's are (Dynamo's graph of a user's Function, which the fallback runs, holds its
backward in one of them).

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

NOTE [A tensor's .data set to itself]
``module.to(dtype)`` (or ``.float()``, ``.to(device)``) where nothing converts ends in ``Module._apply`` doing
``param.data = param.to(...)``, and ``to()`` returns the tensor itself: ``param.data = param``, which swaps
nothing and leaves the version counter alone. transformers' Switch Transformers router runs
``self.classifier = self.classifier.to(self.dtype)`` in every forward; refused as a ``.data`` assignment, the whole
model ran eagerly under ``aotcache.compile`` (``test_module_to_its_own_dtype_inside_forward_is_captured_whole``).
So an assignment of a tensor's ``.data`` to that same tensor object is skipped (not run on the trace tensor, where it
would replace the functional wrapper's storage) instead of refused; any other tensor, even a view or an alias of the
same storage, is still refused. Dynamo writes the same assignment into its graph as ``torch.Tensor.set_(p, p2)``
followed by a helper of its own that lowers ``p``'s version counter by one (eager's ``.data =`` leaves it alone), and
``p2`` is ``p.to(...)``, the very tensor where nothing converts (Dynamo's example values are one object, and its
guards keep the dtype and device they were traced with). :func:`drop_dynamo_data_self_assignments` removes such a
pair from Dynamo's graph before the capture; before, the region ran eagerly and, the helper being a closure the key
cannot name, was never cached. A ``set_`` of another tensor, or one without Dynamo's helper after it (a ``p.set_(p)``
the program wrote, which moves the version counter), stays and is refused as before.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from aotcache.aot.errors import CaptureError

__all__ = ["RefuseAliasedWrites", "drop_dynamo_data_self_assignments", "in_custom_backwards"]


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


def _geometry(tensor: torch.Tensor) -> tuple[Any, list[tuple[Any, Any]], Any]:
    """``tensor``'s bytes in its storage as ``(first byte, [(size, stride in bytes)], element size)`` with every
    stride made non-negative (a dimension walked backwards starts at its last element) and dimensions known to
    add no bytes (size 1, stride 0) left out."""
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    dims = []
    for n, stride in zip(tensor.shape, tensor.stride()):
        if _known(n == 1) or _known(stride == 0):
            continue
        if _known(stride < 0):
            start += (n - 1) * stride * size
            stride = -stride
        dims.append((n, stride * size))
    return start, dims, size


def _known_ge(a: Any, b: Any) -> bool | None:
    """``a >= b`` where known, else None."""
    if _known(a >= b):
        return True
    if _known(a < b):
        return False
    return None


def _disjoint_modulo(a: tuple, b: tuple, period: Any) -> bool:
    """Whether every byte of ``a`` and of ``b`` (:func:`_geometry`) is known to fall, modulo ``period``, into two
    separate ranges: the strides at least ``period`` are its multiples, the others span less than it (column
    blocks ``t[:, :k]`` / ``t[:, k:]``, even and odd elements ``t[0::2]`` / ``t[1::2]``)."""
    spans = []
    for start, dims, size in (a, b):
        span = size
        for n, stride in dims:
            outer = _known_ge(stride, period)
            if outer is None:
                return False
            if outer:
                if not _known(stride % period == 0):
                    return False
            else:
                span = span + (n - 1) * stride
        spans.append(span)
    gap = _modulo(b[0] - a[0], period)  # where b's range begins, a's beginning at 0
    return _known(spans[0] <= gap) and _known(gap + spans[1] <= period)


def _modulo(value: Any, period: Any) -> Any:
    """``value % period``, without a symbolic ``Mod`` where ``value`` is known to lie within one period of 0
    (sympy keeps ``Mod(-12, 8*s0)`` unevaluated, so that nothing about it would be known)."""
    if _known(value >= 0) and _known(value < period):
        return value
    if _known(value < 0) and _known(value + period >= 0):
        return value + period
    return value % period


def _disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one storage) are known to reach no common byte: their byte ranges do not meet
    (``buf[0]`` / ``buf[1]``), or their blocks interleave without meeting (:func:`_disjoint_modulo`, trying each
    stride as the period)."""
    if _known(a.numel() == 0) or _known(b.numel() == 0):
        return True
    ga, gb = _geometry(a), _geometry(b)
    ends = [start + size + sum((n - 1) * stride for n, stride in dims) for start, dims, size in (ga, gb)]
    if _known(ends[0] <= gb[0]) or _known(ends[1] <= ga[0]):
        return True
    periods = [stride for _, dims, _ in (ga, gb) for _, stride in dims]
    return any(_disjoint_modulo(ga, gb, period) for period in periods if _known(period > 0))


def _is_data_setter(func: Any) -> bool:
    return getattr(func, "__name__", "") == "__set__" and getattr(func, "__self__", None) is torch._C.TensorBase.data


def _is_dynamo_version_lowering(target: Any) -> bool:
    """Dynamo's helper that undoes the version bump of the ``set_`` it writes for ``t.data = u``."""
    return (isinstance(target, types.FunctionType) and target.__module__ == "torch._dynamo.variables.builtin"
            and target.__name__.startswith("_lower_version_count_by") and target.__closure__ is None)


def drop_dynamo_data_self_assignments(gm: torch.fx.GraphModule) -> int:
    """Remove from Dynamo's graph the ``.data`` assignments of a tensor to itself (NOTE [A tensor's .data set to
    itself]); how many were removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.Tensor.set_ or len(node.args) != 2 or node.kwargs:
            continue
        target, source = node.args
        if not isinstance(target, torch.fx.Node) or not isinstance(source, torch.fx.Node):
            continue
        example = target.meta.get("example_value")
        if source is not target and (example is None or source.meta.get("example_value") is not example):
            continue
        lowerings = list(node.users)
        if not lowerings or not all(user.op == "call_function" and _is_dynamo_version_lowering(user.target)
                                    for user in lowerings):
            continue
        for user in lowerings:  # each returns the tensor it was given: the target
            user.replace_all_uses_with(target)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        removed += 1
    if removed:
        gm.recompile()
    return removed


def _traced(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value) is not torch.Tensor and type(value) is not torch.nn.Parameter


# NOTE [Augmented and indexed assignments]
# ``t += u`` (``__iadd__`` and the other augmented operators) is the in-place op under another name, whose kernel
# runs inside the C++ method where no mode sees it, so it is checked as that op (``t[:, 1:] += t[:, :-1]``).
# ``t[idx] = u`` with basic indices (ints, slices with a positive step, None, Ellipsis) writes the region
# ``t[idx]``, computed here from sizes and strides (no view traced), and is checked as ``region.copy_(u)``:
# ``t[:, 1:] = t[:, :-1]`` gave the functional form's ``[[2, 2, 4], ...]`` where eager's copy reads what it has
# already written (``[[2, 2, 2], ...]``), silently. With advanced indices (tensors, masks) or bounds not known,
# the write is ``index_put_`` anywhere in ``t``: a value sharing ``t``'s memory is refused unless known disjoint
# from all of ``t`` or a 0-dim element (``t[[1, 2]] = t[0]`` raises in eager, where the graph computed a value).
#
# NOTE [out= arguments reading their target]
# ``torch.add(t[:3], 1, out=t[1:4])`` raises in eager (its kernels refuse an output partially overlapping an
# input); the graph computed a value, or none at all (the write was lost). An argument laid out exactly as the
# output is allowed for any op (``torch.addmm(c, a, b, out=c)``, ``torch.mm(a, b, out=a)``: eager's kernels
# compute such calls as the functional form does), as is one known disjoint from it; any other overlap is
# refused, so the fallback runs the call with eager's values or error.
_AUGMENTED = {"__iadd__": "add_", "__isub__": "sub_", "__imul__": "mul_", "__itruediv__": "div_",
              "__ifloordiv__": "floor_divide_", "__imod__": "remainder_", "__ipow__": "pow_",
              "__iand__": "bitwise_and_", "__ior__": "bitwise_or_", "__ixor__": "bitwise_xor_",
              "__ilshift__": "bitwise_left_shift_", "__irshift__": "bitwise_right_shift_", "__imatmul__": "matmul_"}


class _Region:
    """The sizes, strides and offset of ``t[idx]`` for basic indices, read as a tensor's by the checks here."""

    def __init__(self, base: torch.Tensor, shape: list, stride: list, offset: Any) -> None:
        self.shape, self._stride, self._offset = tuple(shape), tuple(stride), offset
        self.dtype, self._element_size = base.dtype, base.element_size()

    def stride(self) -> tuple:
        return self._stride

    def storage_offset(self) -> Any:
        return self._offset

    def element_size(self) -> int:
        return self._element_size

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> Any:
        count = 1
        for n in self.shape:
            count = count * n
        return count


def _basic_index_region(base: torch.Tensor, index: Any) -> _Region | None:
    """The region ``base[index]`` writes, or None where ``index`` is not basic or a bound is not known."""
    items = list(index) if isinstance(index, tuple) else [index]
    if not all(item is None or item is Ellipsis or _integer(item)
               or (isinstance(item, slice) and all(part is None or _integer(part)
                                                   for part in (item.start, item.stop, item.step)))
               for item in items):
        return None  # advanced indices, or a bound given as a tensor
    used = sum(1 for item in items if item is not None and item is not Ellipsis)
    if items.count(Ellipsis) > 1 or used > base.dim():
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (base.dim() - used)
    items += [slice(None)] * (base.dim() - sum(1 for item in items if item is not None))
    shape, stride, offset, dim = [], [], base.storage_offset(), 0
    for item in items:
        if item is None:
            shape.append(1)
            stride.append(1)
            continue
        size, step_stride = base.shape[dim], base.stride()[dim]
        dim += 1
        if isinstance(item, slice):
            bounds = _slice_bounds(item, size)
            if bounds is None:
                return None
            start, length, step = bounds
            offset = offset + start * step_stride
            shape.append(length)
            stride.append(step * step_stride)
        else:
            position = item + size if _known(item < 0) else item
            if not _known(position >= 0):
                return None
            offset = offset + position * step_stride
    return _Region(base, shape, stride, offset)


def _integer(value: Any) -> bool:
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _slice_bounds(item: slice, size: Any) -> tuple[Any, Any, int] | None:
    """``(start, length, step)`` of ``item`` over ``size`` elements, where known (positive steps only)."""
    step = 1 if item.step is None else item.step
    if not isinstance(step, int) or step <= 0:
        return None
    bounds = []
    for value, default in ((item.start, 0), (item.stop, size)):
        if value is None:
            value = default
        elif _known(value < 0):
            value = value + size
        if _known(value <= 0):  # clamped to [0, size], as slicing does
            value = 0
        elif _known(value >= size):
            value = size
        elif not (_known(value >= 0) and _known(value <= size)):
            return None
        bounds.append(value)
    start, stop = bounds
    if _known(stop <= start):
        return start, 0, step
    if not _known(stop >= start):
        return None
    return start, (stop - start + step - 1) // step, step


# the in-place fills taking their value as a 0-dim tensor, and that value's position in the arguments
_FILL_VALUE_POSITION = {"fill_": 1, "masked_fill_": 2, "index_fill_": 3, "copy_": 1}


def _fill_value(name: str, args: tuple, kwargs: Mapping) -> Any:
    """The 0-dim ``value`` tensor of an in-place fill (``t.masked_fill_(m, t[0, 0])``, ``t.copy_(t[0, 0])``, ``t[:] =
    t[0, 0]``) of the target's dtype, which may alias the target:
    the fill writes that one value everywhere it writes (the value's own element, if written, is written with
    itself), so whenever eager's kernel reads it, it reads what the functional form reads."""
    position = _FILL_VALUE_POSITION.get(name)
    if position is None:
        return None
    value = args[position] if len(args) > position else kwargs.get("src" if name == "copy_" else "value")
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == args[0].dtype:
        return value
    return None


class RefuseAliasedWrites(torch.overrides.TorchFunctionMode):
    """While tracing: refuse in-place calls whose other arguments overlap the written tensor where the
    functional form would read otherwise than eager's kernel (NOTE [In-place ops reading their target]), and
    ``.data`` assignments to trace tensors (NOTE [.data assignments in a trace])."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        kwargs = kwargs or {}
        if _is_data_setter(func) and args and _traced(args[0]):
            if len(args) > 1 and args[1] is args[0]:
                return None  # NOTE [A tensor's .data set to itself]: a no-op, as in eager
            # not Dynamo-safe: torch.compile gets it wrong too (NOTE [.data assignments in a trace])
            raise CaptureError("aotcache: the function assigns to a tensor's .data (h.data = y) inside the "
                               "compiled function (its forward, or a custom autograd.Function's backward); a "
                               "captured graph would go on reading the old value. Write h = y (or "
                               "h.copy_(y) under torch.no_grad()) instead.", reason="unsupported_construct",
                               dynamo_safe=False)
        name = getattr(func, "__name__", "")
        if name.endswith("__"):
            name = _AUGMENTED.get(name, name)  # NOTE [Augmented and indexed assignments]
        if name == "__setitem__" and len(args) == 3 and isinstance(args[2], torch.Tensor) and _traced(args[0]):
            fill_value = _fill_value("copy_", (args[0], args[2]), {})
            region = _basic_index_region(args[0], args[1])
            if region is not None:
                self._check("copy_", region, ((args[2],), {}), fill_value, storage=_storage(args[0]))
            else:  # advanced indices (or bounds not known): index_put_ anywhere in the target
                self._check("index_put_", args[0], ((args[2],), {}), fill_value)
        elif name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor):
            self._check(name, args[0], (args[1:], kwargs), _fill_value(name, args, kwargs))
        elif kwargs.get("out") is not None:  # NOTE [out= arguments reading their target]
            others = (args, {key: value for key, value in kwargs.items() if key != "out"})
            for out in pytree.tree_leaves(kwargs["out"]):
                if isinstance(out, torch.Tensor):
                    self._check(name, out, others, same_layout_reads_itself=True)
        return func(*args, **kwargs)

    @staticmethod
    def _check(name: str, target: Any, others: Any, fill_value: Any = None, storage: Any = None,
               same_layout_reads_itself: bool = False) -> None:
        if storage is None:
            if not _traced(target):
                return
            storage = _storage(target)
        if storage is None:
            return
        for other in pytree.tree_leaves(others):
            if not isinstance(other, torch.Tensor) or other is fill_value or _storage(other) != storage:
                continue
            if (same_layout_reads_itself or _reads_only_its_own_element(name)) and _same_layout(other, target):
                continue
            if _disjoint(other, target):
                continue
            raise CaptureError(f"aotcache: the call {name} writes a tensor that another of its arguments overlaps "
                               f"(e.g. t.masked_scatter_(m, t), t.index_copy_(0, i, t), t[1:].copy_(t[:-1]), "
                               f"t[idx] = t[0], torch.add(t[:3], 1, out=t[1:4])), inside the compiled function or a "
                               f"custom autograd.Function's backward; eager's kernel then reads elements it has "
                               f"already written (or raises), which a captured graph does not reproduce. Pass a "
                               f"clone (t.op_(..., t.clone())).", reason="unsupported_construct")


@contextlib.contextmanager
def in_custom_backwards(nodes: Sequence[Any]) -> Iterator[None]:
    """:class:`RefuseAliasedWrites` on while each custom ``autograd.Function`` backward among the traced outputs'
    autograd ``nodes`` (:func:`autograd_nodes`, kept alive by the caller) runs (the joint trace's
    ``torch.autograd.grad`` in this block).

    NOTE [Checks inside custom backwards]
    A torch-function mode is off while it handles a call, so a mode around ``torch.autograd.grad`` is off for the
    whole backward, and the Python of a custom backward (``grad.data = ...``, ``t.masked_scatter_(m, t)``) ran
    unchecked. Each custom Function's node in the traced outputs' autograd graph gets a pre-hook that pushes a
    mode of its own and a hook that pops it after the node ran; a node that raises leaves its mode pushed, which
    the block's exit pops. Autograd's own formulas (C++) are torch's, and not checked.
    """
    mode = RefuseAliasedWrites()
    depth = torch._C._len_torch_function_stack()
    handles = []
    for node in nodes:
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            handles.append(node.register_prehook(functools.partial(_push, mode)))
            handles.append(node.register_hook(functools.partial(_pop_after, mode)))
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
