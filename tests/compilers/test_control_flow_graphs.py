"""Graphs with control-flow operators (torch.cond, scan, map, associative_scan, nested_compile_region) in the
nop compiler's stored form: written with their subgraphs, loaded in a fresh process with eager's values and
gradients, and keyed by what their subgraphs compute (NOTE [Subgraphs of control-flow operators] in
aotcache/compilers/graph_serde.py)."""

from __future__ import annotations

import json

import pytest
import torch

from aotcache.compilers.base import ArtifactError
from aotcache.compilers.graph_serde import deserialize_graph, serialize_graph
from tests.conftest import run_python

# One program per kind of control flow; BODY picks the op inside the branch / body / region, so that a changed
# subgraph can be told from an unchanged one across processes.
PROGRAM = """
import json, os, torch
from torch._higher_order_ops.associative_scan import associative_scan
from torch._higher_order_ops.map import map as map_
from torch._higher_order_ops.scan import scan
from aotcache.autograd_cache.cache import default_cache

KIND, BODY = os.environ["CF_KIND"], getattr(torch, os.environ["CF_BODY"])

@torch.compiler.nested_compile_region
def region(x, w):
    return BODY(x @ w)

def step(c, xi, w):
    n = BODY(c @ w + xi)
    return n, n * 2

def fn(x, w):
    if KIND == "cond":
        return torch.cond(x.sum() > 0, lambda x, w: BODY(x @ w), lambda x, w: (x @ w) * 2, (x, w))
    if KIND == "scan":
        return scan(lambda c, xi: step(c, xi, w), torch.zeros(x.shape[1]), x)
    if KIND == "map":
        return map_(lambda xi, w: BODY(xi @ w), x, w)
    if KIND == "associative_scan":
        return associative_scan(lambda a, b: BODY(a) + b, x * w, 0, combine_mode="generic")
    return region(region(x, w), w)

torch.manual_seed(0)
x, w = torch.randn(4, 4).abs(), torch.randn(4, 4, requires_grad=True)
reference_w = w.detach().clone().requires_grad_(True)
compiled = torch.compile(fn, backend="aotcache", options={"compiler": "nop"}, fullgraph=True)
got, want = compiled(x, w), fn(x, reference_w)
leaves = lambda out: [t for t in torch.utils._pytree.tree_leaves(out)]
sum(t.sum() for t in leaves(got)).backward()
sum(t.sum() for t in leaves(want)).backward()
for g, e in zip(leaves(got), leaves(want)):
    torch.testing.assert_close(g, e)
torch.testing.assert_close(w.grad, reference_w.grad)
print(json.dumps(default_cache().stats()))
"""

KINDS = ["cond", "scan", "map", "associative_scan", "nested_compile_region"]


def _run(kind, body):
    return json.loads(run_python(PROGRAM, env={"CF_KIND": kind, "CF_BODY": body}).stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", KINDS)
def test_a_control_flow_graph_is_stored_and_loaded_in_a_fresh_process(kind):
    cold = _run(kind, "sin")
    warm = _run(kind, "sin")
    assert cold["saved"] == 1 and cold["bypass"] == 0, cold["bypass_reasons"]
    assert warm["hit"] == 1 and warm["compile"] == 0 and warm["load_error"] == 0


@pytest.mark.parametrize("kind", ["cond", "scan", "nested_compile_region"])
def test_a_changed_subgraph_misses_and_computes_its_own_values(kind):
    """The other direction: a branch / body / region computing something else is a new graph (the program
    checks its values and gradients against eager in each process)."""
    assert _run(kind, "sin")["saved"] == 1
    changed = _run(kind, "cos")
    assert changed["hit"] == 0 and changed["saved"] == 1


def _graph_with_a_region_called_twice():
    from aotcache.api import aot_module_simplified

    graphs = []

    @torch.compiler.nested_compile_region
    def region(x):
        return torch.sin(x) + torch.ones(4)

    def keep(graph, _inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    backend = lambda gm, inputs: aot_module_simplified(gm, inputs, fw_compiler=keep)  # noqa: E731
    torch.compile(lambda x: region(region(x)), backend=backend, fullgraph=True)(torch.randn(4))
    return graphs[0]


def test_a_subgraph_shared_by_two_calls_is_written_once_and_shared_when_loaded():
    graph = _graph_with_a_region_called_twice()
    description, blobs = serialize_graph(graph)
    written = [entry for entry in description["nodes"] if "subgraph" in entry]
    reads = [entry for entry in description["nodes"] if entry["op"] == "get_attr"]
    assert len(written) == 1 and len(reads) == 2

    loaded = deserialize_graph(json.loads(json.dumps(description)), blobs)
    x = torch.randn(4)
    torch.testing.assert_close(loaded(x), graph(x))
    modules = {node.target for node in loaded.graph.nodes if node.op == "get_attr"}
    assert len(modules) == 1


def test_a_stored_subgraph_names_no_more_than_a_stored_graph():
    description, blobs = serialize_graph(_graph_with_a_region_called_twice())
    (entry,) = [entry for entry in description["nodes"] if "subgraph" in entry]
    call = next(node for node in entry["subgraph"]["nodes"] if node["op"] == "call_function")
    call["target"] = "builtins.eval"
    with pytest.raises(ArtifactError, match="unknown operator"):
        deserialize_graph(description, blobs)

    entry.pop("subgraph")  # a get_attr of a module the description does not hold
    with pytest.raises(ArtifactError, match="does not hold"):
        deserialize_graph(description, blobs)
