"""The ``nop`` compiler: runs the FX graph as Python. For debugging, tests, and as the reference compiler.

Its artifact is the graph in the JSON form of :mod:`aotcache.compilers.graph_serde` (no pickle, no source
code executed at load), so it is also what the compiled-graph cache stores when no code generation is wanted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch._prims_common import suggest_memory_format  # eager's rule (Tensor has no Python binding of it)

from aotcache.compilers.base import Artifact, pack_artifact
from aotcache.compilers.graph_serde import deserialize_graph, serialize_graph

__all__ = ["NopCompiledGraph", "nop_compiler", "load"]

COMPILER_NAME = "nop"


def _as_flat_outputs(result: Any) -> Sequence[Any]:
    return result if isinstance(result, (tuple, list)) else (result,)


# NOTE [Group norm inputs in eager's layout]
# Eager's ``group_norm`` hands ``native_group_norm`` its input as ``input.contiguous(input.suggest_memory_format())``
# (and autograd its gradient likewise), since the CPU kernels require that layout. In a captured graph that call
# was decided on fake tensors, and torch's fake stride rules give a size-1 dimension other strides than eager's
# kernels do (``x.transpose(-1, -2).reshape(1, C, H, W)``: channels-last fake, neither format real). So the trace
# of diffusers' VAE attention block recorded no copy, and the graph run as Python raised ``Expected
# X.is_contiguous(memory_format)`` where eager runs (torch.compile's ``aot_eager`` fails the same way, torch
# 2.13). Run as Python, the graph makes those inputs what eager makes them; nothing changes where they already
# are (code generators lower group norm themselves). The stored graph is the traced one.
_GROUP_NORM = torch.ops.aten.native_group_norm.default
_GROUP_NORM_BACKWARD = torch.ops.aten.native_group_norm_backward.default


def _in_suggested_layout(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` contiguous in ``like``'s suggested memory format (itself when it already is)."""
    layout = suggest_memory_format(like)
    return tensor if tensor.is_contiguous(memory_format=layout) else tensor.contiguous(memory_format=layout)


def _with_eager_group_norm_layouts(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm``, or a copy whose group norm nodes get their inputs in eager's layout (NOTE [Group norm inputs in
    eager's layout])."""
    if not any(node.target in (_GROUP_NORM, _GROUP_NORM_BACKWARD) for node in gm.graph.nodes):
        return gm
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # graph_copy leaves out the output node, returning its value
    for node in list(graph.nodes):
        if node.target is _GROUP_NORM:
            with graph.inserting_before(node):
                laid = graph.call_function(_in_suggested_layout, (node.args[0], node.args[0]))
            node.update_arg(0, laid)
        elif node.target is _GROUP_NORM_BACKWARD:
            grad, source = node.args[0], node.args[1]
            with graph.inserting_before(node):
                laid_grad = graph.call_function(_in_suggested_layout, (grad, source))
                laid_source = graph.call_function(_in_suggested_layout, (source, source))
            node.update_arg(0, laid_grad)
            node.update_arg(1, laid_source)
    return torch.fx.GraphModule(gm, graph)


def random_generators(gm: torch.fx.GraphModule) -> tuple | None:
    """The generators the random ops of ``gm`` draw from, in no particular order: ``None`` for the default
    generators, and the ``torch.Generator`` objects the graph holds; None when it draws nothing (or from a
    generator it computes, not replayable). Run as Python, the graph draws with ATen's kernels in its own order,
    as eager does (NOTE [Double backward through random ops] in aotcache/aot/double_backward.py)."""
    found: list = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
            continue
        generator = node.kwargs.get("generator")
        if isinstance(generator, torch.fx.Node) and generator.op == "get_attr":
            generator = getattr(gm, str(generator.target), None)
        if generator is not None and not isinstance(generator, torch.Generator):
            return None
        if not any(generator is seen for seen in found):
            found.append(generator)
    return tuple(found) if found else None


class NopCompiledGraph:
    """A GraphModule called with the flat graph inputs (tensors and ints); returns the flat outputs."""

    compiler_name = COMPILER_NAME

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.graph_module = gm
        self._run = _with_eager_group_norm_layouts(gm)  # NOTE [Group norm inputs in eager's layout]
        self.eager_random_draws = random_generators(gm)  # (the compiler contract, compilers/base.py)

    def __call__(self, *args: Any) -> Sequence[Any]:
        # NOTE [Compiled graphs run without module hooks] The graph is the compiled program, not a module of
        # the user's: ``forward`` directly, so that a global module hook (``register_module_forward_hook``)
        # runs on the user's modules only, as in eager, never on the graph's flat outputs.
        return _as_flat_outputs(self._run.forward(*args))

    def run(self, args: Sequence[Any]) -> Sequence[Any]:
        """Call with the inputs as one sequence (the sequence is not modified)."""
        return self(*args)

    def artifact(self) -> bytes:
        """The graph in JSON form. :raises GraphSerializationError: the graph holds something unstorable."""
        description, blobs = serialize_graph(self.graph_module)
        return pack_artifact(Artifact(COMPILER_NAME, {"graph": description}, blobs))


def nop_compiler(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **_unused: Any) -> NopCompiledGraph:
    """Wrap ``gm`` without compiling it; ``example_inputs`` are accepted for the compiler contract only."""
    del example_inputs
    return NopCompiledGraph(gm)


def decompositions() -> dict:
    """No decompositions of its own: the graph runs whatever ops it was traced with."""
    return {}


nop_compiler.decompositions = decompositions  # type: ignore[attr-defined]


def load(artifact: Artifact) -> NopCompiledGraph:
    """Rebuild from an unpacked artifact. :raises ArtifactError: malformed graph or unknown target."""
    return NopCompiledGraph(deserialize_graph(artifact.meta.get("graph", {}), artifact.blobs))
