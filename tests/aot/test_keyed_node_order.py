"""transformers' ``ModelOutput`` (a pytree node rebuilt by its constructor) keeps eager's key order through a compiled
call, as argument and as output, and one that its constructor cannot rebuild runs with eager's results (NOTE [Keyed
pytree nodes in their own key order] in aotcache/aot/keyed_nodes.py)."""

from __future__ import annotations

import json

import pytest
import torch

import aotcache
from aotcache.aot.errors import CaptureError
from tests.conftest import run_python

modeling_outputs = pytest.importorskip("transformers.modeling_outputs")
BaseModelOutput = modeling_outputs.BaseModelOutput
CausalLMOutputWithPast = modeling_outputs.CausalLMOutputWithPast

ENTRY_POINTS = {
    "compile": lambda fn: aotcache.compile(fn, compiler="nop"),
    "aot_function": lambda fn: aotcache.aot_function(fn),
}


def loss_set_after_construction(x):
    out = CausalLMOutputWithPast(logits=x * 2)
    out.loss = (x * 3).sum()  # a key added last: eager's keys are [logits, loss]
    return out


def loss_set_by_key(x):
    out = CausalLMOutputWithPast(logits=x * 2)
    out["loss"] = (x * 3).sum()
    return out


def first_and_second(o):
    return o[0] * 10 + o.to_tuple()[1]


def _assert_same_output(got, want):
    assert type(got) is type(want)
    assert list(got.keys()) == list(want.keys())
    for a, b in zip(got.to_tuple(), want.to_tuple()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("fn", [loss_set_after_construction, loss_set_by_key], ids=["attribute", "item"])
def test_an_output_with_a_key_set_after_construction_keeps_eagers_key_order(entry, fn):
    x = torch.randn(3, requires_grad=True)
    compiled = ENTRY_POINTS[entry](fn)
    want = fn(x)
    for _ in range(2):  # the capture's call and a call of the compiled graph
        got = compiled(x)
        _assert_same_output(got, want)
        torch.testing.assert_close(got[0], x * 2)  # out[0] is the logits, as in eager
    (grad,) = torch.autograd.grad(got[0].sum() + got[1], x)
    torch.testing.assert_close(grad, torch.full_like(x, 5.0))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_argument_in_another_key_order_than_its_fields_is_traced_in_the_callers_order(entry):
    a, b = torch.randn(3, requires_grad=True), torch.randn(3)
    attentions_first = BaseModelOutput()
    attentions_first["attentions"] = a
    attentions_first["last_hidden_state"] = b
    fields_first = BaseModelOutput(last_hidden_state=b, attentions=a)
    compiled = ENTRY_POINTS[entry](first_and_second)
    # both orders, each way round: the second order must not reuse the first order's graph
    for arg in (attentions_first, fields_first, attentions_first):
        torch.testing.assert_close(compiled(arg), first_and_second(arg))
    (grad,) = torch.autograd.grad(compiled(attentions_first).sum(), a)
    torch.testing.assert_close(grad, torch.full_like(a, 10.0))


def extra_key_output(x):
    out = BaseModelOutput(last_hidden_state=x * 2)
    out["extra"] = x + 1  # not a field: the class's constructor cannot take it back
    return out


def extra_key_argument(o):
    return o["extra"] + o.last_hidden_state


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_model_output_its_constructor_cannot_rebuild_runs_with_eagers_results(entry):
    x = torch.randn(3)
    compiled = ENTRY_POINTS[entry](extra_key_output)
    for _ in range(2):
        _assert_same_output(compiled(x), extra_key_output(x))
    arg = BaseModelOutput(last_hidden_state=x)
    arg["extra"] = x * 5
    compiled_arg = ENTRY_POINTS[entry](extra_key_argument)
    for _ in range(2):
        torch.testing.assert_close(compiled_arg(arg), extra_key_argument(arg))


def test_a_model_output_its_constructor_cannot_rebuild_is_a_capture_error_in_strict_mode(monkeypatch):
    monkeypatch.setenv("AOTCACHE_STRICT", "1")
    with pytest.raises(CaptureError, match="does not rebuild from its pytree form"):
        aotcache.aot_function(extra_key_output)(torch.randn(3))


WARM_PROGRAM = """
import json, torch, aotcache
from aotcache.autograd_cache.cache import default_cache
from transformers.modeling_outputs import CausalLMOutputWithPast

def fn(x):
    out = CausalLMOutputWithPast(logits=x * 2)
    out.loss = (x * 3).sum()
    return out

x = torch.arange(3.0)
got = aotcache.aot_function(fn)(x)
print(json.dumps({"keys": list(got.keys()), "first": got[0].tolist(), "stats": default_cache().stats()}))
"""


def test_a_stored_output_is_rebuilt_in_eagers_key_order_by_a_warm_process(tmp_path):
    runs = [json.loads(run_python(WARM_PROGRAM, env={"AOTCACHE_CACHE_DIR": str(tmp_path)}).stdout.strip()
                       .splitlines()[-1]) for _ in range(2)]
    cold, warm = runs
    assert cold["stats"]["saved"] == 1 and warm["stats"]["hit"] == 1 and warm["stats"]["compile"] == 0
    for run in runs:
        assert run["keys"] == ["logits", "loss"] and run["first"] == [0.0, 2.0, 4.0]
