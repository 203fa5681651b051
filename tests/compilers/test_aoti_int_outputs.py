"""Int outputs of an aoti library's graph that calls may change (NOTE [int outputs the template cannot hold] in
``aotcache/compilers/aoti.py``): refused, so the fallback chain compiles the graph, instead of returning the
first call's value."""

from __future__ import annotations

import functools

import pytest
import torch

import aotcache
from aotcache.backend import aotcache_backend
from aotcache.compilers.aoti import UnpinnedIntOutput, aoti_compiler
from tests.compilers.graphs import traced


def upper_half(x):
    return x[x.shape[0] // 2:]


def window(x):
    return x[16:32]


def test_a_size_output_of_a_dynamic_build_is_refused_before_building():
    gm = traced(lambda x: (x * 2, x.shape[0] // 2 + 1), [torch.randn(8)], "symbolic")
    fake_inputs = [node.meta["val"] for node in gm.graph.nodes if node.op == "placeholder"]
    with pytest.raises(UnpinnedIntOutput, match="which no call check pins"):
        aoti_compiler(gm, fake_inputs)


def test_a_view_at_a_size_dependent_offset_is_eagers_at_every_length():
    """Was the first call's half (shape 32 at offset 32) for every length."""
    torch._dynamo.reset()
    compiled = torch.compile(upper_half, backend=functools.partial(aotcache_backend, compiler="aoti"),
                             fullgraph=True, dynamic=True)
    with torch.no_grad():
        for n in (64, 128):
            x = torch.arange(float(n))
            out, expected = compiled(x), upper_half(x)
            assert (out.shape, out.storage_offset()) == (expected.shape, expected.storage_offset())
            assert torch.equal(out, expected)


@pytest.mark.parametrize("compiler", ["aoti", "inductor"])
def test_a_view_of_an_input_at_another_offset_without_dynamo(compiler):
    """aoti returned the first offset; inductor's code named a symbol it never bound (NameError)."""
    compiled = aotcache.compile(window, compiler=compiler, dynamic=True)
    base = torch.arange(1024.0)
    with torch.no_grad():
        for start in (0, 128, 64):
            out = compiled(base[start:])
            assert out.storage_offset() == start + 16 and torch.equal(out, base[start + 16:start + 32])


def test_an_offset_symbol_the_graph_never_reads_is_not_specialized():
    """NOTE [int inputs the graph never reads]: Dynamo passes a changed input offset as an int input; specialized,
    the third call at another size raised ValueError ("specialized to input 0")."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * 2 + 1, backend=functools.partial(aotcache_backend, compiler="aoti"),
                             fullgraph=True)
    base = torch.arange(1024.0)
    with torch.no_grad():
        for start in (0, 128, 64):
            assert torch.equal(compiled(base[start:]), base[start:] * 2 + 1)
