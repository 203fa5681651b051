"""OnDiskCache in one process: contract, layout, corruption, signatures, eviction, faults (injected only for faults).

Most tests run for both forms of an entry (the ``form`` fixture): ``file`` (one file per key,
``small_max_bytes=0``) and ``row`` (a row of the small-entry pack, every value under the threshold).
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import sqlite3
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aotcache import config
from aotcache.logs import CacheFault
from aotcache.store import disk, frame, smallpack
from aotcache.store.disk import SMALL_MAX_BYTES, OnDiskCache, version_dir_name
from aotcache.store.eviction import STALE_TEMP_SECONDS, TEMP_PREFIX
from aotcache.store.interface import CacheError, LookupStatus, encode_key, key_digest
from aotcache.store.smallpack import DATABASE_NAME, SmallPack

#: small_max_bytes that puts every entry of a test into one form.
FORMS = {"file": 0, "row": 1 << 30}


@pytest.fixture(params=list(FORMS))
def form(request) -> str:
    return request.param


def make_cache(tmp_path: Path, form: str | None = None, **kwargs) -> OnDiskCache:
    kwargs.setdefault("max_bytes", 0)
    kwargs.setdefault("secret", "")
    kwargs.setdefault("compress_min_bytes", 0)
    if form is not None:
        kwargs.setdefault("small_max_bytes", FORMS[form])
    return OnDiskCache("test", tmp_path / "cache", **kwargs)


def entry_path(cache: OnDiskCache, key) -> Path:
    digest = key_digest(key)
    return cache.root / digest[:2] / digest


def database(cache: OnDiskCache) -> sqlite3.Connection:
    """A direct connection to the cache's small-entry pack, as another program would open it."""
    return sqlite3.connect(cache.root / DATABASE_NAME, isolation_level=None)


def row_frame(cache: OnDiskCache, key) -> bytes | None:
    if not (cache.root / DATABASE_NAME).exists():
        return None
    with database(cache) as db:
        row = db.execute("SELECT frame FROM entries WHERE digest = ?", (bytes.fromhex(key_digest(key)),)).fetchone()
    return None if row is None else row[0]


def stored_frame(cache: OnDiskCache, key) -> bytes | None:
    """The entry's bytes in whichever form it has (None if absent); asserts it is not in both."""
    path = entry_path(cache, key)
    as_file = path.read_bytes() if path.exists() else None
    as_row = row_frame(cache, key)
    assert as_file is None or as_row is None, "a key stored both as a file and as a row"
    return as_file if as_file is not None else as_row


def replace_stored_frame(cache: OnDiskCache, key, blob: bytes) -> None:
    """Overwrite the entry's bytes in place (a file write, or a direct SQL UPDATE of the row's frame)."""
    path = entry_path(cache, key)
    if path.exists():
        path.write_bytes(blob)
        return
    with database(cache) as db:
        changed = db.execute("UPDATE entries SET frame = ? WHERE digest = ?",
                             (blob, bytes.fromhex(key_digest(key)))).rowcount
    assert changed == 1, f"no entry for {key!r}"


def age_entries(cache: OnDiskCache, seconds: float) -> None:
    """Move every entry's creation and last access ``seconds`` into the past (files and rows)."""
    for path in cache.root.glob("[0-9a-f][0-9a-f]/*"):
        if not path.name.startswith(TEMP_PREFIX):
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns - int(seconds * 1e9), st.st_mtime_ns - int(seconds * 1e9)))
    if (cache.root / DATABASE_NAME).exists():
        with database(cache) as db:
            db.execute("UPDATE entries SET created_ns = created_ns - ?, last_access_ns = last_access_ns - ?",
                       (int(seconds * 1e9), int(seconds * 1e9)))


def temp_files(cache: OnDiskCache) -> list[Path]:
    return [path for path in cache.root.glob("*/*") if path.name.startswith(TEMP_PREFIX)]


def files_under(directory: Path) -> list[Path]:
    return [Path(parent) / name for parent, _, names in os.walk(directory) for name in names]


# ----------------------------------------------------------------------------------------------------
# Contract
# ----------------------------------------------------------------------------------------------------


def test_get_insert_never_overwrites(tmp_path, form):
    cache = make_cache(tmp_path, form)
    assert cache.get("k") is None
    assert cache.insert("k", b"first") is True
    assert cache.insert("k", b"second") is False
    assert cache.get("k") == b"first"
    assert OnDiskCache("test", tmp_path / "cache", secret="").get("k") == b"first"  # persisted
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.inserts, stats.insert_conflicts, stats.errors) == (1, 1, 1, 1, 0)
    size = len(stored_frame(cache, "k"))
    assert stats.bytes_written == size and stats.bytes_read == size
    assert stats.get_seconds > 0 and stats.insert_seconds > 0
    assert entry_path(cache, "k").exists() is (form == "file")


@pytest.mark.parametrize("value, expected", [
    (b"", b""),
    (b"small", b"small"),
    (bytearray(b"ba"), b"ba"),
    (memoryview(b"mv"), b"mv"),
    ({"nested": [1, 2.5, "s"]}, {"nested": [1, 2.5, "s"]}),
    (os.urandom(300_000), None),  # large raw: read directly into the value
    (list(range(50_000)), None),  # large pickled: the general decoder
], ids=["empty", "small", "bytearray", "memoryview", "pickled", "large-raw", "large-pickled"])
def test_value_kinds_round_trip(tmp_path, form, value, expected):
    expected = value if expected is None else expected
    cache = make_cache(tmp_path, form)
    assert cache.insert(("key", 1), value)
    got = cache.get(("key", 1))
    assert got == expected and type(got) is type(expected)


def test_misuse_raises_cache_error(tmp_path):
    cache = make_cache(tmp_path)
    with pytest.raises(CacheError, match="None"):
        cache.insert("k", None)
    with pytest.raises(CacheError, match="not picklable"):
        cache.insert(lambda: 0, b"v")
    with pytest.raises(CacheError, match="not picklable"):
        cache.get(threading.Lock())
    with pytest.raises(CacheError, match="not picklable"):
        cache.insert("k", threading.Lock())
    for bad_name in ("", ".", "..", "a/b"):
        with pytest.raises(CacheError, match="single directory name"):
            OnDiskCache(bad_name, tmp_path)
    with pytest.raises(CacheError, match="max_bytes"):
        OnDiskCache("x", tmp_path, max_bytes=-5)
    with pytest.raises(CacheError, match="small_max_bytes"):
        OnDiskCache("x", tmp_path, small_max_bytes=-1)
    for bad_digest in ("abc", key_digest("k").upper(), 42):
        with pytest.raises(CacheError, match="not an entry digest"):
            cache.delete_digest(bad_digest)
    with pytest.raises(CacheError, match="max_bytes"):
        cache.prune(-1)
    assert cache.get("k") is None and len(cache) == 0


def test_lookup_statuses(tmp_path, form):
    cache = make_cache(tmp_path, form)
    cache.insert("k", b"v")
    assert cache.lookup("k").status is LookupStatus.HIT and cache.lookup("k").value == b"v"
    assert cache.lookup("nope").status is LookupStatus.MISS
    replace_stored_frame(cache, "k", b"garbage, not an aotcache entry" * 3)
    error = cache.lookup("k")
    assert error.status is LookupStatus.ERROR and error.value is None and "foreign" in error.error
    assert error.tier == "disk"


def test_async_variants(tmp_path):
    cache = make_cache(tmp_path)
    with ThreadPoolExecutor(2) as executor:
        assert cache.insert_async("k", b"v", executor).result() is True
        assert cache.insert_async("k", b"w", executor).result() is False
        assert cache.get_async("k", executor).result() == b"v"


def test_threads_racing_one_insert_wins(tmp_path, form):
    cache = make_cache(tmp_path, form)
    wins: list[int] = []
    barrier = threading.Barrier(6)

    def worker(worker_id):
        barrier.wait()
        for index in range(40):
            if cache.insert(f"k{index}", f"{worker_id}".encode() * 100):
                wins.append(index)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == list(range(40))
    assert len(cache) == 40 and not temp_files(cache) and cache.stats.errors == 0


# ----------------------------------------------------------------------------------------------------
# Layout, forms and configuration
# ----------------------------------------------------------------------------------------------------


def test_layout(tmp_path):
    cache = make_cache(tmp_path, "file")
    assert cache.root == tmp_path / "cache" / version_dir_name()
    assert version_dir_name() == f"v{frame.FRAME_VERSION}.{disk.LAYOUT_VERSION}"
    for index in range(100):
        cache.insert(index, b"v")
    path = entry_path(cache, 7)
    assert path.is_file() and path.parent.name == key_digest(7)[:2]
    assert frame.decode(path.read_bytes(), expected_key=encode_key(7)).value == b"v"
    assert not temp_files(cache)
    for index in range(20):  # corrupt-entry removal takes prefix locks
        entry_path(cache, index).write_bytes(b"bad")
        cache.get(index)
    locks = list((cache.root / ".locks").iterdir())
    assert 0 < len(locks) <= 18  # shared by digest prefix (16) + usage + evict: not one per key


def test_defaults_come_from_config_at_construction(tmp_path, monkeypatch, isolated_cache_dir):
    cache = OnDiskCache("graphs")
    assert cache.directory == isolated_cache_dir / "store" / "graphs"
    assert cache.max_bytes == 10 * 1024**3 and cache.compress_min_bytes == 1024 * 1024 and not cache.signed
    assert cache.small_max_bytes == SMALL_MAX_BYTES
    monkeypatch.setenv("AOTCACHE_CACHE_DIR", str(tmp_path / "elsewhere"))  # after import: still honoured
    monkeypatch.setenv("AOTCACHE_MAX_BYTES", "1MiB")
    with config.patch(secret="s", compress_min_bytes="4KiB"):
        cache = OnDiskCache("graphs")
    assert cache.directory == tmp_path / "elsewhere" / "store" / "graphs"
    assert cache.max_bytes == 1024**2 and cache.compress_min_bytes == 4096 and cache.signed
    with config.patch(secret="s"):
        assert not OnDiskCache("graphs", secret="").signed  # "" turns signing off explicitly


def test_compression(tmp_path, form):
    cache = make_cache(tmp_path, form, compress_min_bytes=1000)
    value = b"compressible " * 10_000
    assert cache.insert("k", value)
    assert len(stored_frame(cache, "k")) < len(value) // 20
    assert cache.get("k") == value


def test_entries_total_bytes_delete_clear(tmp_path, form):
    cache = make_cache(tmp_path, form)
    before = time.time()
    cache.insert("a", b"1" * 100)
    cache.insert(("t", 2), {"x": 1})
    infos = {info.key: info for info in cache.entries()}
    assert set(infos) == {"a", f"<pickled key, {len(encode_key(('t', 2))) - 2} bytes>"}
    info = infos["a"]
    assert info.digest == key_digest("a") and info.tier == "disk"
    assert info.size == len(stored_frame(cache, "a"))
    assert before - 1 <= info.created <= info.last_access <= time.time() + 1
    assert cache.total_bytes() == sum(i.size for i in infos.values()) and len(cache) == 2
    assert cache.delete("a") is True and cache.delete("a") is False and cache.get("a") is None
    assert cache.delete_digest(infos["<pickled key, " + f"{len(encode_key(('t', 2))) - 2} bytes>"].digest)
    assert cache.delete_digest(key_digest("never stored")) is False and len(cache) == 0
    cache.insert("a", b"again")
    cache.insert("b", b"more")
    assert cache.clear() == 2 and len(cache) == 0 and cache.total_bytes() == 0
    assert cache.insert("a", b"again")  # a cleared key can be inserted again


def test_usage_counter_tracks_writes_and_removals(tmp_path, form):
    cache = make_cache(tmp_path, form, max_bytes=10**9)
    for index in range(30):
        cache.insert(index, os.urandom(1000 + index))
    cache.delete(3)
    cache.delete_digest(key_digest(4))
    cache.close()
    assert cache._usage.approximate_total() == cache.total_bytes()


def test_durable_mode_fsyncs_entries(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    cache = make_cache(tmp_path, "file", durable=True)
    assert cache.insert("k", b"v") and cache.get("k") == b"v"
    assert len(synced) == 2  # the entry, then its directory
    make_cache(tmp_path / "fast", "file").insert("k", b"v")
    assert len(synced) == 2  # not durable: no fsync
    rows = make_cache(tmp_path / "rows", "row", durable=True)
    assert rows.insert("k", b"v")
    assert rows._pack._connection(create=False).execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    fast_rows = make_cache(tmp_path / "fast-rows", "row")
    assert fast_rows.insert("k", b"v")
    assert fast_rows._pack._connection(create=False).execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


# ----------------------------------------------------------------------------------------------------
# Corruption
# ----------------------------------------------------------------------------------------------------


def _truncate(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


def _flip_payload(blob: bytes) -> bytes:
    damaged = bytearray(blob)
    damaged[-3] ^= 0x10
    return bytes(damaged)


def _flip_header(blob: bytes) -> bytes:
    damaged = bytearray(blob)
    damaged[20] ^= 0x01  # payload length
    return bytes(damaged)


def _other_version(blob: bytes) -> bytes:
    return blob[:4] + struct.pack("<H", frame.FRAME_VERSION + 1) + blob[6:]


CORRUPTIONS = {
    "truncated": _truncate,
    "bit-flipped payload": _flip_payload,
    "bit-flipped header": _flip_header,
    "wrong version": _other_version,
    "zero length": lambda blob: b"",
    "foreign": lambda blob: b"#!/bin/sh\necho not an entry\n" * 3,
    "other key": lambda blob: frame.encode(encode_key("another key"), b"v"),
}


@pytest.mark.parametrize("value", [b"x" * 1000, os.urandom(200_000), {"pickled": list(range(10))}],
                         ids=["small", "large", "pickled"])
@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_corrupt_entries_are_misses_removed_and_counted(tmp_path, form, value, damage, caplog):
    cache = make_cache(tmp_path, form)
    cache.insert("k", value)
    replace_stored_frame(cache, "k", CORRUPTIONS[damage](stored_frame(cache, "k")))
    assert cache.get("k") is None
    assert stored_frame(cache, "k") is None  # removed, file or row
    assert (cache.stats.corrupt, cache.stats.errors, cache.stats.hits) == (1, 1, 0)
    assert "corrupt disk cache entry" in caplog.text
    assert cache.insert("k", value) and cache.get("k") == value


def test_strict_mode_raises_after_removing(tmp_path, form):
    cache = make_cache(tmp_path, form)
    cache.insert("k", b"v")
    replace_stored_frame(cache, "k", _flip_payload(stored_frame(cache, "k")))
    with config.patch(strict=True), pytest.raises(CacheFault, match="checksum"):
        cache.get("k")
    assert stored_frame(cache, "k") is None and cache.stats.corrupt == 1


@pytest.mark.parametrize("secret", [None, "s"])
def test_split_read_of_large_entries_rejects_every_corruption(tmp_path, secret):
    """Entries past the split-read threshold go through frame.decode_split: damage anywhere is a miss."""
    cache = make_cache(tmp_path, secret=secret)
    value = os.urandom(200_000)
    assert cache.insert("k", value)
    path = entry_path(cache, "k")
    pristine = path.read_bytes()
    for offset in (0, 5, 12, 20, 33, 45, 80, len(pristine) // 2, len(pristine) - 1):
        damaged = bytearray(pristine)
        damaged[offset] ^= 0x10
        path.write_bytes(bytes(damaged))
        assert cache.get("k") is None, f"bit flip at {offset} was accepted"
    for cut in (30, 60, len(pristine) - 1):
        path.write_bytes(pristine[:cut])
        assert cache.get("k") is None, f"truncation at {cut} was accepted"
    path.write_bytes(pristine)
    assert cache.get("k") == value


def test_signed_cache_rejects_unsigned_and_foreign_signatures(tmp_path, form, monkeypatch):
    signed = make_cache(tmp_path, form, secret="ours")
    unsigned = make_cache(tmp_path, form, secret="")
    theirs = make_cache(tmp_path, form, secret="theirs")
    assert unsigned.insert("unsigned", {"evil": 1}) and theirs.insert("foreign", {"evil": 2})
    assert unsigned.insert("raw", os.urandom(100_000))
    real_loads = pickle.loads
    monkeypatch.setattr(frame.pickle, "loads", lambda *a, **k: pytest.fail("untrusted entry was unpickled"))
    assert signed.get("unsigned") is None and signed.get("foreign") is None and signed.get("raw") is None
    # Whole entries of another secret (or none) are misses here, never deleted: their writers rely on them.
    assert signed.stats.corrupt == 0 and signed.stats.unverified == 3 and len(signed) == 3
    monkeypatch.setattr(frame.pickle, "loads", real_loads)
    assert signed.insert("good", {"ok": True}) and signed.get("good") == {"ok": True}
    assert make_cache(tmp_path, secret="ours").get("good") == {"ok": True}


def test_corrupt_file_removal_spares_a_valid_entry_published_meanwhile(tmp_path, monkeypatch):
    cache = make_cache(tmp_path, "file")
    other_process = make_cache(tmp_path, "file")
    cache.insert("k", b"original")
    path = entry_path(cache, "k")
    path.write_bytes(b"corrupt")
    real_discard = OnDiskCache._discard_corrupt

    def replaced_before_removal(self, digest, entry, seen):
        # Between this reader's read and its removal, another process removes the corrupt file and
        # publishes a valid entry under the same name.
        if self is cache:
            os.unlink(entry)
            assert other_process.insert("k", b"replacement")
        real_discard(self, digest, entry, seen)

    monkeypatch.setattr(OnDiskCache, "_discard_corrupt", replaced_before_removal)
    assert cache.get("k") is None
    assert path.exists() and cache.get("k") == b"replacement"


def test_corrupt_row_removal_spares_a_valid_entry_stored_meanwhile(tmp_path, monkeypatch):
    cache = make_cache(tmp_path, "row")
    other_process = make_cache(tmp_path, "row")
    cache.insert("k", b"original")
    replace_stored_frame(cache, "k", b"corrupt")
    real_discard = SmallPack.discard

    def replaced_before_removal(self, digest, blob):
        if self is cache._pack:  # another process removes the corrupt row and stores a valid one
            assert other_process.delete("k") and other_process.insert("k", b"replacement")
        return real_discard(self, digest, blob)

    monkeypatch.setattr(SmallPack, "discard", replaced_before_removal)
    assert cache.get("k") is None and cache.stats.corrupt == 1
    assert cache.get("k") == b"replacement"


# ----------------------------------------------------------------------------------------------------
# Temp files, versions, eviction
# ----------------------------------------------------------------------------------------------------


def test_temp_files_are_never_entries_and_stale_ones_are_swept(tmp_path):
    cache = make_cache(tmp_path, "file")
    cache.insert("other", b"v")
    digest = key_digest("k")
    fanout = cache.root / digest[:2]
    fanout.mkdir(exist_ok=True)
    stale = fanout / f"{TEMP_PREFIX}999999.0.{digest[:12]}"
    stale.write_bytes(frame.encode(encode_key("k"), b"complete but unpublished"))
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    fresh = fanout / f"{TEMP_PREFIX}999999.1.{digest[:12]}"
    fresh.write_bytes(b"partial")
    assert cache.get("k") is None
    assert [info.digest for info in cache.entries()] == [key_digest("other")]
    assert cache.total_bytes() == entry_path(cache, "other").stat().st_size
    report = cache.maintain()
    assert report.temp_files_removed == 1 and not stale.exists() and fresh.exists()
    assert cache.get("other") == b"v"


def test_other_format_versions_are_misses_and_removed(tmp_path):
    cache = make_cache(tmp_path)
    digest = key_digest("k")
    old_dir = cache.directory / "v0.1" / digest[:2]
    old_dir.mkdir(parents=True)
    (old_dir / digest).write_bytes(b"an entry of an older format")
    unrelated = cache.directory / "notes"
    unrelated.mkdir()
    assert cache.get("k") is None
    assert cache.maintain().old_version_dirs_removed == 1
    assert not (cache.directory / "v0.1").exists() and unrelated.exists()


def test_bound_holds_and_recently_read_entries_survive(tmp_path, form):
    cache = make_cache(tmp_path, form, max_bytes=40_000)
    value = b"x" * 1000
    entry_size = len(b"".join(frame.encode_parts(encode_key(0), value)))
    for index in range(30):
        assert cache.insert(index, value)
    age_entries(cache, 10)  # written a while ago: a read now is recorded (at most once a second)
    hot = [0, 1, 2]
    for key in hot:
        assert cache.get(key) == value
    for index in range(30, 60):
        cache.insert(index, value)
        assert cache.total_bytes() <= 40_000 + entry_size  # at most one entry over until its flush evicts
        for key in hot:
            assert cache.get(key) == value
    cache.close()
    assert cache.total_bytes() <= 40_000
    assert cache.stats.evictions >= 20
    assert all(cache.get(key) == value for key in hot)
    assert cache.get(3) is None  # old and never read: evicted first


def test_eviction_takes_files_and_rows_in_one_lru_order(tmp_path):
    cache = make_cache(tmp_path, small_max_bytes=SMALL_MAX_BYTES, max_bytes=10**9)
    small, large = b"s" * 2000, b"L" * 40_000
    for index in range(6):
        assert cache.insert(f"small{index}", small) and cache.insert(f"large{index}", large)
    age_entries(cache, 60)
    for key in ("small0", "large0", "small5", "large5"):  # read: the most recently used of each form
        assert cache.get(key) is not None
    assert {row_frame(cache, "small0") is not None, entry_path(cache, "large0").exists()} == {True}
    keep = 2 * len(stored_frame(cache, "small0")) + 2 * len(stored_frame(cache, "large0"))
    report = cache.prune(keep)
    assert sorted(info.key for info in cache.entries()) == ["large0", "large5", "small0", "small5"]
    assert len(report.removed) == 8 and report.bytes_after == keep == cache.total_bytes()
    assert {info.key[:5] for info in report.removed} == {"small", "large"}


def test_prune_keeps_the_most_recently_used_and_reports(tmp_path, form):
    cache = make_cache(tmp_path, form, max_bytes=0)
    for index in range(6):
        assert cache.insert(f"e{index}", os.urandom(1000))
    age_entries(cache, 30)
    for index in range(6):  # used in order: e5 is the most recently used
        assert cache.get(f"e{index}") is not None
        time.sleep(0.002)
    entry_size = cache.total_bytes() // 6
    bound = entry_size * 3 + entry_size // 2
    dry = cache.prune(bound, dry_run=True)
    assert dry.dry_run and [info.key for info in dry.removed] == ["e0", "e1", "e2"] and len(cache) == 6
    report = cache.prune(bound)
    assert [info.key for info in report.removed] == ["e0", "e1", "e2"]
    assert (report.entries_before, report.bytes_before, report.bytes_after) == (6, 6 * entry_size, 3 * entry_size)
    assert report.removed_bytes == 3 * entry_size and all(info.size == entry_size for info in report.removed)
    assert sorted(info.key for info in cache.entries()) == ["e3", "e4", "e5"]
    assert cache._usage.approximate_total() == cache.total_bytes() == 3 * entry_size  # counter resynced
    assert cache.prune(10**9).removed == [] and cache.prune(0).bytes_after == 0 and len(cache) == 0


def test_value_larger_than_the_bound_is_not_stored(tmp_path, form):
    cache = make_cache(tmp_path, form, max_bytes=5000)
    assert cache.insert("big", b"x" * 6000) is False
    assert cache.get("big") is None and cache.stats.evictions == 1 and len(cache) == 0


# ----------------------------------------------------------------------------------------------------
# Faults (injected: real faults cannot be produced on demand)
# ----------------------------------------------------------------------------------------------------


def _fail_under(root: Path, real, error: int, when=lambda *args, **kwargs: True):
    """Wrap an os function so that calls on paths under ``root`` raise OSError(error)."""

    def failing(path, *args, **kwargs):
        if str(path).startswith(str(root)) and when(*args, **kwargs):
            raise OSError(error, os.strerror(error), str(path))
        return real(path, *args, **kwargs)

    return failing


def test_enospc_while_writing_is_a_counted_fault(tmp_path, monkeypatch, caplog):
    cache = make_cache(tmp_path, "file")
    cache.insert("warm", b"v")  # directories exist

    def full_disk(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full_disk)
    assert cache.insert("k", b"v" * 100) is False
    assert cache.stats.errors == 1 and cache.get("k") is None
    assert not temp_files(cache) and not entry_path(cache, "k").exists()
    assert "No space left" in caplog.text
    with config.patch(strict=True), pytest.raises(CacheFault, match="No space left"):
        cache.insert("k2", b"v")
    assert cache.stats.errors == 2
    monkeypatch.undo()
    assert cache.insert("k", b"v") and cache.get("k") == b"v"


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES])
def test_unwritable_directory_is_a_counted_fault(tmp_path, monkeypatch, error):
    cache = make_cache(tmp_path, "file")
    monkeypatch.setattr(os, "open", _fail_under(cache.root, os.open, error,
                                                when=lambda flags, *a, **k: bool(flags & os.O_CREAT)))
    assert cache.insert("k", b"v") is False
    assert cache.stats.errors == 1 and cache.get("k") is None


@pytest.mark.parametrize("error", [errno.EACCES, errno.EIO])
def test_read_errors_are_counted_misses(tmp_path, monkeypatch, error):
    cache = make_cache(tmp_path, "file")
    cache.insert("k", b"v")
    monkeypatch.setattr(os, "open", _fail_under(cache.root, os.open, error))
    result = cache.lookup("k")
    assert result.status is LookupStatus.ERROR and cache.stats.errors == 1
    assert cache.get("k") is None and cache.stats.errors == 2
    monkeypatch.undo()
    assert cache.get("k") == b"v"  # the entry was not removed: an I/O error is not corruption


def test_eio_during_read_is_a_counted_miss(tmp_path, monkeypatch):
    cache = make_cache(tmp_path, "file")
    cache.insert("k", b"v")
    real_read = os.read

    def failing_read(fd, size):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "read", failing_read)
    assert cache.get("k") is None and cache.stats.errors == 1 and cache.stats.corrupt == 0
    monkeypatch.setattr(os, "read", real_read)
    assert cache.get("k") == b"v"


def _chmod_restricts(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return True
    probe.unlink()
    return False  # running as root (or with CAP_DAC_OVERRIDE): permissions do not restrict


def _read_only_database(monkeypatch) -> None:
    """What a read-only mount answers to SQLite, as root sees it: every write is refused (query_only)."""
    real_configure = SmallPack._configure

    def configure_read_only(self, db):
        real_configure(self, db)
        db.execute("PRAGMA query_only = ON")

    monkeypatch.setattr(SmallPack, "_configure", configure_read_only)


def test_read_only_cache_directory_does_not_crash(tmp_path, form, monkeypatch):
    writer = make_cache(tmp_path, form, max_bytes=10**9)
    assert writer.insert("present", b"v")
    writer.close()
    directories = [writer.directory, *[p for p in writer.directory.rglob("*") if p.is_dir()]]
    for directory in directories:
        directory.chmod(0o555)
    for path in writer.root.rglob("*"):
        if path.is_file():
            path.chmod(0o444)
    try:
        if not _chmod_restricts(writer.root):
            # As root, chmod does not restrict: inject what a read-only mount answers instead.
            for name in ("open", "link", "utime", "mkdir", "unlink"):
                monkeypatch.setattr(os, name, _fail_under(
                    writer.directory, getattr(os, name), errno.EROFS,
                    when=(lambda flags=0, *a, **k: bool(flags & os.O_CREAT)) if name == "open" else
                    (lambda *a, **k: True)))
            _read_only_database(monkeypatch)
        reader = make_cache(tmp_path, form, max_bytes=10**9)
        assert reader.get("present") == b"v"
        assert reader.get("absent") is None
        assert reader.insert("new", b"v") is False
        assert reader.stats.errors >= 1 and reader.stats.hits == 1
        assert reader.get("present") == b"v"  # still readable after failing to refresh recency
    finally:
        for directory in directories:
            directory.chmod(0o755)


def test_hardlink_unsupported_falls_back_to_locked_rename(tmp_path, monkeypatch):
    def no_hardlinks(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hardlinks)
    cache = make_cache(tmp_path, "file")
    assert cache.insert("k", b"first") is True and cache._use_hardlinks is False
    assert cache.insert("k", b"second") is False and cache.get("k") == b"first"
    wins = []

    def worker():
        racer = make_cache(tmp_path, "file")
        for index in range(30):
            if racer.insert(f"r{index}", b"v"):
                wins.append(index)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == list(range(30)) and not temp_files(cache)


def test_key_digest_is_the_entry_name(tmp_path, form):
    cache = make_cache(tmp_path, form)
    cache.insert(b"\x00bytes key", b"v")
    digest = hashlib.sha256(b"b:\x00bytes key").hexdigest()
    assert [info.digest for info in cache.entries()] == [digest]
    assert entry_path(cache, b"\x00bytes key").exists() is (form == "file")


def test_refused_recency_update_still_reads(tmp_path, form, monkeypatch):
    cache = make_cache(tmp_path, form)
    cache.insert("k", b"v")
    age_entries(cache, 10)

    def not_owner(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "utime", not_owner)
    cache.close()
    _read_only_database(monkeypatch)
    assert cache.get("k") == b"v" and cache.get("k") == b"v"
    recency_on = cache._refresh_recency if form == "file" else cache._pack.refresh_recency
    assert recency_on is False and cache.stats.errors == 0  # not a fault: a shared read-only cache


def test_reads_refresh_recency_but_keep_creation_time(tmp_path, form, monkeypatch):
    cache = make_cache(tmp_path, form)
    cache.insert("k", b"v")
    age_entries(cache, 10)
    (before,) = cache.entries()
    assert cache.get("k") == b"v"
    (after,) = cache.entries()
    assert after.created == before.created and after.last_access > before.last_access + 5
    # read again within the resolution (1 s, an hour here: a loaded machine can deschedule this test for a second)
    monkeypatch.setattr(smallpack, "RECENCY_RESOLUTION_NS", 3600 * 10**9)
    assert cache.get("k") == b"v"
    (again,) = cache.entries()
    if form == "row":  # (a file's atime may move anyway: the kernel's relatime rule, not the cache)
        assert again.last_access == after.last_access  # not written again


def test_listing_does_not_count_as_use(tmp_path, form):
    cache = make_cache(tmp_path, form)
    cache.insert("k", b"v")
    age_entries(cache, 10)  # files: atime == mtime, so a plain read would move atime under relatime
    (before,) = cache.entries()
    (info,) = cache.entries()
    assert info.key == "k" and info.last_access == before.last_access < time.time() - 5


def test_closing_a_reader_touches_nothing(tmp_path, form, monkeypatch):
    writer = make_cache(tmp_path, form, max_bytes=10**9)
    writer.insert("k", b"v")
    writer.close()
    reader = make_cache(tmp_path, form, max_bytes=10**9)
    monkeypatch.setattr(os, "open", _fail_under(writer.root, os.open, errno.EROFS,
                                                when=lambda flags, *a, **k: bool(flags & os.O_CREAT)))
    assert reader.get("k") == b"v"
    with config.patch(strict=True):
        reader.close()  # no usage flush, no lock files: nothing to fail on a read-only cache
    assert reader.stats.errors == 0


# ----------------------------------------------------------------------------------------------------
# PyTorch's torch/_inductor/cache.py names: version, base_dir, _fpath_from_key, _flock_from_fpath
# ----------------------------------------------------------------------------------------------------


def test_entries_of_another_user_version_are_misses_and_removed(tmp_path, form, monkeypatch):
    """NOTE [user version]: as PyTorch's OnDiskCache.version; a stale entry is a quiet miss, not corruption."""
    cache = make_cache(tmp_path, form)
    assert cache.insert("k", b"v0") and cache.get("k") == b"v0"
    monkeypatch.setattr(OnDiskCache, "version", 1)
    assert cache.version_prefix == b"v1|"
    assert cache.get("k") is None
    assert cache.stats.corrupt == 0 and cache.stats.errors == 0
    assert cache.insert("k", b"v1") and cache.get("k") == b"v1"
    monkeypatch.setattr(OnDiskCache, "version", 0)
    assert cache.get("k") is None  # the version-1 entry was removed on read
    assert cache.insert("k", b"v0 again") and cache.get("k") == b"v0 again"
    assert cache.stats.corrupt == 0


def test_only_a_version_tag_makes_a_key_mismatch_a_stale_entry(tmp_path, form):
    cache = make_cache(tmp_path, form)
    assert cache.insert("a", b"value")
    assert not cache._of_other_version(encode_key("b"), encode_key("a"))
    assert cache._of_other_version(b"v3|" + encode_key("a"), encode_key("a"))


def test_base_dir_is_the_cache_directory_and_assigning_it_moves_the_handle(tmp_path):
    cache = OnDiskCache(base_dir=tmp_path / "first", max_bytes=0, secret="")
    assert cache.cache_name == "on_disk_cache" and cache.base_dir == tmp_path / "first"
    assert cache.insert("k", b"first")
    cache.base_dir = cache.base_dir / "nested"
    assert cache.base_dir == tmp_path / "first" / "nested" and cache.root.parent == cache.base_dir
    assert cache.get("k") is None and cache.insert("k", b"second") and cache.get("k") == b"second"
    assert OnDiskCache(base_dir=tmp_path / "first", max_bytes=0, secret="").get("k") == b"first"


def test_pytorch_path_and_lock_helpers(tmp_path):
    cache = make_cache(tmp_path, "file")
    assert cache.insert(("a", 1), b"x" * 100)
    path = cache._fpath_from_key(("a", 1))
    assert path == entry_path(cache, ("a", 1)) and path.exists()
    with pytest.raises(CacheError, match="not picklable"):
        cache._fpath_from_key(lambda: None)
    lock = cache._flock_from_fpath(path)
    with lock:
        assert lock.is_locked
    assert not lock.is_locked
