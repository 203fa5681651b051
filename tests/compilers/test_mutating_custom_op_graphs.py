"""Graphs where a custom op mutates its inputs (functionalized to ``auto_functionalized_v2`` / ``auto_functionalized``)
in the nop compiler's stored form: stored, loaded in a fresh process with eager's values and mutations, and missed when
the op's body changes (NOTE [higher-order operators] in aotcache/compilers/graph_serde.py)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_python

PROGRAM = """
import json, os, torch
import torch._inductor.config as inductor_config
from aotcache.autograd_cache.cache import default_cache

inductor_config.enable_auto_functionalized_v2 = os.environ["AF_V2"] == "1"

@torch.library.custom_op("s23b_mut::scale_", mutates_args={"x"})
def scale_(x: torch.Tensor) -> None:
    x.mul_(FACTOR)

@scale_.register_fake
def _(x):
    return None

def fn(x, y):
    y2 = y * 2
    scale_(y2[1:])          # a view of an intermediate
    scale_(x)               # a graph input, mutated in place
    return y2 + x

x, y = torch.randn(4), torch.randn(4)
xc, xe = x.clone(), x.clone()
got = torch.compile(fn, backend="aotcache", options={"compiler": "nop"}, fullgraph=True)(xc, y)
want = fn(xe, y)
torch.testing.assert_close(got, want)
torch.testing.assert_close(xc, xe)
print(json.dumps(default_cache().stats()))
"""


def _run(v2: bool, factor: str, cache_dir):
    program = PROGRAM.replace("FACTOR", factor)
    env = {"AF_V2": "1" if v2 else "0", "AOTCACHE_CACHE_DIR": str(cache_dir)}
    return json.loads(run_python(program, env=env).stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("v2", [True, False], ids=["auto_functionalized_v2", "auto_functionalized"])
def test_a_graph_with_a_mutating_custom_op_is_stored_and_loaded_in_a_fresh_process(v2, tmp_path):
    cold = _run(v2, "3.0", tmp_path)
    warm = _run(v2, "3.0", tmp_path)
    assert cold["saved"] == 1 and cold["bypass"] == 0, cold["bypass_reasons"]
    assert warm["hit"] == 1 and warm["compile"] == 0 and warm["load_error"] == 0


def test_a_changed_body_of_the_mutating_op_misses_and_mutates_by_the_new_body(tmp_path):
    cold = _run(True, "3.0", tmp_path)
    changed = _run(True, "5.0", tmp_path)   # the program asserts eager's values and mutation
    assert cold["saved"] == 1, cold["bypass_reasons"]
    assert changed["hit"] == 0 and changed["compile"] == 1
