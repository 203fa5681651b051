"""Side-effectful ops a custom backward calls, and Dynamo failures that are not ``TorchDynamoException``s, on
aotcache's routes: eager's effects, values and gradients. NOTE [Effectful ops in the backward] in
aot/functional_trace.py and NOTE [Dynamo errors that are not TorchDynamoException] in aot/dynamo_progress.py; found
by PyTorch's test/higher_order_ops/test_with_effects.py run against aotcache's entry points."""

from __future__ import annotations

import pytest
import torch

import aotcache
from aotcache.aot.fallback import fallback_counts

effects = pytest.importorskip("torch._higher_order_ops.effects")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def logging_ops():
    """``scale(x) = 2 * x``, whose backward calls ``note(grad)``, an ordered side-effectful op whose result it
    drops; ``calls`` counts both ops' kernel runs."""
    calls = {"scale": 0, "note": 0}
    with torch.library._scoped_library("_aotc_effects", "FRAGMENT") as lib:
        lib.define("scale(Tensor x) -> Tensor")
        lib.define("note(Tensor x) -> Tensor")

        def scale(x):
            calls["scale"] += 1
            return 2 * x

        def note(x):
            calls["note"] += 1
            return x.clone()

        lib.impl("scale", scale, "CPU")
        lib.impl("scale", lambda x: torch.empty_like(x), "Meta")
        lib.impl("note", note, "CPU")
        lib.impl("note", lambda x: torch.empty_like(x), "Meta")

        def backward(ctx, grad):
            torch.ops._aotc_effects.note(grad)
            return 2 * grad

        torch.library.register_autograd("_aotc_effects::scale", backward, lib=lib)
        handle = effects._register_effectful_op(torch.ops._aotc_effects.note.default, effects._EffectType.ORDERED)
        try:
            yield calls
        finally:
            handle.destroy()


def _scaled_sum(x, y):
    return torch.ops._aotc_effects.scale(x) + y.sin()


def _inputs():
    return (torch.tensor([1.0, -2.0, 3.0], requires_grad=True), torch.tensor([0.5, 0.25, -1.0], requires_grad=True))


def _compiled(route):
    if route == "aot_function":
        return aotcache.aot_function(_scaled_sum, "nop")
    if route == "compile":
        return aotcache.compile(_scaled_sum)
    return torch.compile(_scaled_sum, backend="aotcache", options={"compiler": "nop"})


@pytest.mark.parametrize("route", ["aot_function", "compile", "backend"])
def test_an_effectful_op_of_a_custom_backward_runs_at_every_backward(logging_ops, route):
    compiled = _compiled(route)
    for step in range(3):
        x, y = _inputs()
        ex, ey = _inputs()
        logging_ops["note"] = 0
        out = compiled(x, y)
        out.sum().backward()
        assert logging_ops["note"] == 1, f"step {step}: the backward's side-effectful op ran {logging_ops['note']} times"
        expected = _scaled_sum(ex, ey)
        expected.sum().backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(x.grad, ex.grad)
        torch.testing.assert_close(y.grad, ey.grad)


def test_a_backward_without_effectful_ops_is_still_compiled(logging_ops):
    """The refusal is for effectful ops only: the same function without the op in its backward compiles whole."""
    def plain(x, y):
        return (2 * x) + y.sin()

    before = sum(fallback_counts().values())
    x, y = _inputs()
    aotcache.aot_function(plain, "nop")(x, y).sum().backward()
    assert sum(fallback_counts().values()) == before
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


def test_an_effectful_op_in_the_forward_is_still_compiled_and_runs_once(logging_ops):
    def logs_forward(x):
        torch.ops._aotc_effects.note(x)  # its result dropped: only the effect token keeps it
        return x * 3

    compiled = aotcache.aot_function(logs_forward, "nop")
    before = sum(fallback_counts().values())
    for _ in range(2):
        logging_ops["note"] = 0
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        assert logging_ops["note"] == 1
        torch.testing.assert_close(x.grad, torch.full((2,), 3.0))
    assert sum(fallback_counts().values()) == before


def _sin_plus(x, y):
    return x.sin() + y


def _arguments_after_an_eager_backward():
    """A ``TwoTensor`` and a tensor, both with a ``.grad`` from an eager backward of ``_sin_plus``: torch 2.13's
    Dynamo fails to fake such a ``TwoTensor`` ("Expected SubclassSymbolicContext or None, got
    StatefulSymbolicContext", an ``AssertionError``)."""
    from torch.testing._internal.two_tensor import TwoTensor

    x = TwoTensor(torch.tensor([1.0, 2.0, 3.0], requires_grad=True), torch.tensor([4.0, 5.0, 6.0], requires_grad=True))
    y = torch.tensor([0.5, 0.25, -1.0], requires_grad=True)
    _sin_plus(x, y).sum().backward()
    return x, y


@pytest.mark.parametrize("route", ["aot_function", "compile"])
def test_a_dynamo_assertion_on_the_fallback_way_runs_the_call_eagerly(route):
    """The capture refuses a wrapper-subclass argument; torch.compile, the fallback, fails on one whose ``.grad``
    is set with a plain ``AssertionError`` (torch 2.13's fake-tensor conversion), where eager runs."""
    x, y = _arguments_after_an_eager_backward()
    compiled = aotcache.aot_function(_sin_plus, "nop") if route == "aot_function" else aotcache.compile(_sin_plus)
    out = compiled(x, y)
    expected = _sin_plus(x.detach(), y.detach())
    assert type(out).__name__ == "TwoTensor"
    torch.testing.assert_close(out.a, expected.a)
    torch.testing.assert_close(out.b, expected.b)


def test_a_users_own_assertion_on_the_fallback_way_is_raised_as_it_is():
    """A user's error raised while a Dynamo-compiled frame runs is not Dynamo's failure: raised once, not rerun."""
    calls = []

    def checks(x, y):
        calls.append(1)
        out = x.sin() + y
        assert float(y.sum()) < 0, "the user's own check"
        return out

    x, y = _arguments_after_an_eager_backward()
    with pytest.raises(AssertionError, match="the user's own check"):
        aotcache.aot_function(checks, "nop")(x, y.detach().abs())
    assert len(calls) == 1
