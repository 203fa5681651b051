"""transformers' generate modes through ``aotcache.compile`` (the serving path; found by
``bench/hf_generate_sweep.py``): sampling, beam search, a left-padded batch and the text-generation pipeline give
eager's tokens; a decoding step builds one memory-sharing map; a dict argument's key order stays part of the
signature (transformers' per-layer-type mask dict is ordered by string hashing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aotcache
import aotcache.aot.signature as signature
from aotcache.aot.api import AOTFunction
from aotcache.autograd_cache.cache import AOTAutogradCache
from aotcache.store.memory import InMemoryCache
from aotcache.store.tiered import TieredCache
from tests.aot.tiny_transformers import tiny_llama, word_level_tokenizer

transformers = pytest.importorskip("transformers")


def memory_cache() -> AOTAutogradCache:
    return AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)


def traces(cache: AOTAutogradCache) -> int:
    return cache.counters["fingerprint_miss"] + cache.counters["fingerprint_fallback"]


def test_sampling_beam_padded_batch_and_pipeline_give_eager_tokens_without_a_trace_per_token():
    eager = tiny_llama()
    cache = memory_cache()
    model = aotcache.compile(tiny_llama(), compiler="nop", cache=cache)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    modes = [({"input_ids": ids[:1]}, {}),
             ({"input_ids": ids[:1]}, {"do_sample": True, "top_k": 0}),
             ({"input_ids": ids[:1]}, {"num_beams": 3}),
             ({"input_ids": ids, "attention_mask": mask}, {})]
    for inputs, kwargs in modes:
        settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False) | kwargs
        torch.manual_seed(3)  # sampling draws the same numbers: the compiled forward draws none
        want = eager.generate(**inputs, **settings)
        before = traces(cache)
        torch.manual_seed(3)
        got = model.generate(**inputs, **settings)
        assert torch.equal(got, want), kwargs
        assert traces(cache) - before <= 3, kwargs  # prefill, a first step, the dynamic steps: not one per token
    tokenizer = word_level_tokenizer()
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    want = transformers.pipeline("text-generation", model=eager, tokenizer=tokenizer)("w5 w17 w33", **settings)
    got = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)("w5 w17 w33", **settings)
    assert got == want and model.route == "aot"


def test_a_decoding_step_builds_one_memory_sharing_map(monkeypatch):
    # NOTE [One context per call]: the rank signature and the signature of a call under automatic dynamic
    # shapes each built the map of which of the step's 30 tensors share memory (and read the numerics flags)
    model = aotcache.compile(tiny_llama(), compiler="nop", cache=False)
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # every graph exists
    calls, full_path = [], []
    original, runtime_for = signature.memory_sharing, AOTFunction._runtime_for

    def counting(flat_args):
        calls.append(len(flat_args))
        return original(flat_args)

    def counting_runtime_for(self, *args, **kwargs):
        full_path.append(1)
        return runtime_for(self, *args, **kwargs)

    monkeypatch.setattr(signature, "memory_sharing", counting)
    monkeypatch.setattr(AOTFunction, "_runtime_for", counting_runtime_for)
    eager = tiny_llama()
    longer = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(1))  # a new prefill signature
    want = eager.generate(input_ids=longer, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(input_ids=longer, max_new_tokens=6, min_new_tokens=6, do_sample=False), want)
    assert full_path and len(calls) == len(full_path), calls  # one per call that builds the signature
    # NOTE [Call hot path]: the decoding steps (keyword arguments, a DynamicCache) reuse the recorded calls
    assert len(full_path) <= 2, full_path


class MaskPerLayerType(nn.Module):
    """Attention masks handed in as a dict keyed by layer type, as transformers' ``create_masks_for_generate``
    does (``{"full_attention": ..., "sliding_attention": ...}``, built by iterating a set of strings); ``forward``
    also iterates the dict, so its result depends on the key order."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, masks: dict) -> torch.Tensor:
        out = self.proj(x) + masks["full_attention"]
        return torch.cat([out, *masks.values()], dim=-1)


def test_a_dict_argument_in_another_key_order_is_another_signature_never_a_false_hit():
    # Gemma 2 with cache_implementation="static" gets its masks in a per-process order (string hashing): a warm
    # start in a process with another order traces again. Key order is part of the signature (and fingerprint):
    # a forward that iterates the dict computes another result, so ignoring the order would be a false hit.
    model = MaskPerLayerType()
    cache = memory_cache()
    wrapped = aotcache.compile(model, compiler="nop", cache=cache)
    x, full, sliding = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    for masks in ({"full_attention": full, "sliding_attention": sliding},
                  {"sliding_attention": sliding, "full_attention": full}):
        torch.testing.assert_close(wrapped(x, masks), model(x, masks))
    assert cache.counters["compile"] == 2


def test_generate_modes_on_one_model_add_up_to_the_recompile_limit_and_the_warning_says_what_to_raise(caplog):
    """Each generate mode is a few distinct call forms (found by bench/hf_generate_sweep.py, NOTE [The sweep's
    recompile limit]): on one model they add up past the default limit of 8, whose later forms then run eagerly
    (eager's tokens, counted, warned once naming the limit to raise); above their number nothing falls back."""
    import logging

    from aotcache import config
    from aotcache.aot.fallback import fallback_counts

    eager = tiny_llama()
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    modes = [({"input_ids": ids[:1]}, {}), ({"input_ids": ids[:1]}, {"use_cache": False}),
             ({"input_ids": ids[:1]}, {"num_beams": 3}), ({"input_ids": ids, "attention_mask": mask}, {}),
             ({"input_ids": ids[:1]}, {"cache_implementation": "static"})]

    def serve_all_modes(limit: int) -> tuple[int, int, list[str]]:
        """Compiled graphs, calls run eagerly at the limit, and the limit's warnings."""
        cache = memory_cache()
        model = aotcache.compile(tiny_llama(), compiler="nop", cache=cache)
        before = fallback_counts().get("eager:recompile_limit", 0)
        caplog.clear()
        with config.patch(recompile_limit=limit), caplog.at_level(logging.WARNING, logger="aotcache"):
            for inputs, kwargs in modes:
                settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False) | kwargs
                assert torch.equal(model.generate(**inputs, **settings), eager.generate(**inputs, **settings)), kwargs
        warned = [r.getMessage() for r in caplog.records if "recompile limit" in r.getMessage()]
        return cache.counters["compile"], fallback_counts().get("eager:recompile_limit", 0) - before, warned

    all_compiles, fallbacks, warned = serve_all_modes(32)
    assert 8 < all_compiles <= 3 * len(modes) and fallbacks == 0 and not warned  # not a graph per token
    limited_compiles, fallbacks, warned = serve_all_modes(8)
    assert limited_compiles == 8 and fallbacks > 0
    assert len(warned) == 1 and "distinct call form" in warned[0] and "raise AOTCACHE_RECOMPILE_LIMIT" in warned[0]
