"""transformers' KV-cache objects as arguments and outputs of compiled calls (NOTE [Cache objects as pytree
nodes]): greedy decoding with a cache equals eager and is cached, caches passed in are updated in place, T5
training with its default config (an EncoderDecoderCache output) is cached."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils import _pytree as pytree

from aotcache import config
from aotcache.aot import aot_module
from aotcache.aot.cache_objects import register_transformers_caches
from aotcache.autograd_cache.cache import AOTAutogradCache
from aotcache.store.memory import InMemoryCache
from aotcache.store.tiered import TieredCache
from tests.aot.tiny_transformers import tiny_llama, tiny_t5

transformers = pytest.importorskip("transformers")


def memory_cache() -> AOTAutogradCache:
    return AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)


def cache_of(out):
    """The KV cache of a model output: ``cache`` in transformers >= 5.25, ``past_key_values`` before (5.17)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def cache_keyword(model) -> str:
    """The forward's KV-cache keyword: renamed from ``past_key_values`` to ``cache`` after transformers 5.17."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prompt():
    return torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(0))


def test_greedy_kv_cache_generate_equals_eager_and_is_cached():
    model = tiny_llama()
    expected = model.generate(prompt(), max_new_tokens=4, do_sample=False)  # use_cache=True (the default)
    cache = memory_cache()
    got = aot_module(model, cache=cache, dynamic=False).generate(prompt(), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    assert cache.counters["saved"] == 4 and cache.counters["bypass"] == 0  # prefill + 3 steps, all stored
    again = aot_module(model, cache=cache, dynamic=False)  # a new wrapper (as in a new process): loads
    assert torch.equal(again.generate(prompt(), max_new_tokens=4, do_sample=False), expected)
    assert cache.counters["hit"] == 4 and cache.counters["compile"] == 4


def test_a_cache_passed_back_in_is_updated_in_place_as_eagerly():
    model = tiny_llama()
    wrapped = aot_module(model, cache=False)
    ids = prompt()
    keyword = cache_keyword(model)

    def decode(call):
        kv = transformers.DynamicCache(config=model.config)
        out = call(input_ids=ids, **{keyword: kv}, use_cache=True)
        assert cache_of(out) is kv  # the object passed in comes back, updated
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(3):  # the loop keeps passing the same object
            out = call(input_ids=tokens[-1], **{keyword: kv}, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(tokens, dim=1), kv.get_seq_length(), out.logits

    got, got_length, got_logits = decode(wrapped)
    expected, expected_length, expected_logits = decode(model)
    assert torch.equal(got, expected) and got_length == expected_length == 8
    torch.testing.assert_close(got_logits, expected_logits)


def test_t5_training_with_its_default_config_is_cached():
    model = tiny_t5().train()
    reference = tiny_t5().train()
    assert model.config.use_cache  # its forward returns an EncoderDecoderCache
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    cache = memory_cache()
    out = aot_module(model, cache=cache)(input_ids=ids, labels=ids)
    ref = reference(input_ids=ids, labels=ids)
    assert isinstance(cache_of(out), transformers.EncoderDecoderCache)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(model.shared.weight.grad, reference.shared.weight.grad)
    torch.testing.assert_close(cache_of(out).self_attention_cache.layers[1].keys,
                               cache_of(ref).self_attention_cache.layers[1].keys)
    assert cache.counters["saved"] == 1 and cache.counters["bypass"] == 0


def test_the_layer_structure_is_part_of_the_spec_and_survives_json():
    tiny_llama()  # imports transformers' cache module
    register_transformers_caches()
    full = transformers.DynamicCache()
    full.update(torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)
    sliding_model = tiny_llama(sliding_window=2, layer_types=["sliding_attention"] * 2)
    sliding = transformers.DynamicCache(config=sliding_model.config)
    leaves, spec = pytree.tree_flatten(full)
    assert len(leaves) == 2
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt) is transformers.DynamicCache and rebuilt is not full
    assert rebuilt.get_seq_length() == 3 and torch.equal(rebuilt.layers[0].values, leaves[1])
    assert pytree.tree_flatten(sliding)[1] != spec  # layer classes / sliding window differ: another signature
    assert pytree.treespec_loads(pytree.treespec_dumps(spec)) == spec


def test_an_attribute_that_cannot_be_in_a_signature_is_refused_naming_it():
    tiny_llama()
    register_transformers_caches()
    kv = transformers.DynamicCache()
    kv.something = object()
    with pytest.raises(TypeError, match=r"DynamicCache.something is a builtins.object"):
        pytree.tree_flatten(kv)


def test_kv_cache_decoding_with_automatic_dynamic_shapes_compiles_the_length_once():
    model = tiny_llama()
    expected = model.generate(prompt(), max_new_tokens=5, do_sample=False)
    wrapped = aot_module(model, cache=memory_cache())  # dynamic=None: the cache length becomes dynamic
    assert torch.equal(wrapped.generate(prompt(), max_new_tokens=5, do_sample=False), expected)
    assert wrapped.compiled.num_compiles <= 3  # prefill, first step, then one graph for every later length


def test_sliding_window_decoding_traces_the_token_count_as_a_symbol_not_a_graph_per_token():
    """NOTE [Cache integers]: a sliding-window layer counts its tokens in a Python int; each step used to be
    another signature (one capture per generated token)."""
    model = tiny_llama(sliding_window=3, layer_types=["sliding_attention"] * 2)
    for ids, steps in ((prompt(), 6), (prompt()[:, :2], 6)):  # window already full / filling up during decoding
        expected = model.generate(ids, max_new_tokens=steps, do_sample=False)
        wrapped = aot_module(model, cache=memory_cache())  # dynamic=None
        assert torch.equal(wrapped.generate(ids, max_new_tokens=steps, do_sample=False), expected)
        assert wrapped.compiled.num_compiles <= 4  # was one per token (6)


def test_cache_integers_are_leaves_and_come_back_as_plain_ints():
    from aotcache.aot.cache_objects import CacheInt

    model = tiny_llama(sliding_window=3, layer_types=["sliding_attention"] * 2)
    register_transformers_caches()
    kv = transformers.DynamicCache(config=model.config)
    kv.update(torch.zeros(1, 2, 5, 4), torch.ones(1, 2, 5, 4), 0)
    leaves, spec = pytree.tree_flatten(kv)
    counts = [leaf for leaf in leaves if not isinstance(leaf, torch.Tensor)]
    assert 5 in counts and all(type(leaf) is CacheInt for leaf in counts)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt.layers[0].cumulative_length) is int and rebuilt.get_seq_length() == 5
    assert pytree.tree_flatten(rebuilt)[1] == spec  # the count is a leaf, not part of the structure


CACHE_INT_BRANCHES = {
    "window_full": lambda x, n: x * 2 if n >= 4 else x[:, n:] * 3,
    "equal": lambda x, n: x * 2 if n == 7 else x - 1,
    "modulo": lambda x, n: x + 1 if n % 3 == 0 else x - 1,
    "slice": lambda x, n: x[:, -n:].sum(1) if n else x.sum(1),
    "window_mask": lambda x, n: torch.where(torch.arange(16) >= max(0, n - 3), x, 0.0),
    "half": lambda x, n: x[:, n // 2],
    "scaled": lambda x, n: x * float(n),
}


@pytest.mark.parametrize("dynamic", [False, True, None])
@pytest.mark.parametrize("name", sorted(CACHE_INT_BRANCHES))
def test_a_cache_integer_that_decides_the_result_gives_eager_results_for_every_value(name, dynamic):
    """NOTE [Cache integers]: a cache integer traced as a symbol turns the branches on it into guards (a window
    position choosing the mask); dynamic=False compares it by value. Every value gives eager's result."""
    from aotcache.aot import aot_function
    from aotcache.aot.cache_objects import CacheInt

    fn = CACHE_INT_BRANCHES[name]
    compiled = aot_function(fn, lambda gm, example_inputs: gm, cache=False, dynamic=dynamic)
    x = torch.randn(4, 16)
    values = [5, 2, 7, 9, 0, 1, 3, 12, 6, 5, 2]
    with config.patch(recompile_limit=0):  # dynamic=False: a graph per value, each checked (NOTE [Recompile limit])
        for value in values:
            torch.testing.assert_close(compiled(x, CacheInt(value)), fn(x, value))
    if dynamic is False:
        assert compiled.num_compiles == len(set(values))


CACHE_INT_SCRIPT = """
import json, sys, torch
import aotcache
from aotcache.aot.cache_objects import CacheInt
from aotcache.autograd_cache.cache import default_cache

n = int(open(sys.argv[1] + '/n').read())

def window(x, n):
    return x * 2 if n >= 4 else x[:, n:] * 3

out = aotcache.aot_function(window, "nop", dynamic=True)(torch.ones(2, 6), CacheInt(n))
print(json.dumps({"out": out.tolist(), **default_cache().stats(), **default_cache().counters}))
"""


def test_a_stored_graph_of_a_cache_integer_symbol_is_loaded_only_where_its_guards_hold(tmp_path):
    """The call fingerprint leaves a symbolic cache integer's value out; a warm start must still check the
    stored graph's guards (n >= 4 or not) before using it."""
    from tests.aot.test_stale import _run

    outs = {}
    for n in (5, 2, 6, 3, 5):
        (tmp_path / "n").write_text(str(n))
        out = _run(tmp_path, CACHE_INT_SCRIPT)
        x = torch.ones(2, 6)
        assert out["out"] == (x * 2 if n >= 4 else x[:, n:] * 3).tolist(), n
        outs.setdefault(n, out)
    assert outs[5]["compile"] == outs[2]["compile"] == 1 and outs[6]["compile"] == outs[3]["compile"] == 0


def _static_generate_graphs(generate_through, count) -> list[int]:
    """Graphs made by each static-cache ``generate`` of batches (1, 3), (2, 6), (3, 9) (the sweep's prompts)."""
    made, expected_model = [], tiny_llama()
    for batch, length in ((1, 3), (2, 6), (3, 9)):
        ids = torch.arange(batch * length).reshape(batch, length) % 60 + 3
        settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0,
                        cache_implementation="static")
        before = count()
        with torch.no_grad():
            got = generate_through(ids, **settings)
        assert torch.equal(got, expected_model.generate(ids, **settings)), (batch, length)
        made.append(count() - before)
    return made


def test_static_cache_generate_with_new_batch_sizes_compiles_no_more_graphs_than_torch_compile():
    """Found: with ``cache_implementation="static"`` each generate of a longer prompt compiled prefill and decoding
    step statically again (2, 2, 2 graphs; torch.compile 2, 2, 0, the next test): generate's memo
    ``_previous_max_cache_length`` on the model changed its settings (NOTE [Generate memos]), and a batch of 1
    keyed the sizes first seen apart from larger batches (NOTE [Cache integers compared like sizes]: 2, 2, 1)."""
    import aotcache

    compiled = aotcache.compile(tiny_llama(), compiler="nop", cache=memory_cache())
    assert _static_generate_graphs(compiled.generate, lambda: compiled.compiled.num_compiles) == [2, 2, 0]


@pytest.mark.slow  # Dynamo's tracing of the same sequence, side by side (~2x the test above)
def test_static_cache_generate_graph_counts_side_by_side_with_torch_compile():
    import aotcache

    compiled = aotcache.compile(tiny_llama(), compiler="nop", cache=memory_cache())
    ours = _static_generate_graphs(compiled.generate, lambda: compiled.compiled.num_compiles)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    reference = tiny_llama()
    reference.forward = torch.compile(reference.forward, backend=counting_backend)  # as transformers' docs do
    theirs = _static_generate_graphs(reference.generate, lambda: len(graphs))
    assert all(mine <= their for mine, their in zip(ours, theirs)), (ours, theirs)


def test_generate_memos_are_left_out_of_the_fingerprint_only_on_generation_models():
    from aotcache.aot.api import AOTOptions
    from aotcache.autograd_cache.fingerprint import fingerprint_module_call

    def fingerprint(module):
        params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
        flat, spec = pytree.tree_flatten(((params, buffers, prompt()), {}))
        return fingerprint_module_call(module, flat, spec, AOTOptions()).digest

    model = tiny_llama()
    before = fingerprint(model)
    model._previous_max_cache_length = 42  # what generate with cache_implementation="static" writes
    assert fingerprint(model) == before
    plain = torch.nn.Linear(2, 2)  # not a transformers generation model: a plain int attribute counts
    before = fingerprint(plain)
    plain._previous_max_cache_length = 42
    assert fingerprint(plain) != before
