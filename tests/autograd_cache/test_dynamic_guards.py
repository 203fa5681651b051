"""The compiled-graph cache with dynamic=True and natural guards (no hand-edited entries): guards the
ShapeEnv produced while tracing (a size-dependent branch, two sizes related by an op, a size pinned by a slice)
decide which stored entry serves a call.

Two outcomes of a call that violates the stored guards: when tracing at the new size gives the same graph
(same key), it is a ``guard_miss`` that compiles and adds a slot under that key; when the new specialization
changes the graph, its key differs and it is a plain ``miss`` with its own entry. Each call goes through a
fresh ``aot_function`` (no in-memory reuse) over a disk-only cache, so every hit is a load from bytes. The nop
compiler throughout.
"""

from __future__ import annotations

import pytest
import torch

from aotcache.aot import aot_function
from aotcache.autograd_cache.cache import AOTAutogradCache
from aotcache.store.factory import open_tiers


@pytest.fixture
def cache():
    return AOTAutogradCache(open_tiers("disk", namespace="aot"), journal=False)


def run_and_compare(fn, shapes, cache):
    """Call a fresh dynamic aot_function of ``fn`` on random inputs of ``shapes``; check the output and the
    input gradients against eager; return the cache counter deltas of the call."""
    inputs = [torch.randn(*shape, requires_grad=True) for shape in shapes]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    before = cache.stats()
    out = aot_function(fn, "nop", cache=cache, dynamic=True)(*inputs)
    after = cache.stats()
    expected = fn(*reference_inputs)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for got, want in zip(inputs, reference_inputs):
        torch.testing.assert_close(got.grad, want.grad)
    return {name: after[name] - before[name] for name in ("hit", "miss", "guard_miss", "compile", "saved")
            if after[name] != before[name]}


def upcast_large_batches(x):
    if x.shape[0] > 4:  # guards 5 <= x.size(0), or x.size(0) <= 4
        x = x.float()  # a no-op for float32 inputs: both branches trace the same graph, hence the same key
    return (x * 2).sin()


def test_natural_guard_miss_adds_a_slot_under_the_same_key(cache):
    assert run_and_compare(upcast_large_batches, [(8, 3)], cache) == {"miss": 1, "compile": 1, "saved": 1}
    assert run_and_compare(upcast_large_batches, [(9, 2)], cache) == {"hit": 1}
    assert run_and_compare(upcast_large_batches, [(3, 3)], cache) == {"guard_miss": 1, "compile": 1, "saved": 1}
    listings = cache.list_entries()
    assert [item.slot for item in listings] == [0, 1] and listings[0].digest == listings[1].digest
    assert "5 <= L['t0'].size()[0]" in listings[0].manifest["guards"]
    assert "L['t0'].size()[0] <= 4" in listings[1].manifest["guards"]
    assert run_and_compare(upcast_large_batches, [(2, 5)], cache) == {"hit": 1}  # slot 1
    assert run_and_compare(upcast_large_batches, [(30, 3)], cache) == {"hit": 1}  # slot 0


def size_branch(x):
    if x.shape[0] > 4:
        return (x * 2).sin()
    return (x * 3).cos()


def test_size_dependent_branch_with_another_graph_is_a_new_entry(cache):
    assert run_and_compare(size_branch, [(8, 3)], cache) == {"miss": 1, "compile": 1, "saved": 1}
    assert run_and_compare(size_branch, [(9, 2)], cache) == {"hit": 1}
    assert run_and_compare(size_branch, [(3, 3)], cache) == {"miss": 1, "compile": 1, "saved": 1}
    listings = cache.list_entries()
    assert [item.slot for item in listings] == [0, 0] and listings[0].digest != listings[1].digest
    assert run_and_compare(size_branch, [(2, 5)], cache) == {"hit": 1}
    assert run_and_compare(size_branch, [(30, 3)], cache) == {"hit": 1}


def add_related(x, y):
    return (x * 2).sin() + y  # broadcasting relates the sizes: x.size(i) == y.size(i), or y's is 1


def test_related_sizes_are_reused_and_a_broadcast_is_a_new_specialization(cache):
    assert run_and_compare(add_related, [(5, 3), (5, 3)], cache) == {"miss": 1, "compile": 1, "saved": 1}
    [listing] = cache.list_entries()
    assert "L['t0'].size()[0]" in listing.manifest["guards"] and "L['t1'].size()[0]" in listing.manifest["guards"]
    assert run_and_compare(add_related, [(7, 4), (7, 4)], cache) == {"hit": 1}
    assert run_and_compare(add_related, [(5, 3), (5, 1)], cache) == {"miss": 1, "compile": 1, "saved": 1}
    assert run_and_compare(add_related, [(6, 2), (6, 1)], cache) == {"hit": 1}
    assert run_and_compare(add_related, [(2, 9), (2, 9)], cache) == {"hit": 1}
    assert len(cache.list_entries()) == 2


def cat_then_slice(x):
    return torch.cat([x, x])[:6]


def test_a_size_pinned_by_a_guard_serves_only_that_size(cache):
    assert run_and_compare(cat_then_slice, [(2, 3)], cache) == {"miss": 1, "compile": 1, "saved": 1}
    assert run_and_compare(cat_then_slice, [(2, 8)], cache) == {"hit": 1}
    assert run_and_compare(cat_then_slice, [(4, 3)], cache) == {"miss": 1, "compile": 1, "saved": 1}
    assert run_and_compare(cat_then_slice, [(9, 3)], cache) == {"hit": 1}
    assert run_and_compare(cat_then_slice, [(2, 4)], cache) == {"hit": 1}
