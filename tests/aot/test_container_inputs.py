"""Dynamo graphs taking a list of tensors (compiled autograd's boxed ``inputs``) through the ``aotcache`` backend
(NOTE [Container inputs of a Dynamo graph]): compiled with one input per element, not a failed compile."""

from __future__ import annotations

import functools
import operator

import pytest
import torch

from aotcache.aot.container_inputs import flatten_container_inputs
from aotcache.aot.fallback import fallback_counts
from aotcache.backend import aotcache_backend


def _list_input_graph(read_whole: bool = False, steal: bool = False) -> torch.fx.GraphModule:
    """``f(inputs: list, scale)``: ``inputs[0] * scale + inputs[1]`` (or ``torch.stack(inputs)`` read whole)."""
    graph = torch.fx.Graph()
    inputs = graph.placeholder("L_inputs_")
    scale = graph.placeholder("L_scale_")
    if steal:
        inputs.meta["steal_arg"] = True
    if read_whole:
        out = graph.call_function(torch.stack, (inputs,))
    else:
        first = graph.call_function(operator.getitem, (inputs, 0))
        second = graph.call_function(operator.getitem, (inputs, 1))
        out = graph.call_function(torch.add, (graph.call_function(torch.mul, (first, scale)), second))
    graph.output((out,))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _post_accumulate_hook_step(backend):
    """A leaf with a post-accumulate-grad hook (it scales the leaf by its gradient and the gradient by 5), its
    backward run by compiled autograd with ``backend``: returns the leaf and its gradient."""
    from torch._dynamo import compiled_autograd

    def hook(leaf):
        leaf.mul_(leaf.grad)
        leaf.grad.mul_(5)

    def register_and_multiply(x, y):
        x.register_post_accumulate_grad_hook(hook)
        return x * y

    torch._dynamo.reset()
    x = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    y = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    compiled = torch.compile(register_and_multiply, backend="eager", fullgraph=True)
    with compiled_autograd._enable(torch.compile(backend=backend, fullgraph=True)):
        compiled(x, y)
        x.backward(torch.tensor([2.0, 2.0, 2.0]))
    return x.detach(), x.grad


def test_compiled_autograd_backward_with_a_boxed_input_list_compiles_and_matches_eager():
    eager_x, eager_grad = _post_accumulate_hook_step("eager")
    before = dict(fallback_counts())
    x, grad = _post_accumulate_hook_step(functools.partial(aotcache_backend, compiler="nop"))
    torch.testing.assert_close(x, eager_x)
    torch.testing.assert_close(grad, eager_grad)
    assert fallback_counts() == before  # compiled, not run as Dynamo's graph


def test_list_input_graph_compiles_with_one_input_per_element():
    gm = _list_input_graph()
    a, b, scale = torch.randn(3), torch.randn(3), torch.randn(3)
    flat = flatten_container_inputs(gm, [[a, b], scale])
    assert flat is not None and len(flat.example_inputs) == 3
    assert not any(isinstance(value, list) for value in flat.example_inputs)
    before = dict(fallback_counts())
    compiled = aotcache_backend(gm, [[a, b], scale], compiler="nop")
    torch.testing.assert_close(compiled([a, b], scale)[0], a * scale + b)
    c, d = torch.randn(3), torch.randn(3)  # other values: read from this call's list, not the traced one
    torch.testing.assert_close(compiled([c, d], scale)[0], c * scale + d)
    assert fallback_counts() == before


def test_a_stolen_list_is_emptied_once_flattened():
    gm = _list_input_graph(steal=True)
    a, b, scale = torch.randn(3), torch.randn(3), torch.randn(3)
    compiled = aotcache_backend(gm, [[a, b], scale], compiler="nop")
    boxed = [a, b]
    torch.testing.assert_close(compiled(boxed, scale)[0], a * scale + b)
    assert boxed == []
    kept = [a, b]  # not marked stolen: left as the caller passed it
    aotcache_backend(_list_input_graph(), [[a, b], scale], compiler="nop")(kept, scale)
    assert len(kept) == 2


def test_list_read_whole_is_refused_and_runs_eagerly():
    gm = _list_input_graph(read_whole=True)
    a, b, scale = torch.randn(3), torch.randn(3), torch.randn(3)
    before = fallback_counts().get("region", 0)
    compiled = aotcache_backend(gm, [[a, b], scale], compiler="nop")
    torch.testing.assert_close(compiled([a, b], scale)[0], torch.stack([a, b]))
    assert fallback_counts().get("region", 0) == before + 1


def test_graph_without_containers_is_left_as_it_is():
    gm = _list_input_graph()
    assert flatten_container_inputs(gm, [torch.randn(3), torch.randn(3)]) is None


@pytest.mark.parametrize("bad", ["nested", "object"])
def test_container_of_other_values_is_refused(bad):
    from aotcache.aot.errors import CaptureError

    element = [torch.randn(3)] if bad == "nested" else object()
    with pytest.raises(CaptureError, match="not a tensor or a number"):
        flatten_container_inputs(_list_input_graph(), [[torch.randn(3), element], torch.randn(3)])


def _dynamic_compiled_autograd_steps(backend):
    """Compiled autograd with ``dynamic=True`` over several sizes: each step's leaf and gradient."""
    from torch._dynamo import compiled_autograd

    def hook(leaf):
        leaf.mul_(leaf.grad)

    def fn(x, y):
        x.register_post_accumulate_grad_hook(hook)
        return (x * y).sin()

    torch._dynamo.reset()
    results = []
    with compiled_autograd._enable(torch.compile(backend=backend, fullgraph=True, dynamic=True)):
        for size in (3, 5, 7, 4):
            torch.manual_seed(size)
            x, y = torch.randn(size, requires_grad=True), torch.randn(size)
            torch.compile(fn, backend="eager", dynamic=True)(x, y).sum().backward()
            results.append((x.detach().clone(), x.grad.clone()))
    return results


def test_symbolic_boxed_inputs_give_eagers_values_at_every_size():
    expected = _dynamic_compiled_autograd_steps("eager")
    actual = _dynamic_compiled_autograd_steps(functools.partial(aotcache_backend, compiler="nop"))
    for (x, grad), (eager_x, eager_grad) in zip(actual, expected):
        torch.testing.assert_close(x, eager_x)
        torch.testing.assert_close(grad, eager_grad)
