"""aot_function's ``num_params_buffers``: the leading flat arguments it names (a model's weights) keep static sizes
under dynamic shapes, as PyTorch's aot_function keeps them (NOTE [Weights named by num_params_buffers] in
aot/dynamic_dims.py); the other arguments stay symbolic, and a weight of another size traces its own graph."""

from __future__ import annotations

import pytest
import torch

from aotcache import aot_function


def linear_layer(params, x):
    """A layer called as PyTorch's ModuleInfo tests call one: weights first, then the input (flat: w, b, x)."""
    return torch.nn.functional.linear(x, params["weight"], params["bias"]).relu()


def _params(out_features=5, in_features=4):
    layer = torch.nn.Linear(in_features, out_features)
    return dict(layer.named_parameters())


class RecordingCompiler:
    """A nop compiler that records the sizes of the example inputs of each graph it is given."""

    def __init__(self):
        self.input_sizes = []

    def __call__(self, gm, example_inputs):
        self.input_sizes.append([tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in example_inputs])
        return gm


def _is_static(sizes):
    return all(isinstance(size, int) for size in sizes)


def _values_and_grads(fn, params, x):
    params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    x = x.detach().clone().requires_grad_()
    out = fn(params, x)
    grads = torch.autograd.grad(out.sum(), [*params.values(), x])
    return out, grads


def _compiled(dynamic, compiler=None, num_params_buffers=2):
    return aot_function(linear_layer, compiler or RecordingCompiler(), num_params_buffers=num_params_buffers,
                        dynamic=dynamic, on_capture_error="raise", cache=False)


def test_named_weights_are_static_and_inputs_symbolic_under_dynamic_true():
    compiler = RecordingCompiler()
    compiled = _compiled(True, compiler)
    params = _params()
    x = torch.randn(3, 4)
    torch.testing.assert_close(_values_and_grads(compiled, params, x), _values_and_grads(linear_layer, params, x))
    forward_inputs = compiler.input_sizes[0]
    # the forward graph's first inputs are the weight and the bias, then x
    assert _is_static(forward_inputs[0]) and _is_static(forward_inputs[1]), forward_inputs
    assert not _is_static(forward_inputs[2]), forward_inputs


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
def test_other_input_sizes_reuse_the_graph_and_other_weight_sizes_trace_again(dynamic):
    compiled = _compiled(dynamic)
    params = _params()
    for batch in (3, 6, 7):  # automatic: static for 3, then one symbolic graph for 6 and 7
        x = torch.randn(batch, 4)
        torch.testing.assert_close(_values_and_grads(compiled, params, x), _values_and_grads(linear_layer, params, x))
    compiles = compiled.num_compiles
    assert compiles == (1 if dynamic else 2)
    wider = _params(out_features=7)  # the weights of another layer: their sizes are part of the signature
    for batch in (3, 8):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(_values_and_grads(compiled, wider, x), _values_and_grads(linear_layer, wider, x))
    assert compiled.num_compiles > compiles
    # the first layer's graphs are still there and still right
    x = torch.randn(9, 4)
    torch.testing.assert_close(_values_and_grads(compiled, params, x), _values_and_grads(linear_layer, params, x))


def test_named_weights_are_never_marked_dynamic_under_automatic_shapes():
    compiler = RecordingCompiler()
    compiled = _compiled(None, compiler)
    x = torch.randn(3, 4)
    for out_features in (5, 6, 7):
        params = _params(out_features=out_features)
        torch.testing.assert_close(_values_and_grads(compiled, params, x), _values_and_grads(linear_layer, params, x))
    assert all(_is_static(sizes) for inputs in compiler.input_sizes for sizes in inputs
               if isinstance(sizes, tuple)), compiler.input_sizes


def test_without_num_params_buffers_every_argument_stays_symbolic():
    compiler = RecordingCompiler()
    compiled = _compiled(True, compiler, num_params_buffers=0)
    params = _params()
    x = torch.randn(3, 4)
    torch.testing.assert_close(_values_and_grads(compiled, params, x), _values_and_grads(linear_layer, params, x))
    assert not _is_static(compiler.input_sizes[0][0]), compiler.input_sizes


def test_the_stored_graph_is_loaded_for_the_same_weights_and_not_for_others():
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store.memory import InMemoryCache
    from aotcache.store.tiered import TieredCache

    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)

    def fresh():
        return aot_function(linear_layer, "nop", num_params_buffers=2, dynamic=True, on_capture_error="raise",
                            cache=cache)

    params = _params()
    _values_and_grads(fresh(), params, torch.randn(3, 4))
    saved = cache.counters["saved"]
    assert saved >= 1, dict(cache.counters)
    second = fresh()
    x = torch.randn(6, 4)  # another batch: the same symbolic graph
    torch.testing.assert_close(_values_and_grads(second, params, x), _values_and_grads(linear_layer, params, x))
    assert cache.counters["hit"] >= 1 and cache.counters["saved"] == saved, dict(cache.counters)
    wider = _params(out_features=7)
    third = fresh()
    torch.testing.assert_close(_values_and_grads(third, wider, x), _values_and_grads(linear_layer, wider, x))
    assert third.num_compiles == 1 and cache.counters["saved"] > saved, dict(cache.counters)
