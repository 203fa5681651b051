"""``torch.compile(backend="aotcache")`` hands Dynamo the dynamic dimensions of its graphs' outputs, as
``backend="aot_eager"`` does (NOTE [Dynamic dimensions of a Dynamo graph's outputs]): found on Bloom's greedy
``generate``, whose first decode step compiled once more than under aot_eager (bench/backend_sweep.py)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters


class KVCache:
    """A KV cache in the shape transformers' ``DynamicLayer`` has: filled lazily inside the compiled forward."""

    def __init__(self):
        self.keys = None


def step(x, cache):
    if cache.keys is None:
        cache.keys = x * 2
    else:
        cache.keys = torch.cat([cache.keys, x], dim=1)
    return cache.keys.sum(dim=1)


def run_generate_like(backend, options=None):
    """Two prefills of different lengths (the second compiles the prefill dynamic), then decode steps of one
    token on the second prefill's cache; returns the outputs and the number of graphs Dynamo compiled."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend=backend, **({"options": options} if options else {}))
    torch.manual_seed(0)
    outs = [compiled(torch.randn(2, 3), KVCache())]
    cache = KVCache()
    outs.append(compiled(torch.randn(2, 4), cache))
    for _ in range(4):
        outs.append(compiled(torch.randn(2, 1), cache))
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return outs, graphs, cache.keys


def test_a_dynamic_graph_output_carried_to_the_next_frame_compiles_no_more_than_aot_eager():
    ref_outs, ref_graphs, ref_keys = run_generate_like("aot_eager")
    outs, graphs, keys = run_generate_like("aotcache", {"compiler": "nop"})
    assert graphs == ref_graphs
    assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs)) and torch.equal(keys, ref_keys)


@pytest.mark.parametrize("backend,options", [("aot_eager", None), ("aotcache", {"compiler": "nop"})])
def test_outputs_of_a_dynamic_graph_carry_their_symbolic_dimensions(backend, options):
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (x * 2, x.sum(dim=1)), backend=backend, dynamic=True,
                             **({"options": options} if options else {}))
    doubled, summed = compiled(torch.randn(3, 5))
    torch._dynamo.reset()
    attribute = _attribute_torchs_runtime_stamps()
    assert getattr(doubled, attribute, set()) == {0, 1}
    assert getattr(summed, attribute, set()) == {0}


def _attribute_torchs_runtime_stamps() -> str:
    """The attribute torch's own AOT Autograd runtime stamps on a dynamic graph's outputs: its own marker from torch
    2.12 on, the weak (``maybe_mark_dynamic``) one on torch 2.11, whose runtime has no other."""
    from torch._functorch._aot_autograd import runtime_wrappers

    if hasattr(runtime_wrappers, "mark_dynamo_propagated_dynamic_indices"):
        return "_dynamo_propagated_dynamic_indices"
    assert hasattr(runtime_wrappers, "maybe_mark_dynamic_helper"), "torch's runtime stamps no dynamic outputs"
    return "_dynamo_weak_dynamic_indices"


def test_a_graph_calling_vmap_is_cached_and_loads_warm():
    """Mamba's graphs call ``torch.vmap``, whose Dynamo graph holds ``lazy_load_decompositions`` (in
    ``torch._functorch.predispatch`` from torch 2.12 on): it must not bypass the cache (bench/backend_sweep.py)."""
    from aotcache.autograd_cache.cache import default_cache

    def f(x, w):
        return torch.vmap(lambda row: (row * w).sum())(x).tanh()

    x, w = torch.randn(3, 4), torch.randn(4, requires_grad=True)
    results = []
    for _ in range(2):
        torch._dynamo.reset()
        out = torch.compile(f, backend="aotcache", options={"compiler": "nop"})(x, w)
        results.append((out, torch.autograd.grad(out.sum(), w)[0]))
    torch._dynamo.reset()
    stats = default_cache().stats()
    assert stats["bypass_reasons"] == {} and (stats["compile"], stats["hit"]) == (1, 1)
    ref = f(x, w)
    ref_grad = torch.autograd.grad(ref.sum(), w)[0]
    for out, grad in results:
        assert torch.allclose(out, ref) and torch.allclose(grad, ref_grad)
