"""Per-machine fan-out: processes sharing a cache dir fetch a Redis entry once (NOTE [per-machine fan-out])."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from aotcache.store.redis import RedisCache
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.redis

# One process of the machine: opens the configured tiers, waits for a common start time, looks the key up.
READER = """
import hashlib, json, sys, time
from aotcache.store.factory import open_tiers
start_at, out = float(sys.argv[1]), sys.argv[2]
cache = open_tiers(namespace="fan")
while time.time() < start_at:
    time.sleep(0.005)
found = cache.lookup("aot/digest/0")
json.dump({"tier": found.tier, "sha": hashlib.sha256(found.value).hexdigest(),
           "rows": cache.stats_by_tier()}, open(out, "w"))
"""


def test_processes_of_one_machine_download_a_remote_entry_once(tmp_path, redis_server, isolated_cache_dir):
    value = os.urandom(24 * 1024 * 1024)
    assert RedisCache(redis_server.url, prefix="aotcache:fan").insert("aot/digest/0", value)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "AOTCACHE_REDIS_URL": redis_server.url,
           "AOTCACHE_CACHE_DIR": str(isolated_cache_dir)}
    start_at = time.time() + 8  # after every process has imported the store
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(start_at), str(tmp_path / f"{i}.json")], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(4)]
    assert {r["sha"] for r in results} == {hashlib.sha256(value).hexdigest()}
    assert sum(r["rows"]["redis"]["hits"] for r in results) == 1, results  # one download for the machine
    assert sorted(r["tier"] for r in results) == ["disk", "disk", "disk", "redis"]
    assert sum(r["rows"]["redis"]["bytes_read"] for r in results) < 2 * len(value)


def test_a_key_missing_remotely_takes_no_fetch_lock(redis_server, isolated_cache_dir, monkeypatch):
    from aotcache.store.factory import open_tiers

    monkeypatch.setenv("AOTCACHE_REDIS_URL", redis_server.url)
    cache = open_tiers(namespace="fan")
    assert cache.lookup("absent").status.name == "MISS"
    fetch_dir = isolated_cache_dir / "locks" / "fan" / "fetch"
    assert not fetch_dir.exists() or not list(fetch_dir.glob("*.fetch.lock"))  # EXISTS said no: no lock taken
    assert cache.stats_by_tier()["redis"]["misses"] == 1
