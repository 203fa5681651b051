"""Compile once, start warm everywhere: fresh processes, other working directories, other machines via Redis.

The AOTInductor case is one real compile (module-scoped, slow); every other case uses the nop compiler.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tests.conftest import run_python

# Runs a training step of a small function and saves outputs and gradients; prints the cache counters.
TRAIN_STEP = """
import json, sys, torch
from aotcache.aot import aot_function
from aotcache.autograd_cache.cache import default_cache

def body(x, w, b):
    hidden = torch.nn.functional.gelu(x @ w + b)
    return hidden.logsumexp(-1).mean(), hidden.shape[0]

torch.manual_seed(0)
x, w, b = torch.randn(8, 5), torch.randn(5, 7, requires_grad=True), torch.randn(7, requires_grad=True)
loss, rows = aot_function(body, "nop")(x, w, b)
loss.backward()
torch.save({"loss": loss, "rows": rows, "w": w.grad, "b": b.grad}, sys.argv[1])
print(json.dumps(default_cache().stats()))
"""


def counters(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_process_hits_bit_identical_with_zero_compiles(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(TRAIN_STEP)
    cold = counters(run_python(f"import runpy, sys; sys.argv = ['step', {str(tmp_path / 'cold.pt')!r}]; "
                               f"runpy.run_path({str(script)!r})"))
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    warm = counters(run_python(f"import os, runpy, sys; os.chdir({str(other_dir)!r}); "
                               f"sys.argv = ['step', {str(tmp_path / 'warm.pt')!r}]; runpy.run_path({str(script)!r})",
                               env={"PYTHONHASHSEED": "123"}))
    assert cold["compile"] == 1 and cold["saved"] == 1
    assert warm["compile"] == 0 and warm["hit"] == 1 and warm["miss"] == 0 and warm["time_saved_s"] > 0
    first, second = torch.load(tmp_path / "cold.pt"), torch.load(tmp_path / "warm.pt")
    assert first["rows"] == second["rows"] == 8
    for name in ("loss", "w", "b"):
        assert torch.equal(first[name], second[name]), name
    # the stats journal sums both processes for `aotcache stats`
    from aotcache.autograd_cache.cache import read_journal_counters

    totals = read_journal_counters()
    assert totals["hit"] == 1 and totals["miss"] == 1 and totals["compile"] == 1


@pytest.mark.redis
def test_second_machine_hits_through_shared_redis(tmp_path, redis_server):
    script = tmp_path / "step.py"
    script.write_text(TRAIN_STEP)
    run = (f"import runpy, sys; sys.argv = ['step', {str(tmp_path / 'out.pt')!r}]; runpy.run_path({str(script)!r})")
    machine_a = {"AOTCACHE_CACHE_DIR": str(tmp_path / "a"), "AOTCACHE_REDIS_URL": redis_server.url}
    machine_b = {"AOTCACHE_CACHE_DIR": str(tmp_path / "b"), "AOTCACHE_REDIS_URL": redis_server.url}
    assert counters(run_python(run, env=machine_a))["saved"] == 1
    report = ("\nimport json\nfrom aotcache.autograd_cache.cache import default_cache\n"
              "print(json.dumps({**default_cache().stats(), 'redis': default_cache().tiers.stats_by_tier()['redis']}))")
    warm = counters(run_python(run + report, env=machine_b))
    assert warm["hit"] == 1 and warm["compile"] == 0
    assert warm["redis"]["hits"] >= 1, "the entry must come from the Redis tier (machine B's disk was empty)"


@pytest.mark.redis
def test_a_machine_with_another_secret_keeps_the_shared_entries(tmp_path, redis_server):
    """Issue 13 item 10: a reader whose AOTCACHE_SECRET differs used to delete every validly signed entry of the
    shared Redis and store its own. Its reads are misses (counted as ``unverified``, warned once); the entries
    stay for the machines that share the writer's secret; it caches its own entries in free slots."""
    script = tmp_path / "step.py"
    script.write_text(TRAIN_STEP)
    run = (f"import runpy, sys; sys.argv = ['step', {str(tmp_path / 'out.pt')!r}]; runpy.run_path({str(script)!r})"
           "\nimport json\nfrom aotcache.autograd_cache.cache import default_cache\n"
           "print(json.dumps({**default_cache().stats(), 'redis': default_cache().tiers.stats_by_tier()['redis'], "
           "'fingerprint_hit': default_cache().counters.get('fingerprint_hit', 0)}))")

    def machine(name, secret):
        return {"AOTCACHE_CACHE_DIR": str(tmp_path / name), "AOTCACHE_REDIS_URL": redis_server.url,
                "AOTCACHE_SECRET": secret}

    import redis

    client = redis.Redis.from_url(redis_server.url)
    assert counters(run_python(run, env=machine("a", "alpha")))["saved"] == 1
    shared = {name: client.get(name) for name in client.keys("*")}
    assert len(shared) == 2  # the entry and its fingerprint alias record

    misconfigured = run_python(run, env=machine("b", "beta"))
    stats = counters(misconfigured)
    assert stats["compile"] == 1 and stats["load_error"] == 0 and stats["redis"]["corrupt"] == 0
    assert stats["redis"]["unverified"] >= 2  # the alias record and the entry, both kept
    warnings = [line for line in misconfigured.stderr.splitlines() if "AOTCACHE_SECRET" in line]
    assert len(warnings) == 1, misconfigured.stderr  # warned once, naming the setting to fix
    assert {name: client.get(name) for name in shared} == shared, "the other secret's entries were changed"

    again = counters(run_python(run, env=machine("b2", "beta")))  # B's own entry, in the next free slot
    assert again["compile"] == 0 and again["hit"] == 1

    peer = counters(run_python(run, env=machine("c", "alpha")))  # a machine with the writer's secret
    assert peer["compile"] == 0 and peer["hit"] == 1 and peer["redis"]["hits"] >= 1
    assert peer["fingerprint_hit"] == 1 and peer["redis"]["unverified"] == 0


# --------------------------------------------------------------------------------------------------------
# AOTInductor: one real compile on "machine A"; "machine B" loads it with no C++ compiler and no Inductor.
# --------------------------------------------------------------------------------------------------------

AOTI_INFERENCE = """
import json, sys, torch
from aotcache.aot import aot_function
from aotcache.autograd_cache.cache import default_cache

def body(x, w):
    return (x @ w).sigmoid() * 3

torch.manual_seed(0)
x, w = torch.randn(4, 6), torch.randn(6, 3)
with torch.no_grad():
    out = aot_function(body, "aoti")(x, w)
torch.save(out, sys.argv[1])
report = {**default_cache().stats(), "inductor_imported": "torch._inductor" in sys.modules,
          "expected": torch.allclose(out, body(x, w), atol=1e-5)}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def aoti_machines(tmp_path_factory, redis_server_session):
    """Machine A compiled the AOTI entry into the shared Redis; yields (workdir, redis url, A's report)."""
    workdir = tmp_path_factory.mktemp("aoti")
    if redis_server_session.proc is None or redis_server_session.proc.poll() is not None:
        redis_server_session.start()
    redis_server_session.flush()
    script = workdir / "aoti.py"
    script.write_text(AOTI_INFERENCE)
    env = {"AOTCACHE_CACHE_DIR": str(workdir / "a"), "AOTCACHE_REDIS_URL": redis_server_session.url}
    proc = run_python(f"import runpy, sys; sys.argv = ['aoti', {str(workdir / 'a.pt')!r}]; "
                      f"runpy.run_path({str(script)!r})", env=env)
    yield workdir, redis_server_session.url, counters(proc)


@pytest.mark.slow
@pytest.mark.redis
def test_aoti_entry_loads_on_another_machine_without_compiler_or_inductor(aoti_machines):
    workdir, url, machine_a = aoti_machines
    assert machine_a["compile"] == 1 and machine_a["saved"] == 1 and machine_a["expected"]
    env = {"AOTCACHE_CACHE_DIR": str(workdir / "b"), "AOTCACHE_REDIS_URL": url,
           "PATH": "/nonexistent", "CXX": "/nonexistent/c++", "CC": "/nonexistent/cc"}
    script = workdir / "aoti.py"
    proc = run_python(f"import runpy, sys; sys.argv = ['aoti', {str(workdir / 'b.pt')!r}]; "
                      f"runpy.run_path({str(script)!r})", env=env)
    machine_b = counters(proc)
    assert machine_b["hit"] == 1 and machine_b["compile"] == 0 and machine_b["expected"]
    assert not machine_b["inductor_imported"], "a warm AOTI hit must not import torch._inductor"
    assert torch.equal(torch.load(workdir / "a.pt"), torch.load(workdir / "b.pt"))
