"""Pass 1 of the capture: run the function eagerly on fake probes and record what it does to its inputs and outputs.

:func:`analyze` observes which inputs the function mutates (data, or metadata: replayed or refused) or resizes,
which outputs are inputs, views of inputs or of other outputs, Python constants or graph outputs, which require
grad, and which side effects it has; the result, :class:`Analysis`, tells the trace (pass 2,
:mod:`aotcache.aot.capture`, which drives both passes: NOTE [Analysis without symbols] there) what to
functionalize, return and differentiate.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from aotcache.aot.errors import CaptureError
from aotcache.aot.functional_trace import functionalized, to_functional_tensor
from aotcache.aot.input_mutations import (
    RejectInputResize,
    check_mutated_inputs_do_not_alias,
    check_storage_kept,
    layout_of,
    refuse_value_of_another_shape,
    replayable_metadata_mutation,
    same_layout,
    storage_of,
)
from aotcache.aot.keyed_nodes import refuse_outputs_rebuilt_otherwise
from aotcache.aot.masked_assign import MaskedAssignAsWhere
from aotcache.aot.metadata import (
    InputInfo,
    OutputInfo,
    UnsupportedOutputError,
    encode_output_structure,
)
from aotcache.aot.object_outputs import ObjectOutputError, lift_object_outputs
from aotcache.aot.output_checks import (
    check_outputs_keep_requires_grad,
    classify_output,
    has_autograd_history,
    refuse_grad_mode_change,
    refuse_history_under_no_grad,
    refuse_retained_gradients,
)
from aotcache.aot.plain_trace import SpotInPlaceCalls
from aotcache.aot.unsupported_ops import ExplainUnsupportedOps, explain_data_dependent_ops, refuse_optimizer_steps
from aotcache.aot.switched_settings import refuse_switched_settings, restore_thread_settings, thread_settings
from aotcache.aot.symbolic_draws import GeneratorDrawsWithSymbolicSizes
from aotcache.aot.symbolic_scalars import SymbolicScalarTensors
from aotcache.aot.tangents import is_differentiable, is_grad_free_view
from aotcache.aot.tensor_subclasses import refuse_subclass_outputs

__all__ = ["Analysis", "analyze", "is_graph_input"]


def is_graph_input(value: Any) -> bool:
    """Tensors, SymInts and SymFloats are graph inputs; every other flat argument is a constant baked into the
    trace."""
    return isinstance(value, (torch.Tensor, torch.SymInt, torch.SymFloat))


@dataclasses.dataclass
class Analysis:
    """What pass 1 learned; ``outputs`` are completed (view sizes) by the trace."""

    positions: list  # flat positions of graph inputs
    inputs: list  # InputInfo per graph input
    outputs: list  # OutputInfo per flat user output
    out_spec: Any
    out_structure: dict  # NOTE [Output structure] (metadata)
    # fake examples of the forward outputs that get tangents (for making tangent inputs)
    graph_output_examples: list
    needs_autograd: bool
    # effect types (torch EffectType) of side-effectful ops the function calls: see NOTE [Effect tokens]
    effects: list = dataclasses.field(default_factory=list)
    # the function resized a tensor or changed an input's metadata: what it saw on static probes may not hold
    # for symbolic ones (NOTE [Analysis without symbols])
    shape_sensitive: bool = False
    # the function read a storage offset in Python, or built an as_strided view (absolute offsets)
    reads_offsets: bool = False
    # why its trace needs functionalization (None: no call of the forward on the probes looked in place), NOTE
    # [Symbolic trace without functionalization] in plain_trace.py; "not spotted" where the analysis did not look
    needs_functionalization: str | None = "not spotted"


def _make_probe(fake: torch.Tensor, is_leaf: bool) -> torch.Tensor:
    """A fresh fake with the input's size/stride/dtype and autograd status (non-leaf if the real one is)."""
    probe = torch.empty_strided(fake.shape, fake.stride(), dtype=fake.dtype, device=fake.device)
    if fake.requires_grad:
        probe.requires_grad_(True)
        if not is_leaf:
            with torch.enable_grad():  # under a no_grad call too: views of it then require grad, as in eager
                probe = probe.clone()
    offset = fake.storage_offset()
    if type(offset) is int and offset and probe.numel():
        # at the input's storage offset: a metadata mutation (x.t_() keeps it, as_strided_ sets it) is recorded
        # with the offset it gives the input (NOTE [Metadata mutations]); autograd status is kept
        extent = 1 + sum((size - 1) * stride for size, stride in zip(fake.shape, fake.stride()))
        storage = torch.empty(offset + extent, dtype=fake.dtype, device=fake.device).untyped_storage()
        with torch.no_grad():
            probe.set_(storage, offset, fake.shape, fake.stride())
    return probe


def analyze(flat_fn: Callable, fake_args: Sequence[Any], *, fake_mode: Any, input_is_leaf: Sequence[bool],
            static_views: bool, force_autograd: bool = False, regenerate_aliases: bool = True,
            traced_args: Sequence[Any] | None = None, spot_functionalization: bool = False) -> Analysis:
    """Pass 1: run ``flat_fn`` eagerly on fake probes; classify mutations and outputs.

    ``traced_args``: the fake inputs the trace will use, when they differ from ``fake_args`` (symbolic ones,
    NOTE [Analysis without symbols]); the check that mutated inputs do not overlap looks at those.
    ``spot_functionalization``: note in ``Analysis.needs_functionalization`` the first call of the function that
    looks in place (NOTE [Symbolic trace without functionalization] in plain_trace.py).

    :raises CaptureError: metadata mutation of an input, mutation of a leaf that requires grad during
        training, mutation of an input that shares memory with another input, or a data-dependent op.
    """
    positions = [pos for pos, arg in enumerate(fake_args) if is_graph_input(arg)]
    probe_args = list(fake_args)
    with fake_mode:
        for pos in positions:
            if isinstance(fake_args[pos], torch.Tensor):
                probe_args[pos] = _make_probe(fake_args[pos], input_is_leaf[pos])
    # NOTE [Mutation detection]
    # The probes run under functionalization: version counters miss mutations of non-self arguments on fake
    # tensors (e.g. batch_norm's running stats), while the functional wrappers record every data and metadata
    # mutation, whichever argument slot it came through.
    with fake_mode, functionalized(discover_effects=True) as functional_mode:
        graph_positions = set(positions)
        call_args = [to_functional_tensor(arg) if pos in graph_positions else arg for pos, arg in enumerate(probe_args)]
        probes = [call_args[pos] for pos in positions]
        layouts = [layout_of(p) if isinstance(p, torch.Tensor) else None for p in probes]
        storages = [storage_of(p) for p in probes]
        # a resize_ of an input may reallocate its storage: never replayable (NOTE [Metadata mutations])
        resize_check = RejectInputResize(probes, positions, symbolic=fake_mode.shape_env is not None)
        explain = ExplainUnsupportedOps(probes)  # NOTE [Autograd state read by the function]
        scalars = SymbolicScalarTensors() if fake_mode.shape_env is not None else contextlib.nullcontext()
        draws = GeneratorDrawsWithSymbolicSizes() if fake_mode.shape_env is not None else contextlib.nullcontext()
        spotter = SpotInPlaceCalls() if spot_functionalization else contextlib.nullcontext()
        grad_mode_before = torch.is_grad_enabled()
        settings_before = thread_settings()  # NOTE [Settings left switched by the function]
        with explain_data_dependent_ops(), resize_check, explain, spotter, MaskedAssignAsWhere(), scalars, draws, \
                refuse_optimizer_steps():  # NOTE [Optimizer steps inside a capture]
            try:
                result = flat_fn(*call_args)
            finally:
                grad_mode_after = torch.is_grad_enabled()
                torch._C._set_grad_enabled(grad_mode_before)
                settings_after = thread_settings()
                restore_thread_settings(settings_before)
            explain.raise_caught()  # NOTE [Capture errors the function catches]
        refuse_grad_mode_change(grad_mode_before, grad_mode_after)
        refuse_switched_settings(settings_before, settings_after)
        needs_functionalization = spotter.seen if spot_functionalization else "not spotted"
        effects = list(getattr(functional_mode, "_tokens", {}))
        try:
            result = lift_object_outputs(result)  # NOTE [Object outputs]
        except ObjectOutputError as exc:
            raise CaptureError(str(exc)) from None
        flat_outs, out_spec = pytree.tree_flatten(result)
        refuse_retained_gradients(flat_outs)
        refuse_subclass_outputs(flat_outs)  # NOTE [Tensor subclass outputs]
        try:
            out_structure = encode_output_structure(out_spec)
        except UnsupportedOutputError as exc:
            raise CaptureError(str(exc)) from None
        refuse_outputs_rebuilt_otherwise(flat_outs, out_spec)  # NOTE [Keyed pytree nodes in their own key order]
        for probe in probes:
            if isinstance(probe, torch.Tensor):
                torch._sync(probe)

        grad_mode = torch.is_grad_enabled()
        inputs = []
        for index, (probe, layout) in enumerate(zip(probes, layouts)):
            if not isinstance(probe, torch.Tensor):
                inputs.append(InputInfo(is_tensor=False))
                continue
            check_storage_kept(index, positions[index], probe, storages[index])
            mutated = bool(torch._functionalize_has_data_mutation(probe.elem))
            if mutated:
                refuse_value_of_another_shape(index, positions[index], probe)  # NOTE [out= arguments an op resizes]
            requires_grad = fake_args[positions[index]].requires_grad
            new_layout = None
            if (not same_layout(layout, layout_of(probe))
                    or torch._functionalize_has_metadata_mutation(probe.elem)):
                new_layout = replayable_metadata_mutation(
                    index, positions[index], probe, layout,
                    requiring_grad=grad_mode and requires_grad)
            info = InputInfo(requires_grad=requires_grad, mutates_data=mutated,
                             mutation_requires_grad=mutated and probe.requires_grad, metadata_mutation=new_layout)
            inputs.append(info)

    check_mutated_inputs_do_not_alias(fake_args if traced_args is None else traced_args, positions, inputs)

    probe_storages = [StorageWeakRef(p.untyped_storage()) if isinstance(p, torch.Tensor) else None
                      for p in probes]
    outputs = [classify_output(k, out, flat_outs, probes, probe_storages, static_views)
               if regenerate_aliases or not isinstance(out, torch.Tensor)
               else OutputInfo(kind="graph", requires_grad=out.requires_grad,
                               grad_free_leaf=out.requires_grad and is_grad_free_view(out))
               for k, out in enumerate(flat_outs)]
    graph_user_outputs = [(k, out) for k, out in enumerate(flat_outs) if outputs[k].kind in ("graph",
                                                                                             "alias_of_output")]
    for graph_index, (k, _) in enumerate(graph_user_outputs):
        outputs[k].index = graph_index

    fw_examples = [probes[i] for i, info in enumerate(inputs) if info.mutates_data]
    fw_examples += [out for _, out in graph_user_outputs]
    needs_autograd = force_autograd or (grad_mode and any(is_differentiable(t) for t in fw_examples)
                                        and any(info.requires_grad for info in inputs))
    if needs_autograd and grad_mode:
        for index, info in enumerate(inputs):
            if info.mutates_data and info.requires_grad and input_is_leaf[positions[index]]:
                if not has_autograd_history(probes[index]):
                    # mutated where autograd does not see it (through .detach(), .data or under no_grad): eager
                    # allows that, and the epilogue's copy must not be recorded either
                    info.mutation_requires_grad = False
                    continue
                raise CaptureError(
                    f"aotcache: Found a graph input that requires gradients, and received a mutation: graph "
                    f"input {index} (flat argument {positions[index]}) is a leaf tensor that "
                    f"requires grad and is mutated in place; this is not supported in a training graph (eager "
                    f"autograd refuses it too unless done under no_grad). Mutate it outside the compiled "
                    f"function, or call the compiled function under torch.no_grad().",
                    # NOTE [Errors eager raises too]
                    first_call_only=True, dynamo_safe=False)
    check_outputs_keep_requires_grad(outputs, needs_autograd, grad_mode)
    if not grad_mode and not needs_autograd:
        refuse_history_under_no_grad(flat_outs, outputs)
    shape_sensitive = resize_check.called or any(info.metadata_mutation is not None for info in inputs)
    return Analysis(positions=positions, inputs=inputs, outputs=outputs, out_spec=out_spec,
                    out_structure=out_structure, graph_output_examples=fw_examples,
                    needs_autograd=needs_autograd, effects=effects, shape_sensitive=shape_sensitive,
                    reads_offsets=explain.reads_offsets, needs_functionalization=needs_functionalization)


# NOTE [Errors eager raises too]
# A leaf that requires grad mutated in place under grad mode is refused by the capture, and eager refuses it too
# ("a leaf Variable that requires grad is being used in an in-place operation"). Found (bench/odd_inputs.py):
# aotcache.compile took the refusal for a graph break and sent the model to torch.compile for good, whose fake
# propagation raised a TorchRuntimeError with another message ("RuntimeError when making fake tensor call") where
# eager raises a plain RuntimeError. The refusal is now ``first_call_only`` (the call runs eagerly, so the user
# gets eager's own error, and nothing is decided for later calls, which are captured) and not ``dynamo_safe``
# (aot_function's per-signature fallback runs such calls eagerly too, not through Dynamo).
