"""Inputs that share memory and are mutated (``f(x, x)`` where ``f`` mutates its first argument, overlapping
views of one tensor): captured over one *synthetic base* per shared memory region, the views regenerated.

NOTE [Synthetic bases]
Capture traces each input as its own tensor, which is wrong when one is mutated and another reads the same
memory: the reader would see the old values. So a signature whose mutated inputs overlap
(``CaptureError`` reason ``aliased_mutation``) is compiled as another function: per group of inputs sharing a
storage, one base tensor (a 1-D view over the bytes the group spans) is the graph input, and inside the
function each member is regenerated as ``base.as_strided(size, stride, offset)``. Functionalization then sees
the members as views of one tensor, so a write through one is read through the others, and the mutation
epilogue writes the base's new value back into the caller's memory. The geometry of every member is part of
the signature (sizes, strides, storage offsets relative to the group and which inputs share memory), so the
plan is fixed per signature. Not used with ``dynamic=True`` (geometry not in the signature), for members of different dtypes, or
where a member requires grad under grad mode (its gradient would flow to the base, not to that member):
those signatures take the other fallbacks (NOTE [Capture fallback]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from aotcache.aot.hot_path import storage_object
from aotcache.aot.keyed_nodes import unflatten_arguments

__all__ = ["SyntheticBasePlan", "plan_synthetic_bases", "SyntheticBaseRuntime"]


@dataclasses.dataclass(frozen=True)
class _Member:
    position: int  # flat argument position
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the group's base


@dataclasses.dataclass(frozen=True)
class _Group:
    start: int  # storage offset (elements) of the base in the traced call (each call places its own)
    length: int  # elements the base spans
    members: tuple[_Member, ...]


@dataclasses.dataclass(frozen=True)
class SyntheticBasePlan:
    """Which flat arguments become views of which base (NOTE [Synthetic bases])."""

    groups: tuple[_Group, ...]
    others: tuple[int, ...]  # flat positions passed through unchanged, after the bases
    num_flat: int

    def inner_arguments(self, flat_args: Sequence[Any]) -> list:
        """``[base per group..., other flat arguments...]`` for one call's ``flat_args``."""
        bases = []
        for group in self.groups:
            # the signature keys offsets relative to the group (NOTE [Offsets of arguments that share memory]):
            # the base starts where this call's first member starts, less that member's offset in the group
            anchor = flat_args[group.members[0].position]
            bases.append(anchor.as_strided((group.length,), (1,), anchor.storage_offset() - group.members[0].offset))
        return [*bases, *(flat_args[position] for position in self.others)]

    def outer_arguments(self, inner: Sequence[Any]) -> list:
        """The original flat arguments, members regenerated as views of their base (inside the trace)."""
        flat: list[Any] = [None] * self.num_flat
        for base, group in zip(inner, self.groups):
            for member in group.members:
                # as_strided takes an offset in the storage, and the base starts at group.start in it
                flat[member.position] = base.as_strided(member.size, member.stride,
                                                        base.storage_offset() + member.offset)
        for value, position in zip(inner[len(self.groups):], self.others):
            flat[position] = value
        return flat


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last] element of its storage a (non-empty) tensor touches."""
    first = tensor.storage_offset()
    return first, first + sum((n - 1) * abs(step) for n, step in zip(tensor.shape, tensor.stride()))


def plan_synthetic_bases(flat_args: Sequence[Any], dynamic: Any) -> SyntheticBasePlan | None:
    """The plan for ``flat_args``, or None where NOTE [Synthetic bases] does not apply; ``dynamic`` the call's
    resolved flag or spec: a plan fixes every member's geometry, so any dynamic dimension rules it out (a plan
    under a signature with masked sizes ran a later call of other sizes through the first call's geometry)."""
    if dynamic is True or (isinstance(dynamic, tuple) and any(dynamic)):
        return None
    by_storage: dict[int, list[int]] = {}
    for position, arg in enumerate(flat_args):
        if isinstance(arg, torch.Tensor):
            if arg.layout != torch.strided or arg.is_meta or type(arg) not in (torch.Tensor, torch.nn.Parameter):
                return None
            if arg.numel():
                by_storage.setdefault(storage_object(arg), []).append(position)
    groups, grouped = [], set()
    for positions in by_storage.values():
        if len(positions) < 2:
            continue
        tensors = [flat_args[p] for p in positions]
        if len({t.dtype for t in tensors}) != 1:
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None
        spans = [_span(t) for t in tensors]
        start, end = min(s[0] for s in spans), max(s[1] for s in spans)
        members = tuple(_Member(p, tuple(t.shape), tuple(t.stride()), t.storage_offset() - start)
                        for p, t in zip(positions, tensors))
        groups.append(_Group(start, end - start + 1, members))
        grouped.update(positions)
    if not groups:
        return None
    others = tuple(p for p in range(len(flat_args)) if p not in grouped)
    return SyntheticBasePlan(tuple(groups), others, len(flat_args))


class SyntheticBaseRuntime:
    """Runs a signature through an inner ``AOTFunction`` over synthetic bases (NOTE [Synthetic bases])."""

    kind = "synthetic_base"

    def __init__(self, plan: SyntheticBasePlan, inner: Callable, metadata: Any) -> None:
        self.plan = plan
        self.inner = inner
        self.metadata = metadata

    def __call__(self, *flat_args: Any) -> Any:
        return self.inner(*self.plan.inner_arguments(flat_args))


def synthetic_base_function(fn: Callable, plan: SyntheticBasePlan, in_spec: Any) -> Callable:
    """``fn`` as a function of ``plan.inner_arguments(...)``: members are regenerated from their base."""

    def over_bases(*inner: Any) -> Any:
        args, kwargs = unflatten_arguments(plan.outer_arguments(inner), in_spec)
        return fn(*args, **kwargs)

    over_bases.__wrapped__ = fn  # type: ignore[attr-defined]
    return over_bases
