"""Real AOTInductor precompiles of a few ops, then dispatch to them in fresh processes (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

try:  # tests/ is not a package: pytest puts it on sys.path and imports its conftest as `conftest`
    from conftest import REPO_ROOT, run_python
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.conftest import REPO_ROOT, run_python

pytestmark = pytest.mark.slow

# Two signatures per op; sum has a scalar (keepdim), a list (dim) and a dtype. The cat kernel (a tensor list)
# is compiled on miss by the first process (see PRECOMPILE).
SPECS = [
    [{"op": "aten::add.Tensor", "args": [{"tensor": [8, 8]}, {"tensor": [8, 8]}]},
     {"op": "aten::mm.default", "args": [{"tensor": [8, 16]}, {"tensor": [16, 4]}]},
     {"op": "aten::gelu.default", "args": [{"tensor": [64]}]},
     {"op": "aten::sum.dim_IntList", "args": [{"tensor": [4, 6]}, [1], True],
      "kwargs": {"dtype": {"dtype": "float64"}}}],
    [{"op": "aten::add.Tensor", "args": [{"tensor": [16, 4]}, {"tensor": [4]}], "kwargs": {"alpha": 2}},
     {"op": "aten::mm.default", "args": [{"tensor": [32, 8], "strides": [1, 32]}, {"tensor": [8, 8]}]},
     {"op": "aten::gelu.default", "args": [{"tensor": [4, 32]}], "kwargs": {"approximate": "tanh"}},
     {"op": "aten::sum.dim_IntList", "args": [{"tensor": [3, 5]}, [0, 1], False]}],
]

PRECOMPILE = r"""
import json, os, torch, aotcache.eager as eager
results = eager.precompile_from_spec(os.environ["SPEC"])
compile_on_miss = {}
if os.environ.get("COMPILE_ON_MISS"):
    parts = [torch.randn(2, 3), torch.randn(4, 3)]
    eager.enable(["aten::cat"], compile_on_miss=True)
    first = torch.cat(parts)
    compile_on_miss["first"] = eager.stats()
    second = torch.cat(parts)
    compile_on_miss["second"] = eager.stats()
    compile_on_miss["same"] = bool(torch.equal(first, second) and torch.equal(first[:2], parts[0]))
print(json.dumps({"statuses": [r.status for r in results], "stats": eager.stats(),
                  "compile_on_miss": compile_on_miss}))
"""

# Matching calls (same signatures as SPECS, spelled in other ways) and non-matching ones.
DISPATCH = r"""
import json, sys, torch, aotcache.eager as eager
F = torch.nn.functional
def calls():
    torch.manual_seed(0)
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    c, d = torch.randn(16, 4), torch.randn(4)
    m1, m2 = torch.randn(8, 16), torch.randn(16, 4)
    t1 = torch.randn(8, 32).t()
    s1, s2 = torch.randn(4, 6), torch.randn(3, 5)
    matching = [a + b, torch.add(c, d, alpha=2), torch.mm(m1, m2), torch.mm(t1, torch.randn(8, 8)),
                F.gelu(torch.randn(64)), F.gelu(torch.randn(4, 32), approximate="tanh"),
                torch.sum(s1, [1], keepdim=True, dtype=torch.float64), torch.sum(s2, [0, 1]),
                torch.cat([torch.randn(2, 3), torch.randn(4, 3)])]
    other = [a + 1, torch.add(c, d, alpha=3), torch.mm(m2.t(), m1.t()), F.gelu(torch.randn(65)),
             torch.sum(s1, [0]), torch.cat([torch.randn(2, 3), torch.randn(5, 3)]), a.double() + b.double()]
    return matching, other
eager.enable(None)
enabled = eager.enabled_ops()
ours = calls()
mid = eager.stats()
grad_in = torch.randn(8, 8, requires_grad=True)
(grad_in + grad_in).sum().backward()
with torch.inference_mode():
    torch.randn(8, 8) + torch.randn(8, 8)
eager.disable()
stock = calls()
same = [bool(torch.allclose(x, y, atol=1e-5) and x.dtype == y.dtype and x.shape == y.shape)
        for x, y in zip(ours[0] + ours[1], stock[0] + stock[1])]
print(json.dumps({"enabled": enabled, "mid": mid, "stats": eager.stats(), "same": same,
                  "grad_ok": bool(torch.equal(grad_in.grad, torch.full((8, 8), 2.0))),
                  "inductor": "torch._inductor" in sys.modules}))
"""


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache dir holding the SPECS kernels, compiled by two processes at once (shared by the module)."""
    cache_dir = tmp_path_factory.mktemp("eager-shared") / "aotcache"
    env = {**os.environ, "AOTCACHE_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", PRECOMPILE],
                              env={**env, "SPEC": json.dumps(spec), "COMPILE_ON_MISS": "1" if first else ""},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for first, spec in zip((True, False), SPECS)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        outputs.append(last_json(out))
    for output, spec in zip(outputs, SPECS):
        assert output["statuses"] == ["compiled"] * len(spec)
    assert outputs[1]["stats"]["compiles"] == len(SPECS[1])
    assert outputs[0]["stats"]["compiles"] == len(SPECS[0]) + 1  # + cat, compiled on miss
    return cache_dir, outputs[0]["compile_on_miss"]


def copy_cache(shared_cache, tmp_path):
    target = tmp_path / "cache"
    shutil.copytree(shared_cache, target)
    return target


def run_dispatch(cache_dir, **extra_env):
    proc = run_python(DISPATCH, env={"AOTCACHE_CACHE_DIR": str(cache_dir), **extra_env})
    return last_json(proc.stdout), proc.stderr


def test_index_holds_both_signatures_per_op(shared_cache, monkeypatch):
    shared_cache, _ = shared_cache
    monkeypatch.setenv("AOTCACHE_CACHE_DIR", str(shared_cache))
    import aotcache.eager as eager

    rows = eager.list_entries()
    per_op = {}
    for row in rows:
        per_op.setdefault(row["op"], []).append(row)
    assert {op: len(entries) for op, entries in per_op.items()} == {
        "aten::add.Tensor": 2, "aten::mm.default": 2, "aten::gelu.default": 2, "aten::sum.dim_IntList": 2,
        "aten::cat.default": 1}
    assert all(row["usable"] and row["size"] > 0 for row in rows)
    assert any("approximate='tanh'" in row["signature"] for row in per_op["aten::gelu.default"])


def test_fresh_process_dispatches_matching_calls_to_cached_kernels(shared_cache):
    shared_cache, _ = shared_cache
    result, _ = run_dispatch(shared_cache)
    assert result["enabled"] == ["aten::add.Tensor", "aten::cat", "aten::gelu", "aten::mm",
                                 "aten::sum.dim_IntList"]
    assert all(result["same"]), result["same"]
    assert result["mid"]["hits"] == 9  # every matching call ran its precompiled kernel
    assert result["mid"]["misses"] >= 7  # and the others the stock kernel
    assert result["mid"]["load_errors"] == 0 and result["mid"]["kernels_loaded"] == 9
    assert result["stats"]["hits"] == 11  # + the autograd and inference-mode adds
    assert result["grad_ok"]
    assert result["inductor"] is False  # the warm path never imports Inductor


def test_corrupt_index_is_rebuilt_and_still_hits(shared_cache, tmp_path):
    cache = copy_cache(shared_cache[0], tmp_path)
    index = cache / "aoti_eager" / "aten" / "cpu" / "add.Tensor.json"
    index.write_text(index.read_text()[:50])  # truncated JSON
    result, stderr = run_dispatch(cache)
    assert all(result["same"])
    assert result["mid"]["index_rebuilds"] == 1 and result["mid"]["hits"] == 9
    assert "corrupt per-op kernel index" in stderr
    assert len(json.loads(index.read_text())) == 2


def test_missing_and_foreign_libraries_fall_back_correctly(shared_cache, tmp_path):
    cache = copy_cache(shared_cache[0], tmp_path)
    device_dir = cache / "aoti_eager" / "aten" / "cpu"
    mm_index = json.loads((device_dir / "mm.default.json").read_text())
    (device_dir / mm_index[0]["kernel_path"]).unlink()  # one mm library gone
    gelu_path = device_dir / "gelu.default.json"
    gelu_index = json.loads(gelu_path.read_text())
    for item in gelu_index:
        item["versions"]["torch"] = "2.0.0"  # built by another torch
    gelu_path.write_text(json.dumps(gelu_index))
    result, stderr = run_dispatch(cache)
    assert all(result["same"])
    assert result["mid"]["hits"] == 9 - 1 - 2
    assert result["mid"]["load_errors"] == 3 and result["mid"]["stale_entries"] == 2
    assert "is missing" in stderr and "skipping kernel" in stderr


def test_compile_on_miss_compiled_once_then_hit(shared_cache):
    _, result = shared_cache
    assert result["same"]
    # The first call misses and runs the stock kernel (as does the eager probe run while compiling).
    assert result["first"]["misses"] == 1 and result["first"]["fallbacks"] >= 1 and result["first"]["hits"] == 0
    assert result["second"]["hits"] == 1 and result["second"]["misses"] == 1
