"""Refusals for tensor subclasses that wrap other tensors, and for the nested tensors built from plain ones.

aotcache's capture has no subclass desugaring (NOTE [Tensor subclass arguments] in refusals.py): a graph takes
and returns plain tensors. A subclass used only *inside* the function is traced through its
``__torch_dispatch__`` into plain ops, as eager runs it; these refusals cover what a plain graph cannot stand
for, so that the fallback runs such a call as eager does instead of failing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from aotcache.aot.errors import CaptureError
from aotcache.aot.refusals import unsupported_layout_error

__all__ = ["refuse_subclass_outputs", "refuse_nested_int_inputs", "refuse_non_strided_graph_values"]


def refuse_subclass_outputs(flat_outs: Sequence[Any]) -> None:
    """NOTE [Tensor subclass outputs]
    A function that builds a tensor subclass from plain tensors and returns it (``return TwoTensor(x, x * 2)``,
    a float8 or DTensor made inside) was traced into a graph whose output slot held the subclass of the trace's
    own functional tensors: a graph constant (not cacheable, "tensor constant subclass") and, at the first call,
    "Attempting to use FunctionalTensor on its own" where eager and torch's aot_eager return the subclass. The
    graph has no way to rebuild the subclass around plain outputs, so the capture is refused (``unsupported_layout``)
    and the fallback runs the call as eager does. A subclass used inside and not returned is still captured.

    :raises CaptureError: naming the output and its class.
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for k, out in enumerate(flat_outs):
        if isinstance(out, torch.Tensor) and is_traceable_wrapper_subclass(out):
            raise CaptureError(f"aotcache: output {k} is a {type(out).__name__}, a tensor subclass that wraps other "
                               f"tensors; a compiled graph returns plain tensors only. Return its inner tensors "
                               f"instead, or build the subclass after the compiled call.",
                               reason="unsupported_layout")


def refuse_nested_int_inputs(flat_args: Sequence[Any]) -> None:
    """NOTE [Offsets of nested tensors as inputs]
    A plain tensor that is the offsets (or lengths) of a jagged nested tensor eager has made is registered with
    a ragged size (a nested int); faking it makes that size a symbol, which needs a ShapeEnv. A static capture has
    none, so such an input (``nested_tensor_from_jagged(values, offsets)`` run once eagerly, then ``offsets``
    passed to a compiled function) failed with torch's "self.shape_env must not be None" where eager and aot_eager
    run. It is refused (``unsupported_layout``); the fallback runs the call as eager does. Called for static
    captures only (a symbolic one has its ShapeEnv).

    :raises CaptureError: naming the argument.
    """
    from torch.nested._internal.nested_tensor import _tensor_symint_registry

    for position, arg in enumerate(flat_args):
        if isinstance(arg, torch.Tensor) and arg in _tensor_symint_registry:
            raise CaptureError(f"aotcache: flat argument {position} is the offsets or lengths of a jagged nested "
                               f"tensor (it carries a ragged size), which a static capture cannot stand for. Pass a "
                               f"copy (offsets.clone()) or the nested tensor itself, or call the function eagerly.",
                               reason="unsupported_layout")


def refuse_non_strided_graph_values(gm: torch.nn.Module) -> None:
    """NOTE [Nested tensors built inside a Dynamo graph]
    Dynamo keeps ``nested_tensor_from_jagged(values, offsets)`` on plain inputs in its graph. A symbolic capture
    refuses the jagged result when it meets it (``unsupported_layout``), but a static one failed earlier, inside the
    op: the ragged size is a symbol and a static capture has no ShapeEnv ("self.shape_env must not be None", where
    aot_eager runs). So a Dynamo graph that computes any value with a non-strided layout (jagged, sparse) is
    refused before the capture, by the values Dynamo recorded: the outcome the symbolic capture already had.

    :raises CaptureError: naming the first such value.
    """
    graph = getattr(gm, "graph", None)
    if graph is None:
        return
    for node in graph.nodes:
        if node.op == "placeholder":
            continue  # inputs are checked as arguments (make_fake_inputs)
        for value in pytree.tree_leaves(node.meta.get("example_value", node.meta.get("val"))):
            if isinstance(value, torch.Tensor) and value.layout != torch.strided:
                raise unsupported_layout_error(f"the value {node.name} of the torch.compile graph", value.layout)
