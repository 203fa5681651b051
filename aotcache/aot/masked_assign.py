"""Boolean-mask assignment ``x[mask] = value`` captured without data-dependent shapes.

NOTE [Masked assignment as where]
``x[mask] = value`` with a boolean ``mask`` is ``index_put_`` with a boolean index, whose kernel first turns
the mask into indices (``nonzero``: an output shape that depends on the data), so a fake-tensor capture
refuses it. When ``value`` does not depend on how many elements the mask selects (a number, or a tensor of
``x``'s dtype broadcastable to the dimensions after the mask's), the assignment is the same as
``x.copy_(torch.where(mask, value, x))``: same values, same in-place write into ``x`` (and its views), same
gradients (the value's gradient is summed over the selected elements either way). SpecAugment-style masking
does this (Wav2Vec2, HuBERT, WavLM: ``hidden_states[mask_time_indices] = self.masked_spec_embed``), and so
does ``scores[mask] = -inf``. While a function is captured, :class:`MaskedAssignAsWhere` makes that
rewrite; any other ``__setitem__`` runs as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["MaskedAssignAsWhere"]

_SETITEM = torch.Tensor.__setitem__


def _shape_static_mask_assignment(target: Any, index: Any, value: Any) -> tuple[torch.Tensor, Any] | None:
    """``(mask, value)`` when ``target[index] = value`` can be written as a ``where`` (NOTE [Masked assignment
    as where]), else None."""
    if isinstance(index, tuple) and len(index) == 1:
        index = index[0]
    if not (isinstance(target, torch.Tensor) and isinstance(index, torch.Tensor) and index.dtype == torch.bool):
        return None
    if target.layout != torch.strided or index.dim() == 0 or index.dim() > target.dim():
        return None
    if tuple(index.shape) != tuple(target.shape[:index.dim()]):
        return None  # eager raises its own shape error
    trailing = tuple(target.shape[index.dim():])
    if isinstance(value, (bool, int, float)) and not isinstance(value, torch.SymInt):
        # as index_put_, the number is cast to x's dtype first: where() with a float number and an integer x
        # would compute in float32 and round x's other (large) elements on the way back
        return index, torch.full((), value, dtype=target.dtype, device=target.device)
    if not isinstance(value, torch.Tensor) or value.dtype != target.dtype or value.device != target.device:
        return None
    if value.dim() > len(trailing):
        return None  # a leading dimension per selected element: its size depends on the mask's data
    try:
        if tuple(torch.broadcast_shapes(tuple(value.shape), trailing)) != trailing:
            return None
    except RuntimeError:
        return None
    return index, value


class MaskedAssignAsWhere(torch.overrides.TorchFunctionMode):
    """While capturing: ``x[bool_mask] = value`` as ``x.copy_(torch.where(mask, value, x))`` where that is exact
    (NOTE [Masked assignment as where])."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        if func is _SETITEM and len(args) == 3 and not kwargs:
            target, index, value = args
            rewrite = _shape_static_mask_assignment(target, index, value)
            if rewrite is not None:
                mask, value = rewrite
                mask = mask.reshape(*mask.shape, *([1] * (target.dim() - mask.dim())))
                target.copy_(torch.where(mask, value, target))
                return None
        return func(*args, **(kwargs or {}))
