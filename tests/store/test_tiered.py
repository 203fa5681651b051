"""TieredCache over real memory, disk and Redis tiers: order, backfill, write policy, faults, stats; ReadOnly;
and the tier factory."""

from __future__ import annotations

import errno
import logging
import time
import uuid

import pytest

from aotcache import config, logs
from aotcache.logs import CacheFault
from aotcache.store.disk import OnDiskCache
from aotcache.store.factory import open_tier, open_tiers, resolve_tier_names
from aotcache.store.interface import Cache, CacheError, LookupStatus
from aotcache.store.journal import StatsJournal
from aotcache.store.memory import InMemoryCache
from aotcache.store.redis import RedisCache
from aotcache.store.tiered import ReadOnly, TieredCache


class FailingTier(Cache):
    """Fault injection: a tier whose every operation raises (a full disk, a dead mount)."""

    name = "flaky"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def get(self, key):
        self.calls += 1
        raise OSError(errno.EIO, "injected read failure")

    def insert(self, key, value):
        self.calls += 1
        raise OSError(errno.ENOSPC, "injected: no space left on device")


@pytest.fixture
def memory():
    return InMemoryCache()


@pytest.fixture
def disk(tmp_path):
    cache = OnDiskCache("tiered-test", base_dir=tmp_path / "disk")
    yield cache
    cache.close()


@pytest.fixture
def remote(redis_server):
    cache = RedisCache(redis_server.url, prefix=f"tiered-{uuid.uuid4().hex[:8]}", backoff_initial_s=0.2,
                       backoff_max_s=0.2)
    yield cache
    cache.close()


# ----------------------------------------------------------------------------------------------------
# Reads: order, backfill, which tier answered
# ----------------------------------------------------------------------------------------------------


def test_hit_in_redis_backfills_disk_and_memory(memory, disk, remote):
    tiered = TieredCache([memory, disk, remote])
    assert remote.insert("k", {"artifact": b"x" * 1000})
    found = tiered.lookup("k")
    assert found.hit and found.tier == "redis" and found.value == {"artifact": b"x" * 1000}
    assert memory.get("k") == {"artifact": b"x" * 1000}
    assert disk.get("k") == {"artifact": b"x" * 1000}
    assert tiered.lookup("k").tier == "memory"
    rows = tiered.stats_by_tier()
    assert rows["redis"]["hits"] == 1 and rows["disk"]["misses"] == 1 and rows["memory"]["misses"] == 1
    assert rows["memory"]["hits"] == 1
    assert rows["memory"]["backfills"] == 1 and rows["disk"]["backfills"] == 1 and rows["redis"]["backfills"] == 0


def test_hit_in_disk_backfills_only_faster_tiers(memory, disk, remote):
    tiered = TieredCache([memory, disk, remote])
    disk.insert("k", b"v")
    assert tiered.lookup("k").tier == "disk"
    assert memory.get("k") == b"v"
    assert remote.get("k") is None  # slower tiers are not written by a read


def test_backfill_can_be_turned_off(memory, disk):
    tiered = TieredCache([memory, disk], backfill=False)
    disk.insert("k", b"v")
    assert tiered.get("k") == b"v"
    assert memory.get("k") is None


def test_miss_everywhere_is_a_miss(memory, disk, remote):
    tiered = TieredCache([memory, disk, remote])
    result = tiered.lookup("absent")
    assert result.status is LookupStatus.MISS and result.tier is None
    assert tiered.stats.misses == 1
    assert all(row["misses"] == 1 for row in tiered.stats_by_tier().values())


def test_corrupt_entry_in_one_tier_falls_through_to_the_next(memory, disk, remote, redis_server):
    import redis as redis_py

    tiered = TieredCache([memory, remote, disk])
    disk.insert("k", b"good")
    remote.insert("k", b"good")
    raw = redis_py.Redis.from_url(redis_server.url)
    raw.setrange(remote.entry_name("k"), 45, b"\xff\xff")
    found = tiered.lookup("k")
    assert found.hit and found.tier == "disk" and found.value == b"good"
    assert tiered.stats_by_tier()["redis"]["corrupt"] == 1
    # the corrupt remote entry was deleted, and the backfill rewrote a good one
    assert remote.get("k") == b"good"


# ----------------------------------------------------------------------------------------------------
# Writes: write-through and the write policy
# ----------------------------------------------------------------------------------------------------


def test_insert_writes_through_every_tier_once(memory, disk, remote):
    tiered = TieredCache([memory, disk, remote])
    assert tiered.insert("k", b"v") is True
    assert memory.get("k") == disk.get("k") == remote.get("k") == b"v"
    assert tiered.insert("k", b"other") is False
    rows = tiered.stats_by_tier()
    assert all(row["inserts"] == 1 for row in rows.values())
    # slowest first: the Redis tier already held the key, which ends the write (NOTE [insert-once across tiers])
    assert [row["insert_conflicts"] for row in rows.values()] == [0, 0, 1]
    assert memory.get("k") == disk.get("k") == remote.get("k") == b"v"
    assert rows["disk"]["bytes_written"] > 0 and rows["redis"]["bytes_written"] > 0
    assert tiered.stats.inserts == 1 and tiered.stats.insert_conflicts == 1


def test_insert_of_a_key_a_slower_tier_holds_is_a_conflict_and_keeps_the_first_value(memory, disk):
    tiered = TieredCache([memory, disk])
    disk.insert("k", b"first")
    assert tiered.insert("k", b"second") is False  # the key exists: insert never overwrites
    assert tiered.stats_by_tier()["disk"]["insert_conflicts"] == 1
    assert memory.get("k") is None  # the faster tier was not given a second value
    assert tiered.get("k") == b"first" and memory.get("k") == b"first"  # get backfills the stored one


def test_key_held_only_by_a_faster_tier_reaches_the_slower_one_but_reports_existing(memory, disk):
    memory.insert("k", b"old")
    tiered = TieredCache([memory, disk])
    assert tiered.insert("k", b"v") is False  # memory held another value (after disk stored this one)
    assert disk.get("k") == b"v" and tiered.get("k") == b"old"


def test_failing_tier_is_logged_once_and_others_keep_working(memory, disk, caplog):
    flaky = FailingTier()
    tiered = TieredCache([memory, flaky, disk])
    with caplog.at_level(logging.WARNING, logger="aotcache"):
        for index in range(5):
            assert tiered.insert(f"k{index}", b"v") is True
        fresh = TieredCache([FailingTier(), disk])
        for index in range(5):
            found = fresh.lookup(f"k{index}")
            assert found.hit and found.tier == "disk"
    assert all(disk.get(f"k{index}") == b"v" for index in range(5))
    assert flaky.calls == 5 and flaky.stats.errors == 5
    assert tiered.stats_by_tier()["flaky"]["errors"] == 5
    assert tiered.stats.errors == 5
    messages = [record.getMessage() for record in caplog.records]
    assert sum("flaky cache tier failed during insert" in message for message in messages) == 1
    assert sum("flaky cache tier failed during get" in message for message in messages) == 1


def test_failing_tier_lookup_reports_error_when_nothing_hits(memory):
    tiered = TieredCache([memory, FailingTier()])
    result = tiered.lookup("absent")
    assert result.status is LookupStatus.ERROR and "flaky" in result.error
    assert result.value is None


def test_write_policy_all_vs_require_all(memory, disk):
    assert TieredCache([memory, FailingTier(), disk], write_policy="all").insert("a", b"v") is True
    strict_writes = TieredCache([InMemoryCache(), FailingTier(), disk], write_policy="require_all")
    assert strict_writes.insert("b", b"v") is False
    assert disk.get("b") == b"v"  # a failure in one tier never stops the others
    assert TieredCache([InMemoryCache(), disk], write_policy="require_all").insert("c", b"v") is True
    with pytest.raises(CacheError, match="write_policy"):
        TieredCache([memory], write_policy="most")


def test_require_all_sees_a_fault_handled_inside_a_tier(memory, remote, redis_server):
    tiered = TieredCache([memory, remote], write_policy="require_all")
    redis_server.stop()
    assert tiered.insert("k", b"v") is False  # redis returned False, but counted an error: a failure
    assert memory.get("k") == b"v"
    assert TieredCache([InMemoryCache(), remote], write_policy="all").insert("k", b"v") is True


def test_real_disk_fault_is_a_miss_and_memory_keeps_working(memory, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a file where the cache directory should be")
    broken_disk = OnDiskCache("x", base_dir=blocker)
    tiered = TieredCache([memory, broken_disk])
    assert tiered.insert("k", b"v") is True
    assert tiered.get("k") == b"v"
    assert tiered.stats_by_tier()["disk"]["errors"] >= 1


def test_misuse_propagates(memory, disk):
    tiered = TieredCache([memory, disk])
    with pytest.raises(CacheError, match="not picklable"):
        tiered.get(lambda: 0)
    with pytest.raises(CacheError):
        tiered.insert("k", lambda: 0)
    with pytest.raises(CacheError, match="Cache objects"):
        TieredCache([memory, {}])


def test_strict_mode_raises_on_a_failing_tier(memory):
    tiered = TieredCache([memory, FailingTier()])
    with config.patch(strict=True), pytest.raises(CacheFault, match="no space left"):
        tiered.insert("k", b"v")


# ----------------------------------------------------------------------------------------------------
# Redis killed mid-run
# ----------------------------------------------------------------------------------------------------


def test_redis_killed_mid_run_local_tiers_keep_serving_then_redis_recovers(memory, disk, remote, redis_server):
    tiered = TieredCache([memory, disk, remote])
    for index in range(10):
        assert tiered.insert(f"old{index}", b"v%d" % index)
    redis_server.stop()
    started = time.monotonic()
    for round_index in range(20):
        for index in range(10):
            assert tiered.get(f"old{index}") == b"v%d" % index  # served by memory
        assert tiered.insert(f"new{round_index}", b"n") is True  # memory and disk still store
        assert tiered.lookup(f"missing{round_index}").status is LookupStatus.ERROR
    elapsed = time.monotonic() - started
    assert all(disk.get(f"new{index}") == b"n" for index in range(20))
    # Redis was asked at most once per back-off window (0.2 s), not once per call (40 calls reached it).
    assert 1 <= remote.stats.errors <= 2 + int(elapsed / 0.2)
    assert remote.skipped > 0
    redis_server.start()
    deadline = time.monotonic() + 10
    attempt = 0
    while True:  # once the back-off window has passed, writes reach Redis again
        attempt += 1
        assert tiered.insert(f"after{attempt}", b"a") is True
        if remote.get(f"after{attempt}") == b"a":
            break
        assert time.monotonic() < deadline, "redis did not come back"
        time.sleep(0.05)
    assert remote.describe()["available"] is True


# ----------------------------------------------------------------------------------------------------
# ReadOnly
# ----------------------------------------------------------------------------------------------------


def test_read_only_passes_reads_and_refuses_inserts(disk):
    disk.insert("k", b"v")
    read_only = ReadOnly(disk)
    assert read_only.get("k") == b"v" and read_only.lookup("k").hit
    assert read_only.insert("new", b"x") is False
    assert read_only.rejected_inserts == 1 and disk.get("new") is None
    assert read_only.name == "disk" and read_only.stats is disk.stats
    with pytest.raises(CacheError, match="read-only"):
        read_only.delete("k")
    with pytest.raises(CacheError, match="read-only"):
        read_only.clear()
    with pytest.raises(CacheError, match="not picklable"):
        read_only.insert(lambda: 0, b"x")


def test_read_only_tier_in_a_stack_is_read_but_never_written(memory, disk, remote):
    remote.insert("shared", b"from-ci")
    tiered = TieredCache([memory, disk, ReadOnly(remote)], write_policy="require_all")
    assert tiered.lookup("shared").tier == "redis"
    assert disk.get("shared") == b"from-ci"
    assert tiered.insert("local", b"v") is True  # read-only tiers do not count against require_all
    assert remote.get("local") is None
    tiered_backfilling_into_ro = TieredCache([ReadOnly(InMemoryCache()), disk])
    assert tiered_backfilling_into_ro.get("shared") == b"from-ci"
    assert tiered_backfilling_into_ro.tiers[0].inner.get("shared") is None


# ----------------------------------------------------------------------------------------------------
# Stats, labels, maintenance, journal feed
# ----------------------------------------------------------------------------------------------------


def test_stats_by_tier_has_every_counter(memory, disk):
    tiered = TieredCache([memory, disk])
    tiered.insert("k", b"v" * 100)
    tiered.get("k")
    tiered.get("absent")
    rows = tiered.stats_by_tier()
    assert list(rows) == ["memory", "disk"]
    expected = {"hits", "misses", "inserts", "insert_conflicts", "bytes_read", "bytes_written", "evictions",
                "errors", "corrupt", "unverified", "get_seconds", "insert_seconds", "backfills"}
    assert set(rows["disk"]) == expected
    assert rows["memory"]["hits"] == 1 and rows["memory"]["misses"] == 1 and rows["disk"]["misses"] == 1
    assert rows["disk"]["get_seconds"] > 0 and rows["disk"]["insert_seconds"] > 0


def test_repeated_tier_names_get_unique_labels():
    tiered = TieredCache([InMemoryCache(), InMemoryCache(), InMemoryCache()])
    assert tiered.labels == ("memory", "memory#2", "memory#3")
    assert list(tiered.stats_by_tier()) == ["memory", "memory#2", "memory#3"]


def test_empty_stack_always_misses():
    tiered = TieredCache([])
    assert tiered.get("k") is None and tiered.insert("k", b"v") is False


def test_maintenance_spans_writable_tiers(memory, disk, remote):
    tiered = TieredCache([memory, disk, ReadOnly(remote)])
    remote.insert("remote-only", b"r")
    tiered.insert("a", b"1")
    tiered.insert("b", b"2")
    assert {info.tier for info in tiered.entries()} == {"memory", "disk", "redis"}
    assert tiered.delete("a") is True and tiered.get("a") is None
    assert tiered.clear() == 2  # b in memory and disk; the read-only redis tier is left alone
    assert remote.get("remote-only") == b"r"


@pytest.fixture
def fresh_log_once(monkeypatch):
    """Forget which fault keys this process already logged, so that "logged once" is observable here."""
    monkeypatch.setattr(logs, "_seen", set())


def test_delete_with_redis_down_cleans_local_tiers_and_counts_the_fault(memory, disk, remote, redis_server,
                                                                        caplog, fresh_log_once):
    tiered = TieredCache([memory, disk, remote])
    for key in ("bad", "worse"):
        assert tiered.insert(key, b"entry")
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="aotcache"):
        assert tiered.delete("bad") is True  # no exception: the local tiers were still cleaned
        assert tiered.delete("worse") is True
    assert memory.get("bad") is None and disk.get("bad") is None
    assert memory.get("worse") is None and disk.get("worse") is None
    assert tiered.stats_by_tier()["redis"]["errors"] >= 2 and tiered.stats.errors == 2
    assert tiered.stats_by_tier()["disk"]["errors"] == 0
    messages = [record.getMessage() for record in caplog.records]
    assert sum("redis tier refused delete" in message for message in messages) == 1, messages
    redis_server.start()


def test_clear_with_redis_down_clears_local_tiers(memory, disk, remote, redis_server):
    tiered = TieredCache([memory, disk, remote])
    for key in ("a", "b"):
        assert tiered.insert(key, b"v")
    redis_server.stop()
    assert tiered.clear() == 4  # two entries in each local tier; the unreachable Redis adds none
    assert list(memory.entries()) == [] and list(disk.entries()) == []
    assert tiered.stats.errors == 1 and tiered.stats_by_tier()["redis"]["errors"] >= 1
    redis_server.start()


def test_delete_in_strict_mode_raises_after_cleaning_the_tiers_before_the_fault(memory, disk, remote,
                                                                                 redis_server):
    tiered = TieredCache([memory, disk, remote])
    assert tiered.insert("k", b"v")
    redis_server.stop()
    with config.patch(strict=True), pytest.raises(CacheFault, match="cannot delete Redis"):
        tiered.delete("k")
    assert memory.get("k") is None and disk.get("k") is None
    redis_server.start()


def test_delete_skips_read_only_and_unsupporting_tiers_silently(memory, disk, remote, redis_server, caplog,
                                                                 fresh_log_once):
    tiered = TieredCache([memory, FailingTier(), disk, ReadOnly(remote)])  # FailingTier has no delete
    assert remote.insert("k", b"shared")
    assert memory.insert("k", b"v") and disk.insert("k", b"v")
    with caplog.at_level(logging.WARNING, logger="aotcache"):
        assert tiered.delete("k") is True
        assert tiered.delete("absent") is False
        assert remote.get("k") == b"shared"  # a read-only tier is not ours to change
        redis_server.stop()
        assert tiered.delete("k") is False and tiered.clear() == 0  # nor to report on when it is down
    assert disk.get("k") is None
    assert tiered.stats.errors == 0 and tiered.stats_by_tier()["redis"]["errors"] == 0
    assert caplog.records == []
    redis_server.start()


def test_delete_reports_misuse_before_asking_any_tier(memory, disk):
    tiered = TieredCache([memory, disk])
    assert tiered.insert("k", b"v")
    with pytest.raises(CacheError, match="not picklable"):
        tiered.delete(lambda: 0)
    assert memory.get("k") == b"v" and tiered.stats.errors == 0


def test_journal_receives_per_tier_deltas(memory, disk, tmp_path):
    journal = StatsJournal(tmp_path / "stats.json")
    tiered = TieredCache([memory, disk])
    tiered.attach_journal(journal)
    tiered.insert("k", b"v")
    tiered.get("k")
    assert journal.flush() is True
    first = journal.read()
    assert first["tier:memory"]["hits"] == 1 and first["tier:disk"]["inserts"] == 1
    tiered.get("k")
    journal.flush()
    second = journal.read()
    assert second["tier:memory"]["hits"] == 2  # deltas: the first hit is not added twice
    assert second["tier:disk"]["inserts"] == 1


# ----------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------


def test_open_tiers_without_redis_url_skips_redis(isolated_cache_dir):
    tiered = open_tiers(namespace="graphs")
    assert tiered.labels == ("memory", "disk")
    assert tiered.insert("k", b"v") is True
    assert isinstance(tiered.tiers[1], OnDiskCache)
    assert str(tiered.tiers[1].directory).startswith(str(isolated_cache_dir))
    again = open_tiers("disk", namespace="graphs")
    assert again.get("k") == b"v"
    assert open_tiers("disk", namespace="other").get("k") is None


def test_open_tiers_with_redis_url_uses_namespace_prefix(redis_server):
    with config.patch(redis_url=redis_server.url, tiers="memory,redis", redis_ttl=60):
        tiered = open_tiers(namespace="kernels")
    assert tiered.labels == ("memory", "redis")
    redis_tier = tiered.tiers[1]
    assert redis_tier.prefix == "aotcache:kernels" and redis_tier.ttl == 60
    assert tiered.insert("k", b"v") and redis_tier.get("k") == b"v"


def test_open_tiers_reads_secret_and_bounds_from_config():
    with config.patch(secret="s", max_bytes=12345, tiers="disk"):
        disk_tier = open_tiers().tiers[0]
    assert disk_tier.signed and disk_tier.max_bytes == 12345


def test_open_tiers_disabled_has_no_tiers():
    with config.patch(enabled=False):
        tiered = open_tiers()
    assert tiered.tiers == () and tiered.get("k") is None


def test_open_tiers_rejects_bad_input():
    with pytest.raises(CacheError, match="AOTCACHE_TIERS"):
        open_tiers("memory,tape")
    with pytest.raises(CacheError, match="AOTCACHE_TIERS"):
        resolve_tier_names(["disk", "disk"])
    with pytest.raises(CacheError, match="namespace"):
        open_tiers(namespace="../escape")
    with pytest.raises(CacheError, match="unknown cache tier"):
        open_tier("tape")
    assert open_tier("redis") is None


def test_open_tiers_feeds_a_journal(tmp_path):
    journal = StatsJournal(tmp_path / "stats.json")
    tiered = open_tiers("memory", journal=journal)
    tiered.insert("k", b"v")
    assert journal.read()["tier:memory"]["inserts"] == 1


class _DiskThenConcurrentGet(OnDiskCache):
    """A disk tier whose insert lets another thread's get run right after it stored the value."""

    hook = None

    def insert(self, key, value):
        stored = super().insert(key, value)
        if stored and self.hook is not None:
            import threading

            thread = threading.Thread(target=self.hook, args=(key,))
            thread.start()
            thread.join()
        return stored


def test_insert_that_stored_returns_true_despite_a_concurrent_backfill(tmp_path):
    """NOTE [insert-once across tiers]: a get backfilling memory between the disk and memory writes used to
    make the storing insert return False, so no insert of the key returned True."""
    disk = _DiskThenConcurrentGet("race", tmp_path)
    cache = TieredCache([InMemoryCache(), disk])
    seen = []
    disk.hook = lambda key: seen.append(cache.get(key))
    assert cache.insert("k", "v1") is True
    assert seen == ["v1"]
    disk.hook = None
    assert cache.insert("k", "v2") is False
    assert cache.get("k") == "v1"
