"""Saved activations in the layout the forward compiler chose; the backward is compiled for that layout.

NOTE [saved activations take the compiler's layout]
A compiler may lay out a value differently from its traced strides: Inductor on CPU turns convolution results
channels-last when a graph has convolutions ("layout optimization"). For the module's own outputs that would be
visible to the user, so those always keep their traced strides. Saved activations are seen only by our own
backward, so the pipeline lets the forward compiler choose their layout and compiles the backward for the
strides the compiled forward really returns:

1. :func:`mark_layout_free_outputs` lists the saved-tensor outputs of the forward graph in
   ``fw_gm.meta[LAYOUT_FREE_OUTPUTS]``. A compiler that honours it may return those outputs with other strides
   and then reports every output's strides as ``compiled.output_strides`` (a list of int tuples, ``None`` where
   unknown). A compiler that ignores the key keeps traced strides and reports nothing: nothing changes.
2. :func:`backward_examples` re-strides the backward's example inputs (and its placeholders' ``meta["val"]``)
   to the reported strides, so the backward compiler builds code for them.

Only static shapes: with symbolic sizes a reported stride is one size's value, so nothing is marked. The
input-stride check at every compiled graph's entry (``aotcache.compilers.input_layout``) remains the safety
net: a saved value whose strides differ from what the backward was compiled for is copied, never misread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

__all__ = ["LAYOUT_FREE_OUTPUTS", "mark_layout_free_outputs", "backward_examples"]

LAYOUT_FREE_OUTPUTS = "aotcache_layout_free_outputs"


def _is_static_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not any(
        isinstance(item, torch.SymInt) for item in (*value.shape, *value.stride(), value.storage_offset()))


def mark_layout_free_outputs(fw_gm: fx.GraphModule, primals: Sequence[Any], saved: Sequence[Any],
                             num_fwd_outputs: int) -> None:
    """Let the forward compiler choose the layout of the saved tensors (static graphs only; see the NOTE)."""
    if any(isinstance(value, torch.SymInt) or (isinstance(value, torch.Tensor) and not _is_static_tensor(value))
           for value in primals):
        return
    free = [num_fwd_outputs + index for index, value in enumerate(saved) if _is_static_tensor(value)]
    if free:
        fw_gm.meta[LAYOUT_FREE_OUTPUTS] = free


def _restrided(value: torch.Tensor, strides: Sequence[int]) -> torch.Tensor | None:
    """``value`` (a fake tensor) with ``strides``, or None when its storage cannot hold that layout."""
    try:
        return value.as_strided(value.shape, tuple(strides), value.storage_offset())
    except (RuntimeError, ValueError):
        return None


def backward_examples(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, forward: Any, saved: Sequence[Any],
                      tangents: Sequence[Any], num_fwd_outputs: int) -> list[Any]:
    """The backward's example inputs ``[*saved, *tangents]``, saved tensors re-strided as ``forward`` returns them.

    Placeholders of ``bw_gm`` whose example changes get the new value as ``meta["val"]`` too.
    """
    examples = [*saved, *tangents]
    free = set(fw_gm.meta.get(LAYOUT_FREE_OUTPUTS) or ())
    reported = getattr(forward, "output_strides", None)
    if not free or not isinstance(reported, (list, tuple)) or len(reported) != num_fwd_outputs + len(saved):
        return examples
    placeholders = [node for node in bw_gm.graph.nodes if node.op == "placeholder"]
    for index, value in enumerate(saved):
        strides = reported[num_fwd_outputs + index]
        if num_fwd_outputs + index not in free or strides is None or not isinstance(value, torch.Tensor):
            continue
        strides = tuple(int(stride) for stride in strides)
        if len(strides) != value.dim() or strides == tuple(value.stride()):
            continue
        restrided = _restrided(value, strides)
        if restrided is None:
            continue  # the entry check copies such a value into the traced strides
        examples[index] = restrided
        if index < len(placeholders):
            placeholders[index].meta["val"] = restrided
    return examples
