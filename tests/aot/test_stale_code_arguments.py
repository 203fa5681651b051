"""Code passed as an argument (NOTE [Code passed as an argument] in aot/signature.py): a class, a function or a
``functools.partial`` from the user's program was keyed by identity while what it reads was not guarded, so a class
attribute, a global or a closure cell it reads, or a partial's keywords, changed between calls kept the graph traced
with the old value (found in session 27's review with ``@classmethod`` over ``@aotcache.compile``). Such code is
refused (the fallback's Dynamo guards its reads); a partial of library code is keyed by its values; library code
(torch, the standard library) is still keyed by identity and compiled once."""

from __future__ import annotations

import functools

import pytest
import torch

import aotcache

X = torch.ones(3)
GAIN = 2.0


class _Scaled:
    k = 2.0


def _scale_by_class(cls, x):
    return x * cls.k


def _gain(y):
    return y * GAIN


def _closing_over(k):
    def scale(y):
        return y * k
    return scale


def _apply(fn, x):
    return fn(x)


def _entries(function):
    return {"aot_function": aotcache.aot_function(function, "nop", cache=False),
            "compile": aotcache.compile(function, compiler="nop", cache=False)}


@pytest.mark.parametrize("route", ["aot_function", "compile"])
def test_unchanged_code_arguments_keep_their_graph(route):
    """The direction that holds: the same class / function / partial again reuses the graph, eager's values."""
    scale = _entries(_scale_by_class)[route]
    apply = _entries(_apply)[route]
    partial = functools.partial(torch.mul, other=3.0)
    for _ in range(3):
        torch.testing.assert_close(scale(_Scaled, X), X * _Scaled.k)
        torch.testing.assert_close(apply(_gain, X), X * GAIN)
        torch.testing.assert_close(apply(partial, X), X * 3.0)
    if route == "aot_function":  # the user's class and function take the fallback; the partial of torch.mul is compiled
        assert scale.num_compiles == 0
        assert apply.num_compiles == 1


@pytest.mark.parametrize("route", ["aot_function", "compile"])
def test_library_code_and_equal_partials_reuse_one_graph(route):
    """Library code is keyed by identity (compiled once); a new partial with equal values hits, another value misses."""
    apply = _entries(_apply)[route]
    for _ in range(2):
        torch.testing.assert_close(apply(torch.sigmoid, X), torch.sigmoid(X))
        torch.testing.assert_close(apply(functools.partial(torch.mul, other=3.0), X), X * 3.0)
    torch.testing.assert_close(apply(functools.partial(torch.mul, other=4.0), X), X * 4.0)
    if route == "aot_function":
        assert apply.num_compiles == 3
    else:
        assert apply.route == "aot"


@pytest.mark.parametrize("route", ["aot_function", "compile"])
def test_a_partial_holding_a_tensor_or_user_code_is_refused_with_eager_values(route):
    """A tensor in a partial would be baked into the graph, a user function's reads are not guarded: both refused."""
    apply = _entries(_apply)[route]
    weight = torch.full((3,), 2.0)
    holding_tensor = functools.partial(torch.mul, other=weight)
    torch.testing.assert_close(apply(holding_tensor, X), X * 2.0)
    weight.fill_(5.0)
    torch.testing.assert_close(apply(holding_tensor, X), X * 5.0, rtol=0, atol=0)
    torch.testing.assert_close(apply(functools.partial(_gain), X), X * GAIN)
    if route == "aot_function":
        assert apply.num_compiles == 0


def _change_class_attribute():
    class Scaled:
        k = 2.0

    def run(entry):
        return entry(Scaled, X)

    def change():
        Scaled.k = 7.0

    return _scale_by_class, run, change, lambda: X * 7.0


def _change_global_read_by_argument():
    def run(entry):
        return entry(_gain, X)

    def change():
        global GAIN
        GAIN = 7.0

    return _apply, run, change, lambda: X * 7.0


def _change_closure_cell():
    scale = _closing_over(2.0)

    def change():
        scale.__closure__[0].cell_contents = 7.0

    return _apply, lambda entry: entry(scale, X), change, lambda: X * 7.0


def _change_partial_keywords():
    partial = functools.partial(torch.mul, other=2.0)

    def change():
        partial.keywords["other"] = 7.0

    return _apply, lambda entry: entry(partial, X), change, lambda: X * 7.0


CHANGES = {"class_attribute": _change_class_attribute, "global_read_by_a_function_argument":
           _change_global_read_by_argument, "closure_cell": _change_closure_cell,
           "partial_keywords": _change_partial_keywords}


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("route", ["aot_function", "compile"])
def test_code_argument_changed_between_calls_gives_eager_values(route, change, monkeypatch):
    monkeypatch.setitem(globals(), "GAIN", 2.0)  # put back after the change
    function, run, mutate, expected = CHANGES[change]()
    entry = _entries(function)[route]
    run(entry)
    mutate()
    torch.testing.assert_close(run(entry), expected(), rtol=0, atol=0)
