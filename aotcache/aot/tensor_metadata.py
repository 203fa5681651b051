"""Many tensors' metadata compared with a recorded signature in one C-level call (NOTE [Tensor metadata checked in C]).

NOTE [Tensor metadata checked in C]
The hot paths (NOTE [Hot path], NOTE [Call hot path]) compare, at every call, each tensor argument's type, dtype,
device, requires_grad, leafness, sizes and strides with a recorded signature. With C-level getters that is ~0.5 us
per tensor, most of it spent creating the objects they return (a ``torch.Size``, a ``torch.device``, a stride
tuple), and a decoding step passes 30-100 tensors (the module's parameters and buffers, the KV cache): about a
fifth of what aotcache added to a generated token. torch checks the same fields for its own guards in C++
(``torch._C._dynamo.guards.TensorGuards``, behind Dynamo's tensor-match guards), ~0.07 us per tensor. It
compares, per tensor: the exact Python type, the dispatch key set under the thread's dispatch state (which tells
a sparse, mkldnn or nested tensor, a torch.func transform's tensor, and one device type from another), dtype,
device index, requires_grad, and the sizes and strides it is given (None: any value). It is private, so it is
used only where a probe on this torch build (:func:`_c_tensor_guards`) finds every difference the hot paths rely
on rejected and equal tensors accepted; elsewhere the Python comparison runs, as before.

What it leaves to the caller: leafness (compared here for the tensors that require grad, as the signature does),
storage offsets and memory sharing (the caller's, unchanged), and refusing torch.func transform tensors (the call
hot path still checks them itself: the probe covers vmap's tensors only, since probing ``torch.func.grad`` imports
Dynamo, seconds of a warm start that needs none). A guard built under one dispatch state (inside
``torch.inference_mode()``) rejects calls under another: such a call takes the full path, which records it.

One hazard: it reads every tensor's sizes and strides before comparing anything, and a tensor that has none (a
nested tensor, whose layout is strided; sparse and mkldnn tensors have another layout) raises a C++ error that
ends the process instead of a Python exception. So :class:`TensorMetadata` first compares every tensor's layout
and ``is_nested`` (C-level ``map``) and calls the C check only where every tensor is strided and not nested; the
callers have compared the exact types already.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ["TensorMetadata", "taker"]

_LAYOUT = operator.attrgetter("layout")
_NESTED = operator.attrgetter("is_nested")
_IS_LEAF = operator.attrgetter("is_leaf")


def taker(positions: list[int]) -> Any:
    """``flat -> [flat[i] for i in positions]`` in C (``itemgetter``; a tuple, or a list for 0 or 1 positions)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    if positions:
        only = positions[0]
        return lambda flat: [flat[only]]
    return lambda flat: []


def _geometry(tensor: torch.Tensor, dims: Any) -> tuple[list, list]:
    """The sizes and strides the check compares: exact (``dims`` falsy), the sizes outside ``dims`` (a tuple of
    dynamic dimensions; no strides), or the rank only (``dims is True``)."""
    rank = tensor.dim()
    if dims is True:
        return [None] * rank, [None] * rank
    if dims:
        return [None if dim in dims else size for dim, size in enumerate(tensor.shape)], [None] * rank
    return list(tensor.shape), list(tensor.stride())


def _build(tensor_guards: Any, tensors: Sequence[torch.Tensor], dims: Sequence[Any]) -> Any:
    sizes, strides = [], []
    for tensor, tensor_dims in zip(tensors, dims):
        size, stride = _geometry(tensor, tensor_dims)
        sizes.append(size)
        strides.append(stride)
    return tensor_guards(*tensors, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides)


@functools.cache
def _c_tensor_guards() -> Any:
    """torch's ``TensorGuards`` where it behaves as NOTE [Tensor metadata checked in C] relies on, else None
    (probed once, outside any dispatch mode, transform or inference mode the first caller may be in)."""
    try:
        from torch._C._dynamo.guards import TensorGuards
    except ImportError:
        return None
    try:
        # the first caller may be inside a FakeTensorMode (a capture): its tensors would be fake and fail the probe
        with torch.inference_mode(False), torch.enable_grad(), torch._C.DisableTorchFunction(), \
                _disable_current_modes():
            return TensorGuards if _probe(TensorGuards) else None
    except Exception:  # noqa: BLE001 - any surprise from a private API: the Python comparison only
        return None


def _probe(tensor_guards: Any) -> bool:
    def cpu(*shape: int, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*shape, device="cpu", **kwargs)

    recorded = [cpu(2, 3), cpu(4, 3, requires_grad=True), torch.nn.Parameter(cpu(2)), cpu(3)]
    check = _build(tensor_guards, recorded, [False, (0,), False, True]).check

    def accepts(*tensors: torch.Tensor) -> bool:
        return check(*tensors) is True

    def others(position: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        changed = [cpu(2, 3), cpu(4, 3, requires_grad=True), torch.nn.Parameter(cpu(2)), cpu(3)]
        changed[position] = tensor
        return changed

    equal = accepts(cpu(2, 3), cpu(7, 3, requires_grad=True), torch.nn.Parameter(cpu(2)), cpu(5))
    rejected = [
        others(0, cpu(2, 3, dtype=torch.float64)), others(0, cpu(3, 2)), others(0, cpu(3, 2).t()),
        others(0, cpu(2, 3, 1)), others(0, torch.nn.Parameter(cpu(2, 3))), others(0, cpu(2, 3, requires_grad=True)),
        others(0, torch.zeros(2, 3, device="meta")), others(0, cpu(2, 3).to_sparse()),
        others(1, cpu(4, 5, requires_grad=True)), others(1, cpu(4, 3)), others(1, cpu(4, 3, 1, requires_grad=True)),
        others(2, cpu(2)), others(3, cpu(3, 1)),
    ]
    if not equal or any(accepts(*tensors) for tensors in rejected):
        return False
    # a vmap's tensors have the plain type and fields: their dispatch keys must tell them apart (the callers refuse
    # every torch.func transform's tensor themselves; ``torch.func.grad`` is not probed: it imports Dynamo, seconds
    # of a warm start that needs none)
    seen: list[bool] = []

    def inside(tensor: torch.Tensor) -> torch.Tensor:
        seen.append(accepts(*others(0, tensor)))
        return tensor.sum()

    torch.vmap(inside)(cpu(5, 2, 3))
    return seen == [False]


class TensorMetadata:
    """The metadata of some tensors as NOTE [Tensor metadata checked in C] compares it: ``check(tensors)`` is
    whether each has the recorded type, dtype, device, requires_grad, leafness (where it requires grad), sizes and
    strides (per ``dims``: exact where falsy, outside the dynamic dimensions of a tuple, the rank for True)."""

    __slots__ = ("_check", "_count", "_take_grad", "_leaves")

    def __init__(self, check: Any, tensors: Sequence[torch.Tensor]) -> None:
        self._check = check
        self._count = len(tensors)
        grad = [index for index, tensor in enumerate(tensors) if tensor.requires_grad]
        self._take_grad = taker(grad) if grad else None
        self._leaves = list(map(_IS_LEAF, self._take_grad(tensors))) if grad else []

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], dims: Sequence[Any]) -> TensorMetadata | None:
        """The check of ``tensors`` (strided, not nested, plain ``Tensor`` / ``Parameter``), or None where torch
        has no usable C check (the caller compares in Python)."""
        tensor_guards = _c_tensor_guards()
        if tensor_guards is None or not tensors:
            return None
        try:
            if list(map(_LAYOUT, tensors)).count(torch.strided) != len(tensors) or any(map(_NESTED, tensors)):
                return None
            guards = _build(tensor_guards, tensors, dims)
            if guards.check(*tensors) is not True:  # (never expected: the recorded call must pass its own check)
                return None
        except Exception:  # noqa: BLE001 - a private API refusing these tensors: the Python comparison
            return None
        return cls(guards.check, tensors)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> bool:
        # the layouts first: a nested tensor must never reach the C check (it would end the process)
        if list(map(_LAYOUT, tensors)).count(torch.strided) != self._count or any(map(_NESTED, tensors)):
            return False
        try:
            if self._check(*tensors) is not True:
                return False
        except (RuntimeError, TypeError):
            return False
        return self._take_grad is None or list(map(_IS_LEAF, self._take_grad(tensors))) == self._leaves
