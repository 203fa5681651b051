"""Graph export: ``aot_export_module`` (graph + signature) and ``aot_export_joint_simple`` (one bare graph).

Exports return the functionalized ATen graph itself, with no runtime wrapper around it: whoever runs the graph
applies input mutations and interprets outputs using the returned :class:`ExportSignature`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from aotcache.aot.capture import CaptureError, capture
from aotcache.aot.keyed_nodes import unflatten_arguments
from aotcache.aot.metadata import UnsupportedOutputError, encode_output_structure, object_output_types
from aotcache.aot.module_state import refuse_rebound_module_tensors

__all__ = ["BackwardSignature", "ExportSignature", "aot_export_module", "aot_export_joint_simple"]


@dataclasses.dataclass
class ExportSignature:
    """Names the exported graph's inputs and outputs (placeholder / output node names).

    Graph inputs are parameters, then buffers, then user inputs. Graph outputs are the new values of mutated
    parameters (a forward export only), buffers and user inputs (``parameters_to_mutate`` / ``buffers_to_mutate`` /
    ``user_inputs_to_mutate``), then the user outputs, then
    (``trace_joint``) the gradients of the loss output (``gradients_to_parameters`` /
    ``gradients_to_user_inputs``; parameters with no gradient are left out).
    ``in_spec`` is the pytree ``TreeSpec`` of ``(args, kwargs)`` and ``out_spec`` that of the user outputs, as in
    PyTorch's ``GraphSignature`` (``pytree.tree_unflatten(flat_user_outputs, out_spec)``); ``out_structure`` is
    the same output structure as JSON text in aotcache's form (NOTE [Output structure] in
    :mod:`aotcache.aot.metadata`; ``OutputStructure(json.loads(out_structure)).unflatten(flat_outputs)``), which
    can be stored and read back without the output types being importable.
    """

    parameters: list[str]
    buffers: list[str]
    user_inputs: list[str]
    user_outputs: list[str]
    inputs_to_parameters: dict[str, str]
    inputs_to_buffers: dict[str, str]
    buffers_to_mutate: dict[str, str]
    user_inputs_to_mutate: dict[str, str]
    loss_output: str | None = None
    gradients_to_parameters: dict[str, str] = dataclasses.field(default_factory=dict)
    gradients_to_user_inputs: dict[str, str] = dataclasses.field(default_factory=dict)
    in_spec: Any = None
    out_spec: Any = None
    out_structure: str = ""
    # PyTorch's GraphSignature has these too (aotcache exports use no effect tokens)
    parameters_to_mutate: dict[str, str] = dataclasses.field(default_factory=dict)
    input_tokens: list[str] = dataclasses.field(default_factory=list)
    output_tokens: list[str] = dataclasses.field(default_factory=list)

    @property
    def backward_signature(self) -> BackwardSignature | None:
        """The gradient outputs grouped as PyTorch's ``GraphSignature.backward_signature`` (None: no joint)."""
        if self.loss_output is None:
            return None
        return BackwardSignature(dict(self.gradients_to_parameters), dict(self.gradients_to_user_inputs),
                                 self.loss_output)


@dataclasses.dataclass(frozen=True)
class BackwardSignature:
    """Which outputs of a joint export are gradients of which parameter / user input, and the loss output."""

    gradients_to_parameters: dict[str, str]
    gradients_to_user_inputs: dict[str, str]
    loss_output: str


def _output_nodes(gm: fx.GraphModule) -> list:
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    return list(output.args[0])


def _name_inputs_like_pytorch(gm: fx.GraphModule) -> None:
    """Name the placeholders ``arg0_1, arg1_1, ...`` as PyTorch's aot_export_module does (the signature's
    names are these), unless another node already has such a name."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    wanted = [f"arg{index}_1" for index in range(len(placeholders))]
    taken = {node.name for node in gm.graph.nodes if node.op != "placeholder"}
    if taken.intersection(wanted):
        return
    for node, name in zip(placeholders, wanted):
        node.name = node.target = f"_aotcache_tmp_{name}"  # two passes: old and new names may overlap
    for node, name in zip(placeholders, wanted):
        node.name = node.target = name
    gm.recompile()


def _reject_metadata_mutations(api: str, meta: Any) -> None:
    """An export cannot express an input whose sizes or strides the function changes in place (``t_()``)."""
    changed = [index for index, info in enumerate(meta.inputs) if info.metadata_mutation]
    if changed:
        raise CaptureError(f"{api}: Found an input that received a metadata mutation: the function changes the "
                           f"sizes or strides of graph inputs {changed} in place "
                           "(t_, transpose_, unsqueeze_, as_strided_, ...), which an exported graph cannot express; "
                           "use the out-of-place op and return the result")


def aot_export_module(mod: nn.Module, args: Sequence[Any], trace_joint: bool,
                      output_loss_index: int | None = None, decompositions: Mapping | None = None,
                      kwargs: dict | None = None, *, pre_dispatch: bool = False,
                      dynamic_shapes: bool | None = None) -> tuple[fx.GraphModule, ExportSignature]:
    """Export ``mod(*args, **kwargs)`` as one functionalized ATen graph and its :class:`ExportSignature`.

    With ``trace_joint=True`` the graph also computes the gradients of the scalar output
    ``output_loss_index`` (flat index into the module's outputs) with respect to every parameter and user
    input that requires grad. With ``trace_joint=False`` the module runs under ``torch.no_grad`` (an inference
    graph, as PyTorch exports it), so it may mutate parameters and inputs that require grad.

    ``dynamic_shapes=True`` traces every dimension of every lifted and user input as a symbol (as PyTorch
    does), so the graph runs for other sizes; a data-dependent value (``.item()``) is still a CaptureError.
    ``pre_dispatch=True`` is not supported (a post-dispatch, functionalized ATen graph only).

    :raises ValueError: ``trace_joint`` without a valid scalar ``output_loss_index``.
    :raises NotImplementedError: ``pre_dispatch=True``.
    :raises CaptureError: an unsupported construct in the module.
    """
    if pre_dispatch:
        raise NotImplementedError("aot_export_module(pre_dispatch=True) is not supported by aotcache: it exports "
                                  "post-dispatch functionalized ATen graphs only; use torch.export.export for a "
                                  "pre-dispatch graph")
    if trace_joint and output_loss_index is None:
        raise ValueError("aot_export_module(trace_joint=True) needs output_loss_index: the flat index of the "
                         "scalar loss among the module's outputs")
    params = dict(mod.named_parameters())
    buffers = dict(mod.named_buffers())
    flat_user, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    num_params, num_lifted = len(params), len(params) + len(buffers)
    flat_args = [*params.values(), *buffers.values(), *flat_user]
    user_needs_grad = [isinstance(a, torch.Tensor) and a.requires_grad for a in flat_user]
    num_user_outputs: list[int] = []
    user_out_spec: list = []

    def flat_fn(*flat: Any) -> Any:
        swapped = dict(zip([*params, *buffers], flat[:num_lifted]))
        call_args, call_kwargs = unflatten_arguments(flat[num_lifted:], in_spec)
        if not trace_joint:
            with refuse_rebound_module_tensors(mod, swapped):  # NOTE [Buffers and parameters rebound by forward]
                result = torch.func.functional_call(mod, swapped, call_args, call_kwargs, strict=False)
            user_out_spec[:] = [pytree.tree_flatten(result)[1]]
            return result
        with torch.enable_grad():
            with refuse_rebound_module_tensors(mod, swapped):  # the graph could not express the rebinding
                result = torch.func.functional_call(mod, swapped, call_args, call_kwargs, strict=False)
            outs, spec = pytree.tree_flatten(result)
            loss = outs[output_loss_index]
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                got = (f"a tensor of shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}"
                       if isinstance(loss, torch.Tensor) else type(loss).__name__)
                raise ValueError(f"aot_export_module: output {output_loss_index} (output_loss_index) must be a "
                                 f"scalar tensor that requires grad to be differentiated (got {got}); return the "
                                 f"loss, e.g. out.sum(), at that index")
            others = [k for k, out in enumerate(outs)
                      if k != output_loss_index and isinstance(out, torch.Tensor) and out.requires_grad]
            if others:  # their gradients would need tangents, which a joint graph of the loss does not take
                raise CaptureError(f"aot_export_module: Found an output of the forward that requires gradients, "
                                   f"that was not the scalar loss: outputs {others}; detach them (.detach()) or "
                                   f"return them from a function exported with trace_joint=False")
            wrt = [p for p in flat[:num_params] if p.requires_grad]
            wrt += [a for a, needed in zip(flat[num_lifted:], user_needs_grad) if needed]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        num_user_outputs[:] = [len(outs)]
        user_out_spec[:] = [spec]
        return (*outs, *grads)

    with contextlib.nullcontext() if trace_joint else torch.no_grad():
        captured = capture(flat_fn, flat_args, decompositions=decompositions, trace_joint=False,
                           regenerate_aliases=False, dynamic=bool(dynamic_shapes))
    gm, meta = captured.graph, captured.metadata
    _reject_object_outputs("aot_export_module", meta.out_spec)
    _reject_metadata_mutations("aot_export_module", meta)
    _name_inputs_like_pytorch(gm)
    placeholders = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    outputs = _output_nodes(gm)
    names = list(params) + list(buffers)
    signature = ExportSignature(
        parameters=list(params), buffers=list(buffers), user_inputs=placeholders[num_lifted:],
        user_outputs=[], inputs_to_parameters=dict(zip(placeholders[:num_params], params)),
        inputs_to_buffers=dict(zip(placeholders[num_params:num_lifted], buffers)), buffers_to_mutate={},
        user_inputs_to_mutate={}, in_spec=in_spec, out_spec=user_out_spec[0],
        out_structure=json.dumps(_user_output_structure(user_out_spec[0]) if trace_joint else meta.out_spec))
    for out_index, input_index in enumerate(meta.mutated_inputs):
        name = outputs[out_index].name
        if input_index < num_params:  # (only a forward export, traced under no_grad, can mutate one)
            signature.parameters_to_mutate[name] = names[input_index]
        elif input_index < num_lifted:
            signature.buffers_to_mutate[name] = names[input_index]
        else:
            signature.user_inputs_to_mutate[name] = placeholders[input_index]

    first_user = meta.num_mutation_outputs
    user_count = num_user_outputs[0] if trace_joint else len(meta.outputs)
    wrt_names = [n for n, p in params.items() if p.requires_grad]
    wrt_names += [placeholders[num_lifted + i] for i, needed in enumerate(user_needs_grad) if needed]
    for k, info in enumerate(meta.outputs):
        if info.kind != "graph":
            if k < user_count:
                raise CaptureError(f"aot_export_module: output {k} is a {info.kind} ({info.value!r}); exported "
                                   "graphs can only return tensors and SymInts")
            continue  # a None gradient: that input does not influence the loss
        node = outputs[first_user + info.index]
        if k < user_count:
            signature.user_outputs.append(node.name)
            if trace_joint and k == output_loss_index:
                signature.loss_output = node.name
        else:
            target = wrt_names[k - user_count]
            if target in params:
                signature.gradients_to_parameters[node.name] = target
            else:
                signature.gradients_to_user_inputs[node.name] = target
    return gm, signature


def _reject_object_outputs(api: str, out_spec: dict) -> None:
    """An exported graph's signature must describe its outputs on its own: no in-process object templates."""
    held = object_output_types(out_spec)
    if held:
        raise CaptureError(f"{api}: the outputs hold {', '.join(held)}, an object pytree does not know, which an "
                           f"exported signature cannot describe; register its type with "
                           f"torch.utils._pytree.register_pytree_node (with serialized_type_name), or return its "
                           f"tensors in a tuple or dict")


def _user_output_structure(spec: Any) -> dict:
    try:
        return encode_output_structure(spec)
    except UnsupportedOutputError as exc:
        raise CaptureError(str(exc)) from None


def aot_export_joint_simple(func: Callable, args: Sequence[Any], trace_joint: bool,
                            decompositions: Mapping | None = None, *, num_params_buffers: int = 0) -> fx.GraphModule:
    """One bare functionalized graph of ``func(*args)``: the joint graph of the contract (``trace_joint``) or
    the forward graph (traced under ``torch.no_grad``, as PyTorch does).

    The graph takes ``args`` as they are, so each must be a tensor or a constant, not a list or dict of them. A
    bare graph cannot express input mutations or outputs that alias inputs or each other, so those are
    rejected. ``num_params_buffers`` is accepted for PyTorch compatibility and changes nothing (NOTE
    [PyTorch-compatible arguments] in :mod:`aotcache.aot.compile_step`).

    :raises CaptureError: an argument is a pytree; ``func`` mutates an input, returns an alias or a non-tensor
        constant, or uses an unsupported construct.
    """
    if isinstance(num_params_buffers, bool) or not isinstance(num_params_buffers, int) or num_params_buffers < 0:
        raise TypeError(f"aot_export_joint_simple: num_params_buffers must be an int >= 0, got {num_params_buffers!r}")
    for index, arg in enumerate(args):
        if not pytree.tree_is_leaf(arg):
            raise CaptureError(f"aot_export_joint_simple requires individual inputs not to be pytrees: argument "
                               f"{index} is a {type(arg).__name__}; pass its tensors as separate arguments (the "
                               f"graph takes them flat)")
    flat_args = list(args)
    with contextlib.nullcontext() if trace_joint else torch.no_grad():
        captured = capture(func, flat_args, decompositions=decompositions, trace_joint=trace_joint)
    meta = captured.metadata
    _reject_object_outputs("aot_export_joint_simple", meta.out_spec)
    _reject_metadata_mutations("aot_export_joint_simple", meta)
    if meta.mutated_inputs:
        raise CaptureError(f"aot_export_joint_simple does not support input mutations: the function mutates graph "
                           f"inputs {meta.mutated_inputs} in place, which a bare graph cannot express; return the new "
                           "value instead, or use aot_function / aot_export_module")
    for k, info in enumerate(meta.outputs):
        if info.kind in ("input", "alias_of_input", "alias_of_output"):
            raise CaptureError(f"aot_export_joint_simple: output {k} is an alias ({info.kind}) of an input or of "
                               "another output, which a bare graph cannot express; return a copy (.clone())")
        if info.kind == "constant":
            raise CaptureError(f"aot_export_joint_simple: output {k} is a constant {info.value!r}; a bare graph "
                               "returns tensors and SymInts only")
    return captured.graph
