"""A function that leaves the caller's grad mode switched (``torch.set_grad_enabled(False)`` outside a ``with``
block), through the three entry points: outputs, autograd history and the grad mode after the call as in eager.
NOTE [Grad mode left switched by the function] in aot/output_checks.py; found by PyTorch's own
test/dynamo/test_aot_autograd.py (test_aot_grad_mode_mutation) run against the backend."""

from __future__ import annotations

import pytest
import torch

from tests.aot.routes import ROUTES, compiled_by_route


def _switches_grad_off(x):
    y = x * x
    torch.set_grad_enabled(False)
    return y.clone(), y


def _switches_grad_on(x):
    torch.set_grad_enabled(True)
    return x * x


def _eager(fn, x, grad_before):
    torch.set_grad_enabled(grad_before)
    out = fn(x)
    return out, torch.is_grad_enabled()


@pytest.fixture(autouse=True)
def _grad_mode_put_back():
    before = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(before)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
def test_grad_switched_off_inside_stays_off_after_the_call(route, requires_grad):
    """Was: grad mode still on after the compiled call (eager leaves it off); in training the capture was
    refused for an output 'requiring grad under no_grad'."""
    compiled = compiled_by_route(_switches_grad_off, route)
    for _ in range(3):  # the first call captures; later calls take the compiled or remembered fallback way
        x = torch.full((3,), 3.0, requires_grad=requires_grad)
        expected, mode_after_eager = _eager(_switches_grad_off, x, True)
        torch.set_grad_enabled(True)
        out = compiled(x)
        assert torch.is_grad_enabled() is mode_after_eager is False
        torch.testing.assert_close(out, expected)
        assert out[0].grad_fn is None
        assert (out[1].grad_fn is not None) is requires_grad
        if requires_grad:
            torch.set_grad_enabled(True)
            (grad,) = torch.autograd.grad(out[1].sum(), x)
            torch.testing.assert_close(grad, 2 * x.detach())


@pytest.mark.parametrize("route", ROUTES)
def test_grad_switched_on_inside_a_no_grad_call_keeps_the_output_history(route):
    """Was: called under no_grad, the output came back without autograd history (its gradient silently lost)
    and grad mode stayed off after the call; eager returns an output with history and leaves grad on."""
    compiled = compiled_by_route(_switches_grad_on, route)
    for _ in range(3):
        x = torch.full((3,), 3.0, requires_grad=True)
        expected, mode_after_eager = _eager(_switches_grad_on, x, False)
        torch.set_grad_enabled(False)
        out = compiled(x)
        assert torch.is_grad_enabled() is mode_after_eager is True
        torch.testing.assert_close(out, expected)
        assert out.grad_fn is not None
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(grad, 2 * x.detach())


@pytest.mark.parametrize("route", ROUTES)
def test_grad_mode_blocks_inside_the_function_still_capture_whole(route):
    """The other direction: ``with torch.no_grad()`` inside puts the mode back itself, so nothing is refused."""
    from aotcache.aot.fallback import fallback_counts

    def with_blocks(x):
        with torch.no_grad():
            scale = x.sum()
        return x * scale

    before = dict(fallback_counts())
    compiled = compiled_by_route(with_blocks, route)
    x = torch.full((3,), 3.0, requires_grad=True)
    out = compiled(x)
    assert torch.is_grad_enabled()
    torch.testing.assert_close(out, with_blocks(x))
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 9.0))
    assert dict(fallback_counts()) == before
