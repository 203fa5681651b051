"""The strides compiled code assumes for its tensor inputs, and restriding of arguments that arrive otherwise.

NOTE [compiled code assumes input strides]
Inductor and AOTInductor generate index arithmetic from the strides of the example inputs: the Python wrapper
asserts them (``assert_size_stride``), an AOTInductor library does not check and would read wrong elements.
Values produced by another compiled graph can differ from the traced strides (the bug this guards against:
an Inductor forward returned a saved activation channels-last while the backward was compiled for the traced
contiguous strides). The pipeline prevents that at the source (a backward is compiled for the strides its
forward reports, NOTE [saved activations take the compiler's layout] in ``aotcache.aot.layouts``); this module is the safety net
at every compiled graph's entry: a tensor argument whose strides differ from the compiled expectation is
copied into a tensor with the expected strides (``torch.empty_strided(...).copy_(arg)``) before the call.

Cost per call and tensor input: one ``stride()`` tuple and one tuple comparison when the strides match (the
normal case, ~0.1 us with :class:`InputLayouts`, which compares all static strides in one list comparison); a
copy of the tensor only on a mismatch. Strides of dimensions of size 0 or 1 are never
a mismatch (they address no other element; Inductor's own assert ignores them too).

Expectations are JSON (stored in artifacts): ``{"stride": [...]}`` for static strides, ``{"order": [...]}``
for a dense input with symbolic sizes (expected strides follow from the call's sizes and that dimension
order, outermost first), ``None`` for inputs that are not tensors or not dense with symbolic sizes (unchecked).

NOTE [Misaligned inputs]
Inductor generates GPU code that assumes 16-byte aligned inputs when its example input was aligned (vectorized
loads), and copies an input that arrives misaligned into aligned memory first; on the CPU it assumes nothing
(unaligned loads). It never guards on alignment, so torch.compile reuses one graph at every offset. aotcache's
signature leaves alignment out too (NOTE [Storage offsets are not part of the signature] in ``aot/signature.py``):
a 0-d timestep taken from ``scheduler.timesteps[i]`` alternates between aligned and misaligned offsets, and a
graph per alignment doubled the compiles of a diffusion loop. So every compiled graph that may assume
alignment makes it true at its entry with :func:`copy_misaligned`: the inductor compiler for the inputs
Inductor lists as assumed aligned (``inputs_to_check``), the aoti compiler for every tensor input of a GPU
library (its static build traces fresh, aligned tensors; newer AOTInductor also checks in C++). The nop
compiler runs eager ATen ops, which take any offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["expected_layout", "expected_layouts", "conform_inputs", "dense_strides", "InputLayouts", "ALIGNMENT",
           "copy_misaligned"]

ALIGNMENT = 16  # bytes: what compiled GPU code assumes of an input it treats as aligned (NOTE [Misaligned inputs])


def _hint(value: Any) -> int:
    """An int for a size or stride; symbolic values by their hint (never adds a guard)."""
    if isinstance(value, torch.SymInt):
        from aotcache.compilers.aoti_lib import int_hint

        return int_hint(value)
    return int(value)


def dense_strides(sizes: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    """Strides of a dense tensor of ``sizes`` whose dimensions, outermost first, are ``order``."""
    strides = [0] * len(sizes)
    running = 1
    for dim in reversed(order):
        strides[dim] = running
        running *= max(int(sizes[dim]), 1)
    return tuple(strides)


def expected_layout(value: Any) -> dict[str, list[int]] | None:
    """The JSON expectation for one example input (see the module NOTE)."""
    if not isinstance(value, torch.Tensor):
        return None
    sizes, strides = tuple(value.shape), tuple(value.stride())
    if not any(isinstance(item, torch.SymInt) for item in (*sizes, *strides)):
        return {"stride": [int(stride) for stride in strides]}
    size_hints = [_hint(size) for size in sizes]
    stride_hints = [_hint(stride) for stride in strides]
    # outermost first: larger strides first; among equal strides (size-1 dims) keep the dimension order
    order = sorted(range(len(sizes)), key=lambda dim: (-stride_hints[dim], dim))
    if not _strides_match(size_hints, stride_hints, dense_strides(size_hints, order)):
        return None  # not dense (expanded, sliced): its strides cannot be derived from its sizes
    return {"order": order}


def expected_layouts(example_inputs: Sequence[Any]) -> list[dict[str, list[int]] | None]:
    """:func:`expected_layout` of each example input."""
    return [expected_layout(value) for value in example_inputs]


def _strides_match(sizes: Sequence[int], actual: Sequence[int], expected: Sequence[int]) -> bool:
    return len(actual) == len(expected) and all(
        have == want or size <= 1 for size, have, want in zip(sizes, actual, expected))


def _expected_strides(layout: dict[str, list[int]], value: torch.Tensor) -> tuple[int, ...] | None:
    if "stride" in layout:
        return tuple(layout["stride"])
    order = layout["order"]
    if len(order) != value.dim():
        return None
    return dense_strides(value.shape, order)


def conform_inputs(args: Sequence[Any], layouts: Sequence[dict[str, list[int]] | None]) -> list[Any]:
    """``args`` as a new list, with tensors whose strides differ from ``layouts`` copied into the expected ones.

    A tensor of another rank is passed unchanged (the compiled graph's own checks name the mismatch).
    """
    conformed = list(args)
    for index, layout in enumerate(layouts):
        if layout is None or index >= len(conformed):
            continue
        value = conformed[index]
        if not isinstance(value, torch.Tensor):
            continue
        expected = _expected_strides(layout, value)
        if expected is None:
            continue
        actual = value.stride()
        if actual == expected or len(actual) != len(expected) or _strides_match(value.shape, actual, expected):
            continue
        conformed[index] = torch.empty_strided(value.shape, expected, dtype=value.dtype,
                                               device=value.device).copy_(value)
    return conformed


class InputLayouts:
    """``layouts`` prepared once for :meth:`conform` on every call: the static expectations as int tuples, all
    compared in one list comparison; only a call where one differs takes :func:`conform_inputs`'s per-input
    path (which also forgives the strides of size-0/1 dimensions and copies the others)."""

    __slots__ = ("layouts", "_static_indices", "_static_strides", "_symbolic")

    def __init__(self, layouts: Sequence[dict[str, list[int]] | None]) -> None:
        self.layouts = list(layouts)
        static = [(index, tuple(layout["stride"])) for index, layout in enumerate(self.layouts)
                  if layout is not None and "stride" in layout]
        self._static_indices = [index for index, _ in static]
        self._static_strides = [strides for _, strides in static]
        self._symbolic = any(layout is not None and "stride" not in layout for layout in self.layouts)

    def conform(self, args: Sequence[Any]) -> list[Any]:
        """As :func:`conform_inputs` (a new list, arguments with other strides copied into the expected ones)."""
        if not self._symbolic:
            try:
                if [args[index].stride() for index in self._static_indices] == self._static_strides:
                    return list(args)
            except (AttributeError, IndexError, TypeError):  # not a tensor, fewer arguments: the careful path
                pass
        return conform_inputs(args, self.layouts)


def copy_misaligned(args: list[Any], indices: Sequence[int]) -> None:
    """Replace (in ``args``) each tensor at ``indices`` whose data is not :data:`ALIGNMENT`-byte aligned by an
    aligned copy with the same sizes and strides (NOTE [Misaligned inputs]); an aligned one costs one pointer
    check. Expanded and overlapping inputs keep their strides: the storage they span is copied."""
    for index in indices:
        value = args[index]
        if not isinstance(value, torch.Tensor) or value.data_ptr() % ALIGNMENT == 0 or value.numel() == 0:
            continue
        span = 1 + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))
        storage = torch.empty(span, dtype=value.dtype, device=value.device)
        storage.copy_(value.as_strided((span,), (1,)))
        args[index] = storage.as_strided(value.shape, value.stride())
