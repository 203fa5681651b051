"""Views of inputs the function mutates in place, returned as outputs (NOTE [Views of mutated inputs] in
``aotcache/aot/mutated_input_views.py``): the runtime must place them in the real input where eager does."""

from __future__ import annotations

import functools

import pytest
import torch

import aotcache
from aotcache.backend import aotcache_backend


def bump_then_window(x):
    x.add_(1)
    return x[2:6]


def window_then_bump(x):
    window = x[2:6]
    x.add_(1)
    return window


def bump_then_rows(x):
    x.add_(1)
    return x[1:3]


def _same_view(out, expected, base):
    assert out.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()  # aliases the input, as eager
    assert (out.storage_offset(), out.stride()) == (expected.storage_offset(), expected.stride())
    assert torch.equal(out, expected)


@pytest.mark.parametrize("fn", [bump_then_window, window_then_bump], ids=["view after the write", "view before"])
def test_a_view_of_a_mutated_input_at_an_offset_is_where_eager_puts_it(fn):
    compiled = aotcache.compile(fn, compiler="nop", dynamic=True)
    for start in (128, 64):  # was base[2:6] for both: the offset within the functional value
        base, eager_base = torch.arange(1024.0), torch.arange(1024.0)
        out, expected = compiled(base[start:]), fn(eager_base[start:])
        _same_view(out, expected, base)
        assert torch.equal(base, eager_base)


def test_a_view_of_a_mutated_non_dense_input_is_eagers():
    """The input's new value is contiguous where the input is not (was: contiguous strides, other elements)."""
    compiled = aotcache.compile(bump_then_rows, compiler="nop")
    base, eager_base = torch.arange(1024.0), torch.arange(1024.0)
    out, expected = compiled(base.view(32, 32)[2:, ::2]), bump_then_rows(eager_base.view(32, 32)[2:, ::2])
    _same_view(out, expected, base)
    assert torch.equal(base, eager_base)


def test_under_inductor_with_a_symbolic_offset(monkeypatch):
    monkeypatch.setenv("AOTCACHE_STRICT", "1")
    torch._dynamo.reset()
    compiled = torch.compile(bump_then_window, backend=functools.partial(aotcache_backend, compiler="inductor"),
                             fullgraph=True)
    with torch.no_grad():
        for start in (0, 128, 64):  # the second call makes the input's offset a symbol
            base, eager_base = torch.arange(1024.0), torch.arange(1024.0)
            out, expected = compiled(base[start:]), bump_then_window(eager_base[start:])
            _same_view(out, expected, base)
            assert torch.equal(base, eager_base)
