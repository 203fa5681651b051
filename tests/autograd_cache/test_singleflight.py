"""Single-flight: of several threads / processes / machines missing on one key, exactly one compiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from aotcache.autograd_cache.singleflight import SingleFlight
from tests.conftest import REPO_ROOT

# Each process waits for a common start time, then runs a cold aot_function whose compile takes a while
# (a sleeping custom compiler), and writes its cache counters to a file.
COLD_START = """
import json, sys, time
import torch
from aotcache.aot import aot_function
from aotcache.autograd_cache.cache import default_cache
from aotcache.compilers.nop import nop_compiler

def slow_compiler(gm, example_inputs):
    time.sleep(1.5)
    return nop_compiler(gm, example_inputs)

def body(x, w):
    return (x @ w).relu().sum()

start_at, out_path = float(sys.argv[1]), sys.argv[2]
x, w = torch.ones(4, 3), torch.full((3, 2), 0.5, requires_grad=True)
while time.time() < start_at:
    time.sleep(0.01)
out = aot_function(body, slow_compiler)(x, w)
out.backward()
stats = default_cache().stats()
json.dump({"out": out.item(), "grad": w.grad.sum().item(), **stats}, open(out_path, "w"))
"""


def test_four_cold_processes_compile_once(tmp_path):
    start_at = time.time() + 12  # after every process has imported torch (about 1.5 s each, 2 cores shared)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", COLD_START, str(start_at), str(tmp_path / f"{i}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(4)]
    assert sum(r["compile"] for r in results) == 1, results
    assert sum(r["hit"] for r in results) == 3
    assert len({(r["out"], r["grad"]) for r in results}) == 1
    assert sum(r["lock_wait"] for r in results) >= 1, "the processes must have overlapped"


def test_threads_take_turns(tmp_path):
    flight = SingleFlight(tmp_path / "locks")
    inside, overlaps, waited = [], [], []

    def worker():
        with flight.hold("k" * 64, 30) as ticket:
            waited.append(ticket.waited)
            if inside:
                overlaps.append(True)
            inside.append(1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not overlaps and len(waited) == 4 and waited.count(False) >= 1 and waited.count(True) >= 1


def test_timeout_lets_the_caller_go_ahead(tmp_path):
    flight = SingleFlight(tmp_path / "locks")
    other = SingleFlight(tmp_path / "locks")  # another "process": a separate file lock object
    holding, release = threading.Event(), threading.Event()

    def holder():
        with other.hold("name", 5):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait(10)
    try:
        with flight.hold("name", 0.2) as ticket:
            assert ticket.timed_out and not ticket.held and ticket.waited
    finally:
        release.set()
        thread.join()
    with flight.hold("name", 0.2) as ticket:
        assert ticket.held and not ticket.waited


def test_unwritable_lock_dir_is_skipped(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with SingleFlight(blocker / "locks").hold("name", 1) as ticket:
        assert ticket.held and ticket.skipped == ["file"]


REDIS_HOLDER = """
import sys, time
from aotcache.store.redis import RedisCache
from aotcache.autograd_cache.singleflight import SingleFlight
flight = SingleFlight(None, RedisCache(sys.argv[1], prefix="aotcache:aot"), redis_expire_s=1.0)
with flight.hold("digest", 5) as ticket:
    print("held", ticket.held, flush=True)
    time.sleep(600)
"""


@pytest.mark.redis
def test_redis_lock_across_machines_and_dead_holder_expires(redis_server):
    from aotcache.store.redis import RedisCache

    holder = subprocess.Popen([sys.executable, "-c", REDIS_HOLDER, redis_server.url], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held True"
        flight = SingleFlight(None, RedisCache(redis_server.url, prefix="aotcache:aot"), redis_expire_s=1.0)
        with flight.hold("digest", 0.5) as ticket:  # alive and refreshing: still held after its expiry time
            assert ticket.timed_out and ticket.waited
        holder.kill()
        holder.wait(timeout=30)
        started = time.monotonic()
        with flight.hold("digest", 20) as ticket:
            assert ticket.held and not ticket.timed_out
        assert time.monotonic() - started < 10, "a dead holder's Redis lock must expire"
    finally:
        holder.kill()
        holder.wait(timeout=30)
