"""The nop compiler and the JSON graph form: round trips, fresh-process loads, refusal of unknown targets."""

from __future__ import annotations

import json
import math
import operator

import pytest
import torch

from aotcache.compilers import ArtifactError, get_compiler, load_artifact, pack_artifact, unpack_artifact
from aotcache.compilers.graph_serde import (
    GraphSerializationError,
    deserialize_graph,
    resolve_target,
    serialize_graph,
    target_name,
)
from aotcache.compilers.nop import nop_compiler
from tests.compilers.graphs import REFERENCE_SOURCE, example_args, traced, with_constant, with_int_input
from tests.conftest import run_python


def assert_outputs_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w)
        else:
            assert g == w


@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
def test_round_trip_matches_eager(mode):
    args = example_args()
    compiled = nop_compiler(traced(with_constant, args, mode), args)
    assert_outputs_equal(compiled(*args), with_constant(*args))
    loaded = load_artifact(compiled.artifact())
    assert loaded.compiler_name == "nop"
    assert_outputs_equal(loaded(*args), with_constant(*args))
    assert get_compiler("nop") is nop_compiler


def test_symint_inputs_work_at_run_time():
    gm = traced(with_int_input, [torch.randn(3, 2), 4], "symbolic")
    loaded = load_artifact(nop_compiler(gm, []).artifact())
    x = torch.randn(5, 2)
    assert_outputs_equal(loaded(x, 7), with_int_input(x, 7))


def test_artifact_is_json_plus_tensor_blob_only():
    artifact = unpack_artifact(nop_compiler(traced(with_constant, example_args()), []).artifact())
    assert set(artifact.blobs) == {"constants"}
    text = json.dumps(artifact.meta)
    assert "aten::mm.default" in text and "aten::_to_copy.default" in text
    assert '{"dtype": "float64"}' in text


def test_values_round_trip():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    values = (torch.float16, torch.device("cpu"), torch.channels_last, torch.strided, math.inf, -math.inf,
              slice(1, None, 2), 2 + 3j, [1, (2, 3)], {"k": None}, True, "s")
    graph.call_function(torch.ops.aten.add.Tensor, (x, x), {"alpha": 1})
    node = graph.call_function(operator.getitem, (x, values))
    graph.output((node,))
    gm = torch.fx.GraphModule({}, graph)
    description, blobs = serialize_graph(gm)
    rebuilt = deserialize_graph(json.loads(json.dumps(description)), blobs)
    (getitem,) = [n for n in rebuilt.graph.nodes if n.target is operator.getitem]
    assert getitem.args[1] == values


def test_target_names():
    assert target_name(torch.ops.aten.add.Tensor) == "aten::add.Tensor"
    assert resolve_target("aten::sum.default") is torch.ops.aten.sum.default
    assert resolve_target("prims::convert_element_type.default") is torch.ops.prims.convert_element_type.default
    assert resolve_target("operator.getitem") is operator.getitem
    with pytest.raises(GraphSerializationError, match="cannot store"):
        target_name(print)


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "aten::definitely_not_an_op.default",
                                  "no_such_namespace::x.default", "__import__('os')::x"])
def test_unknown_targets_are_refused_at_load(name):
    artifact = unpack_artifact(nop_compiler(traced(with_constant, example_args()), []).artifact())
    node = next(n for n in artifact.meta["graph"]["nodes"] if n["op"] == "call_function")
    node["target"] = name
    with pytest.raises(ArtifactError):
        load_artifact(pack_artifact(artifact))


def test_unstorable_graph_raises_on_artifact():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output((graph.call_function(print, (x,)),))
    compiled = nop_compiler(torch.fx.GraphModule({}, graph), [])
    with pytest.raises(GraphSerializationError, match="print"):
        compiled.artifact()


def test_fresh_process_load(tmp_path):
    args = example_args()
    path = tmp_path / "nop.bin"
    path.write_bytes(nop_compiler(traced(with_constant, args), args).artifact())
    torch.save(args, tmp_path / "args.pt")
    run_python(REFERENCE_SOURCE + f'''
from aotcache.compilers import load_artifact
args = torch.load({str(tmp_path / "args.pt")!r})
got = load_artifact(open({str(path)!r}, "rb").read())(*args)
for g, w in zip(got, with_constant(*args)):
    torch.testing.assert_close(g, w)
print("ok")
''')
