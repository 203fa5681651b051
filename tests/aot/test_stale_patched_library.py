"""Zero stale results when torch's own functions are rebound, or a forward reads a context variable or a
thread-local object (session 16's adversarial hunt of the capture route and the persistent cache).

Each case changes the program between two calls of one process, or between a cold process and a warm one, and
the compiled result must be eager's; the other direction too: an unchanged (or equal) program keeps its graph /
hits its entry. The nop compiler throughout.
"""

from __future__ import annotations

import contextvars
import threading

import torch
import torch.nn.functional as F
from torch import nn

import aotcache
from aotcache.autograd_cache.fingerprint import fingerprint_module_call
from aotcache.aot.api import AOTOptions
from torch.utils import _pytree as pytree
from tests.conftest import run_script_json

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def compiles(wrapped) -> int:
    return wrapped.compiled.num_compiles


def fingerprint(module, *args):
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    flat, spec = pytree.tree_flatten(((params, buffers, *args), {}))
    result = fingerprint_module_call(module, flat, spec, AOTOptions())
    assert result.trusted, f"untrusted: {result.reason} ({result.where})"
    return result.digest


class TorchSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return torch.sigmoid(self.fc(x))


class FunctionalGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return F.gelu(self.fc(x))


class MethodSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x).sigmoid()


def build(cls):
    torch.manual_seed(0)
    return cls()


# ----------------------------------------------------------------------------------------------------
# Library functions rebound in their module (NOTE [Library functions rebound in their module])
# ----------------------------------------------------------------------------------------------------


def test_a_torch_function_rebound_to_another_torch_function_gives_eagers_result(monkeypatch):
    # found: only user code patched into torch was written down; torch.sigmoid = torch.tanh kept the sigmoid graph
    model = build(TorchSigmoid)
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    torch.testing.assert_close(compiled(X), model(X))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "sigmoid", torch.tanh)
        torch.testing.assert_close(compiled(X), model(X))
        assert compiles(compiled) == 2
    torch.testing.assert_close(compiled(X), model(X))  # restored: the first graph again
    gelu_model = build(FunctionalGelu)
    compiled = aotcache.compile(gelu_model, compiler="nop", cache=False)
    compiled(X)
    with monkeypatch.context() as patch:
        patch.setattr(F, "gelu", F.silu)
        torch.testing.assert_close(compiled(X), gelu_model(X))


def test_a_torch_function_set_again_or_an_unused_one_rebound_keeps_the_graph(monkeypatch):
    model = build(TorchSigmoid)
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    compiled(X)
    monkeypatch.setattr(torch, "sigmoid", torch.sigmoid)
    monkeypatch.setattr(torch, "cosh", torch.tanh)  # the forward does not use it
    torch.testing.assert_close(compiled(X), model(X))
    assert compiles(compiled) == 1


def test_a_torch_function_rebound_changes_the_fingerprint_and_an_unused_one_does_not(monkeypatch):
    model = build(TorchSigmoid)
    base = fingerprint(model, X)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "sigmoid", torch.tanh)
        assert fingerprint(model, X) != base
    with monkeypatch.context() as patch:
        patch.setattr(torch, "cosh", torch.tanh)
        assert fingerprint(model, X) == base
    assert fingerprint(model, X) == base


# ----------------------------------------------------------------------------------------------------
# torch.Tensor methods patched (NOTE [Tensor methods patched])
# ----------------------------------------------------------------------------------------------------


def test_a_tensor_method_patched_gives_eagers_result(monkeypatch):
    # found: y.sigmoid() reaches torch.Tensor through no object the walk saw; a patch kept the sigmoid graph
    model = build(MethodSigmoid)
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    torch.testing.assert_close(compiled(X), model(X))
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "sigmoid", lambda self: torch.tanh(self), raising=False)
        torch.testing.assert_close(compiled(X), model(X))
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "sigmoid", torch.Tensor.tanh, raising=False)
        torch.testing.assert_close(compiled(X), model(X))
    torch.testing.assert_close(compiled(X), model(X))
    assert compiles(compiled) == 3


def test_a_tensor_method_the_forward_does_not_name_patched_is_seen_and_unpatched_is_the_same_program(monkeypatch):
    # torch's own code may call any Tensor method (F.normalize calls Tensor.norm), so a method set on
    # torch.Tensor counts whether or not the forward names it (review of session 16); taken back: the same
    model = build(MethodSigmoid)
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    compiled(X)
    base = fingerprint(model, X)
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "cosh", torch.Tensor.tanh, raising=False)
        torch.testing.assert_close(compiled(X), model(X))
        assert fingerprint(model, X) != base
    torch.testing.assert_close(compiled(X), model(X))
    assert fingerprint(model, X) == base
    monkeypatch.setattr(torch.Tensor, "sigmoid", torch.Tensor.tanh, raising=False)
    assert fingerprint(model, X) != base


class Doubles(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) * 2


def test_a_tensor_operator_patched_gives_eagers_result(monkeypatch):
    # found: ``y * 2`` names no method; torch.Tensor.__mul__ set on the class kept the graph of TensorBase's
    model = build(Doubles)
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    torch.testing.assert_close(compiled(X), model(X))
    base = fingerprint(model, X)
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "__mul__", lambda self, other: torch.add(self, other), raising=False)
        torch.testing.assert_close(compiled(X), model(X))
        assert fingerprint(model, X) != base
    torch.testing.assert_close(compiled(X), model(X))
    assert fingerprint(model, X) == base
    assert compiles(compiled) == 2


# ----------------------------------------------------------------------------------------------------
# Context variables and thread-local objects (NOTE [Context variables in the guards], [Thread-local objects])
# ----------------------------------------------------------------------------------------------------

SCALE = contextvars.ContextVar("s16_scale", default=1.0)
LOCAL = threading.local()
LOCAL.k = 1.0


class ContextScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) * SCALE.get()


class LocalScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) * LOCAL.k


def test_a_context_variable_set_between_calls_gives_eagers_result_and_an_equal_value_keeps_the_graph():
    # found: the walk wrote the variable's value down but the guards held only the variable: a stale result
    model = build(ContextScaled)
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    token = SCALE.set(1.0)
    try:
        torch.testing.assert_close(compiled(X), model(X))
        SCALE.set(float("1.0"))  # equal: walked again, same digest
        compiled(X)
        assert compiles(compiled) == 1
        SCALE.set(3.0)
        torch.testing.assert_close(compiled(X), model(X))
        assert compiles(compiled) == 2
        base = fingerprint(model, X)
        SCALE.set(4.0)
        assert fingerprint(model, X) != base
    finally:
        SCALE.reset(token)


def test_a_thread_local_attribute_changed_gives_eagers_result_in_each_thread():
    # found: a threading.local was opaque (identity only): a changed attribute kept the old graph
    model = build(LocalScaled)
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    LOCAL.k = 1.0
    try:
        torch.testing.assert_close(compiled(X), model(X))
        compiled(X)
        assert compiles(compiled) == 1
        base = fingerprint(model, X)  # trusted now: read as the calling thread's attributes
        LOCAL.k = 2.0
        torch.testing.assert_close(compiled(X), model(X))
        assert fingerprint(model, X) != base
        results = {}

        def other_thread():
            LOCAL.k = 5.0
            results["got"], results["want"] = compiled(X), model(X)

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        torch.testing.assert_close(results["got"], results["want"])
        torch.testing.assert_close(compiled(X), model(X))  # this thread's 2.0 again
    finally:
        LOCAL.k = 1.0


# ----------------------------------------------------------------------------------------------------
# Across processes: the call fingerprint
# ----------------------------------------------------------------------------------------------------

REBOUND = """
import json, sys, torch
import torch.nn.functional as F
from torch import nn
import aotcache
from aotcache.autograd_cache.cache import default_cache

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc(x)
        return torch.sigmoid(y) + y.sigmoid() + F.gelu(y)

if sys.argv[1] == "torch":
    torch.sigmoid = torch.tanh
elif sys.argv[1] == "method":
    torch.Tensor.sigmoid = torch.Tensor.tanh
elif sys.argv[1] == "functional":
    F.gelu = F.silu
torch.manual_seed(0)
model = Model()
x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
out = aotcache.compile(model, compiler="nop")(x)
print(json.dumps({"same": torch.equal(out, model(x)), **default_cache().counters}))
"""


def test_a_torch_function_rebound_misses_in_the_next_process_and_an_unchanged_program_hits():
    # found: a warm process with torch.sigmoid = torch.tanh (or Tensor.sigmoid, F.gelu rebound) loaded the
    # cold process's graph through the same fingerprint: a false cache hit
    cold = run_script_json(REBOUND, "none")
    assert cold["same"]
    for patch in ("torch", "method", "functional"):
        changed = run_script_json(REBOUND, patch)
        assert changed["same"], patch
        assert changed.get("fingerprint_hit", 0) == 0 and changed.get("compile", 0) == 1, (patch, changed)
    unchanged = run_script_json(REBOUND, "none")
    assert unchanged["same"] and unchanged["fingerprint_hit"] == 1 and unchanged.get("compile", 0) == 0


# ----------------------------------------------------------------------------------------------------
# Library functions one factory makes (NOTE [Library functions made by a factory])
# ----------------------------------------------------------------------------------------------------


class AdaptivePool(nn.Module):
    def forward(self, x):
        return F.adaptive_max_pool2d(x, 2)


POOL_INPUT = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2))


def test_a_factory_made_function_rebound_to_its_sibling_changes_the_fingerprint(monkeypatch):
    # found in review: every boolean_dispatch function is ``boolean_dispatch.<locals>.fn``: rebinding one to
    # another (another result on a 3-d input) kept the fingerprint, a false hit in the next process
    model = AdaptivePool()
    base = fingerprint(model, POOL_INPUT)
    with monkeypatch.context() as patch:
        patch.setattr(F, "adaptive_max_pool2d", F.adaptive_max_pool1d)
        assert fingerprint(model, POOL_INPUT) != base
    with monkeypatch.context() as patch:
        patch.setattr(F, "adaptive_max_pool3d", F.adaptive_max_pool1d)  # not used: the same program
        assert fingerprint(model, POOL_INPUT) == base
    assert fingerprint(model, POOL_INPUT) == base


POOLED = """
import json, sys, torch
import torch.nn.functional as F
from torch import nn
import aotcache
from aotcache.autograd_cache.cache import default_cache

class Model(nn.Module):
    def forward(self, x):
        return F.adaptive_max_pool2d(x, 2)

if sys.argv[1] == "rebound":
    F.adaptive_max_pool2d = F.adaptive_max_pool1d
model = Model()
x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2))
out = aotcache.compile(model, compiler="nop")(x)
print(json.dumps({"same": out.shape == model(x).shape and torch.equal(out, model(x)), **default_cache().counters}))
"""


def test_a_factory_made_function_rebound_misses_in_the_next_process_and_the_same_program_hits():
    cold = run_script_json(POOLED, "none")
    again = run_script_json(POOLED, "none")
    rebound = run_script_json(POOLED, "rebound")
    assert cold["same"] and again["same"] and rebound["same"], (cold, again, rebound)
    assert again["fingerprint_hit"] == 1 and again.get("compile", 0) == 0, again
    assert rebound.get("fingerprint_hit", 0) == 0 and rebound.get("hit", 0) == 0, rebound


# ----------------------------------------------------------------------------------------------------
# A Tensor method torch's own code calls (NOTE [Tensor methods patched])
# ----------------------------------------------------------------------------------------------------


class Normalized(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1) * 2


def test_a_tensor_method_only_torchs_code_calls_patched_gives_eagers_result(monkeypatch):
    # found in review: F.normalize calls Tensor.norm in torch's code, a name the forward never uses: patching it
    # kept the graph traced with the old method (in-process and through the fingerprint)
    model = Normalized()
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    torch.testing.assert_close(compiled(X), model(X))
    base = fingerprint(model, X)
    original = torch.Tensor.norm
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "norm", lambda self, *args, **kwargs: original(self, *args, **kwargs) * 0 + 4.0)
        torch.testing.assert_close(compiled(X), model(X))
        assert compiles(compiled) == 2
        assert fingerprint(model, X) != base
    torch.testing.assert_close(compiled(X), model(X))
    assert fingerprint(model, X) == base


def test_a_tensor_method_set_to_itself_keeps_the_graph():
    model = Normalized()
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    compiled(X)
    torch.Tensor.norm = torch.Tensor.norm  # the same object: nothing changed
    torch.testing.assert_close(compiled(X), model(X))
    assert compiles(compiled) == 1


class _RaisingEquality:
    def __eq__(self, other):
        raise Exception("no comparing me")  # noqa: TRY002 - any exception a user's __eq__ may raise

    __hash__ = object.__hash__


class _EqualToAnything:
    def __init__(self, result):
        self.result = result

    def __eq__(self, other):
        return True

    __hash__ = object.__hash__

    def __get__(self, tensor, owner=None):  # a method: bound to the tensor it is read from
        return lambda: self.result(tensor)


def test_odd_values_put_in_torch_tensors_namespace_never_fail_a_call_nor_pass_for_the_old_method(monkeypatch):
    # found in review: the namespace guard compared values with ==: an __eq__ raising crashed the call, one
    # answering True would have passed for the method it replaced
    model = build(MethodSigmoid)
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    compiled(X)
    monkeypatch.setattr(torch.Tensor, "__array_priority__", _RaisingEquality())
    torch.testing.assert_close(compiled(X), model(X))
    assert compiles(compiled) == 1  # not a method: walked again, the same graph
    monkeypatch.setattr(torch.Tensor, "sigmoid", lambda tensor: tensor.tanh(), raising=False)
    torch.testing.assert_close(compiled(X), model(X))
    monkeypatch.setattr(torch.Tensor, "sigmoid", _EqualToAnything(torch.Tensor.relu), raising=False)
    torch.testing.assert_close(compiled(X), model(X))
