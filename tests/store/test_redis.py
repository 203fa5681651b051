"""RedisCache against a real redis-server: insert-once, framing, TTL, faults and back-off, locks."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis as redis_py

from aotcache import config
from aotcache.logs import CacheFault
from aotcache.store import frame
from aotcache.store.interface import CacheError, LookupStatus, encode_key, key_digest
from aotcache.store.redis import RedisCache
from tests.conftest import REPO_ROOT, free_port, run_python

pytestmark = pytest.mark.redis


@pytest.fixture
def raw(redis_server):
    client = redis_py.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def prefix():
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cache(redis_server, prefix):
    instance = RedisCache(redis_server.url, prefix=prefix)
    yield instance
    instance.close()


class Touch:
    """A pickled payload with a side effect: unpickling it creates ``path`` (proves nothing was unpickled)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# ----------------------------------------------------------------------------------------------------
# The cache contract
# ----------------------------------------------------------------------------------------------------


def test_insert_once_and_roundtrip_of_bytes_and_objects(cache):
    assert cache.get("k") is None
    assert cache.insert("k", b"first") is True
    assert cache.insert("k", b"second") is False
    assert cache.get("k") == b"first"
    key = ("graph", 3, frozenset({1, 2}))
    assert cache.insert(key, {"code": [1, 2, 3]}) is True
    assert cache.get(key) == {"code": [1, 2, 3]}
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.inserts, stats.insert_conflicts) == (2, 1, 2, 1)
    assert stats.bytes_written > len(b"first") and stats.bytes_read == stats.bytes_written
    assert stats.errors == 0


def test_lookup_tells_hit_from_miss(cache):
    assert cache.lookup("absent").status is LookupStatus.MISS
    cache.insert("present", b"v")
    found = cache.lookup("present")
    assert found.hit and found.value == b"v" and found.tier == "redis"


def test_key_names_carry_prefix_and_frame_version(cache, raw, redis_server, prefix):
    cache.insert("k", b"v")
    # NOTE [hash tags]: the tag of a key without "/" is derived from the key itself
    expected = f"{prefix}:v{frame.FRAME_VERSION}:{{{cache.hash_tag('k')}}}:{key_digest('k')}"
    assert cache.entry_name("k") == expected
    assert raw.exists(expected) == 1
    other = RedisCache(redis_server.url, prefix=prefix + "-other")
    assert other.get("k") is None
    assert other.insert("k", b"other") is True
    assert cache.get("k") == b"v"


def test_ttl_sets_expiry_and_zero_means_none(redis_server, raw, prefix):
    with_ttl = RedisCache(redis_server.url, prefix=prefix, ttl=100)
    with_ttl.insert("a", b"1")
    assert 0 < raw.ttl(with_ttl.entry_name("a")) <= 100
    with config.patch(redis_ttl=50):
        from_config = RedisCache(redis_server.url, prefix=prefix)
    from_config.insert("b", b"1")
    assert 0 < raw.ttl(from_config.entry_name("b")) <= 50
    forever = RedisCache(redis_server.url, prefix=prefix, ttl=0)
    forever.insert("c", b"1")
    assert raw.ttl(forever.entry_name("c")) == -1


def test_large_values_are_compressed_in_redis(redis_server, raw, prefix):
    cache = RedisCache(redis_server.url, prefix=prefix, compress_min_bytes=1024)
    value = b"\0" * 200_000
    cache.insert("big", value)
    assert raw.strlen(cache.entry_name("big")) < 10_000
    assert cache.get("big") == value


def test_unpicklable_key_or_value_is_a_clear_error(cache):
    with pytest.raises(CacheError, match="not picklable"):
        cache.get(lambda: 0)
    with pytest.raises(CacheError, match="not picklable"):
        cache.insert("k", lambda: 0)


def test_bad_settings_are_clear_errors(redis_server):
    with pytest.raises(CacheError, match="AOTCACHE_REDIS_URL"):
        RedisCache()
    with pytest.raises(CacheError, match="timeout"):
        RedisCache(redis_server.url, timeout=0)
    with pytest.raises(CacheError, match="invalid Redis URL"):
        RedisCache("http://example.invalid/0")


def test_url_from_config_and_describe_hides_credentials(redis_server, prefix):
    with config.patch(redis_url=redis_server.url):
        cache = RedisCache(prefix=prefix)
    assert cache.insert("k", b"v") and cache.get("k") == b"v"
    described = RedisCache(f"redis://user:hunter2@127.0.0.1:{redis_server.port}/0").describe()
    assert "hunter2" not in str(described) and described["available"] is True


# ----------------------------------------------------------------------------------------------------
# Corrupt, tampered and unsigned entries
# ----------------------------------------------------------------------------------------------------


def test_tampered_entry_is_rejected_counted_and_deleted(cache, raw):
    cache.insert("k", b"payload" * 100)
    name = cache.entry_name("k")
    blob = raw.get(name)
    raw.setrange(name, len(blob) - 3, b"X")  # flip bytes inside the payload
    result = cache.lookup("k")
    assert result.status is LookupStatus.ERROR and "checksum" in result.error
    assert cache.stats.corrupt == 1 and cache.stats.errors == 1
    assert raw.exists(name) == 0
    assert cache.insert("k", b"fresh") is True and cache.get("k") == b"fresh"


def test_truncated_entry_is_a_miss(cache, raw):
    cache.insert("k", b"payload" * 100)
    name = cache.entry_name("k")
    raw.set(name, raw.get(name)[:30])
    assert cache.get("k") is None
    assert cache.stats.corrupt == 1


def test_entry_of_another_key_is_rejected(cache, raw):
    cache.insert("a", b"value of a")
    raw.set(cache.entry_name("b"), raw.get(cache.entry_name("a")))
    assert cache.lookup("b").status is LookupStatus.ERROR
    assert cache.get("a") == b"value of a"


def test_signed_entries_roundtrip_and_a_wrong_secret_is_rejected(redis_server, prefix):
    signer = RedisCache(redis_server.url, prefix=prefix, secret="right")
    assert signer.insert("k", {"v": 1}) and signer.get("k") == {"v": 1}
    impostor = RedisCache(redis_server.url, prefix=prefix, secret="wrong")
    result = impostor.lookup("k")
    assert result.status is LookupStatus.ERROR and "signature" in result.error
    # A miss for the impostor only: the entry is kept for the processes holding the right secret.
    assert impostor.stats.unverified == 1 and impostor.stats.corrupt == 0 and impostor.stats.errors == 0
    assert signer.get("k") == {"v": 1}
    assert impostor.insert("k", {"v": 2}) is False and signer.get("k") == {"v": 1}


def test_damaged_signed_entry_is_corrupt_not_foreign(redis_server, raw, prefix):
    """A bit flip in a signed entry fails the checksum (checked first): deleted, whatever the reader's secret."""
    signer = RedisCache(redis_server.url, prefix=prefix, secret="right")
    assert signer.insert("k", b"payload" * 100)
    name = signer.entry_name("k")
    blob = bytearray(raw.get(name))
    blob[-5] ^= 1
    raw.set(name, bytes(blob))
    impostor = RedisCache(redis_server.url, prefix=prefix, secret="wrong")
    result = impostor.lookup("k")
    assert result.status is LookupStatus.ERROR and "checksum" in result.error
    assert impostor.stats.corrupt == 1 and impostor.stats.unverified == 0 and raw.exists(name) == 0


def test_unsigned_entry_is_rejected_before_unpickling(redis_server, raw, prefix, tmp_path):
    marker = tmp_path / "unpickled"
    key = "evil"
    blob = frame.encode(encode_key(key), Touch(str(marker)))  # unsigned frame with a live pickle payload
    trusting = RedisCache(redis_server.url, prefix=prefix + "-control")
    secured = RedisCache(redis_server.url, prefix=prefix, secret="s3cret")

    raw.set(secured.entry_name(key), blob)
    result = secured.lookup(key)
    assert result.status is LookupStatus.ERROR and "unsigned" in result.error
    assert not marker.exists()
    assert secured.stats.unverified == 1 and secured.stats.corrupt == 0 and raw.exists(secured.entry_name(key))

    # Control: without a secret the same bytes would run the payload, so the check above is meaningful.
    raw.set(trusting.entry_name(key), blob)
    trusting.get(key)
    assert marker.exists()


def test_corrupt_entry_in_strict_mode_raises(cache, raw):
    cache.insert("k", b"v" * 50)
    raw.setrange(cache.entry_name("k"), 60, b"!")
    with config.patch(strict=True), pytest.raises(CacheFault, match="checksum"):
        cache.get("k")


# ----------------------------------------------------------------------------------------------------
# Faults: refused, timeout, killed mid-run; back-off
# ----------------------------------------------------------------------------------------------------


def test_connection_refused_costs_one_attempt_per_backoff_window(caplog):
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", prefix="p")
    with caplog.at_level(logging.WARNING, logger="aotcache"):
        results = [cache.get(f"k{index}") for index in range(30)] + [cache.insert("k", b"v") for _ in range(30)]
    assert not any(results)
    assert cache.stats.errors == 1
    assert cache.skipped == 59
    assert cache.stats.misses == 30
    assert cache.describe()["available"] is False
    warnings = [record for record in caplog.records if "unavailable" in record.getMessage()]
    assert len(warnings) == 1


def test_unavailable_redis_in_strict_mode_raises():
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", prefix="p")
    with config.patch(strict=True), pytest.raises(CacheFault, match="unavailable"):
        cache.get("k")
    assert cache.stats.errors == 1


class BlackHoleServer:
    """Fault injection: accepts TCP connections and reads commands but never answers; counts connections."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            self._held.append(conn)  # keep it open, never reply

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self.listener.close()


def test_unresponsive_server_costs_one_timeout_per_backoff_window():
    server = BlackHoleServer()
    try:
        cache = RedisCache(f"redis://127.0.0.1:{server.port}/0", prefix="p", timeout=0.1)
        started = time.monotonic()
        results = [cache.get("k") for _ in range(20)] + [cache.insert("k", b"v") for _ in range(20)]
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert not any(results)
    # One timeout paid (one connection, no hidden client retries), then the 5 s back-off skipped the rest;
    # a further attempt only if a whole window went by.
    windows = 1 + int(elapsed / 5.0)
    assert 1 <= cache.stats.errors <= windows
    assert 1 <= server.connections <= windows
    assert cache.skipped == 40 - cache.stats.errors


def test_backoff_window_doubles_and_success_resets_it(redis_server, prefix):
    cache = RedisCache(redis_server.url, prefix=prefix, backoff_initial_s=0.05, backoff_max_s=0.2)
    redis_server.stop()
    windows = []
    for _ in range(4):
        deadline = time.monotonic() + 5
        errors = cache.stats.errors
        while cache.stats.errors == errors and time.monotonic() < deadline:
            cache.get("k")
            time.sleep(0.01)
        windows.append(cache.describe()["backoff_window_s"])
    assert windows == [0.05, 0.1, 0.2, 0.2]
    redis_server.start()
    deadline = time.monotonic() + 5
    while not cache.insert("k", b"v") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cache.get("k") == b"v"
    assert cache.describe()["available"] is True and cache.describe()["backoff_window_s"] == 0.0


def test_redis_killed_mid_run_is_bounded_and_recovers(redis_server, prefix):
    backoff = 0.2
    cache = RedisCache(redis_server.url, prefix=prefix, backoff_initial_s=backoff, backoff_max_s=backoff)
    assert cache.insert("before", b"v")
    redis_server.stop()
    started = time.monotonic()
    calls = 0
    while calls < 300:
        assert cache.get("before") is None
        assert cache.insert(f"k{calls}", b"v") is False
        calls += 2
        time.sleep(0.002)
    elapsed = time.monotonic() - started
    # Attempts paid are bounded by back-off windows elapsed (each window lets one probe through).
    assert 1 <= cache.stats.errors <= 1 + int(elapsed / backoff) + 1
    assert cache.skipped >= calls - cache.stats.errors
    redis_server.start()
    deadline = time.monotonic() + 10
    while not cache.insert("after", b"v2") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.get("after") == b"v2"


def test_restart_while_idle_costs_no_fault(cache, redis_server):
    assert cache.insert("k", b"v")
    redis_server.stop()
    redis_server.start()  # same port, empty (no persistence); the pooled socket is now stale
    assert cache.lookup("k").status is LookupStatus.MISS
    assert cache.insert("k", b"v2") is True
    assert cache.stats.errors == 0 and cache.skipped == 0


# ----------------------------------------------------------------------------------------------------
# Concurrency across processes
# ----------------------------------------------------------------------------------------------------

_RACE_SCRIPT = """
import sys
from aotcache.store.redis import RedisCache
cache = RedisCache(sys.argv[1], prefix=sys.argv[2], timeout=5.0)
won = sum(cache.insert(f"key{index}", sys.argv[3].encode() * 100) for index in range(200))
print(won)
"""


def test_two_processes_racing_inserts_store_each_key_once(cache, redis_server, prefix):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", _RACE_SCRIPT, redis_server.url, prefix, tag],
                              stdout=subprocess.PIPE, text=True, env=env) for tag in ("A", "B")]
    wins = [int(proc.communicate(timeout=120)[0]) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert sum(wins) == 200
    for index in range(200):
        value = cache.get(f"key{index}")
        assert value in (b"A" * 100, b"B" * 100)


# ----------------------------------------------------------------------------------------------------
# Maintenance
# ----------------------------------------------------------------------------------------------------


def test_entries_total_bytes_delete_and_clear_stay_in_prefix(cache, redis_server, prefix, raw):
    other = RedisCache(redis_server.url, prefix=prefix + "-other")
    other.insert("kept", b"x")
    cache.insert("a", b"1" * 10)
    cache.insert(("tuple", 1), b"2" * 20)
    with cache.lock("not-an-entry", 30) as held:
        assert held
        listed = list(cache.entries())
        assert sorted(info.key for info in listed)[0].startswith("<pickled key")
        assert sorted(info.key for info in listed)[1] == "a"
        assert {info.digest for info in listed} == {key_digest("a"), key_digest(("tuple", 1))}
        assert all(info.tier == "redis" and info.size > 10 for info in listed)
        assert cache.total_bytes() == sum(info.size for info in listed)
        assert cache.delete("a") is True and cache.delete("a") is False
        assert cache.clear() == 1
    assert list(cache.entries()) == []
    assert other.get("kept") == b"x"


def test_maintenance_on_dead_redis_is_a_clear_error():
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", prefix="p")
    with pytest.raises(CacheError, match="server running"):
        list(cache.entries())
    assert cache.ping() is False


# ----------------------------------------------------------------------------------------------------
# Locks
# ----------------------------------------------------------------------------------------------------


def test_lock_is_exclusive_until_released(cache):
    first = cache.lock("compile:abc", expire_s=30)
    second = cache.lock("compile:abc", expire_s=30)
    assert first.acquire() is True
    assert second.acquire(timeout=0) is False
    assert cache.lock("compile:other", 30).acquire() is True
    assert first.release() is True
    assert second.acquire(timeout=0) is True
    second.release()


def test_lock_context_manager_yields_whether_held(cache):
    with cache.lock("x", 30) as held:
        assert held is True
        with cache.lock("x", 30, timeout=0.1) as other_held:
            assert other_held is False
    with cache.lock("x", 30) as held_again:
        assert held_again is True


def test_expired_lock_is_not_released_by_its_old_holder(cache, raw):
    old = cache.lock("x", expire_s=0.1)
    assert old.acquire()
    new = cache.lock("x", expire_s=30)
    assert new.acquire(timeout=5) is True  # after the old holder's expiry
    assert old.release() is False  # compare-and-delete: not ours any more
    assert raw.exists(new.redis_key) == 1
    assert new.refresh(60) is True and raw.pttl(new.redis_key) > 30_000
    assert new.release() is True and raw.exists(new.redis_key) == 0


def test_lock_of_a_dead_holder_process_frees_by_expiry(cache, redis_server, prefix):
    run_python(
        "import os\n"
        "from aotcache.store.redis import RedisCache\n"
        f"lock = RedisCache({redis_server.url!r}, prefix={prefix!r}, timeout=5.0).lock('job', expire_s=1.5)\n"
        "assert lock.acquire()\n"
        "os._exit(0)  # dies holding the lock\n"
    )
    waiter = cache.lock("job", expire_s=30)
    assert waiter.acquire(timeout=0) is False
    assert waiter.acquire(timeout=10) is True
    waiter.release()


def test_lock_on_unavailable_redis_is_not_held():
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", prefix="p")
    with cache.lock("x", 30, timeout=5) as held:
        assert held is False
    assert cache.stats.errors == 1


def test_lock_arguments_are_checked(cache):
    with pytest.raises(ValueError, match="expire_s"):
        cache.lock("x", expire_s=0)
    with pytest.raises(ValueError, match="name"):
        cache.lock("", expire_s=1)


def test_delete_script_only_removes_the_bad_value_it_read(cache, raw):
    # Compare-and-delete: a corrupt value replaced by a good one before the delete runs must survive.
    cache.insert("k", b"good value")
    name = cache.entry_name("k")
    good = raw.get(name)
    deleted = cache._delete_if_unchanged(keys=[name], args=[hashlib.sha1(b"some other bytes").hexdigest()])
    assert deleted == 0 and raw.get(name) == good
    deleted = cache._delete_if_unchanged(keys=[name], args=[hashlib.sha1(good).hexdigest()])
    assert deleted == 1
