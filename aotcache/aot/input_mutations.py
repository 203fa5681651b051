"""Input mutations during capture: which metadata mutations can be replayed, resizes that cannot, and inputs
that share memory with a mutated one. Used by the analysis pass of :mod:`aotcache.aot.capture`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from aotcache.aot.errors import CaptureError

__all__ = ["layout_of", "same_layout", "replayable_metadata_mutation", "RejectInputResize", "refuse_kernel_resize",
           "check_mutated_inputs_do_not_alias", "mutated_input_overlaps", "refuse_value_of_another_shape"]


def layout_of(tensor: torch.Tensor) -> tuple:
    """Sizes, strides and storage offset of ``tensor`` (ints, or SymInts with symbolic shapes)."""
    return (*tensor.shape, "strides", *tensor.stride(), "offset", tensor.storage_offset())


def same_layout(before: tuple, after: tuple) -> bool:
    """Whether two :func:`layout_of` results are provably equal for every size the ShapeEnv allows.

    NOTE [Semantic layout comparison]
    With symbolic shapes, a guard raised while the function runs can relate two sizes (``x + y`` guards
    ``s0 == s2``; ``x @ w`` guards ``s1 == s2``) or pin one (``s0 == 2``). The ShapeEnv then records a
    replacement, and every SymInt mentioning the replaced symbol prints (and evaluates) in terms of the
    other one, although the tensor's layout never changed. So layouts are compared as expressions under
    the ShapeEnv's replacements and facts (``statically_known_true(a == b)``, which adds no guard), never as
    strings: a relating guard is not a mutation, while ``t_()`` (sizes swapped), ``unsqueeze_()`` (rank),
    ``as_strided_()`` / ``resize_()`` (new sizes, strides or offset) still differ.
    """
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if len(before) != len(after):
        return False
    for old, new in zip(before, after):
        if isinstance(old, str) or isinstance(new, str):  # the section markers of layout_of
            if old != new:
                return False
        elif not statically_known_true(old == new):
            return False
    return True


def _metadata_mutation_error(index: int, position: int, why: str = "") -> CaptureError:
    return CaptureError(
        f"aotcache: graph input {index} (flat argument {position}) has its metadata mutated in place "
        f"(size/stride/offset changed, e.g. by t_(), transpose_(), resize_(), as_strided_()){why}. This is not "
        f"supported; use the out-of-place op (x = x.t()) instead.", reason="metadata_mutation")


def storage_of(probe: Any) -> StorageWeakRef | None:
    """The storage a probe (a functional input) holds before the function runs, for :func:`check_storage_kept`."""
    return StorageWeakRef(probe.untyped_storage()) if isinstance(probe, torch.Tensor) else None


def check_storage_kept(index: int, position: int, probe: torch.Tensor, before: StorageWeakRef | None) -> None:
    """Refuse an input whose storage the function replaced: ``x.set_(y)`` or ``x.data = y``.

    Functionalization records ``set_`` only as a storage change (neither a data nor a metadata mutation), and
    ``.data =`` not at all (the wrapper gets another storage); unrefused, the real input kept its old value.
    """
    changed_storage = getattr(torch, "_functionalize_was_storage_changed", None)
    if ((changed_storage is not None and changed_storage(probe.elem))
            or (before is not None and StorageWeakRef(probe.untyped_storage()) != before)):
        raise CaptureError(
            f"aotcache: graph input {index} (flat argument {position}) has its storage replaced in place "
            f"(x.set_(y) or x.data = y), which a graph cannot write back into the caller's tensor. Return the new "
            f"tensor instead, or call set_() outside the compiled function.", reason="metadata_mutation")


def replayable_metadata_mutation(index: int, position: int, probe: torch.Tensor, before: tuple,
                                  requiring_grad: bool) -> list | None:
    """``[size, stride, storage_offset]`` of an input whose view metadata the function changed in place, or
    None when the changes cancel out.

    NOTE [Metadata mutations]
    ``x.t_()`` or ``x.unsqueeze_(0)`` on an input change only its size/stride/offset: the graph needs no output
    for it. The runtime gives the real input its final geometry with ``as_strided_`` and runs the graph on an
    alias with the traced geometry (outputs that are the input, or views of it, come from the real input).
    A data mutation of the same input is written into it after the graph, in its final geometry (the one the
    graph returns its new value in). Replayed only when the geometry is static (ints) and, under grad mode,
    the input does not require grad (the joint graph's gradient would have the final geometry, not the
    input's); ``set_`` (a storage swap) and ``resize_`` (may reallocate) stay errors.

    :raises CaptureError: the mutation is not one of those.
    """
    after = layout_of(probe)
    changed_storage = getattr(torch, "_functionalize_was_storage_changed", None)
    if changed_storage is not None and changed_storage(probe.elem):
        raise _metadata_mutation_error(index, position, " and its storage replaced (set_())")
    if same_layout(before, after):
        if changed_storage is not None:
            return None  # a net no-op (t_() of a 1-D tensor, t_() twice): nothing to replay
        raise _metadata_mutation_error(index, position, " without a net change of layout (e.g. set_())")
    if requiring_grad:
        raise _metadata_mutation_error(index, position, " while it requires grad")
    if not all(type(value) is int for value in after if not isinstance(value, str)):
        raise _metadata_mutation_error(index, position, " to symbolic sizes (dynamic=True)")
    size, stride = list(probe.shape), list(probe.stride())
    return [[int(v) for v in size], [int(v) for v in stride], int(probe.storage_offset())]


def refuse_value_of_another_shape(index: int, position: int, probe: torch.Tensor) -> None:
    """Refuse an input whose new value has another shape than the input (NOTE [out= arguments an op resizes]).

    NOTE [out= arguments an op resizes]
    An op called with ``out=`` an input of another shape resizes it (``torch.cosh(x, out=y)`` with ``y`` of 4
    elements and ``x`` of 2x3; ``torch.mv(a, b, out=torch.empty(0))``). Functionalization records that as a data
    mutation whose new value has the op's shape, while the input keeps its old sizes and no metadata mutation is
    recorded: the compiled call's epilogue then copied a 2x3 value into the 4-element tensor and raised ("The
    size of tensor a (4) must match ...") where eager resizes it (PyTorch's test_misc
    ``test_out_variants_with_resizing_on_graph_inputs*`` through ``aotcache.compile``, session 20). Such a capture
    is refused; the fallback lets the op resize the caller's tensor. A symbolic trace checks it again on its own
    sizes (``_verify_analysis`` in capture.py): the analysis ran on static probes, so the comparison there is what
    makes "the value has the argument's sizes" a guard of a dynamic graph, which a call that resizes then misses.
    """
    value = torch._from_functional_tensor(probe.elem)
    if tuple(value.shape) != tuple(probe.shape):
        raise _metadata_mutation_error(index, position, " to another shape by an op writing into it (an out= "
                                                        "argument of another shape, which the op resizes)")


class RejectInputResize(torch.overrides.TorchFunctionMode):
    """Raises the metadata-mutation :class:`CaptureError` when ``resize_``/``resize_as_`` targets a graph input.

    NOTE [Resize with symbolic shapes]: functionalization cannot resize a tensor to symbolic sizes (torch
    fails with an internal assert, or "tried to directly modify sizes"), so with ``dynamic`` a resize of an
    input is refused before it runs, with the same message as any other metadata mutation; a resize of an
    intermediate that torch refuses becomes a :class:`CaptureError` too (one with static sizes still works).
    An operator whose kernel would resize its arguments is refused too (:func:`refuse_kernel_resize`).
    """

    _RESIZE_METHODS = (torch.Tensor.resize_, torch.Tensor.resize_as_)

    def __init__(self, probes: Sequence[Any], positions: Sequence[int], symbolic: bool) -> None:
        super().__init__()
        self.probes = list(probes)
        self.positions = list(positions)
        self.symbolic = symbolic
        self.called = False  # whether the function resized any tensor (NOTE [Analysis without symbols])

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        if func in self._RESIZE_METHODS and args:
            self.called = True
            for index, probe in enumerate(self.probes):
                if args[0] is probe:
                    raise _metadata_mutation_error(index, self.positions[index])
            try:
                return func(*args, **(kwargs or {}))
            except RuntimeError as exc:
                if not self.symbolic:
                    raise
                raise CaptureError(
                    "aotcache: resize_() of a tensor with symbolic sizes is not supported with dynamic=True "
                    "(functionalization cannot resize to symbolic sizes). Use an out-of-place op (torch.empty, "
                    "narrow, torch.cat), or compile with dynamic=False.") from exc
        if func is _FUSED_OBS_FAKE_QUANT:
            refuse_kernel_resize(func, args, kwargs or {})
        return func(*args, **(kwargs or {}))


def refuse_kernel_resize(func: Any, args: tuple, kwargs: Mapping) -> None:
    """Raises a :class:`CaptureError` before an operator whose kernel would resize a mutable argument runs
    (checked by :class:`RejectInputResize`, the capture's torch-function mode: no second mode on every call).

    NOTE [Kernels that resize their arguments]
    ``fused_moving_avg_obs_fake_quant`` (a per-channel ``FusedMovingAvgObsFakeQuantize``: the weight observers of
    eager-mode QAT's default qconfigs) resizes its scale / zero point (``[1]``) and running min / max (``[0]``)
    to one entry per channel inside its kernel on the first forward, while its fake kernel keeps their sizes.
    The captured graph then returned new values of sizes it did not know: the epilogue's copy into the buffers
    raised ("output with shape [1] doesn't match the broadcast shape [4]"; a smaller value would have been
    broadcast silently), and Inductor's generated code failed its size assertion. Such a call is refused (the
    fallback runs it with eager's results); once the buffers have their per-channel sizes the kernel resizes
    nothing, so the next call is captured (its signature has the new sizes): ``aot_module``'s fallback is per
    signature, and ``aotcache.compile`` runs the refused call eagerly without choosing the Dynamo way
    (``CaptureError.first_call_only``).
    """
    if func is _FUSED_OBS_FAKE_QUANT and _fake_quant_would_resize(*args, **kwargs):
        raise CaptureError(
            "aotcache: torch.fused_moving_avg_obs_fake_quant (a per-channel FusedMovingAvgObsFakeQuantize, "
            "eager-mode QAT) resizes its scale, zero point and running min / max buffers to one entry per "
            "channel on its first call, which a graph cannot replay; this call falls back, and the next one "
            "(with the per-channel sizes) is captured.",
            reason="metadata_mutation", first_call_only=True)


_FUSED_OBS_FAKE_QUANT = getattr(torch, "fused_moving_avg_obs_fake_quant", None)


def _fake_quant_would_resize(x: Any, observer_on: Any, fake_quant_on: Any, running_min: Any, running_max: Any,
                             scale: Any, zero_point: Any, averaging_const: float, quant_min: int, quant_max: int,
                             ch_axis: int, per_row_fake_quant: bool = False, symmetric_quant: bool = False) -> bool:
    """Whether the kernel resizes a buffer: per channel, any of them without one entry per channel."""
    if not per_row_fake_quant or not isinstance(x, torch.Tensor) or x.dim() <= ch_axis:
        return False
    channels = x.shape[ch_axis]
    return any(isinstance(t, torch.Tensor) and t.numel() != channels
               for t in (running_min, running_max, scale, zero_point))


def _byte_span(tensor: torch.Tensor) -> tuple[int, int] | None:
    """[first, last] byte of its storage a static tensor can touch; None when symbolic or empty."""
    values = (*tensor.shape, *tensor.stride(), tensor.storage_offset())
    if any(not isinstance(value, int) for value in values) or tensor.numel() == 0:
        return None
    size = tensor.element_size()
    first = tensor.storage_offset() * size
    last = first + sum((n - 1) * abs(step) for n, step in zip(tensor.shape, tensor.stride())) * size + size - 1
    return first, last


def mutated_input_overlaps(tensors: Sequence[torch.Tensor], sharing: Sequence[int], mutated: Sequence[int]) -> tuple:
    """Per pair of ``tensors`` that share a storage (``sharing`` as ``storage_sharing`` gives it), one of them at a
    position in ``mutated``: ``(i, j, overlap)``, ``overlap`` whether their byte spans meet (None: not known, a
    symbolic or empty tensor). What :func:`check_mutated_inputs_do_not_alias` decided a graph on, for guards that
    do not hold the inputs' offsets (NOTE [Overlap in the call contract] in dynamo_graph.py)."""
    relation = []
    for j, group in enumerate(sharing):
        for i in range(group, j):
            if sharing[i] != group or (i not in mutated and j not in mutated):
                continue
            first, second = _byte_span(tensors[i]), _byte_span(tensors[j])
            overlap = (None if first is None or second is None
                       else not (first[1] < second[0] or second[1] < first[0]))
            relation.append((i, j, overlap))
    return tuple(relation)


def check_mutated_inputs_do_not_alias(fake_args: Sequence[Any], positions: list, inputs: list) -> None:
    """Refuse a mutated input that may overlap another input. Each input is traced as its own tensor, which
    is exact for inputs over disjoint memory, such as two row slices of one buffer: static inputs whose byte
    spans are disjoint are accepted (the signature holds their geometry, so a call with overlapping views of
    the same storage is traced again and refused then)."""
    by_storage: dict[StorageWeakRef, list[int]] = {}
    for index, pos in enumerate(positions):
        arg = fake_args[pos]
        if not isinstance(arg, torch.Tensor):
            continue
        ref = StorageWeakRef(arg.untyped_storage())
        for other in by_storage.setdefault(ref, []):
            if not (inputs[index].mutates_data or inputs[other].mutates_data):
                continue
            mine, theirs = _byte_span(arg), _byte_span(fake_args[positions[other]])
            if mine is not None and theirs is not None and (mine[1] < theirs[0] or theirs[1] < mine[0]):
                continue
            # (the leading phrases are PyTorch's own, so that code matching its errors matches ours)
            same = fake_args[positions[other]] is arg
            phrase = ("Encountered duplicated inputs that are mutated in the graph" if same
                      else "Encountered aliased inputs that are mutated")
            raise CaptureError(
                f"aotcache: {phrase}: graph inputs {other} and {index} share memory (views of one tensor, or the "
                f"same tensor twice) and one of them is mutated in place; this is not supported. Pass separate "
                f"tensors (e.g. .clone() one of them).", reason="aliased_mutation")
        by_storage[ref].append(index)
