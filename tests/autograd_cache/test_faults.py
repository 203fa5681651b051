"""Faults never crash and never give a wrong result: each is a counted miss, the entry is rebuilt (strict raises)."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from aotcache import config
from aotcache.aot import aot_function
from aotcache.autograd_cache.cache import AOTAutogradCache, entry_store_key
from aotcache.autograd_cache.entry import current_versions, pack_entry, unpack_entry
from aotcache.logs import CacheFault
from aotcache.store.factory import open_tiers
from aotcache.store.interface import key_digest
from aotcache.store.smallpack import DATABASE_NAME
from tests.conftest import REPO_ROOT


def body(x, w):
    return (x @ w).tanh().sum()


def large_body(x, w):
    """A few hundred nodes: its entry (well over 32 KiB) is a file of the disk tier, not a row of the small pack."""
    y = x @ w
    for _ in range(100):
        y = (y * 1.01).tanh()
    return y.sum()


def call(cache, fn=body):
    """A fresh aot_function of ``fn`` called once and checked against eager; returns the counters after."""
    torch.manual_seed(0)
    x, w = torch.randn(4, 3), torch.randn(3, 2, requires_grad=True)
    out = aot_function(fn, "nop", cache=cache)(x, w)
    out.backward()
    expected_w = w.detach().clone().requires_grad_()
    expected = fn(x, expected_w)
    expected.backward()
    assert torch.equal(out, expected) or torch.allclose(out, expected)
    torch.testing.assert_close(w.grad, expected_w.grad)
    return cache.stats()


@pytest.fixture
def cache():
    return AOTAutogradCache(open_tiers("disk", namespace="aot"), journal=False)


def only_entry(cache):
    [listing] = cache.list_entries()
    return entry_store_key(listing.digest, listing.slot)


def replace_entry(cache, store_key, blob):
    cache.delete(store_key)
    assert cache.tiers.insert(store_key, blob)


def truncate_on_disk(cache, store_key, cut):
    """Cut the last ``cut`` bytes of ``store_key``'s frame in whatever form the disk tier keeps it: a file, or
    a row of its small-entry SQLite pack (aotcache/store/smallpack.py). Returns the form, "file" or "row"."""
    disk = cache.tiers.tiers[0]
    digest = key_digest(store_key)
    path = disk.root / digest[:2] / digest
    if path.exists():
        data = path.read_bytes()
        path.write_bytes(data[:-cut])
        return "file"
    with contextlib.closing(sqlite3.connect(disk.root / DATABASE_NAME)) as db, db:
        changed = db.execute("UPDATE entries SET frame = substr(frame, 1, length(frame) - ?) WHERE digest = ?",
                             (cut, bytes.fromhex(digest))).rowcount
    assert changed == 1, f"{store_key} is neither a file nor a row of {disk.root / DATABASE_NAME}"
    return "row"


def tamper_version(entry):
    entry.versions = {**current_versions(), "torch": "0.0.1"}


def tamper_artifact(entry):
    entry.artifacts["forward"] = b"AOTA" + b"\xff" * 40


def tamper_metadata(entry):
    entry.metadata["version"] = 99


def tamper_guards(entry):
    entry.guards = "__import__('os').system('false')"


def tamper_missing_library(entry):
    del entry.artifacts["backward"]


@pytest.mark.parametrize("tamper", [tamper_version, tamper_artifact, tamper_metadata, tamper_guards,
                                    tamper_missing_library])
def test_unusable_entry_is_a_load_error_then_rebuilt(cache, tamper):
    call(cache)
    store_key = only_entry(cache)
    entry = unpack_entry(cache.tiers.get(store_key), check_versions=False)
    tamper(entry)
    replace_entry(cache, store_key, pack_entry(entry))
    stats = call(cache)
    assert stats["load_error"] == 1 and stats["compile"] == 2 and stats["saved"] == 2
    stats = call(cache)
    assert stats["hit"] == 1 and stats["compile"] == 2, "the rebuilt entry must serve the next process"


def test_garbage_bytes_under_the_key_are_a_load_error(cache):
    call(cache)
    replace_entry(cache, only_entry(cache), b"definitely not an entry")
    stats = call(cache)
    assert stats["load_error"] == 1 and stats["saved"] == 2
    assert call(cache)["hit"] == 1


@pytest.mark.parametrize("cut", [1, 200])
@pytest.mark.parametrize(("form", "fn"), [("row", body), ("file", large_body)], ids=["row", "file"])
def test_truncated_entry_on_disk_is_a_store_error_then_rebuilt(cache, form, fn, cut):
    call(cache, fn)
    assert truncate_on_disk(cache, only_entry(cache), cut) == form
    stats = call(cache, fn)
    assert stats["store_error"] == 1 and stats["compile"] == 2 and stats["saved"] == 2
    assert call(cache, fn)["hit"] == 1


def test_strict_mode_raises_on_a_bad_entry(cache):
    call(cache)
    replace_entry(cache, only_entry(cache), b"junk")
    with config.patch(strict=True), pytest.raises(CacheFault, match="unusable compiled-graph entry"):
        call(cache)


@pytest.mark.redis
def test_redis_down_still_correct_and_saved_on_disk(redis_server):
    with config.patch(redis_url=redis_server.url, tiers="memory,disk,redis"):
        cache = AOTAutogradCache(journal=False)
        assert cache.tiers.labels == ("memory", "disk", "redis")
        redis_server.stop()
        stats = call(cache)
        assert stats["compile"] == 1 and stats["saved"] == 1
        assert [item.tiers for item in cache.list_entries()] == [["memory", "disk"]]
        fresh = AOTAutogradCache(journal=False)  # a new process on this machine: disk still serves it
        assert call(fresh)["hit"] == 1


def test_unusable_cache_dir_still_correct(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with config.patch(cache_dir=str(blocker / "aotcache")):
        cache = AOTAutogradCache(open_tiers("disk", namespace="aot"), journal=False)
        for _ in range(2):
            stats = call(cache)
        assert stats["compile"] == 2 and stats["saved"] == 0 and stats["hit"] == 0


HOLD_LOCK = """
import sys, time
from aotcache.autograd_cache.singleflight import SingleFlight
flight = SingleFlight(sys.argv[1])
with flight.hold(sys.argv[2], 5) as ticket:
    print("held", ticket.held, flush=True)
    time.sleep(600)
"""


def _start_holder(lock_dir, name):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock_dir), name], stdout=subprocess.PIPE,
                            text=True, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.readline().strip() == "held True"
    return proc


def _key_digest_of_body(cache):
    call(cache)
    [listing] = cache.list_entries()
    cache.clear()
    return listing.digest


def test_killed_lock_holder_does_not_block(cache):
    digest = _key_digest_of_body(cache)
    holder = _start_holder(cache.lock_dir, digest)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with config.patch(lock_timeout=120):
        stats = call(cache)
    assert stats["lock_timeout"] == 0 and stats["compile"] == 2 and stats["saved"] == 2
    assert stats["lock_wait"] == 0, "a dead holder's lock must not be waited for"  # the kernel dropped its flock


def test_live_lock_holder_times_out_then_compiles_anyway(cache):
    digest = _key_digest_of_body(cache)
    holder = _start_holder(cache.lock_dir, digest)
    try:
        with config.patch(lock_timeout=0.3):
            stats = call(cache)
        assert stats["lock_timeout"] == 1 and stats["lock_wait"] == 1 and stats["compile"] == 2
        with config.patch(lock_timeout=0.3, strict=True), pytest.raises(CacheFault, match="lock_timeout"):
            cache.clear()
            call(cache)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_waiter_probing_with_redis_down_counts_its_store_errors_once(cache):
    """A waiter probes every 50 ms; with Redis down each probe's tier fault is not counted again."""
    from tests.conftest import free_port

    with config.patch(redis_url=f"redis://127.0.0.1:{free_port()}/0"):
        down = AOTAutogradCache(open_tiers("disk,redis", namespace="aot"), journal=False)
    digest = _key_digest_of_body(down)
    down.counters.clear()
    unhindered = call(down)["store_error"]  # a compile with nobody holding the lock
    down.clear()
    down.counters.clear()
    holder = _start_holder(down.lock_dir, digest)
    try:
        with config.patch(lock_timeout=1.0):  # about 20 probes, each missing in Redis (down)
            stats = call(down)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert stats["lock_timeout"] == 1 and stats["compile"] == 1
    assert stats["store_error"] == unhindered > 0  # the ~20 probes while waiting added none
