"""A list argument that holds itself: eager and ``torch.compile`` run such a call (the function reads ``len``), while
torch's pytree, which flattens every aotcache entry point's arguments, recursed without end (a RecursionError, found
in session 26's review). Such a call runs eagerly, alone (NOTE [Arguments that hold themselves] in
aot/signature.py); other calls are still compiled and reused."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import aotcache
from aotcache.aot.errors import RefusedArgumentError
from aotcache.aot.fallback import fallback_counts
from aotcache.aot.signature import holds_order_free_argument
from tests.aot.routes import ROUTES, compiled_by_route


def _scaled_by_length(x, items):
    return x * len(items)


def _holding_itself(kind="list"):
    if kind == "list":
        items = [1]
        items.append(items)
    else:
        items = {"one": 1} if kind == "dict" else OrderedDict(one=1)
        items["me"] = items
    return items


@pytest.mark.parametrize("kind", ["list", "dict", "OrderedDict"])
@pytest.mark.parametrize("route", ROUTES)
def test_an_argument_holding_itself_runs_as_eager_runs(route, kind):
    """On every entry point (torch.compile(backend="aotcache"): Dynamo guards what the function reads)."""
    compiled = compiled_by_route(_scaled_by_length, route)
    x = torch.ones(2)
    items = _holding_itself(kind)
    assert torch.equal(compiled(x, items), _scaled_by_length(x, items))
    assert torch.equal(compiled(x, items), _scaled_by_length(x, items))


def test_only_that_call_runs_eagerly_and_other_calls_keep_their_graph():
    """Both directions: the call holding itself runs eagerly (counted once); plain calls are compiled once and
    reused, before and after it."""
    before = fallback_counts().get("eager:refused_argument", 0)
    compiled = aotcache.aot_function(_scaled_by_length, "nop", cache=False)
    x = torch.ones(2)
    assert torch.equal(compiled(x, [1, 2]), x * 2)
    for _ in range(2):
        assert torch.equal(compiled(x, _holding_itself()), x * 2)
    assert torch.equal(compiled(x, [1, 2]), x * 2)
    assert compiled.num_compiles == 1
    assert fallback_counts().get("eager:refused_argument", 0) == before + 1


def test_aotcache_compile_stays_on_the_aot_way():
    compiled = aotcache.compile(_scaled_by_length, compiler="nop", cache=False)
    x = torch.ones(2)
    assert torch.equal(compiled(x, _holding_itself()), x * 2)  # a first call: decides nothing
    assert torch.equal(compiled(x, [1, 2, 3]), x * 3)
    assert compiled.route == "aot" and compiled.compiled.num_compiles == 1
    assert torch.equal(compiled(x, _holding_itself()), x * 2)
    assert torch.equal(compiled(x, [1, 2, 3]), x * 3)
    assert compiled.route == "aot" and compiled.compiled.num_compiles == 1


class _Scaler(torch.nn.Module):
    def forward(self, x, items=()):
        return x * len(items)


@pytest.mark.parametrize("entry", ["aot_module", "compile"])
def test_a_module_with_a_keyword_argument_holding_itself(entry):
    compiled = (aotcache.aot_module(_Scaler(), "nop", cache=False) if entry == "aot_module"
                else aotcache.compile(_Scaler(), compiler="nop", cache=False))
    x = torch.ones(2)
    assert torch.equal(compiled(x, items=_holding_itself()), x * 2)
    assert torch.equal(compiled(x, items=[1, 2, 3]), x * 3)


def _scaled_after_a_graph_break(x, items):
    if x.sum() > 0:
        x = x + 1
    return x * len(items)


def test_aotcache_compile_on_the_dynamo_way():
    compiled = aotcache.compile(_scaled_after_a_graph_break, compiler="nop", cache=False)
    x = torch.ones(2)
    assert torch.equal(compiled(x, [1]), _scaled_after_a_graph_break(x, [1]))
    assert compiled.route == "dynamo"
    items = _holding_itself("OrderedDict")
    assert torch.equal(compiled(x, items), _scaled_after_a_graph_break(x, items))


def test_on_capture_error_raise_names_the_argument_not_a_recursion_error():
    strict = aotcache.aot_function(_scaled_by_length, "nop", cache=False, on_capture_error="raise")
    with pytest.raises(RefusedArgumentError, match="holds itself"):
        strict(torch.ones(2), _holding_itself())


def test_the_set_check_opens_a_mapping_holding_itself_once():
    items = _holding_itself("OrderedDict")
    assert not holds_order_free_argument((items,), {})
    items["set"] = {1}
    assert holds_order_free_argument((items,), {})
