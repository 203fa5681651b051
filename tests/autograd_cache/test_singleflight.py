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

# Each process, once imported, says so and waits for the word to go (a file: no clock to guess how long four
# imports take on a loaded machine), then runs a cold aot_function, and writes its cache counters to a file.
# NOTE [The holder compiles once everyone waits] Whichever process takes the lock compiles with a compiler that
# returns only once the three others are waiting on that lock (each touches a file the first time it probes for
# the holder's entry). It slept 1.5 s instead: on a loaded machine a process could still be tracing when the
# holder had saved, found the entry on its first lookup, never waited, and the overlap check failed.
COLD_START = """
import json, os, sys, time
from pathlib import Path
import torch
from aotcache.aot import aot_function
from aotcache.autograd_cache import singleflight
from aotcache.autograd_cache.cache import default_cache
from aotcache.compilers.nop import nop_compiler

go, out_path = Path(sys.argv[1]), sys.argv[2]
plain_hold = singleflight.SingleFlight.hold


def hold_marking_the_wait(self, name, timeout, *, ready=None, **kwargs):
    def probe():  # called only while another process holds the lock
        Path(out_path + ".waiting").touch()
        return ready()
    return plain_hold(self, name, timeout, ready=probe if ready is not None else None, **kwargs)


singleflight.SingleFlight.hold = hold_marking_the_wait


def compiler_waiting_for_the_others(gm, example_inputs):
    run_dir = Path(os.environ["COLD_START_DIR"])  # env, not a global: one compiler identity for the four
    deadline = time.monotonic() + 300
    while len(list(run_dir.glob("*.json.waiting"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    return nop_compiler(gm, example_inputs)

def body(x, w):
    return (x @ w).relu().sum()

x, w = torch.ones(4, 3), torch.full((3, 2), 0.5, requires_grad=True)
Path(out_path + ".ready").write_text("")
while not go.exists():
    time.sleep(0.01)
out = aot_function(body, compiler_waiting_for_the_others)(x, w)
out.backward()
stats = default_cache().stats()
json.dump({"out": out.item(), "grad": w.grad.sum().item(), **stats}, open(out_path, "w"))
"""


def test_four_cold_processes_compile_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLD_START_DIR": str(tmp_path)}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", COLD_START, str(go), str(tmp_path / f"{i}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"{i}.json.ready").exists() for i in range(4)):
        assert time.monotonic() < deadline and all(proc.poll() is None for proc in procs), "a process never got ready"
        time.sleep(0.05)
    go.write_text("")  # every process has imported torch: they start together
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(4)]
    assert sum(r["compile"] for r in results) == 1, results
    assert sum(r["hit"] for r in results) == 3
    assert len({(r["out"], r["grad"]) for r in results}) == 1
    assert sum(r["lock_wait"] for r in results) == 3, results  # NOTE [The holder compiles once everyone waits]
    assert len(list(tmp_path.glob("*.json.waiting"))) == 3


def test_threads_take_turns(tmp_path):
    flight = SingleFlight(tmp_path / "locks")
    inside, overlaps, waited = [], [], []
    start = threading.Barrier(4)

    def worker():
        start.wait(60)  # all four try at once
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
            release.wait(300)  # set as soon as the other side timed out

    thread = threading.Thread(target=holder)
    thread.start()
    assert holding.wait(300)
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


# A waiter on another "machine" (its own lock dir, one shared Redis): waits for the entry (a marker file here),
# then "loads" it outside every lock until every other waiter is loading too (a file each; no clock), and records
# how many it saw loading at once.
PROBING_WAITER = """
import json, sys, time
from pathlib import Path
from aotcache.store.redis import RedisCache
from aotcache.autograd_cache.singleflight import SingleFlight
lock_dir, url, marker, out = sys.argv[1:5]
flight = SingleFlight(lock_dir, RedisCache(url, prefix="aotcache:aot"))


def probe():
    Path(out + ".polling").touch()  # the lock was busy: this waiter probes for the entry from now on
    return "entry" if Path(marker).exists() else None


print("waiting", flush=True)
with flight.hold("digest", 120, ready=probe) as ticket:
    pass
Path(out + ".loading").write_text("")
loading = lambda: len(list(Path(out).parent.glob("*.json.loading")))
deadline = time.monotonic() + 120
while loading() < 4 and time.monotonic() < deadline:
    time.sleep(0.01)
json.dump({"found": ticket.found, "held": ticket.held, "waited": ticket.waited, "together": loading()},
          open(out, "w"))
"""


@pytest.mark.redis
def test_waiters_load_at_once_not_one_at_a_time(tmp_path, redis_server):
    from aotcache.store.redis import RedisCache

    holder = SingleFlight(tmp_path / "holder-locks", RedisCache(redis_server.url, prefix="aotcache:aot"))
    marker = tmp_path / "saved"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    # two waiters share one machine's lock dir (file lock level), two have their own (Redis level only)
    lock_dirs = [tmp_path / "m1", tmp_path / "m1", tmp_path / "m2", tmp_path / "m3"]
    with holder.hold("digest", 5) as ticket:
        assert ticket.held
        procs = [subprocess.Popen([sys.executable, "-c", PROBING_WAITER, str(lock_dir), redis_server.url,
                                   str(marker), str(tmp_path / f"{i}.json")], env=env, stdout=subprocess.PIPE,
                                  text=True) for i, lock_dir in enumerate(lock_dirs)]
        for proc in procs:
            assert proc.stdout.readline().strip() == "waiting"
        deadline = time.monotonic() + 300
        while not all((tmp_path / f"{i}.json.polling").exists() for i in range(4)):  # every waiter is polling now
            assert time.monotonic() < deadline and all(proc.poll() is None for proc in procs), "a waiter never polled"
            time.sleep(0.05)
        marker.write_text("saved")  # the holder saves, then releases its locks
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(4)]
    assert all(r["found"] == "entry" and not r["held"] and r["waited"] for r in results), results
    # every load ran while every other one was running: none waited for another's load to finish
    assert all(r["together"] == 4 for r in results), results


# A rank of a job on its own machine (own cache dir, one shared Redis): traces a function and compiles it with a
# slow compiler that writes when it starts. The first rank's compiler never finishes (it is killed).
RANK = """
import json, os, sys, time
import torch
from aotcache.aot import aot_function
from aotcache.autograd_cache.cache import default_cache
from aotcache.compilers.nop import nop_compiler

out_path = os.environ["RANK_OUT"]

def slow_compiler(gm, example_inputs):
    with open(os.environ["RANK_OUT"] + ".compiling", "a") as f:  # env, not globals: one compiler identity
        f.write(f"{time.time()}\\n")
    time.sleep(float(os.environ["RANK_COMPILE_S"]))
    return nop_compiler(gm, example_inputs)

def body(x, w):
    return (x @ w).tanh().sum()

x, w = torch.ones(4, 3), torch.full((3, 2), 0.25, requires_grad=True)
print("ready", flush=True)
while not os.path.exists(os.environ["RANK_GO"]):  # the survivors start together, however long imports took
    time.sleep(0.01)
out = aot_function(body, slow_compiler)(x, w)
out.backward()
json.dump({"out": out.item(), "grad": w.grad.sum().item(), "end": time.time(), **default_cache().stats()},
          open(out_path, "w"))
"""


@pytest.mark.redis
@pytest.mark.parametrize("store", ["redis_server", "redis_cluster"])
def test_a_killed_holder_is_replaced_within_the_lease_and_survivors_compile_once(tmp_path, store, request):
    """kill -9 of the compiling rank: one survivor compiles after the lease runs out (5 s), the others load.

    The survivors' lock timeout (30 s) is shorter than their whole wait (the dead holder's 15 s, what is left of
    its lease, 3.75 to 5 s, then the new holder's 20 s compile of forward and backward): it bounds the wait for one
    live holder (NOTE [the timeout follows the holder]), so nobody gives up and compiles a second time. Each
    holder is waited for 20 s at most (the dead one, plus however late this process kills it) or 20 s and its
    saving (the new one): 10 s to spare each. They were 11 s and 6 s against 14 s, 3 s to spare: on a loaded
    machine a late kill or a slow save cost a second compile.
    """

    redis_url = request.getfixturevalue(store).url  # one server, or a 3-node Redis Cluster

    def start(name: str, compile_s: float) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "AOTCACHE_REDIS_URL": redis_url,
               "AOTCACHE_CACHE_DIR": str(tmp_path / f"cache-{name}"), "AOTCACHE_LOCK_TIMEOUT": "30",
               "RANK_COMPILE_S": str(compile_s), "RANK_OUT": str(tmp_path / f"{name}.json"),
               "RANK_GO": str(tmp_path / ("go" if name != "holder" else ""))}
        return subprocess.Popen([sys.executable, "-c", RANK],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    holder = start("holder", 600)
    survivors = []
    try:
        assert holder.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 120
        while not (tmp_path / "holder.json.compiling").exists():
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.1)
        survivors = [start(f"s{i}", 10) for i in range(3)]
        for proc in survivors:
            assert proc.stdout.readline().strip() == "ready"
        (tmp_path / "go").write_text("")
        time.sleep(15)  # longer than the lease: the live holder's heartbeat keeps it
        assert not any((tmp_path / f"s{i}.json.compiling").exists() for i in range(3)), "took a live lease"
        holder.kill()
        killed_at = time.time()
        holder.wait(timeout=30)
        for proc in survivors:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
    finally:
        for proc in [holder, *survivors]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    results = [json.loads((tmp_path / f"s{i}.json").read_text()) for i in range(3)]
    assert sum(r["compile"] for r in results) == 1, results
    assert sum(r["hit"] for r in results) == 2 and sum(r["lock_timeout"] for r in results) == 0, results
    assert len({(r["out"], r["grad"]) for r in results}) == 1
    started = min(float(line) for i in range(3) if (tmp_path / f"s{i}.json.compiling").exists()
                  for line in (tmp_path / f"s{i}.json.compiling").read_text().split())
    print(f"dead holder replaced {started - killed_at:.2f} s after the kill")
