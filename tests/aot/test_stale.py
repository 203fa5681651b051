"""Zero stale results: a compiled function never returns what an older version of the program computed.

Each case is shaped as it was found (issue 11): the program changes between two calls in one process (the
program guards, NOTE [Program guards]) or between two processes (the call fingerprint, NOTE [Process state]
and NOTE [Reachable code]), and the result is compared with eager. Both directions: a change that alters
the result re-traces (or misses), one that does not (an equal value re-assigned, an unrelated global) keeps
the compiled graph. The nop compiler throughout, plus one Inductor case (slow).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import types

import pytest
import torch
from torch import nn

import aotcache
from aotcache import config
from aotcache.autograd_cache.fingerprint import code_fingerprint
from tests.conftest import FRESH_PROCESSES_TIMEOUT, run_python

X = torch.randn(3, 4)

SCALE = 2.0  # a module-level global read by forward / by an aot_function
UNRELATED = 1.0  # a global nothing compiled reads


def _equal_copy(value: float) -> float:
    """An equal float that is another object (re-assigning it must not re-trace)."""
    copy = float(repr(value))
    assert copy == value and copy is not value
    return copy


def compiled_function(fn, **options):
    return aotcache.aot_function(fn, "nop", cache=False, **options)


def compiled_module(module):
    return aotcache.aot_module(module, "nop", cache=False)


class ReadsGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) * SCALE


# ----------------------------------------------------------------------------------------------------
# In one process: the program guards
# ----------------------------------------------------------------------------------------------------


def test_module_global_reassigned_retraces_and_equal_value_does_not(monkeypatch):
    model = ReadsGlobal()
    compiled = compiled_module(model)
    torch.testing.assert_close(compiled(X), model(X))
    monkeypatch.setitem(globals(), "SCALE", 3.0)
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 2
    monkeypatch.setitem(globals(), "SCALE", _equal_copy(3.0))  # a guard fails, the walk finds the same program
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 2 and compiled.compiled.num_program_walks == 3
    monkeypatch.setitem(globals(), "UNRELATED", 5.0)  # not read by the program: not even a walk
    compiled(X)
    assert compiled.compiled.num_compiles == 2 and compiled.compiled.num_program_walks == 3
    monkeypatch.setitem(globals(), "SCALE", 2.0)  # back to the first program: its graph again, no trace
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 2


class ReadsClassAttribute(nn.Module):
    FACTOR = 2.0

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) * self.FACTOR


def test_class_attribute_reassigned_retraces(monkeypatch):
    model = ReadsClassAttribute()
    compiled = compiled_module(model)
    torch.testing.assert_close(compiled(X), model(X))
    monkeypatch.setattr(ReadsClassAttribute, "FACTOR", 3.0)
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 2


def test_class_attribute_added_to_a_subclass_shadows_the_base_and_retraces():
    class Base(nn.Module):
        FACTOR = 2.0

        def forward(self, x):
            return x * self.FACTOR

    class Child(Base):
        pass

    model = Child()
    compiled = compiled_module(model)
    torch.testing.assert_close(compiled(X), X * 2)
    Child.FACTOR = 5.0
    torch.testing.assert_close(compiled(X), X * 5)


def test_aot_function_closure_cell_reassigned_retraces():
    def make(factor):
        def scaled(x):
            return x * factor

        return scaled

    fn = make(2.0)
    compiled = compiled_function(fn)
    torch.testing.assert_close(compiled(X), X * 2)
    fn.__closure__[0].cell_contents = 7.0
    torch.testing.assert_close(compiled(X), X * 7)
    assert compiled.num_compiles == 2


def test_aot_function_nonlocal_rebound_by_the_enclosing_function_retraces():
    factor = 2.0

    def scaled(x):
        return x * factor

    compiled = compiled_function(scaled)
    torch.testing.assert_close(compiled(X), X * 2)
    factor = 4.0  # noqa: F841 - read through the closure cell
    torch.testing.assert_close(compiled(X), X * 4)


def scaled_by_global(x):
    return x * SCALE


def test_aot_function_global_reassigned_retraces_and_unrelated_one_does_not(monkeypatch):
    compiled = compiled_function(scaled_by_global)
    torch.testing.assert_close(compiled(X), X * 2)
    monkeypatch.setitem(globals(), "UNRELATED", 9.0)
    torch.testing.assert_close(compiled(X), X * 2)
    assert compiled.num_compiles == 1 and compiled.num_program_walks == 1
    monkeypatch.setitem(globals(), "SCALE", -1.0)
    torch.testing.assert_close(compiled(X), -X)
    assert compiled.num_compiles == 2


def scaled_through_globals(x):
    return x * globals()["SCALE"]


def test_global_read_through_globals_with_a_constant_name_retraces(monkeypatch):
    compiled = compiled_function(scaled_through_globals)
    torch.testing.assert_close(compiled(X), X * 2)
    monkeypatch.setitem(globals(), "SCALE", 8.0)
    torch.testing.assert_close(compiled(X), X * 8)


# NOTE [Global reads are loads, not co_names]: ``self.proj`` names ``proj`` in co_names, but reads no global
# ``proj``; a script whose top level rebinds ``proj`` / ``norm`` / ``gain`` at every step (a loop variable, an
# ``out = compiled(x)``) re-traced at every call while the guards took them for globals the forward reads.


class ReadsAttributesNamedLikeGlobals(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.gain = 2.0

    def forward(self, x):
        return self.norm(self.proj(x)) * self.gain


def _rebind_script_globals(monkeypatch, step):
    """What ``for proj in range(5): norm = torch.randn(2); gain = float(proj); out = compiled(x)`` does."""
    monkeypatch.setitem(globals(), "proj", step)
    monkeypatch.setitem(globals(), "norm", torch.randn(2))
    monkeypatch.setitem(globals(), "gain", float(step))
    monkeypatch.setitem(globals(), "out", object())


@pytest.mark.parametrize("wrap", ["aot_module", "compile"])
def test_globals_named_like_attributes_the_forward_reads_keep_the_graph(wrap, monkeypatch):
    _rebind_script_globals(monkeypatch, -1)  # they exist when the program is first walked
    model = ReadsAttributesNamedLikeGlobals()
    compiled = (compiled_module(model) if wrap == "aot_module"
                else aotcache.compile(model, compiler="nop", cache=False))
    for step in range(5):
        _rebind_script_globals(monkeypatch, step)
        torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 1 and compiled.compiled.num_program_walks == 1
    model.gain = 3.0  # the attribute itself is read and guarded
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 2


class ReadsGainAsAttributeAndGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = 2.0

    def forward(self, x):
        return x * self.gain + gain  # noqa: F821 - the module global set by the test


def test_a_name_read_both_as_attribute_and_as_global_guards_both(monkeypatch):
    monkeypatch.setitem(globals(), "gain", 1.0)
    model = ReadsGainAsAttributeAndGlobal()
    compiled = compiled_module(model)
    torch.testing.assert_close(compiled(X), X * 2 + 1)
    monkeypatch.setitem(globals(), "gain", 5.0)  # the global changed: traced again, eager's result
    torch.testing.assert_close(compiled(X), X * 2 + 5)
    assert compiled.compiled.num_compiles == 2
    monkeypatch.setitem(globals(), "gain", _equal_copy(5.0))  # an equal value: walked, the same program
    torch.testing.assert_close(compiled(X), X * 2 + 5)
    assert compiled.compiled.num_compiles == 2 and compiled.compiled.num_program_walks == 3
    model.gain = 4.0  # the attribute changed
    torch.testing.assert_close(compiled(X), X * 4 + 5)
    assert compiled.compiled.num_compiles == 3


def _shifted(t):
    return t + shift  # noqa: F821 - a global read in a function the forward calls


class ReadsGlobalsInNestedCode(nn.Module):
    def __init__(self):
        super().__init__()
        self.shift = 0.5  # also an attribute name: both are read
        self.factor = 3.0  # an attribute named like a global read only by the lambda

    def forward(self, x):
        scaled = (lambda t: t * factor)(x)  # noqa: F821 - lambda
        parts = torch.stack([row * offset for row in scaled.unbind(0)])  # noqa: F821 - comprehension

        def debiased(t):
            return t - bias  # noqa: F821 - nested function

        return _shifted(debiased(parts)) * self.shift + self.factor


NESTED_GLOBALS = {"factor": 2.0, "offset": 3.0, "bias": 0.25, "shift": 1.0}


@pytest.mark.parametrize("name", sorted(NESTED_GLOBALS))
def test_a_global_read_in_nested_code_or_a_called_function_is_guarded(name, monkeypatch):
    for global_name, value in NESTED_GLOBALS.items():
        monkeypatch.setitem(globals(), global_name, value)
    model = ReadsGlobalsInNestedCode()
    compiled = compiled_module(model)
    first = model(X)
    torch.testing.assert_close(compiled(X), first)
    monkeypatch.setitem(globals(), name, NESTED_GLOBALS[name] + 7.0)
    assert not torch.allclose(model(X), first)
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 2


HOLDER = types.SimpleNamespace(width=2.0, depth=1.0)


def reads_holder_attributes(x):
    return x * HOLDER.width + HOLDER.depth


def test_aot_function_attributes_named_like_globals_keep_the_graph_and_the_object_stays_guarded(monkeypatch):
    monkeypatch.setitem(globals(), "width", 0)
    monkeypatch.setitem(globals(), "depth", 0)
    compiled = compiled_function(reads_holder_attributes)
    for step in range(4):
        monkeypatch.setitem(globals(), "width", step)
        monkeypatch.setitem(globals(), "depth", -step)
        torch.testing.assert_close(compiled(X), X * 2 + 1)
    assert compiled.num_compiles == 1 and compiled.num_program_walks == 1
    monkeypatch.setattr(HOLDER, "width", 4.0)  # the attribute read: traced again
    torch.testing.assert_close(compiled(X), X * 4 + 1)
    assert compiled.num_compiles == 2


def records_its_width(x):
    global last_width
    last_width = x.shape[-1] * 2  # written under ``global``, never read: still guarded
    return x + 1


def test_a_global_the_code_only_writes_is_written_at_every_call_as_in_eager(monkeypatch):
    compiled = compiled_function(records_its_width)
    for _ in range(3):
        monkeypatch.setitem(globals(), "last_width", None)
        torch.testing.assert_close(compiled(X), X + 1)
        assert globals()["last_width"] == 8


def test_the_fingerprint_holds_globals_read_not_globals_named_like_attributes(monkeypatch):
    from aotcache.autograd_cache.code_reading import global_names

    assert global_names(ReadsGainAsAttributeAndGlobal.forward.__code__) == {"gain"}
    assert global_names(ReadsGlobalsInNestedCode.forward.__code__) >= {"factor", "offset", "bias", "_shifted"}
    assert "shift" not in global_names(ReadsGlobalsInNestedCode.forward.__code__)  # only ``self.shift`` here
    _rebind_script_globals(monkeypatch, 0)
    model = ReadsAttributesNamedLikeGlobals()
    base = code_fingerprint(model).digest
    assert base is not None
    _rebind_script_globals(monkeypatch, 1)
    assert code_fingerprint(model).digest == base
    both = ReadsGainAsAttributeAndGlobal()
    before = code_fingerprint(both).digest
    monkeypatch.setitem(globals(), "gain", 9.0)
    assert code_fingerprint(both).digest != before


def test_forward_hook_swapped_for_another_with_the_same_count_retraces():
    model = nn.Linear(4, 4)
    compiled = compiled_module(model)
    handle = model.register_forward_hook(lambda module, args, out: out * 2)
    torch.testing.assert_close(compiled(X), model(X))
    handle.remove()
    model.register_forward_hook(lambda module, args, out: out * 3)
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 2


def test_forward_hook_of_a_module_called_by_an_aot_function_is_guarded():
    inner = nn.Linear(4, 4).requires_grad_(False)  # its weights are constants of the function
    compiled = compiled_function(lambda x: inner(x))
    handle = inner.register_forward_hook(lambda module, args, out: out + 1)
    torch.testing.assert_close(compiled(X), inner(X))
    handle.remove()
    inner.register_forward_hook(lambda module, args, out: out - 1)
    torch.testing.assert_close(compiled(X), inner(X))


def _make_helper_model_class():
    class HelperModel(nn.Module):
        FACTOR = 2.0

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def helper(self, y):
            return y * self.FACTOR

        def forward(self, x):
            return self.helper(self.linear(x))

    return HelperModel


def _replace_class_forward(cls, model):
    cls.forward = lambda self, x: self.linear(x) - 1


def _replace_method(cls, model):
    cls.helper = lambda self, y: y + 100


def _replace_instance_forward(cls, model):
    model.forward = lambda x: model.linear(x) + 7


def _swap_instance_class(cls, model):
    model.__class__ = type("Swapped", (cls,), {"forward": lambda self, x: self.linear(x) * 0})


@pytest.mark.parametrize("change", [_replace_class_forward, _replace_method, _replace_instance_forward,
                                    _swap_instance_class], ids=lambda fn: fn.__name__.lstrip("_"))
@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
def test_wrapped_model_class_or_method_changed_after_compile_retraces(change, cache):
    """NOTE [The wrapper's class]: the wrapper is an instance of a class signed as the model's; a change of the
    model's class, of one of its methods or of the instance's forward after the first call still re-traces
    (with the persistent cache too: the fingerprint of the new program differs)."""
    cls = _make_helper_model_class()
    model = cls()
    compiled = aotcache.aot_module(model, "nop", cache=cache)
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), model(X))
        before = model(X)
        change(cls, model)
        after = model(X)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(compiled(X), after)
        torch.testing.assert_close(aotcache.aot_module(model, "nop", cache=cache)(X), after)


class SetsModeOnFirstCall(nn.Module):
    mode = None

    def forward(self, x):
        if self.mode is None:
            self.mode = "set"
            return x + 1
        return x * 2


@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
def test_forward_that_changes_state_it_reads_gives_eagers_first_result(dynamic):
    """NOTE [State changed by a capture]: the capture's analysis pass set ``mode`` and the trace then took the
    other branch (6 where eager gives 4)."""
    model, reference = SetsModeOnFirstCall(), SetsModeOnFirstCall()
    compiled = aotcache.aot_module(model, "nop", cache=False, dynamic=dynamic)
    x = torch.full((2,), 3.0)
    torch.testing.assert_close(compiled(x), reference(x))
    assert model.mode == reference.mode == "set"
    for _ in range(2):  # the new state: another graph, traced once and reused
        torch.testing.assert_close(compiled(x), reference(x))
    assert compiled.compiled.num_compiles == 2 and compiled.compiled.num_single_use == 1


class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.seen = []
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        self.calls += 1
        self.seen.append(self.calls)
        return self.linear(x)


def test_forward_that_counts_its_calls_advances_once_per_call_as_eager(caplog):
    """A counter the forward does not branch on: eager counts every call; the capture's runs count once, and a
    graph whose capture changed the state is not reused (it would skip the count), so each call is traced (with
    one warning saying so)."""
    model = CountsCalls()
    compiled = compiled_module(model)
    with caplog.at_level("WARNING", logger="aotcache"):
        for call in range(1, 5):
            torch.testing.assert_close(compiled(X), model.linear(X))
            assert model.calls == call and model.seen == list(range(1, call + 1))
    assert compiled.compiled.num_compiles == compiled.compiled.num_single_use == 4
    assert len([r for r in caplog.records if "changed Python state it reads" in r.getMessage()]) == 1


def test_forward_that_changes_its_state_at_every_call_runs_eagerly_after_eight_traces(caplog):
    """Traced at every call to keep eager's state (above), a counter in forward stops being traced after 8 calls in
    a row: the signature then runs eagerly (as torch.compile does past its recompile limit), counted and warned
    about once; results and state stay eager's."""
    from aotcache.aot.fallback import fallback_counts

    model = CountsCalls()
    compiled = compiled_module(model)
    before = fallback_counts().get("eager:changes_own_state", 0)
    with caplog.at_level("WARNING", logger="aotcache"):
        for call in range(1, 13):
            torch.testing.assert_close(compiled(X), model.linear(X))
            assert model.calls == call and model.seen == list(range(1, call + 1))
    assert compiled.compiled.num_compiles == 8
    assert fallback_counts().get("eager:changes_own_state", 0) == before + 1
    assert len([r for r in caplog.records if "now runs eagerly" in r.getMessage()]) == 1


class WarmsUp(nn.Module):
    """Counts its first five calls, then stays put (a warm-up schedule)."""

    def __init__(self):
        super().__init__()
        self.steps = 0

    def forward(self, x):
        if self.steps < 5:
            self.steps += 1
        return x * self.steps


def test_state_that_settles_keeps_its_graph_and_restarts_the_count():
    """Single-use graphs count in a row only: a call whose graph is kept starts the count again, so a forward
    whose state settles after a few calls, warmed up twice (10 state-changing calls in all), is never sent to
    eager, and its settled graph is reused."""
    from aotcache.aot.fallback import fallback_counts

    model, reference = WarmsUp(), WarmsUp()
    compiled = compiled_module(model)
    before = fallback_counts().get("eager:changes_own_state", 0)
    with config.patch(recompile_limit=0):  # 11 traces: this counts single-use graphs (NOTE [Recompile limit])
        for _ in range(2):
            model.steps = reference.steps = 0
            for _ in range(8):
                torch.testing.assert_close(compiled(X), reference(X))
                assert model.steps == reference.steps
    assert compiled.compiled.num_single_use == 10
    assert compiled.compiled.num_compiles == 11  # the settled state's graph once, reused in the second round
    assert fallback_counts().get("eager:changes_own_state", 0) == before


def test_with_on_capture_error_raise_a_counter_keeps_being_traced():
    model = CountsCalls()
    compiled = aotcache.aot_module(model, "nop", cache=False, on_capture_error="raise")
    with config.patch(recompile_limit=0):  # 10 traces: past the limit a call runs eagerly (NOTE [Recompile limit])
        for call in range(1, 11):
            torch.testing.assert_close(compiled(X), model.linear(X))
            assert model.calls == call
    assert compiled.compiled.num_compiles == 10


class Toggles(nn.Module):
    def __init__(self):
        super().__init__()
        self.flag = False

    def forward(self, x):
        self.flag = not self.flag
        return x + 1 if self.flag else x * 2


def test_graph_traced_in_a_state_the_call_left_is_not_reused_when_that_state_comes_back():
    """The state comes back to the first call's (a flag toggled per call): the first graph, reused, would skip
    the toggle (a compiled graph runs no Python) and the results would stop alternating."""
    model, reference = Toggles(), Toggles()
    compiled = compiled_module(model)
    for _ in range(4):
        torch.testing.assert_close(compiled(X), reference(X))
        assert model.flag is reference.flag


class ReadsConfig(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = Settings()

    def forward(self, x):
        self.config.attention.scale += 1.0
        self.config.attention.flags["negate"] = not self.config.attention.flags["negate"]
        return x * self.config.attention.scale


def test_nested_config_changed_by_forward_is_put_back_between_the_captures_runs():
    model, reference = ReadsConfig(), ReadsConfig()
    compiled = compiled_module(model)
    for _ in range(3):
        torch.testing.assert_close(compiled(X), reference(X))
        assert model.config.attention.scale == reference.config.attention.scale
        assert model.config.attention.flags == reference.config.attention.flags


CALLS = 0


def counts_in_a_global(x):
    global CALLS
    CALLS += 1
    return x * CALLS


def test_aot_function_global_and_closure_counters_advance_once_per_call(monkeypatch):
    monkeypatch.setitem(globals(), "CALLS", 0)
    compiled = compiled_function(counts_in_a_global)
    for call in range(1, 4):
        torch.testing.assert_close(compiled(X), X * call)
        assert CALLS == call

    def make():
        count = 0

        def step(x):
            nonlocal count
            count += 1
            return x * count

        return step

    step = make()
    compiled = compiled_function(step)
    for call in range(1, 4):
        torch.testing.assert_close(compiled(X), X * call)
        assert step.__closure__[0].cell_contents == call


class ClassCounter(nn.Module):
    instances_called = 0

    def forward(self, x):
        type(self).instances_called += 1
        return x * type(self).instances_called


def test_class_attribute_written_by_forward_is_put_back_through_the_class(monkeypatch):
    monkeypatch.setattr(ClassCounter, "instances_called", 0)
    compiled = compiled_module(ClassCounter())
    for call in range(1, 3):
        torch.testing.assert_close(compiled(X), X * call)
        assert ClassCounter.instances_called == call


class ReadsOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = 2.0
        self.history = [1.0]

    def forward(self, x):
        return self.linear(x) * self.scale * sum(self.history)


def test_forward_that_changes_nothing_keeps_one_graph():
    """The other direction: a forward that only reads its state is traced once and its graph reused."""
    model = ReadsOnly()
    compiled = compiled_module(model)
    for _ in range(3):
        torch.testing.assert_close(compiled(X), model.linear(X) * 2.0)
    assert compiled.compiled.num_compiles == 1 and compiled.compiled.num_program_walks == 1
    assert compiled.compiled.num_single_use == 0


class ReadsList(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.weights = [1.0, 2.0]

    def forward(self, x):
        return self.linear(x) * sum(self.weights)


def test_list_attribute_mutated_in_place_retraces():
    model = ReadsList()
    compiled = compiled_module(model)
    torch.testing.assert_close(compiled(X), model(X))
    model.weights.append(4.0)
    torch.testing.assert_close(compiled(X), model(X))
    model.weights[0] = 10.0
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 3


class Settings:
    """A plain config object (transformers-like), holding a nested one."""

    def __init__(self):
        self.attention = Settings.Inner()

    class Inner:
        def __init__(self):
            self.scale = 1.0
            self.flags = {"negate": False}


class ReadsNestedConfig(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        out = self.linear(x) * self.config.attention.scale
        return -out if self.config.attention.flags["negate"] else out


def test_nested_config_object_mutated_in_place_retraces():
    model = ReadsNestedConfig(Settings())
    compiled = compiled_module(model)
    torch.testing.assert_close(compiled(X), model(X))
    model.config.attention.scale = 0.5
    torch.testing.assert_close(compiled(X), model(X))
    model.config.attention.flags["negate"] = True  # a dict two objects deep
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 3


def test_simple_namespace_config_mutated_in_place_retraces_and_is_fingerprinted():
    import types

    config = types.SimpleNamespace(scale=2.0)

    def scaled(x):
        return x * config.scale

    assert code_fingerprint(scaled).trusted  # an attribute bag: by its __dict__, not opaque
    compiled = compiled_function(scaled)
    torch.testing.assert_close(compiled(X), X * 2)
    config.scale = 4.0
    torch.testing.assert_close(compiled(X), X * 4)
    assert compiled.num_compiles == 2


def reads_mode(x):
    return x * 2 if os.environ.get("AOTCACHE_TEST_MODE") == "a" else x * -3


def test_environment_variable_read_by_name_is_guarded_in_process(monkeypatch):
    monkeypatch.setenv("AOTCACHE_TEST_MODE", "a")
    compiled = compiled_function(reads_mode)
    torch.testing.assert_close(compiled(X), X * 2)
    monkeypatch.setenv("AOTCACHE_TEST_MODE", "b")
    torch.testing.assert_close(compiled(X), X * -3)
    monkeypatch.delenv("AOTCACHE_TEST_MODE")  # absent is a value too
    torch.testing.assert_close(compiled(X), X * -3)
    monkeypatch.setenv("AOTCACHE_TEST_MODE", "a")
    torch.testing.assert_close(compiled(X), X * 2)
    assert compiled.num_compiles == 3  # a, b, absent (absent traces the graph of b again: another program)


class Doubled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def test_autograd_function_backward_reassigned_retraces(monkeypatch):
    compiled = compiled_function(lambda x: Doubled.apply(x).sum())
    x = torch.randn(3, requires_grad=True)
    compiled(x).backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    monkeypatch.setattr(Doubled, "backward", staticmethod(lambda ctx, grad: grad * 5))
    x.grad = None
    compiled(x).backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 5.0))


MASK = torch.ones(4)


def masked(x):
    return x * MASK


def test_tensor_constant_changed_in_place_retraces():
    compiled = compiled_function(masked)
    torch.testing.assert_close(compiled(X), X * MASK)
    with torch.no_grad():
        MASK[0] = 5.0
    torch.testing.assert_close(compiled(X), X * MASK)
    compiled(X)
    assert compiled.num_compiles == 2 and compiled.num_program_walks == 2


def test_untrusted_program_still_guards_what_can_be_walked(monkeypatch):
    model = ReadsGlobal()
    model.event = threading.Event()  # opaque: the fingerprint gives up, the guards keep going
    assert not code_fingerprint(model).trusted
    compiled = compiled_module(model)
    torch.testing.assert_close(compiled(X), model(X))
    monkeypatch.setitem(globals(), "SCALE", 6.0)
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 2


def test_steady_calls_check_guards_without_walking_again():
    from tests.aot.zoo import get_entry

    for name in ("cnn_bn", "lstm"):
        model, inputs = get_entry(name).build()
        compiled = compiled_module(model)
        for _ in range(5):
            out = compiled(*inputs)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        assert compiled.compiled.num_program_walks == 1, name
        assert compiled.compiled.num_compiles == 1, name


def test_program_change_hits_the_persistent_cache_under_the_new_fingerprint(monkeypatch):
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store.factory import open_tiers

    cache = AOTAutogradCache(open_tiers("memory,disk", namespace="aot"), journal=False)
    first = aotcache.aot_function(scaled_by_global, "nop", cache=cache)
    torch.testing.assert_close(first(X), X * 2)
    monkeypatch.setitem(globals(), "SCALE", 3.0)
    torch.testing.assert_close(first(X), X * 3)  # guards fail: a new fingerprint, a miss, compiled and saved
    assert cache.counters["fingerprint_miss"] == 2
    second = aotcache.aot_function(scaled_by_global, "nop", cache=cache)
    torch.testing.assert_close(second(X), X * 3)
    assert cache.counters["fingerprint_hit"] == 1


# ----------------------------------------------------------------------------------------------------
# What the fingerprint sees: code autograd runs, custom ops, process state
# ----------------------------------------------------------------------------------------------------


def test_fingerprint_sees_every_method_autograd_calls():
    def make(backward_factor, jvp_factor):
        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(x):
                return x * 2

            @staticmethod
            def setup_context(ctx, inputs, output):
                pass

            @staticmethod
            def backward(ctx, grad):
                return grad * backward_factor

            @staticmethod
            def jvp(ctx, tangent):
                return tangent * jvp_factor

        Fn.__qualname__ = Fn.__name__ = "Fn"
        return lambda x: Fn.apply(x)

    base = code_fingerprint(make(2, 2)).digest
    assert base is not None and base == code_fingerprint(make(2, 2)).digest
    assert code_fingerprint(make(3, 2)).digest != base  # backward
    assert code_fingerprint(make(2, 3)).digest != base  # jvp


def test_custom_op_is_fingerprinted_by_its_registrations():
    @torch.library.custom_op("aotcache_stale::scale", mutates_args=())
    def scale(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @scale.register_fake
    def _(x):
        return torch.empty_like(x)

    def uses(x):
        return scale(x)

    before = code_fingerprint(uses)
    assert before.trusted, before.reason
    scale.register_autograd(lambda ctx, grad: grad * 2)
    after = code_fingerprint(uses)
    assert after.trusted and after.digest != before.digest


def test_custom_op_autograd_registered_between_calls_retraces():
    @torch.library.custom_op("aotcache_stale::triple", mutates_args=())
    def triple(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    triple.register_fake(lambda x: torch.empty_like(x))
    triple.register_autograd(lambda ctx, grad: grad * 3)
    compiled = compiled_function(lambda x: triple(x).sum())
    x = torch.randn(3, requires_grad=True)
    compiled(x).backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 3.0))
    triple.register_autograd(lambda ctx, grad: grad * 7)  # another backward formula for the same op
    x.grad = None
    compiled(x).backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 7.0))
    assert compiled.num_compiles == 2


@pytest.mark.parametrize("source, reason", [
    ("import time\ndef f(x):\n    return x * time.time()", "process state: time.time"),
    ("from time import perf_counter\ndef f(x):\n    return x * perf_counter()", "process state: time"),
    ("import random\ndef f(x):\n    return x * random.random()", "process state: random.random"),
    ("import sys\ndef f(x):\n    return x * len(sys.argv)", "process state: sys.argv"),
    ("def f(x):\n    return x * len(open('weights.txt').read())", "process state: open"),
    ("import os\ndef f(x):\n    return x * os.path.getsize('w')", "process state: os.path.getsize"),
    ("import os\nNAME = 'MODE'\ndef f(x):\n    return x if os.environ.get(NAME) else -x",
     "process state: os.environ read with a non-constant name"),
    ("import os\ndef f(x):\n    return x * len(os.environ)", "process state: os.environ"),
    ("import numpy as np\ndef f(x):\n    return x * np.random.rand()", "process state: numpy.random"),
    ("import torch\ndef f(x):\n    return x * torch.get_num_threads()", "process state: torch.get_num_threads"),
    ("import torch\ndef f(x):\n    return x * torch.random.initial_seed()", "process state: torch"),
])
def test_process_state_the_walker_cannot_pin_makes_the_fingerprint_untrusted(source, reason):
    namespace: dict = {"__name__": "user_code"}
    exec(compile(source, "<user code>", "exec"), namespace)
    fingerprint = code_fingerprint(namespace["f"])
    assert not fingerprint.trusted and fingerprint.reason.startswith(reason), fingerprint.reason


def test_a_compiler_that_reads_the_clock_leaves_the_fingerprint_trusted():
    import time

    from aotcache.aot.api import AOTOptions
    from aotcache.autograd_cache.fingerprint import fingerprint_call
    from aotcache.compilers.nop import nop_compiler
    from torch.utils import _pytree as pytree

    def timed_compiler(gm, example_inputs):
        started = time.perf_counter()
        compiled = nop_compiler(gm, example_inputs)
        timed_compiler.seconds = time.perf_counter() - started
        return compiled

    flat, spec = pytree.tree_flatten(((X,), {}))
    fingerprint = fingerprint_call(scaled_by_global, flat, spec, AOTOptions(fw_compiler=timed_compiler))
    assert fingerprint.trusted, fingerprint.reason  # the options shape the artifact, not the captured graph


@pytest.mark.parametrize("read", ['os.environ.get("AOTCACHE_PIN")', 'os.environ.get("AOTCACHE_PIN", "x")',
                                  'os.getenv("AOTCACHE_PIN")', '"AOTCACHE_PIN" in os.environ',
                                  'os.environ["AOTCACHE_PIN"] if "AOTCACHE_PIN" in os.environ else None'])
def test_environment_variable_with_a_constant_name_is_pinned(read, monkeypatch):
    namespace: dict = {"__name__": "user_code"}
    exec(f"import os\ndef f(x):\n    return x if ({read}) else -x", namespace)
    monkeypatch.setenv("AOTCACHE_PIN", "a")
    first = code_fingerprint(namespace["f"])
    monkeypatch.setenv("AOTCACHE_PIN", "b")
    second = code_fingerprint(namespace["f"])
    monkeypatch.delenv("AOTCACHE_PIN")
    absent = code_fingerprint(namespace["f"])
    assert first.trusted and second.trusted and absent.trusted
    assert len({first.digest, second.digest, absent.digest}) == 3
    monkeypatch.setenv("AOTCACHE_PIN", "a")
    assert code_fingerprint(namespace["f"]).digest == first.digest


# ----------------------------------------------------------------------------------------------------
# Between two processes: the call fingerprint
# ----------------------------------------------------------------------------------------------------

FUNCTION_MODULE = """
import torch

class Scaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * {factor}
"""

TRAIN = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import aotcache
from aotcache.autograd_cache.cache import default_cache
from stale_user_code import Scaled

x = torch.ones(3, requires_grad=True)
aotcache.aot_function(lambda t: Scaled.apply(t).sum(), "nop")(x).backward()
print(json.dumps({"grad": x.grad.tolist(), **default_cache().stats(), **default_cache().counters}))
"""


def _run(tmp_path, script: str, env: dict | None = None) -> dict:
    path = tmp_path / "train.py"
    path.write_text(script)
    code = f"import runpy, sys; sys.argv = ['train', {str(tmp_path)!r}]; runpy.run_path({str(path)!r})"
    proc = run_python(code, env={"PYTHONDONTWRITEBYTECODE": "1", **(env or {})})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_autograd_function_backward_edited_in_its_file_misses_in_the_next_process(tmp_path):
    (tmp_path / "stale_user_code.py").write_text(FUNCTION_MODULE.format(factor=2))
    cold = _run(tmp_path, TRAIN)
    warm = _run(tmp_path, TRAIN)
    assert cold["grad"] == warm["grad"] == [2.0] * 3
    assert warm.get("fingerprint_hit", 0) == 1 and warm["compile"] == 0, (cold, warm)  # all counters if it fails
    (tmp_path / "stale_user_code.py").write_text(FUNCTION_MODULE.format(factor=5))
    edited = _run(tmp_path, TRAIN)
    assert edited["grad"] == [5.0] * 3
    assert edited.get("fingerprint_hit", 0) == 0 and edited["compile"] == 1


ENV_SCRIPT = """
import json, os, sys, torch
import aotcache
from aotcache.autograd_cache.cache import default_cache

def body(x):
    return x * 2 if os.environ.get("AOTCACHE_TEST_MODE") == "a" else x * -3

out = aotcache.aot_function(body, "nop")(torch.ones(2))
print(json.dumps({"out": out.tolist(), **default_cache().stats(), **default_cache().counters}))
"""


def test_environment_variable_changed_between_processes_misses_then_hits_again(tmp_path):
    first = _run(tmp_path, ENV_SCRIPT, {"AOTCACHE_TEST_MODE": "a"})
    second = _run(tmp_path, ENV_SCRIPT, {"AOTCACHE_TEST_MODE": "b"})
    third = _run(tmp_path, ENV_SCRIPT, {"AOTCACHE_TEST_MODE": "a"})
    assert first["out"] == [2.0, 2.0] and second["out"] == [-3.0, -3.0] and third["out"] == [2.0, 2.0]
    assert second.get("fingerprint_hit", 0) == 0 and second["compile"] == 1
    assert third["fingerprint_hit"] == 1 and third["compile"] == 0


CUSTOM_OP_SCRIPT = """
import json, torch
import aotcache
from aotcache.autograd_cache.cache import default_cache

@torch.library.custom_op("aotcache_stale_proc::scale", mutates_args=())
def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2

scale.register_fake(lambda x: torch.empty_like(x))
scale.register_autograd(lambda ctx, grad: grad * 2)

x = torch.ones(3, requires_grad=True)
aotcache.aot_function(lambda t: scale(t).sum(), "nop")(x).backward()
print(json.dumps({"grad": x.grad.tolist(), **default_cache().stats(), **default_cache().counters}))
"""


def test_custom_op_warm_start_goes_through_the_fingerprint(tmp_path):
    cold = _run(tmp_path, CUSTOM_OP_SCRIPT)
    warm = _run(tmp_path, CUSTOM_OP_SCRIPT)
    assert cold["grad"] == warm["grad"] == [2.0] * 3
    assert cold.get("fingerprint_fallback", 0) == 0 and cold["fingerprint_miss"] == 1
    assert warm["fingerprint_hit"] == 1 and warm["compile"] == 0


# ----------------------------------------------------------------------------------------------------
# Inductor
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_inductor_tensor_constant_changed_in_place_retraces():
    mask = torch.ones(4)
    compiled = aotcache.aot_function(lambda x: x * mask, "inductor", cache=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), X * mask)
        mask[1] = -2.0  # Inductor's graph holds its own copy of the constant
        torch.testing.assert_close(compiled(X), X * mask)


@pytest.mark.slow
def test_inductor_global_and_class_attribute_changes_retrace(monkeypatch):
    model = ReadsClassAttribute()
    compiled = aotcache.aot_module(model, "inductor", cache=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), model(X))
        monkeypatch.setattr(ReadsClassAttribute, "FACTOR", -1.5)
        torch.testing.assert_close(compiled(X), model(X))
        monkeypatch.setattr(ReadsClassAttribute, "FACTOR", _equal_copy(-1.5))
        torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 2


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("fresh-process tests use POSIX paths")


# ----------------------------------------------------------------------------------------------------
# The wrapper's class and source lines across processes
# ----------------------------------------------------------------------------------------------------

MODEL_MODULE = """
import torch
from torch import nn

class Model(nn.Module):
    FACTOR = {factor}

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def helper(self, x):
        return x {op} self.FACTOR

    def forward(self, x):
        return self.helper(x * self.scale)
"""

OTHER_MODEL_MODULE = """
import torch
from torch import nn

class Model(nn.Module):  # the same class name, another forward
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale - 1
"""

TWO_MODELS = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import aotcache
from aotcache.autograd_cache.cache import default_cache
import stale_model, other_model

outs = []
for cls in (stale_model.Model, other_model.Model):
    with torch.no_grad():
        outs.append(aotcache.aot_module(cls(), "nop")(torch.ones(3)).tolist())
print(json.dumps({"outs": outs, **default_cache().stats(), **default_cache().counters}))
"""


@FRESH_PROCESSES_TIMEOUT  # five fresh processes
def test_model_class_attribute_and_method_edits_miss_and_two_classes_of_one_name_do_not_share(tmp_path):
    """NOTE [The wrapper's class]: wrappers are signed as their model's class; two model classes of one name in
    one process keep their own graphs, and an edit of the class attribute or a method misses in the next
    process, while an unchanged file (or a change back) hits."""
    (tmp_path / "other_model.py").write_text(OTHER_MODEL_MODULE)
    compiles = []
    for factor, op, want in ((2.0, "*", 2.0), (2.0, "*", 2.0), (3.0, "*", 3.0), (3.0, "+", 4.0), (3.0, "*", 3.0)):
        (tmp_path / "stale_model.py").write_text(MODEL_MODULE.format(factor=factor, op=op))
        out = _run(tmp_path, TWO_MODELS)
        assert out["outs"] == [[want] * 3, [0.0] * 3], (factor, op)
        compiles.append(out["compile"])
    assert compiles == [2, 0, 1, 1, 0]


MOVED_USER = """import torch
{pad}
def body(x, w):
    y = x @ w
    return (y {op} 1).relu().sum()
"""

MOVED_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import aotcache
from aotcache.autograd_cache.cache import default_cache
import moved_user

w = torch.ones(3, 3, requires_grad=True)
out = torch.compile(moved_user.body, backend="aotcache")(torch.ones(2, 3), w)
out.backward()
print(json.dumps({"out": out.item(), "grad": w.grad.sum().item(), **default_cache().stats(),
                  **default_cache().counters}))
"""


@FRESH_PROCESSES_TIMEOUT  # three fresh processes compiling with Inductor
def test_a_source_edit_that_only_moves_lines_hits_and_a_real_edit_misses(tmp_path):
    """NOTE [Source stack traces] in aot/source_locations.py: the graphs keep the source lines of their nodes, but the cache
    key does not (comments added above the function hit); an edit of the computation misses."""
    results = []
    for pad, op in (("", "+"), ("# a comment\n# another comment\n", "+"), ("", "-")):
        (tmp_path / "moved_user.py").write_text(MOVED_USER.format(pad=pad, op=op))
        results.append(_run(tmp_path, MOVED_SCRIPT, {"TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}))
    assert [result["out"] for result in results] == [24.0, 24.0, 12.0]
    assert [result["grad"] for result in results] == [18.0] * 3
    assert [result["compile"] for result in results] == [1, 0, 1] and results[1]["hit"] == 1


STATEFUL_SCRIPT = """
import json, torch
import aotcache
from aotcache.autograd_cache.cache import default_cache

class Counts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.mode = None

    def forward(self, x):
        self.calls += 1
        if self.mode is None:
            self.mode = "set"
            return x + 1
        return x * 2

model = Counts()
compiled = aotcache.aot_module(model, "nop")
outs = [compiled(torch.full((2,), 3.0)).tolist() for _ in range(3)]
print(json.dumps({"outs": outs, "calls": model.calls, **default_cache().stats(), **default_cache().counters}))
"""


def test_forward_that_changes_its_state_gives_eagers_results_and_counts_on_a_warm_start(tmp_path):
    """NOTE [State changed by a capture] with the persistent cache: the alias of a call that changes its state
    records that change (a counter, a mode set once: plain values), and a warm start replays it without tracing
    (NOTE [Replaying a call's state change]): the count and the first call's branch as eager, nothing traced."""
    cold = _run(tmp_path, STATEFUL_SCRIPT)
    warm = _run(tmp_path, STATEFUL_SCRIPT)
    for run in (cold, warm):
        assert run["outs"] == [[4.0, 4.0], [6.0, 6.0], [6.0, 6.0]] and run["calls"] == 3
        assert run.get("fingerprint_state_changed", 0) == 0
    assert cold["compile"] >= 1 and cold["fingerprint_state_recorded"] == 3
    assert warm["fingerprint_replay"] == 3 and warm.get("fingerprint_miss", 0) == 0 and warm.get("compile", 0) == 0


class AppendOnly(list):
    """A container that refuses to be written back (its items cannot be replaced)."""

    def __setitem__(self, index, value):
        raise TypeError("append-only")


LOG = AppendOnly()


def logs_its_calls(x):
    LOG.append(len(LOG))
    return x * len(LOG)


class ReadOnlySetting:
    __slots__ = ("value",)

    def __setattr__(self, name, value):
        raise AttributeError("read-only")


SETTING = ReadOnlySetting()
object.__setattr__(SETTING, "value", 1)


def bumps_a_read_only_setting(x):
    object.__setattr__(SETTING, "value", SETTING.value + 1)
    return x * SETTING.value


def test_state_that_cannot_be_put_back_is_refused_and_a_read_only_object_is_put_back(monkeypatch):
    """NOTE [State changed by a capture]: a change the capture cannot undo between its runs is a CaptureError
    (raised in strict mode, else the fallback runs the call); an object whose __setattr__ refuses is written
    back directly, and its graph gives eager's result."""
    from aotcache import config
    from aotcache.aot.errors import CaptureError

    with pytest.raises(CaptureError, match=r"could not put that state back .*AppendOnly") as info:
        aotcache.aot_function(logs_its_calls, "nop", cache=False, on_capture_error="raise")(X)
    assert info.value.reason == "unsupported_construct"
    with config.patch(strict=True), pytest.raises(CaptureError, match="could not put that state back"):
        aotcache.aot_function(logs_its_calls, "nop", cache=False)(X)
    monkeypatch.setattr(sys.modules[__name__], "LOG", AppendOnly())
    compiled = compiled_function(logs_its_calls)
    # the documented limit: the capture's first run changed it for good, and the fallback runs the Python again
    torch.testing.assert_close(compiled(X), X * 2)
    torch.testing.assert_close(compiled(X), X * 3)  # later calls: the fallback runs the Python once per call
    assert LOG == [0, 1, 2]

    object.__setattr__(SETTING, "value", 1)
    compiled = compiled_function(bumps_a_read_only_setting)
    for call in range(2, 4):
        torch.testing.assert_close(compiled(X), X * call)
        assert SETTING.value == call


# ----------------------------------------------------------------------------------------------------
# Tensors held in containers: lists, tuples, dicts on modules, globals, class attributes (NOTE [Rebound list
# attributes], NOTE [Tensor constants by identity in-process])
# ----------------------------------------------------------------------------------------------------


def _full(value: float) -> torch.Tensor:
    return torch.full((4,), float(value))


class HoldsMasks(nn.Module):
    """Reads tensors from a list, a tuple, a dict, nested containers and a submodule's list (found: a rebound
    list or tuple of tensors left the graph of the old tensors running)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.masks = [_full(1), _full(1)]
        self.tup = (_full(1),)
        self.table = {"a": _full(1)}
        self.nested = {"l": [_full(1)]}
        self.holder = MaskHolder()
        self.frames = collections.deque([_full(1)], maxlen=4)
        self.inner = InnerMasks()

    def forward(self, x):
        y = self.linear(x) * self.masks[0] + self.masks[1] + self.tup[0] + self.table["a"] + self.nested["l"][0]
        return self.inner(y * self.holder.masks[0] - self.frames[0])


class MaskHolder:
    """A plain object holding a list of tensors (a config-like holder)."""

    def __init__(self):
        self.masks = [_full(1)]


class InnerMasks(nn.Module):
    def __init__(self):
        super().__init__()
        self.masks = [_full(1)]
        self.tup = (_full(1),)

    def forward(self, x):
        return x * self.masks[0] + self.tup[0]


CONTAINER_CHANGES = {
    "list rebound": lambda m: setattr(m, "masks", [_full(2), _full(0)]),
    "list item set": lambda m: m.masks.__setitem__(0, _full(3)),
    "list member in place": lambda m: m.masks[0].mul_(2),
    "tuple rebound": lambda m: setattr(m, "tup", (_full(9),)),
    "tuple member in place": lambda m: m.tup[0].add_(1),
    "dict rebound": lambda m: setattr(m, "table", {"a": _full(4)}),
    "dict item set": lambda m: m.table.__setitem__("a", _full(6)),
    "nested list rebound": lambda m: setattr(m, "nested", {"l": [_full(8)]}),
    "nested list item set": lambda m: m.nested["l"].__setitem__(0, _full(7)),
    "submodule list rebound": lambda m: setattr(m.inner, "masks", [_full(3)]),
    "submodule tuple rebound": lambda m: setattr(m.inner, "tup", (_full(2),)),
    "plain object's list rebound": lambda m: setattr(m.holder, "masks", [_full(5)]),
    "plain object's list member in place": lambda m: m.holder.masks[0].add_(2),
    "deque item set": lambda m: m.frames.__setitem__(0, _full(2)),
    "deque appendleft": lambda m: m.frames.appendleft(_full(3)),
    "deque member in place": lambda m: m.frames[0].add_(4),
}


@pytest.mark.parametrize("wrap", ["aot_module", "compile"])
@pytest.mark.parametrize("change", list(CONTAINER_CHANGES))
def test_tensor_in_a_container_attribute_changed_gives_eagers_result(change, wrap):
    model = HoldsMasks()
    compiled = (compiled_module(model) if wrap == "aot_module"
                else aotcache.compile(model, compiler="nop", cache=False))
    torch.testing.assert_close(compiled(X), model(X))
    with torch.no_grad():
        CONTAINER_CHANGES[change](model)
    for _ in range(2):
        torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 2


def test_a_deque_of_tensors_is_fingerprinted_by_content_and_bound():
    """A deque is a container like a list (was: an opaque object, guarded by identity only, so its items changed
    in-process went unseen and the fingerprint was untrusted); its ``maxlen`` is part of the token."""
    model = HoldsMasks()
    first = code_fingerprint(model)
    assert first.trusted
    model.frames = collections.deque([_full(1)], maxlen=5)
    assert code_fingerprint(model).digest != first.digest
    model.frames = collections.deque([_full(1)], maxlen=4)
    assert code_fingerprint(model).digest == first.digest


def test_the_found_sequence_of_list_changes_gives_eagers_result_each_time():
    """The repro as found: rebound, an item set, a member changed in place, one after the other."""
    model = HoldsMasks()
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    torch.testing.assert_close(compiled(X), model(X))
    model.masks = [_full(2), _full(0)]
    torch.testing.assert_close(compiled(X), model(X))
    model.masks[0] = _full(3)
    torch.testing.assert_close(compiled(X), model(X))
    model.masks[0].mul_(2)
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 4


def test_unchanged_or_rebuilt_tensor_list_keeps_its_graph_without_walking_again():
    """The other direction: calls with the containers untouched check the guards only, and so do calls after a
    list or tuple rebuilt with the same tensors (as nn.LSTM rebuilds its weight list): members by identity."""
    model = HoldsMasks()
    compiled = compiled_module(model)
    for _ in range(4):
        torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 1 and compiled.compiled.num_program_walks == 1
    model.masks = list(model.masks)
    model.tup = (*model.tup,)
    for _ in range(3):
        torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 1 and compiled.compiled.num_program_walks == 1


class PlainSettings(nn.Module):
    """Plain values that decide the result's dtype or sign: an attribute, a tuple, a list, a dict, a config."""

    def __init__(self):
        super().__init__()
        self.k, self.ks, self.kl, self.kd = 1, (1,), [1], {"v": 1}
        self.z = (0.0,)
        self.config = types.SimpleNamespace(k=1, z=0.0)

    def forward(self, x):
        scaled = x * self.k + x * self.ks[0] + x * self.kl[0] + x * self.kd["v"] + x * self.config.k
        return scaled, 1.0 / (torch.ones(3) * self.z[0] * self.config.z)


PLAIN_CHANGES = {  # (a change of type or sign that eager sees, an equal value of the same type)
    "attribute 1 -> 1.0": (lambda m: setattr(m, "k", 1.0), lambda m: setattr(m, "k", int("1"))),
    "attribute 1 -> True": (lambda m: setattr(m, "k", True), lambda m: setattr(m, "k", int("1"))),
    "tuple (1,) -> (1.0,)": (lambda m: setattr(m, "ks", (1.0,)), lambda m: setattr(m, "ks", (int("1"),))),
    "tuple (0.0,) -> (-0.0,)": (lambda m: setattr(m, "z", (-0.0,)), lambda m: setattr(m, "z", (_equal_copy(0.0),))),
    "list item 1 -> 1.0": (lambda m: m.kl.__setitem__(0, 1.0), lambda m: m.kl.__setitem__(0, int("1"))),
    "dict item 1 -> 1.0": (lambda m: m.kd.__setitem__("v", 1.0), lambda m: m.kd.__setitem__("v", int("1"))),
    "config 1 -> 1.0": (lambda m: setattr(m.config, "k", 1.0), lambda m: setattr(m.config, "k", int("1"))),
    "config 0.0 -> -0.0": (lambda m: setattr(m.config, "z", -0.0), lambda m: setattr(m.config, "z", _equal_copy(0.0))),
}


@pytest.mark.parametrize("wrap", ["aot_module", "compile"])
@pytest.mark.parametrize("change", list(PLAIN_CHANGES))
def test_plain_setting_of_another_type_or_sign_gives_eagers_result_and_an_equal_one_keeps_the_graph(change, wrap):
    """NOTE [Plain values by type]: found as settings compared with ``==`` (``1 == 1.0``, ``0.0 == -0.0``), the
    graph of the old value ran: int64 where eager gives float32, ``inf`` where eager gives ``-inf``."""
    model = PlainSettings()
    compiled = (compiled_module(model) if wrap == "aot_module"
                else aotcache.compile(model, compiler="nop", cache=False))
    x = torch.arange(3)  # an int64 input: a float setting promotes the result

    def check():
        (result, inverse), (expected, expected_inverse) = compiled(x), model(x)
        assert result.dtype == expected.dtype
        torch.testing.assert_close(result, expected)
        torch.testing.assert_close(inverse, expected_inverse)  # +inf and -inf differ

    check()
    changed, equal = PLAIN_CHANGES[change]
    equal(model)  # an equal value of the same type: the same graph
    check()
    assert compiled.compiled.num_compiles == 1
    changed(model)
    check()
    check()
    assert compiled.compiled.num_compiles == 2


class SwapsSetMember(nn.Module):
    """Replaces its set's member by an equal one of another type (``{1}`` -> ``{1.0}``) and multiplies by it."""

    def __init__(self):
        super().__init__()
        self.factors = {1}

    def forward(self, x):
        factor = next(iter(self.factors))
        self.factors.discard(factor)
        self.factors.add(float(factor))
        return x * factor


@pytest.mark.parametrize("wrap", ["aot_module", "compile"])
def test_set_member_swapped_for_an_equal_one_of_another_type_is_put_back_between_the_captures_runs(wrap):
    """Found: sets were put back only when ``!=`` (``{1} == {1.0}``), so the capture's second run read ``1.0`` and
    the first call gave float32 where eager gives int64."""
    model, eager = SwapsSetMember(), SwapsSetMember()
    compiled = (compiled_module(model) if wrap == "aot_module"
                else aotcache.compile(model, compiler="nop", cache=False))
    x = torch.arange(3)
    for _ in range(2):
        result, expected = compiled(x), eager(x)
        assert result.dtype == expected.dtype
        torch.testing.assert_close(result, expected)
        assert [type(f) for f in model.factors] == [type(f) for f in eager.factors] == [float]


class RemembersSizes(nn.Module):
    """Reads a list of tensors and remembers each new batch size (the capture of a new size changes state)."""

    def __init__(self):
        super().__init__()
        self.masks = [torch.ones(4)]
        self.memo = types.SimpleNamespace(seen=frozenset())

    def forward(self, x):
        if x.shape[0] not in self.memo.seen:
            self.memo.seen = self.memo.seen | {x.shape[0]}
        return x * self.masks[0]


@pytest.mark.parametrize("wrap", ["aot_module", "compile"])
def test_list_rebuilt_with_the_same_members_stays_the_users_after_a_capture_that_changes_state(wrap):
    """NOTE [Rebound containers are put back as the call found them]: found as a restore between the capture's
    runs writing back the list the first walk saw, so the module no longer held the user's list and a later
    change to it gave the old result (compiled 1.0, eager 10.0)."""
    model, eager = RemembersSizes(), RemembersSizes()
    compiled = (compiled_module(model) if wrap == "aot_module"
                else aotcache.compile(model, compiler="nop", cache=False, dynamic=False))
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(torch.ones(2, 4)), eager(torch.ones(2, 4)))
        users, eagers = list(model.masks), list(eager.masks)
        model.masks, eager.masks = users, eagers
        torch.testing.assert_close(compiled(torch.ones(3, 4)), eager(torch.ones(3, 4)))  # a new size: a capture
        assert model.masks is users and model.memo.seen == eager.memo.seen == {2, 3}
        users[0], eagers[0] = torch.full((4,), 10.0), torch.full((4,), 10.0)
        torch.testing.assert_close(compiled(torch.ones(3, 4)), eager(torch.ones(3, 4)))


MASKS_HOLDER = RemembersSizes()


def reads_a_global_modules_masks(x):
    return MASKS_HOLDER(x) + 1


def test_aot_function_list_rebuilt_with_the_same_members_stays_the_users_after_a_capture():
    """The same through a module an aot_function calls (no aot_module tree saving its lists)."""
    MASKS_HOLDER.masks, MASKS_HOLDER.memo.seen = [torch.ones(4)], frozenset()
    compiled = compiled_function(reads_a_global_modules_masks)
    for _ in range(2):  # the first call's capture changed the memo: the second one's graph is kept
        compiled(torch.ones(2, 4))
    users = MASKS_HOLDER.masks = list(MASKS_HOLDER.masks)
    compiled(torch.ones(3, 4))
    assert MASKS_HOLDER.masks is users
    users[0] = torch.full((4,), 10.0)
    torch.testing.assert_close(compiled(torch.ones(3, 4)), reads_a_global_modules_masks(torch.ones(3, 4)))


def test_tensor_rebound_to_an_equal_copy_does_not_keep_a_graph_reading_the_old_tensor():
    """NOTE [Tensor constants by identity in-process]: by content alone the copy selected the first graph, which
    (nop) reads the first tensor object; changing that one (no longer the model's) changed the result."""
    model = HoldsMasks()
    compiled = compiled_module(model)
    torch.testing.assert_close(compiled(X), model(X))
    old = model.masks
    model.masks = [tensor.clone() for tensor in old]
    torch.testing.assert_close(compiled(X), model(X))
    with torch.no_grad():
        old[0].mul_(5)
    torch.testing.assert_close(compiled(X), model(X))
    model.masks = old  # back to the first tensors, as they are now: their graph (version changed: traced again)
    torch.testing.assert_close(compiled(X), model(X))


def test_tensor_rebound_to_an_equal_copy_loads_its_graph_from_the_cache():
    """Another identity is another in-process digest, but the same call fingerprint (by content): the graph is
    loaded, not compiled again, and it holds its own constants (the old tensor changed later is not read)."""
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store.factory import open_tiers

    cache = AOTAutogradCache(open_tiers("memory", namespace="aot"), journal=False)
    model = HoldsMasks()
    compiled = aotcache.aot_module(model, "nop", cache=cache)
    torch.testing.assert_close(compiled(X), model(X))
    old = model.masks
    model.masks = [tensor.clone() for tensor in old]
    torch.testing.assert_close(compiled(X), model(X))
    assert cache.counters["fingerprint_hit"] == 1
    with torch.no_grad():
        old[0].mul_(5)
    torch.testing.assert_close(compiled(X), model(X))


MASKS = [_full(1)]
MASK_TUPLE = (_full(1),)


class ReadsGlobalMasks(nn.Module):
    CLASS_MASKS = [_full(1)]

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) * MASKS[0] + MASK_TUPLE[0] + ReadsGlobalMasks.CLASS_MASKS[0]


def _closure_masks():
    masks = [_full(1)]

    def masked_by_closure(x):
        return x * masks[0]

    return masked_by_closure, masks


@pytest.mark.parametrize("change", ["global list rebound", "global list item set", "global tuple rebound",
                                    "global tuple member in place", "class list rebound", "class list item set"])
def test_tensor_in_a_global_or_class_container_changed_gives_eagers_result(change, monkeypatch):
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "MASKS", [_full(1)])
    monkeypatch.setattr(module, "MASK_TUPLE", (_full(1),))
    monkeypatch.setattr(ReadsGlobalMasks, "CLASS_MASKS", [_full(1)])
    model = ReadsGlobalMasks()
    compiled = compiled_module(model)
    torch.testing.assert_close(compiled(X), model(X))
    with torch.no_grad():
        if change == "global list rebound":
            monkeypatch.setattr(module, "MASKS", [_full(3)])
        elif change == "global list item set":
            MASKS[0] = _full(4)
        elif change == "global tuple rebound":
            monkeypatch.setattr(module, "MASK_TUPLE", (_full(5),))
        elif change == "global tuple member in place":
            MASK_TUPLE[0].add_(1)
        elif change == "class list rebound":
            monkeypatch.setattr(ReadsGlobalMasks, "CLASS_MASKS", [_full(6)])
        else:
            ReadsGlobalMasks.CLASS_MASKS[0] = _full(7)
    torch.testing.assert_close(compiled(X), model(X))
    assert compiled.compiled.num_compiles == 2


MASKED_MODULE = InnerMasks()


def calls_a_module_global(x):
    return MASKED_MODULE(x) * 2


def test_tensor_list_of_a_module_an_aot_function_calls_rebound_gives_eagers_result():
    """A module outside aot_module's tree (a global the function calls): its list attribute of tensors rebound
    was unseen (only lists without tensors were read again)."""
    MASKED_MODULE.masks = [_full(1)]
    compiled = compiled_function(calls_a_module_global)
    torch.testing.assert_close(compiled(X), calls_a_module_global(X))
    MASKED_MODULE.masks = [_full(3)]
    torch.testing.assert_close(compiled(X), calls_a_module_global(X))
    MASKED_MODULE.tup = (_full(4),)
    torch.testing.assert_close(compiled(X), calls_a_module_global(X))
    for _ in range(2):
        compiled(X)
    assert compiled.num_compiles == 3 and compiled.num_program_walks == 3


def test_tensor_in_a_closure_list_changed_gives_eagers_result():
    fn, masks = _closure_masks()
    compiled = compiled_function(fn)
    torch.testing.assert_close(compiled(X), fn(X))
    masks[0] = _full(3)
    torch.testing.assert_close(compiled(X), fn(X))
    with torch.no_grad():
        masks[0].mul_(2)
    torch.testing.assert_close(compiled(X), fn(X))
    assert compiled.num_compiles == 3


def test_torch_compile_with_the_aotcache_backend_sees_container_changes():
    """Dynamo guards the containers itself: each change gives eager's result through the backend too."""
    model = HoldsMasks()
    compiled = torch.compile(model, backend="aotcache")
    torch.testing.assert_close(compiled(X), model(X))
    model.masks = [_full(2), _full(0)]
    torch.testing.assert_close(compiled(X), model(X))
    model.masks[0] = _full(3)
    torch.testing.assert_close(compiled(X), model(X))
    with torch.no_grad():
        model.masks[0].mul_(2)
        model.tup[0].add_(1)
    torch.testing.assert_close(compiled(X), model(X))
    model.tup = (_full(9),)
    torch.testing.assert_close(compiled(X), model(X))


LIST_VALUES_SCRIPT = """
import json, sys, torch
import aotcache
from aotcache.autograd_cache.cache import default_cache

class HoldsMasks(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.masks = [torch.full((4,), value), torch.ones(4)]

    def forward(self, x):
        return self.linear(x) * self.masks[0] + self.masks[1]

torch.manual_seed(0)
model = HoldsMasks(float(sys.argv[2]))
x = torch.ones(2, 4)
with torch.no_grad():
    out = aotcache.aot_module(model, "nop")(x)
    print(json.dumps({"same": torch.equal(out, model(x)), **default_cache().counters}))
"""


def test_processes_with_other_list_tensor_values_each_get_their_eager_result(tmp_path):
    """The call fingerprint hashes tensor constants in containers by content: a warm start with other list
    values misses (and gives its eager result), the same values hit."""
    def run(value):
        path = tmp_path / "masks.py"
        path.write_text(LIST_VALUES_SCRIPT)
        code = f"import runpy, sys; sys.argv = ['masks', '', {value!r}]; runpy.run_path({str(path)!r})"
        return json.loads(run_python(code, env={"PYTHONDONTWRITEBYTECODE": "1"}).stdout.strip().splitlines()[-1])

    first, other, again = run("2.0"), run("3.0"), run("2.0")
    assert first["same"] and other["same"] and again["same"]
    assert other.get("fingerprint_hit", 0) == 0 and again["fingerprint_hit"] == 1


@pytest.mark.parametrize("api", ["aot_module", "compile"])
def test_a_library_first_imported_by_the_capture_and_patched_later_is_seen(tmp_path, monkeypatch, api):
    """NOTE [Libraries loaded after the walk], as found by review: a forward importing an installed library in
    its body, loaded by the first call's capture, then patched by user code (``lib.f = ...``), kept the graph
    traced with the old function. Unpatched, the walk that runs once the library is loaded finds the same graph."""
    import importlib
    import sys

    name = f"aotc_bodylib_{api}"
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / f"{name}.py").write_text("def f(t):\n    return t * 2\n")
    info = site / f"{name}-1.0.dist-info"  # an installed distribution: named with its version, not walked
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "top_level.txt").write_text(f"{name}\n")
    (info / "RECORD").write_text("")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, name, raising=False)

    namespace: dict = {}
    exec(f"def forward(self, x):\n    import {name}\n    return {name}.f(x) + 1\n", namespace)
    model_type = type("BodyImport", (torch.nn.Module,), {"forward": namespace["forward"]})
    model = model_type()
    wrapped = (aotcache.aot_module(model, "nop", cache=False) if api == "aot_module"
               else aotcache.compile(model, compiler="nop", cache=False))
    function = wrapped.compiled
    x = torch.ones(3)
    from aotcache.code_origin import is_library

    assert name not in sys.modules and is_library(name)
    assert torch.equal(wrapped(x), torch.full((3,), 3.0))
    assert torch.equal(wrapped(x), torch.full((3,), 3.0))  # loaded now, unpatched: the same graph
    assert function.num_compiles == 1
    library = sys.modules[name]
    monkeypatch.setattr(library, "f", lambda t: t * 3)
    assert torch.equal(wrapped(x), torch.full((3,), 4.0)) and torch.equal(model(x), torch.full((3,), 4.0))
    sys.modules.pop(name, None)
