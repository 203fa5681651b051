"""The per-call hot path (NOTE [Hot path]): it must select exactly the runtime the full signature selects.

Each test changes one thing between calls that the signature covers and checks the result against eager
(and, where a retrace is due, the compile count), so a hot path that matched too eagerly fails here.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn

from aotcache.aot import aot_function, aot_module, hot_path
from aotcache.aot.exact_values import exact_value
from aotcache.aot.hot_path import HotSignature, ModuleState


def graph_compiler(gm, example_inputs):
    return gm


def counted(fn):
    compiled = aot_function(fn, graph_compiler, cache=False)
    return compiled


def test_repeated_calls_take_the_hot_path_without_retracing():
    compiled = counted(lambda x, y: x * y + 1)
    x, y = torch.randn(3), torch.randn(3)
    for _ in range(5):
        torch.testing.assert_close(compiled(x, y), x * y + 1)
    assert compiled.num_compiles == 1
    assert compiled._hot.find(2, (x, y)) is not None


@pytest.mark.parametrize("change", ["dtype", "shape", "stride", "requires_grad", "grad_mode",
                                    "leafness", "aliasing", "autocast"])
def test_each_signature_field_change_leaves_the_hot_path(change):
    def fn(x, y):
        return x.sin() * y.cos()

    compiled = counted(fn)
    base = torch.randn(8, 8)
    x, y = base[:4].clone(), base[4:].clone()
    compiled(x, y)
    compiled(x, y)
    assert compiled.num_compiles == 1
    grad_mode = torch.enable_grad()
    if change == "dtype":
        x = x.double()
        y = y.double()
    elif change == "shape":
        x, y = torch.randn(5, 8), torch.randn(5, 8)
    elif change == "stride":
        x = torch.randn(8, 4).t()
    elif change == "requires_grad":
        x = x.clone().requires_grad_()
    elif change == "grad_mode":
        x = x.clone().requires_grad_()
        compiled(x, y)  # a grad-mode signature first, so that no_grad is the change
        grad_mode = torch.no_grad()
    elif change == "leafness":
        leaf = x.clone().requires_grad_()
        compiled(leaf, y)
        x = leaf * 1  # same metadata, not a leaf
    elif change == "aliasing":
        y = x  # the same storage twice
    before = compiled.num_compiles
    if change == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = compiled(x, y)
            want = fn(x, y)
    else:
        with grad_mode:
            got = compiled(x, y)
            want = fn(x, y)
    assert compiled.num_compiles == before + 1, f"{change}: the changed call reused a runtime"
    torch.testing.assert_close(got, want)


def test_another_aligned_storage_offset_reuses_the_runtime_on_the_hot_path():
    """NOTE [Storage offsets are not part of the signature]: batches sliced from one tensor (X[i:i + 4]) traced
    a new graph at every step."""
    compiled = counted(lambda x, y: x.sin() * y)
    data, y = torch.randn(64, 8), torch.randn(4, 8)
    for start in range(0, 64, 4):
        torch.testing.assert_close(compiled(data[start:start + 4], y), data[start:start + 4].sin() * y)
        assert compiled.num_compiles == 1
    hot = compiled._hot.find(2, (data[8:12], y))
    assert hot is not None and hot.runtime.input_offsets is None


@pytest.mark.parametrize("hot", [True, False])
def test_misaligned_storage_offsets_reuse_the_graph(hot):
    """NOTE [Storage offsets are not part of the signature]: a 0-d timestep taken from ``timesteps[i]`` (int64:
    every other one 16-byte aligned) used two graphs where torch.compile uses one; alignment is the compiled
    graph's business (NOTE [Misaligned inputs]). ``hot=False`` passes a constant, so the full signature decides."""
    def fn(x, t, scale=2.0):
        return x * t * scale

    compiled = counted(fn)
    timesteps, x = torch.arange(80, 0, -10), torch.randn(4, 4)
    kwargs = {} if hot else {"scale": 3.0}
    for i in range(len(timesteps)):
        t = timesteps[i]
        assert (t.storage_offset() * t.element_size() % 16 == 0) is (i % 2 == 0)
        torch.testing.assert_close(compiled(x, t, **kwargs), fn(x, t, **kwargs))
    assert compiled.num_compiles == 1
    data = torch.randn(65)  # float32 rows at offsets 1, 2, ...: no row aligned but the first
    for start in range(0, 8):
        got = compiled(data[start:start + 16].view(4, 4), timesteps[0], **kwargs)
        torch.testing.assert_close(got, fn(data[start:start + 16].view(4, 4), timesteps[0], **kwargs))
    assert compiled.num_compiles == 1


@pytest.mark.slow
def test_inductor_graph_reused_at_a_misaligned_offset_gives_eagers_result():
    """One Inductor compile serves aligned and misaligned inputs (NOTE [Misaligned inputs]); the compile at a
    misaligned offset first is covered by the loop starting at 1."""
    def fn(x, t):
        return (x * t).softmax(-1) + x.sum(0)

    compiled = aot_function(fn, "inductor", cache=False)
    data, timesteps = torch.randn(200), torch.arange(10.0, 0.0, -1.0, dtype=torch.float64)
    with torch.no_grad():
        for start in (1, 0, 4, 3, 2):
            x, t = data[start:start + 64].view(8, 8), timesteps[start]
            torch.testing.assert_close(compiled(x, t), fn(x, t))
    assert compiled.num_compiles == 1


def test_a_graph_that_depends_on_the_offset_is_reused_only_at_its_offsets():
    """An output that is a view of an input is regenerated with its absolute storage offset, and an
    as_strided call or a Python read of the offset bakes it in: such graphs keep their exact offsets."""
    def view_out(x):
        return x[1:], x.sum()

    def reads(x):
        return x * x.storage_offset()

    def strided(x):
        return x.as_strided((2, 2), (1, 2)) * 2

    data = torch.randn(64)
    for fn in (view_out, reads, strided):
        compiled = counted(fn)
        for start in (0, 8, 16, 8):
            x = data[start:start + 8]
            got, want = compiled(x), fn(x)
            torch.testing.assert_close(got, want)
        assert compiled.num_compiles == 3, fn.__name__
        out = compiled(data[16:24])
        if fn is view_out:
            assert out[0].data_ptr() == data[17:].data_ptr()


def test_alternating_signatures_stay_correct():
    compiled = counted(lambda x: x.cumsum(0))
    small, large = torch.randn(3), torch.randn(6)
    for _ in range(3):
        torch.testing.assert_close(compiled(small), small.cumsum(0))
        torch.testing.assert_close(compiled(large), large.cumsum(0))
    assert compiled.num_compiles == 2


def test_dynamic_hot_path_still_checks_guards():
    compiled = aot_function(lambda x: x.reshape(2, -1).sum(1), graph_compiler, dynamic=True, cache=False)
    even = torch.randn(6)
    torch.testing.assert_close(compiled(even), even.reshape(2, -1).sum(1))
    other = torch.randn(10)
    torch.testing.assert_close(compiled(other), other.reshape(2, -1).sum(1))
    assert compiled.num_compiles == 1


def test_non_tensor_and_keyword_calls_take_the_full_path():
    compiled = counted(lambda x, k=2: x * k)
    x = torch.randn(3)
    torch.testing.assert_close(compiled(x, 3), x * 3)
    torch.testing.assert_close(compiled(x, 4), x * 4)
    torch.testing.assert_close(compiled(x, k=5), x * 5)
    assert compiled.num_compiles == 3


def test_hot_signature_rejects_each_field():
    x = torch.randn(2, 3)
    hot = HotSignature([x], dynamic=False, runtime=None)
    assert hot.matches([torch.randn(2, 3)])
    for other in (torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 2), torch.randn(3, 2).t(),
                  torch.randn(7)[1:].view(2, 3), torch.randn(2, 3, requires_grad=True)):
        assert not hot.matches([other])
    assert not hot.matches([x, x])
    assert not HotSignature.eligible([x, 3])


# -- aot_module: module state ----------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x)).relu()


def _replace_parameter(model):
    model.fc.weight = nn.Parameter(torch.randn(3, 4))


def _replace_in_dict(model):
    model.fc._parameters["bias"] = nn.Parameter(torch.randn(3))


def _replace_buffer(model):
    model.bn.running_mean = torch.randn(3)


def _swap_submodule(model):
    model.fc = nn.Linear(4, 3)


def _add_parameter(model):
    model.fc.weight = nn.Parameter(torch.randn(3, 4))
    model.bn.register_parameter("unused", nn.Parameter(torch.randn(1)))


def _to_double(model):
    model.double()


def _freeze(model):
    model.fc.weight.requires_grad_(False)


@pytest.mark.parametrize("mutate", [_replace_parameter, _replace_in_dict, _replace_buffer, _swap_submodule,
                                    _add_parameter, _to_double, _freeze])
def test_aot_module_sees_module_changes(mutate):
    torch.manual_seed(0)
    model = Net()
    compiled = aot_module(model, graph_compiler, cache=False)
    x = torch.randn(5, 4)
    compiled(x).sum().backward()
    compiled(x)
    mutate(model)
    reference = copy.deepcopy(model)
    if next(model.parameters()).dtype == torch.float64:
        x = x.double()
    got = compiled(x)
    want = reference(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)


def test_module_state_is_cached_while_unchanged():
    model = Net()
    state = ModuleState(model)
    first = state.current()
    assert state.current() is first
    model.fc.bias = nn.Parameter(torch.zeros(3))
    second = state.current()
    assert second is not first and second[0]["fc.bias"] is model.fc.bias
    assert second[2] is first[2]  # same names: same names object


def test_module_state_never_caches_custom_traversal():
    class Custom(Net):
        def named_parameters(self, *args, **kwargs):
            return super().named_parameters(*args, **kwargs)

    state = ModuleState(Custom())
    assert state.current() is not state.current()


# -- aot_module: module settings (NOTE [module settings]) -------------------------------------------------


class Regularized(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.scale = 2.0

    def forward(self, x):
        return self.bn(self.fc(x)) * self.scale


def test_eval_after_training_traces_again_and_train_reuses():
    torch.manual_seed(0)
    model = Regularized()
    compiled = aot_module(model, graph_compiler, cache=False)
    x = torch.randn(8, 4)
    compiled(x).sum().backward()
    model.eval()
    reference = copy.deepcopy(model)
    torch.testing.assert_close(compiled(x), reference(x))  # grad mode on, eval mode: running statistics
    assert compiled.compiled.num_compiles == 2
    model.train()
    compiled(x)
    assert compiled.compiled.num_compiles == 2  # the training runtime again, not a third trace


@pytest.mark.parametrize("change", ["attribute", "hook", "submodule_flag"])
def test_changed_settings_are_seen(change):
    torch.manual_seed(0)
    model = Regularized()
    compiled = aot_module(model, graph_compiler, cache=False)
    x = torch.randn(8, 4)
    compiled(x)
    compiled(x)
    if change == "attribute":
        model.scale = 3.0
    elif change == "hook":
        model.fc.register_forward_hook(lambda module, inputs, output: output + 1)
    else:
        model.bn.track_running_stats = False
    reference = copy.deepcopy(model)
    before = compiled.compiled.num_compiles
    torch.testing.assert_close(compiled(x), reference(x))
    assert compiled.compiled.num_compiles == before + 1


class _Config:
    def __init__(self):
        self.use_bias = True
        self.scale = 2.0


class ConfiguredBlock(nn.Module):
    """Submodules sharing one config object, as transformers models do."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        out = self.fc(x) * self.config.scale
        return out + 1 if self.config.use_bias else out


def test_config_attributes_set_in_place_are_settings():
    """NOTE [Config objects are settings]: ``model.config.use_cache = False`` used to reuse the old graph."""
    torch.manual_seed(0)
    config = _Config()
    model = nn.Sequential(ConfiguredBlock(config), ConfiguredBlock(config))
    compiled = aot_module(model, graph_compiler, cache=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), model(x))
    config.use_bias = False
    torch.testing.assert_close(compiled(x), model(x))
    config.scale = 0.5
    torch.testing.assert_close(compiled(x), model(x))
    assert compiled.compiled.num_compiles == 3
    config.use_bias, config.scale = True, 2.0
    torch.testing.assert_close(compiled(x), model(x))
    assert compiled.compiled.num_compiles == 3  # the first runtime again


def test_exact_value_tells_equal_values_of_other_types_or_bits_apart_at_every_depth():
    """NOTE [Plain values by type]: ``1 == 1.0 == True`` and ``0.0 == -0.0``, yet each traces another graph."""
    distinct = [1, 1.0, True, 0.0, -0.0, 1 + 0j, (1,), (1.0,), [1], [1.0], {"a": 1}, {"a": 1.0}, ((0.0,),),
                ((-0.0,),), [{"a": (1,)}], [{"a": (True,)}], "1", None, torch.float32, torch.float64]
    keys = [exact_value(value) for value in distinct]
    assert len(set(keys)) == len(keys)
    nan = float("nan")
    assert exact_value(float(repr(2.5))) == exact_value(2.5) and exact_value(nan) == exact_value(float("nan"))
    assert exact_value((int("7"), [float(repr(0.5))])) == exact_value((7, [0.5]))


def test_module_setting_of_another_type_selects_another_graph_and_back_reuses_the_first():
    model = Regularized()
    compiled = aot_module(model, graph_compiler, cache=False)
    x = torch.randn(8, 4)
    compiled(x)
    for scale in (2, 2.0, True, 2, True):  # int, float (the first), bool: three settings, each found again
        model.scale = scale
        torch.testing.assert_close(compiled(x), copy.deepcopy(model)(x))
    assert compiled.compiled.num_compiles == 3


# -- the bulk checks (NOTE [Static signatures in bulk], NOTE [Dict versions]) -------------------------------


def test_hot_signature_bulk_check_sees_leafness_and_sharing():
    leaf = torch.randn(2, 3, requires_grad=True)
    hot = HotSignature([leaf, torch.randn(4)], dynamic=False, runtime=None)
    assert hot.matches([torch.randn(2, 3, requires_grad=True), torch.randn(4)])
    assert not hot.matches([leaf * 1, torch.randn(4)])  # requires grad, not a leaf
    two = torch.randn(8)
    distinct = HotSignature([two[:4], torch.randn(4)], dynamic=False, runtime=None)
    assert not distinct.matches([two[:4], two[4:]])  # same storage now: another signature
    sharing = HotSignature([two[:4], two[4:]], dynamic=False, runtime=None)
    assert sharing.matches([two[:4], two[4:]]) and not sharing.matches([two[:4], torch.randn(8)[4:]])
    empty = HotSignature([torch.empty(0), torch.empty(0)], dynamic=False, runtime=None)
    assert empty.matches([torch.empty(0), torch.empty(0)])  # 0-pointers never share


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="dict version tags are probed; checked on 3.10-3.11")
def test_dict_version_fast_path_is_in_use_here():
    assert hot_path._dict_version is not None
    model = Net()
    state = ModuleState(model)
    state.current()
    assert state._versions is not None and state._versions.hold()


def test_module_state_after_a_write_that_changes_nothing():
    """A write that leaves the tree as it was (the method router pops and restores ``forward``) keeps the values;
    any real change after it is still seen."""
    model = Net()
    state = ModuleState(model)
    first = state.current()
    model.__dict__["forward"] = model.forward
    del model.__dict__["forward"]
    assert state.current() is first
    model.bn.momentum = 0.5
    assert state.current()[3] != first[3]
    model.bn.momentum = 0.1
    assert state.current()[3] == first[3]
    model.fc.weight = nn.Parameter(torch.randn(3, 4))
    assert state.current()[0]["fc.weight"] is model.fc.weight
    handle = model.fc.register_forward_pre_hook(lambda module, args: None)
    with_hook = state.current()[3]
    assert with_hook != first[3]
    handle.remove()
    assert state.current()[3] == first[3]


OFFSET_SCRIPT = """
import json, sys, torch
import aotcache
from aotcache.autograd_cache.cache import default_cache

start = int(open(sys.argv[1] + '/start').read())
x = torch.arange(64.0)[start:start + 8]
view = aotcache.aot_function(lambda t: (t[1:], t.sum()), "nop")(x)[0]
plain = aotcache.aot_function(lambda t: t * 2, "nop")(x)
print(json.dumps({"view": view.tolist(), "view_offset": view.storage_offset(), "plain": plain.tolist(),
                  **default_cache().stats(), **default_cache().counters}))
"""


def test_a_stored_graph_that_depends_on_the_offset_is_not_loaded_at_another_offset(tmp_path):
    """NOTE [Storage offsets are not part of the signature] across processes: the cache key keeps the exact
    offset, so a graph regenerating a view of its input at offset 1 is not loaded for a call at offset 8
    (it would return a view at offset 1 of another slice); the same offset loads again."""
    from tests.aot.test_stale import _run

    outs = []
    for start in (0, 8, 0):
        (tmp_path / "start").write_text(str(start))
        outs.append(_run(tmp_path, OFFSET_SCRIPT))
    for start, out in zip((0, 8, 0), outs):
        assert out["view"] == [float(v) for v in range(start + 1, start + 8)] and out["view_offset"] == start + 1
        assert out["plain"] == [2.0 * v for v in range(start, start + 8)]
    assert outs[1]["compile"] == 2 and outs[2]["compile"] == 0 and outs[2]["hit"] == 2


@pytest.mark.parametrize("dynamic", [False, True])
def test_views_of_inputs_at_other_offsets_equal_eager_with_gradients(dynamic):
    """Outputs that are views of an input (through decompositions: unfold, diagonal, as_strided, view_as_real,
    a dtype view, unbind) called at other aligned offsets: values, storage offsets, strides and gradients
    equal eager's; a graph whose outputs are not views of an input is reused at every offset."""
    data = torch.randn(256)
    cases = {
        "slice": (lambda x: x[1:], True), "unfold": (lambda x: x.flatten().unfold(0, 4, 2), True),
        "diagonal": (lambda x: x.diagonal(), True), "as_strided": (lambda x: x.as_strided((2, 2), (1, 2)), True),
        "unbind": (lambda x: x.unbind(1), True), "expand": (lambda x: x[:1].expand(3, 4), True),
        "unfold_sum": (lambda x: x.flatten().unfold(0, 4, 2).sum(0), False),
        "diagonal_exp": (lambda x: x.diagonal().exp(), False),
    }
    for name, (fn, views) in cases.items():
        compiled = aot_function(fn, graph_compiler, cache=False, dynamic=dynamic)
        for start in (0, 8, 16, 8):
            x = data.clone()[start:start + 16].view(4, 4).detach().requires_grad_()
            ref = data.clone()[start:start + 16].view(4, 4).detach().requires_grad_()
            got, want = compiled(x), fn(ref)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            for g, w in zip(got, want):
                assert torch.equal(g, w) and g.stride() == w.stride(), name
                assert g.storage_offset() == w.storage_offset(), name
            sum(g.sum() for g in got).backward()
            sum(w.sum() for w in want).backward()
            torch.testing.assert_close(x.grad, ref.grad)
        if not views and not dynamic:
            assert compiled.num_compiles == 1, name


@pytest.mark.slow
def test_inductor_graph_reading_views_of_its_input_is_right_at_other_aligned_offsets():
    """Inductor addresses a view of a graph input (``reinterpret_tensor`` for the extern mm of ``x[1:]``)
    relative to the input, so the graph reused at another aligned offset reads the new slice."""
    def fn(x, w):
        return x[1:] @ w, (x[1:] * 2).sum(0), x.t().contiguous()

    compiled = aot_function(fn, "inductor", cache=False)
    data, w = torch.randn(512), torch.randn(8, 8)
    with torch.no_grad():
        for start in (0, 64, 128, 64):
            x = data[start:start + 64].view(8, 8)
            for got, want in zip(compiled(x, w), fn(x, w)):
                torch.testing.assert_close(got, want)
    assert compiled.num_compiles == 1


def test_settings_table_of_a_module_rebinding_an_attribute_at_every_call_stays_bounded(monkeypatch):
    """A loop that rebinds a module attribute at every call (``model.tag = object()``) kept every value alive and
    grew the interned settings without bound; past MAX_SETTINGS the table starts over, and a settings number is
    never handed out twice (an old graph is never selected by a new object that reuses an old id)."""
    monkeypatch.setattr(hot_path, "MAX_SETTINGS", 4)
    model = nn.Linear(3, 3)
    state = ModuleState(model)
    ids = []
    for _ in range(11):
        model.tag = object()
        ids.append(state.current()[3])
        assert len(state._settings_ids) <= 4 and len(state._kept_alive) <= 4
    assert len(set(ids)) == len(ids)
    model.tag = None
    first = state.current()[3]
    assert state.current()[3] == first not in ids  # a plain value: one number while it holds


def test_wrapper_of_a_module_whose_attribute_changes_every_call_gives_eagers_results(monkeypatch):
    monkeypatch.setattr(hot_path, "MAX_SETTINGS", 3)
    model = nn.Linear(3, 3)
    wrapped = aot_module(model, "nop", cache=False)
    x = torch.randn(2, 3)
    for step in range(8):
        model.tag = object()
        with torch.no_grad():
            model.weight.mul_(0.5)
        torch.testing.assert_close(wrapped(x), model(x))
    assert len(wrapped._state._kept_alive) <= 3


def test_mixed_signature_checks_static_and_dynamic_arguments_apart():
    # NOTE [Mixed signatures]: the static arguments in bulk (exact sizes and strides), the dynamic ones outside
    # their dynamic dimensions only
    weight, cache = torch.randn(4, 8), torch.randn(1, 2, 5, 8)
    graph = types.SimpleNamespace(input_offsets=None)  # a graph whose result does not depend on offsets
    hot = HotSignature([weight, cache], dynamic=((), (2,)), runtime=graph)
    assert hot._mixed is not None
    assert hot.matches([torch.randn(4, 8), torch.randn(1, 2, 9, 8)])  # the dynamic dimension grew
    assert not hot.matches([torch.randn(4, 9), torch.randn(1, 2, 9, 8)])  # a static size
    assert not hot.matches([torch.randn(8, 4).t(), torch.randn(1, 2, 9, 8)])  # a static stride
    assert not hot.matches([torch.randn(4, 8), torch.randn(1, 3, 9, 8)])  # a size outside the dynamic dimension
    assert not hot.matches([torch.randn(4, 8), torch.randn(2, 9, 8)])  # a rank
    assert not hot.matches([torch.randn(4, 8).double(), torch.randn(1, 2, 9, 8)])
    assert not hot.matches([torch.randn(4, 8), torch.randn(1, 2, 9, 8).double()])
    assert not hot.matches([torch.randn(4, 8), torch.randn(1, 2, 9, 8, requires_grad=True)])
    shared = torch.randn(4, 8)
    assert not hot.matches([shared, shared.view(1, 2, 2, 8)])  # memory sharing
    offset = torch.randn(40)[8:].view(4, 8)
    assert hot.matches([offset, torch.randn(1, 2, 9, 8)])  # an offset: not part of the signature ...
    assert hot.pin_offsets()
    assert not hot.matches([offset, torch.randn(1, 2, 9, 8)])  # ... unless pinned for a call record's guards


GAIN = 2.0
TABLE = {"shift": 1.0}


class ReadsGlobals(nn.Module):
    def forward(self, x):
        return x * GAIN + TABLE["shift"]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="dict version tags are probed; checked on 3.10-3.11")
def test_program_guards_see_writes_after_keeping_the_dict_tags():
    # NOTE [Program guards of unwritten dicts]: a global rebound, a dict entry set in place, after the tags were kept
    global GAIN
    compiled = aot_module(ReadsGlobals(), graph_compiler, cache=False)
    x = torch.randn(3)
    for _ in range(3):
        torch.testing.assert_close(compiled(x), x * GAIN + TABLE["shift"])
    (program, _), = compiled.compiled._programs.values()
    assert program.guards._tags is not None and program.guards._tagged
    try:
        GAIN = 3.0
        torch.testing.assert_close(compiled(x), x * 3.0 + TABLE["shift"])
        torch.testing.assert_close(compiled(x), x * 3.0 + TABLE["shift"])
        TABLE["shift"] = 5.0
        torch.testing.assert_close(compiled(x), x * 3.0 + 5.0)
        TABLE["extra"] = 0.0  # a new entry: the dict's length and keys
        torch.testing.assert_close(compiled(x), x * 3.0 + 5.0)
    finally:
        GAIN, TABLE["shift"] = 2.0, 1.0
        TABLE.pop("extra", None)
    torch.testing.assert_close(compiled(x), x * 2.0 + 1.0)
    assert compiled.compiled.num_program_walks >= 4
