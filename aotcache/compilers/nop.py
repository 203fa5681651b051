"""The ``nop`` compiler: runs the FX graph as Python. For debugging, tests, and as the reference compiler.

Its artifact is the graph in the JSON form of :mod:`aotcache.compilers.graph_serde` (no pickle, no source
code executed at load), so it is also what the compiled-graph cache stores when no code generation is wanted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from aotcache.compilers.base import Artifact, pack_artifact
from aotcache.compilers.graph_serde import deserialize_graph, serialize_graph

__all__ = ["NopCompiledGraph", "nop_compiler", "load"]

COMPILER_NAME = "nop"


def _as_flat_outputs(result: Any) -> Sequence[Any]:
    return result if isinstance(result, (tuple, list)) else (result,)


class NopCompiledGraph:
    """A GraphModule called with the flat graph inputs (tensors and ints); returns the flat outputs."""

    compiler_name = COMPILER_NAME

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.graph_module = gm

    def __call__(self, *args: Any) -> Sequence[Any]:
        return _as_flat_outputs(self.graph_module(*args))

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
