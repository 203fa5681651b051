"""Tangents of a joint trace: which forward outputs get one, the layout each is traced with, tangents made
inside the trace for symbolic shapes, and which tangents each input's gradient reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

__all__ = ["grad_tangent_dependencies", "inputs_without_gradient", "is_differentiable", "is_grad_free_view",
           "made_under_no_grad", "make_tangents", "tangent_layout", "tangent_placeholders", "tangents_in_trace"]


def is_differentiable(value: Any) -> bool:
    """Whether a forward output gets a tangent: a floating or complex tensor that requires grad and has history."""
    return (isinstance(value, torch.Tensor) and value.requires_grad
            and (value.is_floating_point() or value.is_complex()) and not is_grad_free_view(value))


def is_grad_free_view(value: torch.Tensor) -> bool:
    """NOTE [Views made under no_grad]: ``with torch.no_grad(): v = out.view(-1)`` of an intermediate that
    requires grad is, in eager, a leaf that requires grad but has no history: no gradient flows back through
    it. Such an output gets no tangent (autograd.grad would refuse it); the runtime returns it as a leaf that
    requires grad (``CompiledRuntime._build_outputs``)."""
    return value.requires_grad and value._is_view() and value.grad_fn is None


def made_under_no_grad(value: torch.Tensor) -> bool:
    """Whether ``value`` is a view that a view op made under no_grad (or a view of such a view): eager gives it
    its base's requires_grad and no history (NOTE [Views of inputs made under no_grad] in runtime.py)."""
    if not value._is_view():
        return False
    from torch._C._autograd import CreationMeta, _get_creation_meta

    return _get_creation_meta(value) == CreationMeta.NO_GRAD_MODE


def is_multi_output_view(value: torch.Tensor) -> bool:
    """Whether ``value`` is a view made by a multi-output view op (``unbind``, ``split``): autograd refuses
    in-place changes of such views (and of their base while they live), so the regenerated output is marked
    as one (``OutputInfo.multi_output_view``)."""
    if not value._is_view():
        return False
    from torch._C._autograd import CreationMeta, _get_creation_meta

    return _get_creation_meta(value) == CreationMeta.MULTI_OUTPUT_NODE


def grad_tangent_dependencies(gm: fx.GraphModule, num_inputs: int) -> list[list[int]]:
    """Per graph input of a joint graph: the tangents (positions among the ``tangents_*`` placeholders) its
    gradient reads, directly or not (NOTE [Gradients of unused outputs] in runtime)."""
    masks: dict[fx.Node, int] = {}
    tangent = 0
    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name.startswith("tangents"):
                masks[node] = 1 << tangent
                tangent += 1
        elif node.op == "output":
            output = node
        else:
            mask = 0
            for arg in node.all_input_nodes:
                mask |= masks.get(arg, 0)
            if mask:
                masks[node] = mask
    flat = list(output.args[0]) if output is not None else []
    grads = flat[len(flat) - num_inputs:] if num_inputs else []
    return [[bit for bit in range(tangent) if masks.get(grad, 0) >> bit & 1] if isinstance(grad, fx.Node) else []
            for grad in grads]


def inputs_without_gradient(gm: fx.GraphModule, grad_inputs: Sequence[bool]) -> list[int]:
    """The graph inputs that require grad (``grad_inputs``) but get no gradient from the joint graph: the traced
    function detached them (NOTE [Inputs the backward does not reach] in runtime)."""
    output = next((node for node in reversed(gm.graph.nodes) if node.op == "output"), None)
    flat = list(output.args[0]) if output is not None else []
    grads = flat[len(flat) - len(grad_inputs):] if grad_inputs else []
    return [index for index, (needed, grad) in enumerate(zip(grad_inputs, grads)) if needed and grad is None]


def _dense_non_overlapping(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether static ``shape``/``stride`` cover their storage exactly once (a permutation of contiguous)."""
    expected = 1
    for size, step in sorted(zip(shape, stride), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if step != expected:
            return False
        expected *= size
    return True


def tangent_layout(example: torch.Tensor) -> dict:
    """The layout the tangent of forward output ``example`` is traced with (NOTE [Tangent strides] in runtime):
    ``{"stride": [...]}`` for a static, dense, non-overlapping output, else ``{"memory_format": name}``."""
    from torch._prims_common import suggest_memory_format

    static = not any(isinstance(v, torch.SymInt) for v in (*example.shape, *example.stride()))
    if static and example.layout == torch.strided and _dense_non_overlapping(example.shape, example.stride()):
        return {"stride": [int(v) for v in example.stride()]}
    memory_format = suggest_memory_format(example) if example.layout == torch.strided else torch.contiguous_format
    return {"memory_format": str(memory_format).removeprefix("torch.")}


def make_tangents(output_examples: Sequence[Any], fake_mode: Any) -> tuple[list[int], list, list[dict]]:
    """Indices of the forward outputs that get a tangent, fake tangents for them, and their layouts."""
    indices, tangents, layouts = [], [], []
    with fake_mode:
        for index, example in enumerate(output_examples):
            if is_differentiable(example):
                tangent, layout = _empty_tangent(example)
                indices.append(index)
                tangents.append(tangent)
                layouts.append(layout)
    return indices, tangents, layouts


def _empty_tangent(example: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """An uninitialized tangent for the forward output ``example``, in its :func:`tangent_layout`, and the layout."""
    layout = tangent_layout(example)
    if "stride" in layout:
        return torch.empty_strided(example.shape, layout["stride"], dtype=example.dtype,
                                   device=example.device), layout
    return torch.empty(example.shape, dtype=example.dtype, device=example.device,
                       memory_format=getattr(torch, layout["memory_format"])), layout


# NOTE [Tangents made in the trace]
# A joint trace takes fake tangents shaped like the forward outputs. With symbolic sizes their shapes are
# expressions of the input symbols, known only once the forward ran on symbolic inputs; an analysis on static
# probes (NOTE [Analysis without symbols]) does not give them. Then the trace makes each tangent itself, right
# after the forward, from the output's symbolic shape and layout (``empty_strided`` / ``empty``), and turns
# those nodes into the ``tangents_*`` placeholders afterwards: the same graph as with tangents given as inputs.


def tangents_in_trace(fw_outs: list, indices: Sequence[int], layouts: list, nodes: list) -> list:
    """Fake tangents for ``fw_outs[indices]`` made inside the trace; their graph nodes go to ``nodes`` (the caller
    checks there is one per tangent)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    graph = get_proxy_mode().tracer.graph
    start = len(graph.nodes)
    tangents = []
    for index in indices:
        tangent, layout = _empty_tangent(fw_outs[index])
        layouts.append(layout)
        tangents.append(tangent)
    made = (torch.ops.aten.empty_strided.default, torch.ops.aten.empty.memory_format)
    nodes.extend(node for node in list(graph.nodes)[start:] if node.op == "call_function" and node.target in made)
    return tangents


def tangent_placeholders(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> list:
    """Replace the tangents made in the trace by ``tangents_*`` placeholders after the primals; their fakes."""
    graph = gm.graph
    first = next(node for node in graph.nodes if node.op != "placeholder")
    fakes = []
    for number, node in enumerate(nodes, start=1):
        with graph.inserting_before(first):
            placeholder = graph.placeholder(f"tangents_{number}")
        placeholder.meta = dict(node.meta)
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
        fakes.append(placeholder.meta["val"])
    return fakes
