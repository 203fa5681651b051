"""Dynamo graphs holding a higher-order op that aotcache's backend runs eagerly (eager's values, logged) where torch's
``aot_eager`` compiles them (found in session 27 running PyTorch's test_higher_order_ops.py through the backend).
Known gaps, in docs/design.md's upstream-suites part: ``while_loop`` (the static capture has no ShapeEnv for the
loop's unbacked symbols) and a float Dynamo passes unspecialized, read inside a ``wrap`` body (NOTE [Dynamo's float
inputs kept as graph inputs] rewrites top-level reads only)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._higher_order_ops.while_loop import while_loop
from torch._higher_order_ops.wrap import wrap

from aotcache.aot.fallback import fallback_counts
from aotcache.backend import aotcache_backend

NOP_BACKEND = functools.partial(aotcache_backend, compiler="nop", cache=False)
SCALE = 3.0


def _eager_fallbacks() -> int:
    """Fallback decisions so far; a Dynamo graph run as Python is counted ``region`` (eager_dynamo_graph)."""
    return sum(n for kind, n in fallback_counts().items() if kind == "region" or kind.startswith(("eager:", "partial:")))


def _doubling_loop(n, x):
    return while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x * 2), (torch.zeros((), dtype=torch.int64), x))


def _scaled_in_wrap(x):
    return wrap(lambda x: x * SCALE, x)


@pytest.mark.xfail(strict=True, reason="while_loop's capture has no ShapeEnv: the graph runs eagerly")
def test_a_while_loop_graph_is_captured_through_the_backend():
    torch._dynamo.reset()
    compiled = torch.compile(_doubling_loop, backend=NOP_BACKEND)
    before = _eager_fallbacks()
    n, x = torch.tensor(3), torch.ones(2)
    assert torch.equal(compiled(n, x)[1], _doubling_loop(n, x)[1])  # eager's values either way
    assert _eager_fallbacks() == before


@pytest.mark.xfail(strict=True, reason="an unspecialized float read inside a wrap body is refused: the graph runs eagerly")
def test_a_changed_float_read_inside_wrap_is_captured_through_the_backend():
    global SCALE
    torch._dynamo.reset()
    compiled = torch.compile(_scaled_in_wrap, backend=NOP_BACKEND)
    x = torch.ones(2)
    try:
        assert torch.equal(compiled(x), x * 3.0)
        SCALE = 5.0  # Dynamo recompiles with the float unspecialized
        before = _eager_fallbacks()
        assert torch.equal(compiled(x), x * 5.0)
        assert _eager_fallbacks() == before
    finally:
        SCALE = 3.0
