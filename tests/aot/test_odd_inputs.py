"""Regressions found by ``bench/odd_inputs.py`` (ordinary forwards called with unusual arguments or in unusual
autograd contexts): each ran in eager and raised another error, or gave other results, through ``aot_function`` /
``aot_module``, ``aotcache.compile`` or ``torch.compile(backend="aotcache")`` (nop compiler)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import aotcache


def _routes(obj):
    """The three entry points, each over its own deep copy of ``obj`` (a module or a function)."""
    module = isinstance(obj, nn.Module)
    return {
        "aot": lambda: (aotcache.aot_module if module else aotcache.aot_function)(copy.deepcopy(obj) if module
                                                                                   else obj, "nop", cache=False),
        "compile": lambda: aotcache.compile(copy.deepcopy(obj) if module else obj, compiler="nop", cache=False),
        "dynamo": lambda: torch.compile(copy.deepcopy(obj) if module else obj, backend="aotcache",
                                        options={"compiler": "nop", "cache": False}),
    }


def _mutate_leaf(x):
    x.add_(1)
    return x * 2


def _eager_error(fn, *args):
    with pytest.raises(RuntimeError) as info:
        fn(*args)
    return info


@pytest.mark.parametrize("route", ("aot", "compile"))
def test_leaf_requiring_grad_mutated_raises_eagers_error_and_later_calls_compile(route):
    """NOTE [Errors eager raises too]: aotcache.compile raised Dynamo's TorchRuntimeError ('RuntimeError when
    making fake tensor call') where eager raises a plain RuntimeError about the leaf, and took the Dynamo way for
    good; now the call runs eagerly (eager's error) and a later call under no_grad is captured whole."""
    compiled = _routes(_mutate_leaf)[route]()
    eager = _eager_error(_mutate_leaf, torch.randn(3, requires_grad=True))
    for _ in range(2):
        x = torch.randn(3, requires_grad=True)
        got = _eager_error(compiled, x)
        assert type(got.value) is type(eager.value), got.value
        assert "leaf Variable that requires grad" in str(got.value)
        assert torch.equal(x, x.detach())  # nothing else happened to it
    before = compiled.compiled.num_compiles if route == "compile" else compiled.num_compiles
    x = torch.randn(3, requires_grad=True)
    expected = x.detach() + 1
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out, expected * 2)
    torch.testing.assert_close(x.detach(), expected)
    if route == "compile":
        assert compiled.route == "aot"
        assert compiled.compiled.num_compiles == before + 1
    with torch.no_grad():
        compiled(torch.randn(3, requires_grad=True))
    assert (compiled.compiled.num_compiles if route == "compile" else compiled.num_compiles) == before + 1
