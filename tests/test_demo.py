"""The demos run end to end in fresh processes: the training demo (`python -m aotcache.demo`, the main job)
and the store demo (`python -m aotcache.demo --store`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FRESH_PROCESSES_TIMEOUT, REPO_ROOT

SECTIONS = ("== 1. Tiers ==", "== 2. Misses, then hits ==",
            "== 3. A fresh process: hits from disk, backfilled into memory ==",
            "== 4. A corrupted entry is detected and becomes a miss ==", "== 5. Eviction under a small max_bytes ==",
            "== 6. Stats per tier ==")


def run_demo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "aotcache.demo", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"demo failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    return proc


def table_row(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(label + " "))
    return line[len(label):].split()


@FRESH_PROCESSES_TIMEOUT  # the demo's eager, cold and warm processes
def test_training_demo_trains_cold_then_loads_warm(tmp_path):
    # the nop compiler and no torch.compile phases keep this quick; the table and the counters are the same.
    # 43 s of CPU, 110 s at a load of 12: a 300 s limit fails past a load of about 15
    # (NOTE [Fresh-process tests under load] in tests/conftest.py)
    out = run_demo("--compiler", "nop", "--steps", "3", "--skip-torch-compile", "--cache-dir",
                   str(tmp_path / "demo"), timeout=1800).stdout
    for label in ("eager", "aotcache cold", "aotcache warm"):
        first, overhead, rest, loss, same, decode, same_tokens, inductor, process = table_row(out, label)
        assert same == "yes", f"{label} trained differently from eager:\n{out}"
        assert same_tokens == "yes", f"{label} decoded other tokens than eager:\n{out}"
    cold = next(line for line in out.splitlines() if line.startswith("Cache counters, aotcache cold"))
    warm = next(line for line in out.splitlines() if line.startswith("Cache counters, aotcache warm"))
    # one training graph, then the prompt and two single-token steps with a KV cache: all stored, all loaded
    assert "miss=4" in cold and "saved=4" in cold and "fingerprint_miss=4" in cold
    assert "hit=4" in warm and "fingerprint_hit=4" in warm and "miss=" not in warm.replace("fingerprint_", "")
    assert "aotcache.compile chose: aot" in out
    assert "running torch.compile" not in out and "\ntorch.compile " not in out  # the phases were skipped


def test_training_demo_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "aotcache.demo", "--steps", "1"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 2 and "--steps must be at least 2" in proc.stderr


@pytest.mark.redis
def test_store_demo_runs_with_a_private_redis():
    proc = run_demo("--store")
    out = proc.stdout
    positions = [out.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    assert "a private redis-server on 127.0.0.1:" in out
    assert "miss  kernel/add_relu/f32" in out  # misses first ...
    assert "hit   kernel/add_relu/f32            from memory" in out  # ... then hits
    assert "|   hit   graph/mlp_forward              from disk" in out  # the fresh process, from disk
    assert "|   hit   graph/mlp_forward              from memory" in out  # ... then backfilled
    assert "|   hit   graph/mlp_forward              from redis" in out  # the process without a disk tier
    assert "corrupt=1" in out and "Redis had a good copy" in out and "is valid again" in out
    assert "the recently read entry 00 survived" in out and "within the bound" in out
    assert "All processes of this demo" in out
    assert "corrupt disk cache entry" in proc.stderr  # the fault was logged, once
    assert proc.stderr.count("corrupt disk cache entry") == 1


def test_store_demo_without_redis_keeps_the_cache_dir_for_the_cli(tmp_path):
    cache_dir = tmp_path / "kept"
    out = run_demo("--store", "--no-redis", "--cache-dir", str(cache_dir)).stdout
    assert "Redis tier: skipped (--no-redis)" in out
    assert "no other tier has it: a miss" in out and "is valid again" in out
    assert f"aotcache --cache-dir {cache_dir} stats" in out

    # The kept cache is what the command line sees; a second run starts from empty demo tiers again.
    assert "miss  kernel/add_relu/f32" in run_demo("--store", "--no-redis", "--cache-dir", str(cache_dir)).stdout
    listed = subprocess.run([sys.executable, "-m", "aotcache.cli", "--cache-dir", str(cache_dir), "ls", "-n", "demo",
                             "--json"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert listed.returncode == 0, listed.stderr
    keys = {entry["key"] for entry in json.loads(listed.stdout)["entries"]}
    assert keys == {"kernel/add_relu/f32", "graph/mlp_forward", "graph/mlp_backward", "module/transformer_block.so"}
