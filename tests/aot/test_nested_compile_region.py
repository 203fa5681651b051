"""``torch.compiler.nested_compile_region`` (the ``invoke_subgraph`` op) through the torch.compile backend: a
region called several times is traced once, its forward and backward subgraphs shared by every call, with
eager's values and gradients (NOTE [Nested compile regions traced once] in aot/capture.py)."""

from __future__ import annotations

import pytest
import torch

from aotcache.api import aot_module_simplified

nested_compile_region = torch.compiler.nested_compile_region


class RecordingBackend:
    """aotcache's backend with compilers that keep the forward / backward / inference graphs they are given."""

    def __init__(self):
        self.forward_graphs, self.backward_graphs = [], []

    def __call__(self, gm, example_inputs):
        def forward_compiler(graph, _inputs):
            self.forward_graphs.append(graph)
            return graph.forward

        def backward_compiler(graph, _inputs):
            self.backward_graphs.append(graph)
            return graph.forward

        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=backward_compiler)


def _subgraph_modules(graph):
    """The distinct subgraph modules ``invoke_subgraph`` calls in ``graph``."""
    return {node.target for node in graph.graph.nodes if node.op == "get_attr"}


def _invoke_subgraph_calls(graph):
    return [node for node in graph.graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]


def _input_shapes_per_subgraph(graph):
    """Subgraph module -> the distinct tuples of input shapes it is called with."""
    shapes = {}
    for call in _invoke_subgraph_calls(graph):
        module, _identifier, *operands = call.args
        shapes.setdefault(module.target, set()).add(
            tuple(tuple(op.meta["val"].shape) for op in operands if isinstance(op.meta.get("val"), torch.Tensor)))
    return shapes


@nested_compile_region
def _layer(x, w):
    return torch.tanh(x @ w) * 2


def _three_layers(x, w):
    return _layer(_layer(_layer(x, w), w), w)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_region_called_three_times_in_training_is_traced_once():
    backend = RecordingBackend()
    x, w = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)

    got = torch.compile(_three_layers, backend=backend, fullgraph=True)(x, w)
    grads = torch.autograd.grad(got.sum(), (x, w))
    want = _three_layers(x, w)
    want_grads = torch.autograd.grad(want.sum(), (x, w))

    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads, want_grads)
    forward, backward = backend.forward_graphs[0], backend.backward_graphs[0]
    assert len(_invoke_subgraph_calls(forward)) == 3 and len(_invoke_subgraph_calls(backward)) == 3
    assert len(_subgraph_modules(forward)) == 1
    assert len(_subgraph_modules(backward)) == 1


def test_a_region_called_three_times_in_inference_is_traced_once():
    backend = RecordingBackend()
    x, w = torch.randn(4, 4), torch.randn(4, 4)

    got = torch.compile(_three_layers, backend=backend, fullgraph=True)(x, w)

    torch.testing.assert_close(got, _three_layers(x, w))
    (graph,) = backend.forward_graphs
    assert len(_invoke_subgraph_calls(graph)) == 3
    assert len(_subgraph_modules(graph)) == 1


def test_a_region_called_with_other_shapes_gets_its_own_subgraph():
    """The other direction: calls that Dynamo tells apart (another shape) must not share a traced subgraph."""
    backend = RecordingBackend()
    x, y = torch.randn(4, 4, requires_grad=True), torch.randn(8, 8, requires_grad=True)

    def fn(x, y):
        return _layer(x, x).sum() + _layer(y, y).sum() + _layer(x, x).sum()

    got = torch.compile(fn, backend=backend, fullgraph=True)(x, y)
    grads = torch.autograd.grad(got, (x, y))
    want = fn(x, y)
    want_grads = torch.autograd.grad(want, (x, y))

    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads, want_grads)
    for graph in (backend.forward_graphs[0], backend.backward_graphs[0]):
        assert _invoke_subgraph_calls(graph)
        for subgraph, input_shapes in _input_shapes_per_subgraph(graph).items():
            assert len(input_shapes) == 1, f"{subgraph} called with inputs of several shapes: {input_shapes}"
