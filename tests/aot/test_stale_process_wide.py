"""Process-wide state a compiled call must see as eager does: global module hooks and the environment reached
as a value (found in session 20). Both directions: a change that alters the result gives eager's result, and
none (or an equal one) keeps the compiled graph.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_hooks

import aotcache
from aotcache.autograd_cache.fingerprint import code_fingerprint

X = torch.randn(3, 4)

_ROUTES = {
    "aot_module": lambda model: aotcache.aot_module(model, "nop", cache=False),
    "compile": lambda model: aotcache.compile(model, compiler="nop", cache=False),
}


def _compiles(compiled) -> int:
    return compiled.compiled.num_compiles


@pytest.mark.parametrize("route", list(_ROUTES))
@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_global_forward_hook_registered_after_compiling_runs_once_as_in_eager(route, kind, global_hooks):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    compiled = _ROUTES[route](model)
    torch.testing.assert_close(compiled(X), model(X))
    def triple_linear_outputs(module, inputs, output=None):
        if isinstance(module, nn.Linear):
            return output * 3 if kind == "forward" else (inputs[0] * 3,)
        return None

    register = (module_hooks.register_module_forward_hook if kind == "forward"
                else module_hooks.register_module_forward_pre_hook)
    global_hooks(register(triple_linear_outputs))
    torch.testing.assert_close(compiled(X), model(X))  # once around each module: not around the wrapper too
    assert _compiles(compiled) == 2
    compiled(X)
    assert _compiles(compiled) == 2  # nothing changed: the graph with the hook


@pytest.mark.parametrize("route", list(_ROUTES))
def test_unconditional_global_forward_hook_is_not_applied_to_the_wrapper_or_the_graph(route, global_hooks):
    model = nn.Linear(4, 4)
    compiled = _ROUTES[route](model)
    compiled(X)
    global_hooks(module_hooks.register_module_forward_hook(lambda module, inputs, output: output * 3))
    torch.testing.assert_close(compiled(X), model(X))  # was 9x the linear's output (and a crash under nop)
    handle_count = _compiles(compiled)
    module_hooks._global_forward_hooks.clear()
    torch.testing.assert_close(compiled(X), model(X))
    assert _compiles(compiled) == handle_count  # back to the first program: its graph, no trace


def test_global_backward_hook_on_the_dynamo_way_runs_once_as_in_eager(global_hooks):
    model = nn.Linear(4, 4)
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    x = torch.randn(2, 4, requires_grad=True)

    def input_grad(fn):
        x.grad = None
        fn(x).sum().backward()
        return x.grad.clone()

    torch.testing.assert_close(input_grad(compiled), input_grad(model))
    global_hooks(module_hooks.register_module_full_backward_hook(lambda module, gi, go: (gi[0] * 5,)))
    expected = input_grad(model)
    got = input_grad(compiled)  # a backward hook sends the module the Dynamo way (module_refusals.py)
    torch.testing.assert_close(got, expected)  # was 25x: once more around the OptimizedModule


ENV = os.environ  # the environment as a value: a global alias


def reads_environment_through_an_alias(x):
    return x * 2 if "AOTCACHE_S20_FLAG" in ENV else x * -3


def _reads_through_a_closure():
    environment = os.environ

    def reads(x):
        return x + len(environment.get("AOTCACHE_S20_FLAG", ""))

    return reads


@pytest.mark.parametrize("make", [lambda: reads_environment_through_an_alias, _reads_through_a_closure],
                         ids=["global", "closure"])
def test_environment_reached_as_a_value_is_guarded_in_process(make, monkeypatch):
    fn = make()
    monkeypatch.delenv("AOTCACHE_S20_FLAG", raising=False)
    compiled = aotcache.aot_function(fn, "nop", cache=False)
    torch.testing.assert_close(compiled(X), fn(X))
    monkeypatch.setenv("AOTCACHE_S20_FLAG", "on")
    torch.testing.assert_close(compiled(X), fn(X))
    assert compiled.num_compiles == 2
    walks = compiled.num_program_walks
    monkeypatch.setenv("AOTCACHE_S20_FLAG", "".join(["o", "n"]))  # an equal value: a walk, the same graph
    torch.testing.assert_close(compiled(X), fn(X))
    assert compiled.num_compiles == 2 and compiled.num_program_walks == walks + 1
    compiled(X)
    walks = compiled.num_program_walks
    compiled(X)
    assert compiled.num_program_walks == walks  # steady: guards only
    monkeypatch.delenv("AOTCACHE_S20_FLAG")
    torch.testing.assert_close(compiled(X), fn(X))  # back to the first program: its graph again
    assert compiled.num_compiles == 2


def test_environment_reached_as_a_value_leaves_the_fingerprint_untrusted():
    fingerprint = code_fingerprint(reads_environment_through_an_alias)
    assert not fingerprint.trusted and fingerprint.reason.startswith("process state: os.environ"), fingerprint.reason
