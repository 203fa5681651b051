"""Double backward (``create_graph=True``) through a compiled graph that contains a custom autograd.Function: the
replay of the joint graph differentiated the Function's forward with autograd's formulas instead of running its
backward, so the first-order gradients silently differed from eager's. Such graphs now raise DoubleBackwardError
(as torch.compile's AOT Autograd does); first-order gradients and plain graphs' double backward are unchanged
(NOTE [Custom backwards and double backward] in aotcache/aot/double_backward.py; found by session 15's run of PyTorch's
test_autograd_function.py)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.function import once_differentiable

import aotcache
from aotcache.aot.double_backward import DoubleBackwardError


class StraightThroughRound(torch.autograd.Function):
    """Forward ``round(x) * x``; backward ``3 * x * g``, which is not the forward's derivative (a user's choice)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.round() * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x


class SquareOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 * x


def _straight_through(x):
    return StraightThroughRound.apply(x).sum()


def _square_once(x):
    return SquareOnce.apply(x * 1.0).sum()


def _plain(x):
    return (x.sin() * x).sum()


def _input():
    return torch.tensor([1.3, 2.6, -0.4], requires_grad=True)


def _gradient(fn, create_graph):
    x = _input()
    (grad,) = torch.autograd.grad(fn(x), x, create_graph=create_graph)
    return grad


def _compiled(fn, route):
    if route == "torch.compile":
        torch._dynamo.reset()
        return torch.compile(fn, backend="aotcache", options={"compiler": "nop"})
    return aotcache.aot_function(fn, "nop")


ROUTES = ["torch.compile", "aot_function"]


@pytest.mark.parametrize("route", ROUTES)
def test_first_order_gradient_of_a_custom_backward_is_eagers(route):
    compiled = _compiled(_straight_through, route)
    torch.testing.assert_close(_gradient(compiled, create_graph=False), _gradient(_straight_through, False))


@pytest.mark.parametrize("route", ROUTES)
def test_create_graph_through_a_custom_backward_raises_rather_than_differ(route):
    """Before: 1.0, 3.0, -0.0 (the derivative of ``round(x) * x``) where eager gives 3.9, 7.8, -1.2."""
    compiled = _compiled(_straight_through, route)
    with pytest.raises(DoubleBackwardError, match="custom torch.autograd.Function"):
        _gradient(compiled, create_graph=True)


@pytest.mark.parametrize("route", ROUTES)
def test_double_backward_through_once_differentiable_raises(route):
    """Eager refuses to differentiate a ``once_differentiable`` backward; aotcache differentiated the forward."""
    compiled = _compiled(_square_once, route)
    with pytest.raises(DoubleBackwardError, match="custom torch.autograd.Function"):
        grad = _gradient(compiled, create_graph=True)
        torch.autograd.grad(grad.sum(), grad)


def test_a_region_loaded_from_the_cache_raises_too():
    """The second compile loads the stored region (no capture): its first double backward captures the graph
    again, which must come out without a replayable joint graph too."""
    from aotcache.autograd_cache.cache import default_cache

    for attempt in ("miss", "hit"):
        compiled = _compiled(_straight_through, "torch.compile")
        torch.testing.assert_close(_gradient(compiled, create_graph=False), _gradient(_straight_through, False),
                                   msg=attempt)
        with pytest.raises(DoubleBackwardError, match="custom torch.autograd.Function"):
            _gradient(compiled, create_graph=True)
    assert default_cache().stats()["hit"] >= 1


@pytest.mark.parametrize("route", ROUTES)
def test_double_backward_without_a_custom_function_still_replays(route):
    compiled = _compiled(_plain, route)
    got = _gradient(compiled, create_graph=True)
    want = _gradient(_plain, create_graph=True)
    torch.testing.assert_close(got, want)
    x_got, x_want = _input(), _input()
    (g_got,) = torch.autograd.grad(compiled(x_got), x_got, create_graph=True)
    (g_want,) = torch.autograd.grad(_plain(x_want), x_want, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(g_got.sum(), x_got)[0], torch.autograd.grad(g_want.sum(), x_want)[0])
