"""Graphs holding ``flex_attention`` (a block mask built in the graph, a score_mod and a mask_mod as subgraphs) in
the nop compiler's stored form: stored, loaded in a fresh process with eager's values, and missed when the mask
function changes (NOTE [higher-order operators] in aotcache/compilers/graph_serde.py). Before, such a graph was
refused (GraphSerializationError) and compiled again in every process: transformers' ``flex_attention``
implementation under ``torch.compile(backend="aotcache")``."""

from __future__ import annotations

import json

from tests.conftest import run_python

PROGRAM = """
import json, torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from aotcache.autograd_cache.cache import default_cache

def keep(b, h, q, kv):
    return MASK

def bias(score, b, h, q, kv):
    return score + (q - kv) * 0.25

def attend(q, k, v):
    mask = create_block_mask(keep, None, None, q.shape[-2], k.shape[-2], device="cpu")
    return flex_attention(q, k, v, score_mod=bias, block_mask=mask)

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 8, 8, generator=g) for _ in range(3))
got = torch.compile(attend, backend="aotcache", options={"compiler": "nop"}, fullgraph=True)(q, k, v)
torch._dynamo.reset()
want = torch.compile(attend, backend="eager", fullgraph=True)(q, k, v)   # flex_attention's own reference
torch.testing.assert_close(got, want)
print(json.dumps(default_cache().stats()))
"""


def _run(mask: str, cache_dir):
    return json.loads(run_python(PROGRAM.replace("MASK", mask), env={"AOTCACHE_CACHE_DIR": str(cache_dir)})
                      .stdout.strip().splitlines()[-1])


def test_a_flex_attention_graph_is_stored_and_loaded_in_a_fresh_process(tmp_path):
    cold = _run("q >= kv", tmp_path)
    warm = _run("q >= kv", tmp_path)
    assert cold["saved"] == 1 and cold["bypass"] == 0, cold["bypass_reasons"]
    assert warm["hit"] == 1 and warm["compile"] == 0 and warm["load_error"] == 0


def test_a_changed_mask_function_misses_and_gives_its_own_result(tmp_path):
    _run("q >= kv", tmp_path)
    changed = _run("(q - kv).abs() <= 2", tmp_path)   # the program asserts the new mask's values
    assert changed["hit"] == 0 and changed["compile"] == 1 and changed["saved"] == 1
