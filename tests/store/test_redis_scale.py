"""The Redis tier at scale: chunked large entries (NOTE [chunked entries]) and Redis Cluster (NOTE [hash tags])."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
import redis as redis_py

from aotcache.store.redis import RedisCache
from tests.conftest import RedisServer

pytestmark = pytest.mark.redis

MiB = 1024 * 1024


@pytest.fixture
def capped_server(tmp_path):
    """A redis-server that refuses any request bulk over 32 MB, like a tightly configured production one."""
    server = RedisServer(tmp_path, ("--proto-max-bulk-len", "32mb"))
    server.start()
    yield server
    server.stop()


def _chunk_keys(raw, cache):
    return sorted(raw.scan_iter(match=f"{cache.prefix}:chunk:*", count=1000))


def test_a_100mb_entry_round_trips_through_a_server_capped_at_32mb(capped_server):
    raw = redis_py.Redis.from_url(capped_server.url)
    value = os.urandom(100 * MiB)  # incompressible: stored at full size
    whole = RedisCache(capped_server.url, prefix="whole", chunk_bytes=1024**3, timeout=10)
    assert whole.insert("aot/digest/0", value) is False  # one 100 MB SET: refused by this server
    cache = RedisCache(capped_server.url, prefix="big", chunk_bytes=4 * MiB)
    assert cache.insert("aot/digest/0", value) is True
    assert len(_chunk_keys(raw, cache)) == 26  # 100 MiB of value plus its frame header: 26 chunks of <= 4 MiB
    assert raw.strlen(cache.entry_name("aot/digest/0")) < 4096  # the manifest
    reader = RedisCache(capped_server.url, prefix="big", chunk_bytes=4 * MiB)
    assert reader.get("aot/digest/0") == value
    assert reader.stats.bytes_read > 100 * MiB and reader.stats.errors == 0
    [info] = reader.entries()
    assert info.key == "aot/digest/0" and info.size > 100 * MiB and reader.total_bytes() == info.size
    assert cache.insert("aot/digest/0", b"other" * MiB) is False  # insert-once holds for chunked entries
    assert len(_chunk_keys(raw, cache)) == 26  # the losing write left no chunks behind
    assert cache.delete("aot/digest/0") is True and _chunk_keys(raw, cache) == []


def test_a_reader_never_sees_a_partial_chunked_entry(redis_server):
    value = os.urandom(6 * MiB)
    writer = RedisCache(redis_server.url, prefix="partial", chunk_bytes=64 * 1024)
    reader = RedisCache(redis_server.url, prefix="partial", chunk_bytes=64 * 1024)
    seen: list[object] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            got = reader.get("k")
            seen.append(None if got is None else got == value)
            if got is not None:
                return

    thread = threading.Thread(target=read)
    thread.start()
    try:
        assert writer.insert("k", value) is True
    finally:
        thread.join(timeout=60)
        stop.set()
    assert seen[-1] is True and set(seen) <= {None, True}  # a miss, then the whole value: never a wrong one
    assert reader.stats.errors == 0


def test_a_missing_chunk_is_a_counted_miss_and_the_manifest_is_deleted(redis_server):
    raw = redis_py.Redis.from_url(redis_server.url)
    cache = RedisCache(redis_server.url, prefix="evicted", chunk_bytes=64 * 1024)
    assert cache.insert("k", os.urandom(MiB)) is True
    raw.delete(_chunk_keys(raw, cache)[3])  # what an LRU eviction of one chunk does
    assert cache.get("k") is None
    assert cache.stats.corrupt == 1 and cache.stats.errors == 1
    assert raw.exists(cache.entry_name("k")) == 0 and _chunk_keys(raw, cache) == []  # nothing left behind
    assert cache.insert("k", b"again" * 100_000) is True and cache.get("k") == b"again" * 100_000


def test_chunks_take_the_entry_lifetime_once_the_manifest_is_written(redis_server):
    raw = redis_py.Redis.from_url(redis_server.url)
    forever = RedisCache(redis_server.url, prefix="life0", chunk_bytes=64 * 1024, ttl=0)
    assert forever.insert("k", os.urandom(MiB))
    assert {raw.ttl(name) for name in _chunk_keys(raw, forever)} == {-1}
    expiring = RedisCache(redis_server.url, prefix="life1", chunk_bytes=64 * 1024, ttl=100)
    assert expiring.insert("k", os.urandom(MiB))
    assert 0 < raw.ttl(expiring.entry_name("k")) <= 100
    assert all(raw.ttl(name) > 100 for name in _chunk_keys(raw, expiring))  # chunks outlive their manifest


def test_concurrent_readers_of_a_large_entry_leave_the_server_responsive(redis_server):
    """Four threads read a 64 MB chunked entry in a loop; a fifth client's small GETs still get through."""
    value = os.urandom(64 * MiB)
    RedisCache(redis_server.url, prefix="busy").insert("big", value)
    RedisCache(redis_server.url, prefix="busy").insert("small", b"s")
    stop = threading.Event()
    reads = []

    def big_reader() -> None:
        cache = RedisCache(redis_server.url, prefix="busy", timeout=5)
        while not stop.is_set():
            reads.append(cache.get("big") == value)

    readers = [threading.Thread(target=big_reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    small = RedisCache(redis_server.url, prefix="busy")  # the tests' timeout (NOTE [Redis timeouts under load])
    small_ok = 0
    try:
        while len(reads) < 8:
            small_ok += small.get("small") == b"s"
    finally:
        stop.set()
        for thread in readers:
            thread.join(timeout=120)
    assert all(reads) and small_ok > 0 and small.stats.errors == 0


# ----------------------------------------------------------------------------------------------------
# Redis Cluster
# ----------------------------------------------------------------------------------------------------


def _keyslot(cluster, name) -> int:
    out = subprocess.run(["redis-cli", "-p", str(cluster.servers[0].port), "cluster", "keyslot", name],
                         capture_output=True, text=True, timeout=10).stdout
    return int(out.strip())


def _dbsizes(cluster) -> list[int]:
    return [redis_py.Redis(port=server.port).dbsize() for server in cluster.servers]


def test_cluster_spreads_entries_and_keeps_an_entry_its_chunks_and_lock_together(redis_cluster):
    cache = RedisCache(redis_cluster.url, prefix="aotcache:aot", chunk_bytes=64 * 1024)
    for index in range(30):
        assert cache.insert(f"aot/{index:064x}/0", b"v%d" % index) is True
    assert all(size > 0 for size in _dbsizes(redis_cluster))  # every node holds some entries
    assert cache.insert("aot/" + "e" * 64 + "/1", os.urandom(MiB)) is True
    lock = cache.lock("compile:" + "e" * 64, 5, group="aot/" + "e" * 64)
    assert lock.try_acquire() is True
    raw = redis_py.RedisCluster.from_url(redis_cluster.url.replace("redis+cluster", "redis"))
    chunk_names = list(raw.scan_iter(match="aotcache:aot:chunk:*", count=1000, target_nodes=raw.ALL_NODES))
    slots = {_keyslot(redis_cluster, name.decode()) for name in chunk_names}
    slots.add(_keyslot(redis_cluster, cache.entry_name("aot/" + "e" * 64 + "/1")))
    slots.add(_keyslot(redis_cluster, cache.entry_name("aot/" + "e" * 64 + "/0")))  # another slot of the graph
    slots.add(_keyslot(redis_cluster, lock.redis_key))
    assert len(chunk_names) == 17 and len(slots) == 1
    reader = RedisCache(redis_cluster.url, prefix="aotcache:aot")
    assert [reader.get(f"aot/{index:064x}/0") for index in range(30)] == [b"v%d" % index for index in range(30)]
    assert len(list(reader.entries())) == 31
    assert lock.release() is True
    assert reader.clear() == 31 and sum(_dbsizes(redis_cluster)) == 0


def test_a_cluster_node_killed_mid_job_gives_misses_never_a_wrong_value(redis_cluster):
    cache = RedisCache(redis_cluster.url, prefix="aotcache:aot", chunk_bytes=64 * 1024)
    values = {f"aot/{index:064x}/0": os.urandom(100 + index) for index in range(20)}
    values["aot/" + "b" * 64 + "/0"] = os.urandom(MiB)
    for key, value in values.items():
        assert cache.insert(key, value) is True
    redis_cluster.kill(1)
    started = time.monotonic()
    got = {key: cache.get(key) for key in values}
    elapsed = time.monotonic() - started
    assert all(value is None or value == values[key] for key, value in got.items())
    assert any(value is None for value in got.values()) and cache.stats.errors >= 1
    assert elapsed < 20 * cache.timeout * 4  # no hang: at worst a few timeouts, not one per retry loop
    assert cache.insert("aot/" + "c" * 64 + "/0", b"late") in (True, False)  # degrades, never raises


def test_a_cluster_that_is_down_at_start_is_a_miss_not_a_crash():
    from tests.conftest import free_port

    cache = RedisCache(f"redis+cluster://127.0.0.1:{free_port()}", prefix="aotcache:aot")
    assert cache.get("k") is None and cache.insert("k", b"v") is False
    assert cache.stats.errors >= 1


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://host-without-port"])
def test_a_cluster_url_without_a_node_is_a_clear_error(url):
    from aotcache.store.interface import CacheError

    with pytest.raises(CacheError, match="redis\\+cluster://host:"):  # the form, or the node the URL lacks
        RedisCache(url, prefix="p")
