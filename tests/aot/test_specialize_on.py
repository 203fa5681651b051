"""``torch._dynamo.mark_dynamic(x, dim, specialize_on=[...])`` under aotcache's backend: each size gets eager's
result in-process, and a compile made for a specialization is never stored, so a later process never loads a
graph that assumed the specialized size for the general graph (NOTE [Compiles for a specialize_on
specialization])."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_python

SCRIPT = """
import functools, json, sys, torch
from aotcache.backend import aotcache_backend
from aotcache.autograd_cache.cache import default_cache

def fn(x):
    return x * x.shape[0] + x.sum()

compiled = torch.compile(fn, backend=functools.partial(aotcache_backend, compiler="nop"))
ok = []
for step in sys.argv[1:]:
    if step == "clear":  # the general entry gone (cleared or evicted) before the specialized compile
        default_cache().clear()
        continue
    x = torch.arange(float(step))
    torch._dynamo.mark_dynamic(x, 0, specialize_on=[lambda s: s == 8])
    ok.append(torch.equal(compiled(x), fn(x)))
print(json.dumps({**default_cache().stats(), "ok": ok}))
"""


def _run(cache_dir, *steps):
    script = cache_dir / "specialized.py"  # a file: Dynamo reads the check's source with inspect
    script.write_text(SCRIPT)
    code = f"import runpy, sys; sys.argv = ['s', *{list(steps)!r}]; runpy.run_path({str(script)!r})"
    proc = run_python(code, env={"AOTCACHE_CACHE_DIR": str(cache_dir / "cache")})
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("sizes", [("8", "5", "16", "8"), ("5", "8", "5")])
def test_each_size_gets_eagers_result_in_process(tmp_path, sizes):
    assert all(_run(tmp_path, *sizes)["ok"])


def test_a_specialized_compile_is_not_stored_for_the_general_graph(tmp_path):
    """Before: the size-8 compile, stored under the general graph's key, was loaded at size 5 by the next
    process (``x * 8`` where eager computes ``x * 5``)."""
    first = _run(tmp_path, "5", "clear", "8")
    assert first["ok"] == [True, True]
    assert first["bypass_reasons"].get("compiled for a mark_dynamic(..., specialize_on=...) specialization") == 1
    second = _run(tmp_path, "5", "8")
    assert second["ok"] == [True, True], "the graph compiled for size 8 was loaded for size 5"


def test_the_general_entry_still_loads_in_a_later_process(tmp_path):
    cold = _run(tmp_path, "5", "8")
    assert cold["ok"] == [True, True] and cold["compile"] == 1 and cold["saved"] == 1, cold
    warm = _run(tmp_path, "5", "8", "16")
    assert warm["ok"] == [True, True, True]
    # (the key holds a digest of aotcache's sources: an edit of the checkout between the two processes, as in a
    # worktree being worked on, misses here too; session 19's one failure, reproduced so)
    assert warm["compile"] == 0 and warm["hit"] == 2, ("the general entry serves the general and the specialized "
                                                       f"compile: {warm}")


