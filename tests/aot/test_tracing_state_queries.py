"""``torch.fx._symbolic_trace.is_fx_tracing()`` inside a captured function answers as in eager (False), in the forward
and in a custom backward, through aotcache.compile, aot_function and aot_module (found with PyTorch's
test_functions.py ``test_is_fx_tracing`` in session 27: the capture's fx tracer left torch.fx's flag set, so the
traced branch was the tracing one, a wrong value). NOTE [is_fx_tracing during a capture] in
aot/trace_environment.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing

import aotcache


@pytest.fixture(autouse=True)
def _quiet_fx_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "is_fx_tracing will return true")
        yield


def branch_on_fx_tracing(x, y):
    if is_fx_tracing():
        return x - 1
    return y * 2 + 1


@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
def test_compile_and_aot_function_see_eager_is_fx_tracing(requires_grad):
    x = torch.zeros(3)
    y = torch.ones(3, requires_grad=requires_grad)
    expected = branch_on_fx_tracing(x, y)
    compiled = aotcache.compile(branch_on_fx_tracing, compiler="nop")
    for compiled_fn in (compiled, aotcache.aot_function(branch_on_fx_tracing, "nop")):
        out = compiled_fn(x, y)
        torch.testing.assert_close(out, expected)
        if requires_grad:
            (grad,) = torch.autograd.grad(out.sum(), y)
            torch.testing.assert_close(grad, torch.full((3,), 2.0))
    assert compiled.route == "aot"  # captured whole, not a fallback that ran eagerly


class _ScaleUnlessTracing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, grad):
        return grad * (100 if is_fx_tracing() else 3)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        hidden = _ScaleUnlessTracing.apply(self.linear(x))
        return hidden + (1 if is_fx_tracing() else 0)


def test_a_custom_backward_and_a_module_forward_see_eager_is_fx_tracing():
    block = _Block()
    x = torch.randn(2, 3, requires_grad=True)
    expected = block(x)
    expected_grads = torch.autograd.grad(expected.sum(), [x, block.linear.weight])
    for compiled in (aotcache.aot_module(block, "nop"), aotcache.compile(block, compiler="nop")):
        out = compiled(x)
        torch.testing.assert_close(out, expected)
        grads = torch.autograd.grad(out.sum(), [x, block.linear.weight])
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want)


def test_the_flag_is_back_after_a_capture_inside_fx_symbolic_trace():
    # a capture run while torch.fx traces (a user's symbolic_trace of a model calling a compiled function as a leaf)
    # leaves the flag as it found it
    from torch.fx import _symbolic_trace

    compiled = aotcache.aot_function(branch_on_fx_tracing, "nop", cache=False)
    _symbolic_trace._is_fx_tracing_flag = True
    try:
        torch.testing.assert_close(compiled(torch.zeros(2), torch.ones(2)), torch.full((2,), 3.0))
        assert _symbolic_trace._is_fx_tracing_flag is True
    finally:
        _symbolic_trace._is_fx_tracing_flag = False
