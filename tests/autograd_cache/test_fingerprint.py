"""The call fingerprint: stable across processes, sensitive to everything that decides the graph, and
untrusted (with a reason) whenever the cheap form cannot see something."""

from __future__ import annotations

import contextlib
import functools
import json
import threading

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from aotcache.aot.api import AOTOptions
from aotcache.autograd_cache import reachable as reachable_module
from aotcache.autograd_cache.fingerprint import code_fingerprint, fingerprint_call, fingerprint_module_call
from tests.conftest import run_python

OPTIONS = AOTOptions()


def module_fingerprint(module, *args, options=OPTIONS, **kwargs):
    """Fingerprint an aot_module call the way AOTModule flattens it (parameters, buffers, then arguments)."""
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    flat, spec = pytree.tree_flatten(((params, buffers, *args), kwargs))
    return fingerprint_module_call(module, flat, spec, options)


def function_fingerprint(fn, *args, options=OPTIONS):
    flat, spec = pytree.tree_flatten((args, {}))
    return fingerprint_call(fn, flat, spec, options)


# ----------------------------------------------------------------------------------------------------
# A small model whose pieces the tests change
# ----------------------------------------------------------------------------------------------------

SCALE = 2.0


def helper(x):
    return x * SCALE


class Block(nn.Module):
    def __init__(self, eps=1e-5, p=0.0):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4, eps=eps)
        self.drop = nn.Dropout(p)
        self.register_buffer("offset", torch.zeros(4))

    def forward(self, x):
        return self.drop(self.norm(helper(self.linear(x)) + self.offset))


def make_block(**kwargs):
    torch.manual_seed(0)
    return Block(**kwargs)


X = torch.randn(2, 4)


def trusted(result):
    assert result.trusted, f"untrusted: {result.reason} ({result.where})"
    return result.digest


def test_same_call_same_fingerprint_and_parameter_values_do_not_count():
    block = make_block()
    first = trusted(module_fingerprint(block, X))
    assert trusted(module_fingerprint(block, X)) == first
    with torch.no_grad():
        block.linear.weight.add_(1.0)  # a training step changes values, never the fingerprint
    assert trusted(module_fingerprint(block, X)) == first
    assert trusted(module_fingerprint(make_block(), torch.randn(2, 4))) == first  # other values, same metadata


@pytest.mark.parametrize("change", ["eps", "dropout_p", "training", "param_shape", "param_dtype",
                                    "requires_grad", "input_shape", "input_dtype", "input_requires_grad",
                                    "input_kwarg", "extra_attribute"])
def test_fingerprint_changes_with_what_decides_the_graph(change):
    base = trusted(module_fingerprint(make_block(), X))
    block, x, kwargs = make_block(), X, {}
    if change == "eps":
        block = make_block(eps=1e-3)
    elif change == "dropout_p":
        block = make_block(p=0.1)
    elif change == "training":
        block.eval()
    elif change == "param_shape":
        block.linear = nn.Linear(4, 4, bias=False)
    elif change == "param_dtype":
        block.double()
        x = X.double()
        base = trusted(module_fingerprint(make_block().double(), X.double(), options=AOTOptions(dynamic=False)))
        block.norm.float()
    elif change == "requires_grad":
        block.linear.bias.requires_grad_(False)
    elif change == "input_shape":
        x = torch.randn(3, 4)
    elif change == "input_dtype":
        block, x = make_block().double(), X.double()
    elif change == "input_requires_grad":
        x = X.clone().requires_grad_(True)
    elif change == "input_kwarg":
        kwargs = {"unused": 3}
    elif change == "extra_attribute":
        block.scale_mode = "fast"
    assert trusted(module_fingerprint(block, x, **kwargs)) != base


class HoldsSettings(nn.Module):
    """Plain values in an attribute, a tuple, a list, a dict and a config object (NOTE [Plain values by type])."""

    def __init__(self, value):
        super().__init__()
        self.k, self.ks, self.kl, self.kd = value, (value,), [value], {"v": value}
        self.config = _PlainConfig(value)

    def forward(self, x):
        return x * self.k + x * self.ks[0] + x * self.kl[0] + x * self.kd["v"] + x * self.config.v


class _PlainConfig:
    def __init__(self, value):
        self.v = value


@pytest.mark.parametrize("where", ["k", "ks", "kl", "kd", "config"])
def test_fingerprint_tells_plain_values_of_another_type_or_sign_apart(where):
    """``1 == 1.0 == True`` and ``0.0 == -0.0``, but each bakes another graph (dtype promotion, the sign of an
    infinity): every place a plain value sits gives another fingerprint, and an equal value the same one."""
    def digest(value):
        module, source = HoldsSettings(1), HoldsSettings(value)  # only ``where`` holds ``value``
        setattr(module, where, getattr(source, where))
        return trusted(module_fingerprint(module, X))

    digests = [digest(value) for value in (1, 1.0, True, 0.0, -0.0)]
    assert len(set(digests)) == 5
    assert digest(float("-0.0")) == digests[4] and digest(int("1")) == digests[0]


def test_fingerprint_changes_with_grad_mode_autocast_options_and_default_dtype():
    block = make_block()
    base = trusted(module_fingerprint(block, X))
    with torch.no_grad():
        assert trusted(module_fingerprint(block, X)) != base
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert trusted(module_fingerprint(block, X)) != base
    for options in (AOTOptions(fw_compiler="inductor"), AOTOptions(dynamic=True),
                    AOTOptions(compiler_options={"max_autotune": True}),
                    AOTOptions(decompositions={torch.ops.aten.gelu.default: helper})):
        assert trusted(module_fingerprint(block, X, options=options)) != base
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert trusted(module_fingerprint(block, X)) != base
    finally:
        torch.set_default_dtype(previous)
    # torch rewrites the fp32_precision flags ("none" -> "ieee") when the precision is set: restore them exactly
    pairs = [("generic", "all"), ("mkldnn", "all"), ("cuda", "all"), ("mkldnn", "matmul"), ("cuda", "matmul")]
    saved = [torch._C._get_fp32_precision_getter(*pair) for pair in pairs]
    torch.set_float32_matmul_precision("medium")
    try:
        assert trusted(module_fingerprint(block, X)) != base
    finally:
        torch.set_float32_matmul_precision("highest")
        for pair, value in zip(pairs, saved):
            torch._C._set_fp32_precision_setter(*pair, value)
    assert trusted(module_fingerprint(block, X)) == base


def test_tied_parameters_are_part_of_the_structure():
    def make(tied):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
        if tied:
            model[1].weight = model[0].weight
        return model

    assert trusted(module_fingerprint(make(True), X)) != trusted(module_fingerprint(make(False), X))


# ----------------------------------------------------------------------------------------------------
# Code changes: compiled in fresh namespaces, so each variant is a distinct class / function
# ----------------------------------------------------------------------------------------------------

SOURCE = """
import torch
from torch import nn

FACTOR = {factor}

def helper(x):
    return x {helper_op} FACTOR

class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def activation(self, x):
        return x.{activation}()

    def forward(self, x):
        return self.activation(helper(self.linear(x)))

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return self.inner(x).sum(dim={dim})
"""
BASE_CODE = {"factor": "2.0", "helper_op": "*", "activation": "relu", "dim": "0"}


def build_from_source(**changes):
    namespace = {"__name__": "user_model_under_test"}
    exec(compile(SOURCE.format(**{**BASE_CODE, **changes}), "<user model>", "exec"), namespace)
    torch.manual_seed(0)
    return namespace["Model"]()


@pytest.mark.parametrize("change", [{"dim": "1"}, {"activation": "tanh"}, {"helper_op": "+"},
                                    {"factor": "3.0"}])
def test_fingerprint_changes_with_a_method_body_a_helper_or_a_global(change):
    base = trusted(module_fingerprint(build_from_source(), X))
    assert trusted(module_fingerprint(build_from_source(), X)) == base  # a rebuilt identical model
    assert trusted(module_fingerprint(build_from_source(**change), X)) != base


def test_monkeypatched_torch_method_is_seen():
    model = nn.Sequential(nn.Linear(4, 4))
    base = trusted(module_fingerprint(model, X))
    model[0].forward = lambda x: x * 3  # an instance attribute
    assert trusted(module_fingerprint(model, X)) != base


def test_function_fingerprint_hashes_closed_over_tensors_by_content():
    weight = torch.ones(4)

    def fn(x):
        return x * weight

    base = trusted(function_fingerprint(fn, X))
    weight.add_(1)  # a constant of the graph: its value counts for aot_function
    assert trusted(function_fingerprint(fn, X)) != base


def test_code_fingerprint_of_functions():
    def first(x):
        return x + 1

    def second(x):
        return x + 2

    assert trusted(code_fingerprint(first)) != trusted(code_fingerprint(second))
    assert trusted(code_fingerprint(functools.partial(first))) == trusted(code_fingerprint(functools.partial(first)))


def test_custom_op_called_through_torch_ops_is_part_of_the_fingerprint():
    @torch.library.custom_op("aotk_fp::shift", mutates_args=())
    def shift(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    @shift.register_fake
    def _(x):
        return torch.empty_like(x)

    def fn(x):
        return torch.ops.aotk_fp.shift(x) * 2

    base = trusted(function_fingerprint(fn, X))
    assert trusted(function_fingerprint(fn, X)) == base

    @shift.register_kernel("cpu")
    def _(x):
        return x + 2  # an edited kernel: the captured graph is the same, its behaviour is not

    assert trusted(function_fingerprint(fn, X)) != base


class Doubler:
    def __init__(self):
        self.factor = 2

    def apply(self, x):
        return x * self.factor


def test_constructor_of_a_class_the_code_calls_is_part_of_the_fingerprint(monkeypatch):
    def fn(x):
        return Doubler().apply(x)

    base = trusted(function_fingerprint(fn, X))

    def tripling_init(self):
        self.factor = 3

    monkeypatch.setattr(Doubler, "__init__", tripling_init)
    assert trusted(function_fingerprint(fn, X)) != base


# ----------------------------------------------------------------------------------------------------
# Untrusted: the cheap form cannot see it, the caller captures instead
# ----------------------------------------------------------------------------------------------------


class Opaque:
    __slots__ = ()


class WithCall(nn.Module):
    def __call__(self, x):
        return x


class TwoTimes(torch.Tensor):
    pass


class PassThroughMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class AdapterLinear(nn.Module):
    """peft's LoRA layer in small: adapters in an nn.ParameterDict (whose class defines a raising __call__)."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.scales = nn.ParameterDict({"a": nn.Parameter(torch.ones(4)), "b": nn.Parameter(torch.full((4,), 2.0))})
        self.active = "a"

    def forward(self, x):
        return self.base(x) * self.scales[self.active]


def test_a_parameter_dict_leaves_the_fingerprint_trusted_and_the_active_entry_is_part_of_it():
    # NOTE [Library __call__ overrides]: every peft LoRA model was untrusted ("module overrides __call__:
    # ParameterDict"), so each warm start traced again; torch's own __call__ is pinned by torch's version
    torch.manual_seed(0)
    model = AdapterLinear()
    first = trusted(module_fingerprint(model, X))
    model.active = "b"
    assert trusted(module_fingerprint(model, X)) != first
    assert module_fingerprint(nn.Sequential(WithCall()), X).reason.startswith("module overrides __call__")


def test_untrusted_cases_name_their_reason():
    block = make_block()
    block.handle = threading.Event()  # a stdlib object with hidden state
    assert module_fingerprint(block, X).reason == "opaque object: threading.Event"

    block = make_block()
    block.register_full_backward_hook(lambda *args: None)
    assert module_fingerprint(block, X).reason == "module backward hooks"

    model = nn.Sequential(WithCall())
    assert module_fingerprint(model, X).reason.startswith("module overrides __call__")

    compiled = nn.Sequential(torch.compile(nn.Linear(4, 4)))
    assert module_fingerprint(compiled, X).reason == "torch.compile-d submodule"

    subclass_input = X.as_subclass(TwoTimes)
    assert module_fingerprint(make_block(), subclass_input).reason == "tensor input subclass: TwoTimes"

    block = make_block()
    block.tool = torch.Generator()
    assert module_fingerprint(block, X).reason.startswith("opaque object")

    block = make_block()
    with PassThroughMode():
        assert module_fingerprint(block, X).reason == "active torch function or dispatch mode"


def test_untrusted_function_closures():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.empty(4)
    del mode

    def uses_fake(x):
        return x + fake

    assert function_fingerprint(uses_fake, X).reason == "fake or meta tensor constant"
    lock = contextlib.ExitStack()

    def uses_object(x):
        return x if lock else -x

    assert function_fingerprint(uses_object, X).reason == "opaque object: contextlib.ExitStack"


# ----------------------------------------------------------------------------------------------------
# Stable across processes, and cheap enough to run on the zoo
# ----------------------------------------------------------------------------------------------------

CROSS_PROCESS = """
import json, torch
from torch.utils import _pytree as pytree
from aotcache.aot.api import AOTOptions
from aotcache.autograd_cache.fingerprint import fingerprint_module_call
from tests.aot.zoo import get_entry
out = {}
for name in ("mlp", "cnn_bn", "transformer_encoder", "gpt2_tiny"):
    model, inputs = get_entry(name).build()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    flat, spec = pytree.tree_flatten(((params, buffers, *inputs), {}))
    result = fingerprint_module_call(model, flat, spec, AOTOptions(fw_compiler="aoti"))
    out[name] = [result.digest, result.reason, dict(result.parts)]
print(json.dumps(out))
"""


def test_fingerprint_is_stable_across_processes_on_the_zoo():
    first = json.loads(run_python(CROSS_PROCESS, env={"PYTHONHASHSEED": "1"}).stdout.splitlines()[-1])
    second = json.loads(run_python(CROSS_PROCESS, env={"PYTHONHASHSEED": "2"}).stdout.splitlines()[-1])
    for name, (digest, reason, parts) in first.items():
        assert digest is not None, f"{name}: untrusted ({reason})"
        assert second[name][2] == parts, name
        assert second[name][0] == digest, name


def test_node_budget_makes_huge_programs_untrusted(monkeypatch):
    monkeypatch.setattr(reachable_module, "_MAX_NODES", 3)
    assert module_fingerprint(build_from_source(), X).reason == "too much reachable code"


# ----------------------------------------------------------------------------------------------------
# The two-level lookup (fingerprint -> key -> entry) through aot_module
# ----------------------------------------------------------------------------------------------------


def fresh_cache():
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store.factory import open_tiers

    return AOTAutogradCache(open_tiers("memory,disk", namespace="aot"), journal=False)


def train_step(compiled, x):
    out = compiled(x)
    out.sum().backward()
    return out.detach()


def test_second_module_loads_through_the_alias_without_capturing(monkeypatch):
    import aotcache
    from aotcache.autograd_cache import pipeline

    cache = fresh_cache()
    expected = train_step(make_block(), X)
    cold = aotcache.aot_module(make_block(), cache=cache)
    assert torch.allclose(train_step(cold, X), expected)
    assert cache.counters["fingerprint_miss"] == 1 and cache.counters["saved"] == 1

    def no_capture(*args, **kwargs):
        raise AssertionError("a fingerprint hit must not capture")

    monkeypatch.setattr(pipeline, "capture", no_capture)
    warm_model = make_block()
    warm = aotcache.aot_module(warm_model, cache=cache)
    assert torch.allclose(train_step(warm, X), expected)
    assert cache.counters["fingerprint_hit"] == 1 and cache.counters["hit"] == 1
    assert warm_model.linear.weight.grad is not None  # gradients reach the parameters


def test_corrupt_alias_record_is_deleted_and_the_full_path_runs():
    import aotcache
    from aotcache.autograd_cache.fingerprint_cache import alias_store_key, fingerprint_of

    cache = fresh_cache()
    compiled = aotcache.aot_module(make_block(), cache=cache)
    params, buffers = dict(compiled.orig_module.named_parameters()), dict(compiled.orig_module.named_buffers())
    flat, spec = pytree.tree_flatten(((params, buffers, X), {}))
    store_key = alias_store_key(fingerprint_of(compiled.compiled, flat, spec))
    cache.tiers.insert(store_key, b"{not json")
    expected = train_step(make_block(), X)
    assert torch.allclose(train_step(compiled, X), expected)
    assert cache.counters["load_error"] == 1 and cache.counters["fingerprint_miss"] == 1
    assert json.loads(bytes(cache.tiers.get(store_key)))["schema"] == 1  # rewritten by the full path


def test_untrusted_call_is_counted_and_still_cached():
    import aotcache

    cache = fresh_cache()
    block = make_block()
    block.handle = threading.Event()
    compiled = aotcache.aot_module(block, cache=cache)
    assert torch.allclose(train_step(compiled, X), train_step(make_block(), X))
    assert cache.counters["fingerprint_fallback"] == 1 and cache.counters["saved"] == 1


def test_alias_of_an_evicted_entry_is_a_miss_then_recompiles():
    import aotcache

    cache = fresh_cache()
    train_step(aotcache.aot_module(make_block(), cache=cache), X)
    assert cache.clear() == 1  # entries go; the alias record stays (derived data, now stale)
    other = fresh_cache()
    assert torch.allclose(train_step(aotcache.aot_module(make_block(), cache=other), X), train_step(make_block(), X))
    assert other.counters["fingerprint_miss"] == 1 and other.counters["miss"] == 1 and other.counters["saved"] == 1


# --------------------------------------------------------------------------------------------------------
# Issue 13 item 6: an LSTM never got the fast warm path (its fingerprint was untrusted)
# --------------------------------------------------------------------------------------------------------

LSTM_STEP = """
import json, sys, torch
from aotcache.aot import aot_module
from aotcache.autograd_cache.cache import default_cache

class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out).logsumexp(-1).mean()

torch.manual_seed(0)
model = Tagger()
loss = aot_module(model, "nop")(torch.randn(2, 5, 8))
loss.backward()
counters = default_cache().counters
print(json.dumps({"loss": loss.item(), "grad": model.lstm.weight_hh_l0.grad.sum().item(),
                  **{name: counters.get(name, 0) for name in ("fingerprint_hit", "fingerprint_fallback", "compile")}}))
"""


def test_lstm_starts_warm_through_its_fingerprint(tmp_path):
    """nn.RNNBase holds weakrefs to its parameters (opaque, so the fingerprint was never trusted), and a
    capture left traced tensors in its weight cache."""
    cold = json.loads(run_python(LSTM_STEP).stdout.strip().splitlines()[-1])
    warm = json.loads(run_python(LSTM_STEP).stdout.strip().splitlines()[-1])
    assert cold["compile"] == 1 and cold["fingerprint_fallback"] == 0
    assert warm["fingerprint_hit"] == 1 and warm["compile"] == 0 and warm["fingerprint_fallback"] == 0
    assert warm["loss"] == cold["loss"] and warm["grad"] == cold["grad"]


def test_a_capture_leaves_the_lstm_weight_cache_as_it_found_it():
    from aotcache.aot import aot_module

    lstm = nn.LSTM(4, 3)
    compiled = aot_module(lstm, "nop", cache=False)
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(compiled(x)[0], lstm(x)[0])
    assert all(weight is getattr(lstm, name) for weight, name in zip(lstm._flat_weights, lstm._flat_weights_names))
    params, buffers = dict(lstm.named_parameters()), dict(lstm.named_buffers())
    flat, spec = pytree.tree_flatten(((params, buffers, x), {}))
    assert fingerprint_module_call(lstm, flat, spec, AOTOptions()).trusted


def test_weak_references_read_as_their_referent():
    target = nn.Linear(2, 2)
    other = nn.Linear(2, 3)
    import weakref

    def make(ref):
        def fn(x):
            return ref()(x)
        return fn

    x = torch.randn(1, 2)
    flat, spec = pytree.tree_flatten(((x,), {}))
    first = fingerprint_call(make(weakref.ref(target)), flat, spec, AOTOptions())
    again = fingerprint_call(make(weakref.ref(target)), flat, spec, AOTOptions())
    changed = fingerprint_call(make(weakref.ref(other)), flat, spec, AOTOptions())
    assert first.trusted and first.digest == again.digest and changed.digest != first.digest


def test_a_hook_handle_kept_as_an_attribute_is_trusted_and_the_hook_still_counts():
    # found by the sweep: transformers' gradient_checkpointing_enable() keeps the RemovableHandle of a forward
    # hook as model._require_grads_hook, which made every warm start of such a model trace again
    block = make_block()
    plain = trusted(module_fingerprint(block, X))
    block.linear._hook_handle = block.linear.register_forward_hook(lambda module, args, out: out * 2)
    hooked = trusted(module_fingerprint(block, X))
    assert hooked != plain  # the hook itself is part of the fingerprint
    block.linear._hook_handle.remove()
    assert trusted(module_fingerprint(block, X)) != hooked


def test_a_weak_reference_is_written_down_as_its_referent():
    # found by the sweep: nn.LSTM keeps weakrefs to its weights (_flat_weight_refs), so every LSTM model's
    # fingerprint was untrusted ("opaque object: weakref.ReferenceType") and warm starts traced again
    import weakref

    torch.manual_seed(0)
    lstm = nn.LSTM(4, 8, batch_first=True)
    x = torch.randn(2, 3, 4)
    trusted(module_fingerprint(lstm, x))

    class Keeps(Block):
        def forward(self, x):
            target = self.ref()
            return super().forward(x) if target is None else target(x)

    block = Keeps()
    first, second = nn.Linear(4, 4), nn.Tanh()
    block.ref = weakref.ref(first)
    to_first = trusted(module_fingerprint(block, X))
    block.ref = weakref.ref(second)
    assert trusted(module_fingerprint(block, X)) != to_first
    block.ref = weakref.ref(first)
    assert trusted(module_fingerprint(block, X)) == to_first
