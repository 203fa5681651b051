"""The call hot path (NOTE [Call hot path] in aot/call_hot_path.py): calls with keyword arguments and cache objects,
as transformers' decoding steps make them, reuse a recorded call's graph only where the full signature would.

Each test runs a decoding-like loop (a DynamicCache updated in place, keyword arguments), then changes one thing the
signature, the guards or the module state cover and checks that the call leaves the hot path (the full path runs:
``full_path`` counts it, and a retrace where one is due) and that the result is eager's; and that an unchanged call
stays on the hot path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aotcache.aot import aot_function, aot_module
from aotcache.aot.api import AOTFunction
from aotcache.aot.cache_objects import _flatten, register_transformers_caches, structure_step

transformers = pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer, EncoderDecoderCache  # noqa: E402


def graph_compiler(gm, example_inputs):
    return gm


class ToyDecoder(nn.Module):
    """A decoder step: projects ``x``, appends it to a KV cache in place (as transformers' attention does) and attends
    over the whole cache; ``position`` (an int) and ``use_cache`` (a bool) are keyword constants."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.register_buffer("gain", torch.ones(8))

    def forward(self, x, cache=None, position=0, use_cache=True):
        h = self.proj(x) * self.gain
        keys, values = cache.update(h, h * 2, 0)
        out = torch.softmax(h @ keys.transpose(-1, -2), dim=-1) @ values + position
        return (out if use_cache else -out), cache


class FullPath:
    """Counts the calls that build the full signature (``AOTFunction._runtime_for``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = AOTFunction._runtime_for

        def counting(function, *args, **kwargs):
            self.count += 1
            return original(function, *args, **kwargs)

        monkeypatch.setattr(AOTFunction, "_runtime_for", counting)

    def taken(self, call):
        before = self.count
        result = call()
        return result, self.count - before


def step_input(step: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(1, 2, 1, 8, generator=torch.Generator().manual_seed(step)).to(dtype)


def warm(steps: int = 6):
    """An eager model, its compiled twin, and the caches of both after ``steps`` decoding steps."""
    register_transformers_caches()
    eager, compiled_model = ToyDecoder(), ToyDecoder()
    compiled = aot_module(compiled_model, graph_compiler, cache=False)
    eager_cache, cache = DynamicCache(), DynamicCache()
    with torch.no_grad():  # as generate() runs
        for step in range(steps):
            want, _ = eager(step_input(step), cache=eager_cache, position=3, use_cache=True)
            got, returned = compiled(step_input(step), cache=cache, position=3, use_cache=True)
            assert returned is cache
            torch.testing.assert_close(got, want)
    return eager, compiled, eager_cache, cache


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def test_decoding_steps_take_the_call_hot_path_and_give_eagers_results(monkeypatch):
    eager, compiled, eager_cache, cache = warm()
    full = FullPath(monkeypatch)
    traces = compiled.compiled.num_compiles
    for step in range(6, 12):
        want, _ = eager(step_input(step), cache=eager_cache, position=3, use_cache=True)
        (got, returned), taken = full.taken(lambda: compiled(step_input(step), cache=cache, position=3,
                                                              use_cache=True))
        assert taken == 0, f"step {step} built the full signature"
        assert returned is cache and cache.get_seq_length() == eager_cache.get_seq_length() == step + 1
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(cache.layers[0].keys, eager_cache.layers[0].keys)
    assert compiled.compiled.num_compiles == traces


def one_step(eager, compiled, eager_cache, cache, full, **changes):
    """One more step with ``changes`` to its keyword arguments (and ``x=...``); returns how often it took the
    full path, after checking the result against eager."""
    x = changes.pop("x", step_input(50))
    kwargs = dict(cache=cache, position=3, use_cache=True) | changes
    eager_kwargs = dict(kwargs, cache=eager_cache)
    want, _ = eager(x, **eager_kwargs)
    (got, _), taken = full.taken(lambda: compiled(x, **kwargs))
    torch.testing.assert_close(got, want)
    return taken


@pytest.mark.parametrize("change", ["position", "use_cache", "added", "removed", "reordered", "positional"])
def test_a_changed_keyword_leaves_the_hot_path(monkeypatch, change):
    eager, compiled, eager_cache, cache = warm()
    full = FullPath(monkeypatch)
    x = step_input(40)
    if change == "position":  # an int constant: another value is another signature (or a symbol's guards)
        taken = one_step(eager, compiled, eager_cache, cache, full, position=4)
    elif change == "use_cache":  # a bool constant: never a symbol
        traces = compiled.compiled.num_compiles
        taken = one_step(eager, compiled, eager_cache, cache, full, use_cache=False)
        assert compiled.compiled.num_compiles == traces + 1
    elif change == "added":
        taken = one_step(eager, compiled, eager_cache, cache, full, x=x)  # unchanged: the hot path
        assert taken == 0
        want, _ = eager(x, cache=eager_cache, position=3, use_cache=True)
        (got, _), taken = full.taken(lambda: compiled(x, cache=cache, position=3, use_cache=True, **{}))
        assert taken == 0
        torch.testing.assert_close(got, want)
        want, _ = eager(x, cache=eager_cache)  # keywords left to their defaults: another structure
        (got, _), taken = full.taken(lambda: compiled(x, cache=cache))
        torch.testing.assert_close(got, want)
    elif change == "removed":
        want, _ = eager(x, cache=eager_cache, position=3)
        (got, _), taken = full.taken(lambda: compiled(x, cache=cache, position=3))
        torch.testing.assert_close(got, want)
    elif change == "reordered":  # the kwargs dict's order is part of its pytree structure
        want, _ = eager(x, use_cache=True, position=3, cache=eager_cache)
        (got, _), taken = full.taken(lambda: compiled(x, use_cache=True, position=3, cache=cache))
        torch.testing.assert_close(got, want)
    else:  # the cache passed by position
        want, _ = eager(x, eager_cache, position=3, use_cache=True)
        (got, _), taken = full.taken(lambda: compiled(x, cache, position=3, use_cache=True))
        torch.testing.assert_close(got, want)
    assert taken == 1, change


@pytest.mark.parametrize("change", ["dtype", "requires_grad", "static_shape", "stride", "grad_mode", "autocast",
                                    "attribute"])
def test_a_changed_tensor_or_ambient_state_leaves_the_hot_path(monkeypatch, change):
    eager, compiled, eager_cache, cache = warm()
    full = FullPath(monkeypatch)
    x = step_input(41)
    context = torch.no_grad()
    if change == "dtype":
        x = x.double()
        eager.double(), compiled.double()
        for layer in (*eager_cache.layers, *cache.layers):
            layer.keys, layer.values = layer.keys.double(), layer.values.double()
    elif change == "requires_grad":
        x = x.requires_grad_()
    elif change == "static_shape":  # the batch of the step: static so far
        x = torch.randn(1, 2, 3, 8)
    elif change == "stride":
        x = torch.randn(1, 2, 8, 1).transpose(-1, -2)
    elif change == "grad_mode":
        context = torch.enable_grad()
    elif change == "autocast":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    elif change == "attribute":  # NOTE [Python attributes of tensor arguments]: the full path keys them
        x = x.clone()
        x.tag = "another graph"
    with context:
        taken = one_step(eager, compiled, eager_cache, cache, full, x=x)
    assert taken == 1, change


def test_a_cache_of_another_type_or_length_leaves_the_hot_path(monkeypatch):
    eager, compiled, eager_cache, cache = warm()
    full = FullPath(monkeypatch)
    # another layer count: the cache's context (its structure) differs
    two_layers, eager_two = copy.deepcopy(cache), copy.deepcopy(eager_cache)
    for c in (two_layers, eager_two):
        c.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 1)
    assert one_step(eager, compiled, eager_two, two_layers, full) == 1
    # another layer class in the same place (a sliding-window layer)
    sliding, eager_sliding = copy.deepcopy(cache), copy.deepcopy(eager_cache)
    for c in (sliding, eager_sliding):
        layer = DynamicSlidingWindowLayer(sliding_window=64)
        layer.lazy_initialization(c.layers[0].keys, c.layers[0].values)
        layer.keys, layer.values = c.layers[0].keys.clone(), c.layers[0].values.clone()
        layer.cumulative_length = c.layers[0].keys.shape[-2]
        c.layers[0] = layer
    assert one_step(eager, compiled, eager_sliding, sliding, full) == 1
    # a flag of the cache changed in place: 1.0 where True was (the context's == finds them equal, so the full
    # path reuses the graph; the hot path compares the type too and leaves it to the full path)
    flagged, eager_flagged = copy.deepcopy(cache), copy.deepcopy(eager_cache)
    flagged.layers[0].is_initialized = eager_flagged.layers[0].is_initialized = 1.0
    assert one_step(eager, compiled, eager_flagged, flagged, full) == 1
    # an unchanged cache again: the hot path
    assert one_step(eager, compiled, eager_cache, cache, full) == 0


def test_another_cache_class_of_the_same_tensors_leaves_the_hot_path(monkeypatch):
    eager, compiled, eager_cache, cache = warm()
    full = FullPath(monkeypatch)
    assert one_step(eager, compiled, eager_cache, cache, full) == 0
    # an EncoderDecoderCache holding the same layers: eager's forward fails on it (no update()); a graph recorded
    # for the DynamicCache would have returned a result
    with pytest.raises(AttributeError):
        eager(step_input(53), cache=EncoderDecoderCache(copy.deepcopy(cache), DynamicCache()), position=3)
    with pytest.raises(AttributeError):
        compiled(step_input(53), cache=EncoderDecoderCache(copy.deepcopy(cache), DynamicCache()), position=3)
    assert full.count == 1


@pytest.mark.parametrize("change", ["eval", "buffer", "requires_grad", "param_data", "hook"])
def test_module_state_changed_in_place_between_calls_leaves_the_hot_path(monkeypatch, change):
    eager, compiled, eager_cache, cache = warm()
    full = FullPath(monkeypatch)
    inner = compiled.orig_module
    if change == "eval":
        eager.eval(), compiled.eval()
    elif change == "buffer":  # a buffer replaced (values differ: the result tells a stale graph)
        eager.gain = torch.full((8,), 2.0)
        inner.gain = torch.full((8,), 2.0)
    elif change == "requires_grad":
        for model in (eager, inner):
            model.proj.weight.requires_grad_(False)
    elif change == "param_data":  # the same Parameter object, other data and layout
        for model in (eager, inner):
            model.proj.weight.data = model.proj.weight.data.t().contiguous().t()
    elif change == "hook":
        for model in (eager, inner):
            model.proj.register_forward_hook(lambda module, args, out: out * 3)
    taken = one_step(eager, compiled, eager_cache, cache, full)
    if change == "buffer":  # a tensor input: its new values are read by the same graph, on the hot path
        assert taken == 0
    else:
        assert taken == 1, change
    # new settings or signatures start over with static then dynamic sizes (NOTE [Dynamic dimensions]); then every
    # step is reused
    one_step(eager, compiled, eager_cache, cache, full)
    assert one_step(eager, compiled, eager_cache, cache, full) == 0


def test_a_static_argument_at_another_storage_offset_is_checked_by_the_full_guards(monkeypatch):
    # NOTE [Guards left to check when inputs are pinned]: a dynamic graph's guards name every static input's offset
    eager, compiled, eager_cache, cache = warm()
    full = FullPath(monkeypatch)
    x = torch.randn(2 * 8 + 3)[3:].view(1, 2, 1, 8)  # offset 3, the step's usual sizes and strides
    assert x.storage_offset() == 3 and x.stride() == step_input(0).stride()
    assert one_step(eager, compiled, eager_cache, cache, full, x=x) == 1
    assert one_step(eager, compiled, eager_cache, cache, full, x=x.clone()) == 0


def test_the_first_steps_graphs_serve_their_own_sizes_after_the_dynamic_one(monkeypatch):
    # a record of the dynamic graph matches a cache of one token too, but its guards specialize sizes 0 and 1:
    # the static graph of that size serves it (never the dynamic one, never a new trace)
    register_transformers_caches()
    eager, compiled = ToyDecoder(), aot_module(ToyDecoder(), graph_compiler, cache=False)
    full = FullPath(monkeypatch)
    for round_ in range(3):
        eager_cache, cache = DynamicCache(), DynamicCache()
        taken = 0
        for step in range(5):
            want, _ = eager(step_input(step), cache=eager_cache, position=3)
            (got, _), took = full.taken(lambda: compiled(step_input(step), cache=cache, position=3))
            taken += took
            torch.testing.assert_close(got, want)
        if round_:
            assert taken == 0, round_  # every size has its graph and its record
    assert compiled.compiled.num_compiles <= 3


def test_a_pytree_node_registered_later_leaves_the_hot_path(monkeypatch):
    from torch.utils import _pytree as pytree

    class Box:
        def __init__(self, value):
            self.value = value

    eager, compiled, eager_cache, cache = warm()
    full = FullPath(monkeypatch)
    assert one_step(eager, compiled, eager_cache, cache, full) == 0
    pytree.register_pytree_node(Box, lambda box: ([box.value], None), lambda values, _: Box(values[0]))
    try:
        assert one_step(eager, compiled, eager_cache, cache, full) == 1
        assert one_step(eager, compiled, eager_cache, cache, full) == 0
    finally:
        pytree._deregister_pytree_node(Box)


def test_structure_step_accepts_exactly_what_flattens_to_the_context():
    register_transformers_caches()
    cache = DynamicCache()
    cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 0)
    leaves, context = _flatten(cache)
    step = structure_step(context)
    out: list = []
    assert step(cache, out) and len(out) == len(leaves) and all(a is b for a, b in zip(out, leaves))
    other = copy.deepcopy(cache)
    other.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 1)  # a second layer
    assert not step(other, [])
    flag = copy.deepcopy(cache)
    flag.offloading = 0  # == False, another type: refused (stricter than the context's ==)
    assert not step(flag, [])
    extra = copy.deepcopy(cache)
    extra.layers[0].note = "x"  # an attribute added
    assert not step(extra, [])
    assert _flatten(extra)[1] != context
    counted = EncoderDecoderCache(copy.deepcopy(cache), DynamicCache())
    leaves, context = _flatten(counted)
    out = []
    assert structure_step(context)(counted, out) and [type(v) for v in out] == [type(v) for v in leaves]


def _weighs_keys_by_type(x, d):
    """Adds each value of ``d`` weighted by its key's type (eager tells ``{1: v}``, ``{True: v}`` and ``{1.0: v}``
    apart, though the three dicts are equal)."""
    out = x
    for key, value in d.items():
        out = out + value * (2.0 if type(key) is bool else 3.0 if type(key) is float else 1.0)
    return out


@pytest.mark.parametrize("container", [dict, __import__("collections").OrderedDict])
@pytest.mark.parametrize("as_keyword", [True, False])
def test_dict_keys_equal_across_types_select_their_own_graph(container, as_keyword):
    # NOTE [Dict keys equal across types]: ``{True: v} == {1: v}`` with equal hashes, so their TreeSpecs were equal
    # and a call with one ran the graph traced for the other (on the full path and on the call hot path)
    compiled = aot_function(lambda x, d: _weighs_keys_by_type(x, d), graph_compiler, cache=False)
    x = torch.ones(2)
    for key in (1, 1, True, 1.0, True, 1, "a", 1.0):
        d = container([(key, torch.ones(2)), ("b", torch.ones(2))])
        got = compiled(x, d=d) if as_keyword else compiled(x, d)
        torch.testing.assert_close(got, _weighs_keys_by_type(x, d), msg=f"key {key!r}")
    assert compiled.num_compiles == 4  # int, bool, float and str keys: a graph each; the repeats reuse theirs


def test_dicts_of_str_keys_keep_the_signature_they_had():
    from torch.utils import _pytree as pytree

    from aotcache.aot.signature import dict_key_types

    assert dict_key_types(pytree.tree_flatten(((torch.ones(1),), {"a": 1, "b": {"c": torch.ones(1)}}))[1]) == ()
    spec = pytree.tree_flatten(((torch.ones(1),), {"a": {True: torch.ones(1), 2: 3}}))[1]
    assert dict_key_types(spec) == ((4, (bool, int)),)  # (root, args, kwargs, then the dict)
