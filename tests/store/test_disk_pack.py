"""The disk tier's small-entry pack (SQLite): the two forms, database faults, corrupt databases, fork, connections.

Faults are real where they can be produced on demand (a lock held by another connection, a garbage or
truncated database file); I/O errors are injected.
"""

from __future__ import annotations

import logging
import os
import time
import sqlite3
import threading

import pytest

from aotcache import config
from aotcache.logs import CacheFault
from aotcache.store import frame
from aotcache.store.disk import SMALL_MAX_BYTES
from aotcache.store.interface import LookupStatus, encode_key
from aotcache.store.smallpack import DATABASE_NAME, SCHEMA_VERSION, SmallPack
from tests.store.test_disk import database, entry_path, files_under, make_cache, row_frame, stored_frame


def _database_path(cache):
    return cache.root / DATABASE_NAME


class _FailingConnection:
    """Fault injection: a connection whose statements matching ``when`` raise ``error``."""

    def __init__(self, real: sqlite3.Connection, error: sqlite3.Error, when) -> None:
        self._real, self._error, self._when = real, error, when

    def execute(self, sql, *args):
        if self._when(sql):
            raise self._error
        return self._real.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _inject(monkeypatch, error: sqlite3.Error, when) -> None:
    real_connection = SmallPack._connection

    def failing_connection(self, **kwargs):
        db = real_connection(self, **kwargs)
        return None if db is None else _FailingConnection(db, error, when)

    monkeypatch.setattr(SmallPack, "_connection", failing_connection)
    monkeypatch.setattr(SmallPack, "_reader", lambda self: self._connection(create=False))  # reads too


def _disk_io_error() -> sqlite3.OperationalError:
    return sqlite3.OperationalError("disk I/O error")


# ----------------------------------------------------------------------------------------------------
# Two forms of an entry: rows for small values, files for large ones, never both for one key
# ----------------------------------------------------------------------------------------------------


def test_threads_racing_values_of_both_forms_one_insert_wins(tmp_path):
    """Racers of one key with a small and a large value (row vs file): still exactly one winner per key."""
    wins: dict[int, list[int]] = {}
    barrier = threading.Barrier(4)

    def worker(worker_id):
        cache = make_cache(tmp_path, small_max_bytes=SMALL_MAX_BYTES)  # a handle per thread, as per process
        barrier.wait()
        for index in range(30):
            value = bytes([worker_id]) * (100 if (worker_id + index) % 2 else 60_000)
            if cache.insert(f"k{index}", value):
                wins.setdefault(index, []).append(worker_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == list(range(30)) and all(len(won) == 1 for won in wins.values())
    reader = make_cache(tmp_path)
    for index, (winner,) in wins.items():
        got = reader.get(f"k{index}")
        assert got is not None and set(got) == {winner}
        stored_frame(reader, f"k{index}")  # asserts: never both a file and a row


def test_form_follows_the_frame_size(tmp_path):
    cache = make_cache(tmp_path, small_max_bytes=SMALL_MAX_BYTES)
    assert cache.small_max_bytes == 32 * 1024
    overhead = len(frame.encode(encode_key("edge-r"), b""))  # both keys are 6 characters long
    assert cache.insert("edge-r", b"r" * (SMALL_MAX_BYTES - overhead - 1))  # frame one byte under: a row
    assert cache.insert("edge-f", b"f" * (SMALL_MAX_BYTES - overhead))  # frame at the threshold: a file
    assert cache.insert("tiny", b"t") and cache.insert("big", os.urandom(200_000))
    assert row_frame(cache, "edge-r") is not None and not entry_path(cache, "edge-r").exists()
    assert row_frame(cache, "tiny") is not None and not entry_path(cache, "tiny").exists()
    assert entry_path(cache, "edge-f").stat().st_size == SMALL_MAX_BYTES and row_frame(cache, "edge-f") is None
    assert entry_path(cache, "big").exists() and row_frame(cache, "big") is None
    listed = {info.key: info for info in cache.entries()}
    assert set(listed) == {"edge-r", "edge-f", "tiny", "big"}
    assert listed["edge-r"].size == SMALL_MAX_BYTES - 1 and listed["edge-f"].size == SMALL_MAX_BYTES
    assert cache.total_bytes() == sum(info.size for info in listed.values()) and len(cache) == 4
    assert all(cache.get(key) is not None for key in listed)


@pytest.mark.parametrize("first, second", [("file", "row"), ("row", "file")])
def test_a_key_stored_in_one_form_blocks_inserts_of_the_other(tmp_path, first, second):
    """NOTE [one form per key]: handles with different thresholds share a directory safely."""
    writer, other = make_cache(tmp_path, first), make_cache(tmp_path, second)
    assert writer.insert("k", b"first")
    assert other.insert("k", b"second") is False and other.stats.insert_conflicts == 1
    assert other.get("k") == b"first" and writer.get("k") == b"first"
    assert stored_frame(writer, "k") is not None  # in exactly one form
    assert other.delete("k") and writer.get("k") is None  # removal reaches either form
    assert other.insert("k", b"second") and writer.get("k") == b"second"


def test_small_entries_use_a_constant_number_of_files(tmp_path):
    """Inode use: a thousand small entries are rows of one database, not a thousand files."""
    rows = make_cache(tmp_path / "rows", small_max_bytes=SMALL_MAX_BYTES)
    for index in range(1000):
        assert rows.insert(f"k{index}", os.urandom(1000))
    rows.close()
    used = files_under(rows.directory)
    assert len(rows) == 1000 and len(used) <= 8, used  # database (+ -wal, -shm), .usage, two lock files
    files = make_cache(tmp_path / "files", "file")
    for index in range(100):
        assert files.insert(f"k{index}", os.urandom(1000))
    assert len(files_under(files.directory)) >= 100  # the file form: one inode per entry


def test_reading_never_creates_the_database(tmp_path):
    cache = make_cache(tmp_path)
    assert cache.get("k") is None and cache.lookup("k").status is LookupStatus.MISS
    assert list(cache.entries()) == [] and len(cache) == 0 and cache.total_bytes() == 0
    assert cache.delete("k") is False and cache.clear() == 0
    assert not (cache.root / DATABASE_NAME).exists()
    assert SCHEMA_VERSION == 1


# ----------------------------------------------------------------------------------------------------
# Database faults: counted, logged once, a miss or False, raised in strict mode
# ----------------------------------------------------------------------------------------------------


def test_a_locked_database_fails_inserts_not_reads(tmp_path, caplog):
    cache = make_cache(tmp_path, "row")
    assert cache.insert("present", b"v")
    cache._pack.busy_timeout = 0.2
    cache.close()  # reopen with the short timeout
    holder = database(cache)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        assert cache.insert("new", b"v") is False
        assert cache.stats.errors == 1 and "disk cache database" in caplog.text and "locked" in caplog.text
        assert cache.get("present") == b"v"  # WAL: readers never wait for writers
        large = make_cache(tmp_path, "file")
        large._pack.busy_timeout = 0.2
        assert large.insert("large", b"v") is False and large.stats.errors == 1  # files wait for the lock too
        with config.patch(strict=True), pytest.raises(CacheFault, match="locked"):
            cache.insert("new", b"v")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert cache.insert("new", b"v") and cache.get("new") == b"v"


def test_a_locked_database_does_not_delay_recording_reads_long(tmp_path):
    cache = make_cache(tmp_path, "row")
    assert cache.insert("k", b"v")
    with database(cache) as db:
        db.execute("UPDATE entries SET last_access_ns = last_access_ns - 10000000000")
    holder = database(cache)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert cache.get("k") == b"v" and cache.stats.errors == 0  # the recency update is skipped
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert cache._pack.refresh_recency is True  # a busy database is not a read-only one


@pytest.mark.parametrize("operation", ["get", "insert", "listing"])
def test_disk_io_errors_are_counted_faults(tmp_path, monkeypatch, operation, caplog):
    cache = make_cache(tmp_path, "row")
    assert cache.insert("present", b"v")
    _inject(monkeypatch, _disk_io_error(), when=lambda sql: sql.startswith(("SELECT", "INSERT")))
    if operation == "get":
        assert cache.lookup("present").status is LookupStatus.ERROR and cache.get("present") is None
        assert cache.stats.errors == 2 and cache.stats.corrupt == 0
    elif operation == "insert":
        assert cache.insert("new", b"v") is False and cache.stats.errors == 1
    else:
        assert list(cache.entries()) == [] and cache.stats.errors == 1
    assert "disk I/O error" in caplog.text
    monkeypatch.undo()
    assert cache.get("present") == b"v"  # the row was not removed: an I/O error is not corruption
    assert cache.insert("new", b"v") is True or cache.get("new") == b"v"


def test_a_database_fault_does_not_hide_file_entries(tmp_path, monkeypatch):
    """A failing database never hides a key stored as a file."""
    cache = make_cache(tmp_path, small_max_bytes=SMALL_MAX_BYTES)
    large = b"x" * (SMALL_MAX_BYTES * 2)
    assert cache.insert("small", b"v") and cache.insert("large", large)
    _inject(monkeypatch, _disk_io_error(), when=lambda sql: sql.startswith("SELECT"))
    assert cache.get("large") == large
    assert cache.lookup("small").status is LookupStatus.ERROR
    assert cache.lookup("absent").status is LookupStatus.ERROR  # not a plain miss: the rows were not seen
    assert cache.stats.errors == 2 and cache.stats.hits == 1


def test_maintenance_methods_raise_os_errors_for_database_faults(tmp_path, monkeypatch):
    cache = make_cache(tmp_path, "row")
    assert cache.insert("k", b"v")
    _inject(monkeypatch, _disk_io_error(), when=lambda sql: sql.startswith(("DELETE", "BEGIN", "SELECT")))
    for call in (lambda: cache.delete("k"), cache.clear, lambda: cache.prune(0)):
        with pytest.raises(OSError, match="disk I/O error"):
            call()


# ----------------------------------------------------------------------------------------------------
# A corrupt database file: set aside once, never a crash
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other schema"])
def test_a_corrupt_database_is_set_aside_and_replaced(tmp_path, damage, caplog):
    cache = make_cache(tmp_path, "row")
    for index in range(200):
        assert cache.insert(f"k{index}", os.urandom(500))
    cache.close()
    path = _database_path(cache)
    if damage == "garbage":
        path.write_bytes(b"this is not a database " * 200)
    elif damage == "truncated":
        with database(cache) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        blob = path.read_bytes()
        path.write_bytes(blob[:4096] + b"\xff" * 4096 + blob[8192:len(blob) // 2])
    else:
        with database(cache) as db:
            db.execute("PRAGMA user_version = 99")
    with caplog.at_level(logging.WARNING, logger="aotcache"):
        results = [cache.get(f"k{index}") for index in range(200)]
        assert all(result is None for result in results)  # misses, never garbage
        assert cache.stats.errors >= 1 and cache.stats.hits == 0
        assert (tmp_path / "cache" / cache.root.name / (DATABASE_NAME + ".corrupt")).exists()
        assert cache.insert("after", b"fine") and cache.get("after") == b"fine"  # a new database
        assert cache.insert("k0", b"again") and cache.get("k0") == b"again"
    assert caplog.text.count("is corrupt") == 1  # logged once
    assert [info.key for info in cache.entries()] == sorted(["after", "k0"]) or len(cache) == 2


def test_a_corrupt_database_raises_in_strict_mode_after_setting_it_aside(tmp_path):
    cache = make_cache(tmp_path, "row")
    assert cache.insert("k", b"v")
    cache.close()
    _database_path(cache).write_bytes(b"garbage" * 1000)
    with config.patch(strict=True), pytest.raises(CacheFault, match="is corrupt"):
        cache.get("k")
    assert cache.insert("k", b"v2") and cache.get("k") == b"v2"


def test_another_handle_follows_a_database_set_aside(tmp_path):
    """A process still holding the old database notices the new one on its next write (inode check)."""
    first, second = make_cache(tmp_path, "row"), make_cache(tmp_path, "row")
    assert first.insert("a", b"1") and second.get("a") == b"1"  # both hold connections
    first.close()
    # What `first` does on finding the database corrupt (the detection itself is tested above):
    assert first._pack._set_aside(seen_inode=None).startswith("set aside")
    assert first.get("a") is None  # the old rows went with the old database
    assert second.insert("b", b"2")  # second's connection is to the old file: it reopens first
    assert first.get("b") == b"2" and row_frame(first, "b") is not None
    assert second.insert("a", b"new") and first.get("a") == b"new"


# ----------------------------------------------------------------------------------------------------
# Connections: threads and fork
# ----------------------------------------------------------------------------------------------------


def test_each_thread_has_its_own_connection_and_dead_threads_release_theirs(tmp_path):
    cache = make_cache(tmp_path, "row")
    connections = []

    def worker(index):
        assert cache.insert(f"t{index}", b"v")
        connections.append(cache._pack._connection(create=False))

    for index in range(5):
        thread = threading.Thread(target=worker, args=(index,))
        thread.start()
        thread.join()
    assert len({id(connection) for connection in connections}) == 5
    assert cache.insert("main", b"v")
    assert len(cache._pack._open) <= 2  # ended threads' connections were closed when a new one opened
    cache.close()
    assert cache._pack._open == [] and len(cache) == 6  # closed, and reopened on use


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_forked_child_opens_its_own_connection_and_the_parent_keeps_working(tmp_path):
    cache = make_cache(tmp_path, "row")
    assert cache.insert("before-fork", b"parent")
    parent_connection = cache._pack._connection(create=False)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: use the inherited cache object, then exit without cleanup
        code = 1
        try:
            os.close(read_end)
            ok = (cache.get("before-fork") == b"parent" and cache.insert("from-child", b"child")
                  and cache._pack._connection(create=False) is not parent_connection)
            cache.close()  # must not close the parent's connection
            code = 0 if ok else 2
        finally:
            os.write(write_end, bytes([code]))
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"\x00" and os.waitstatus_to_exitcode(status) == 0
    os.close(read_end)
    assert cache._pack._connection(create=False) is parent_connection  # untouched by the child
    assert cache.get("from-child") == b"child" and cache.insert("after-fork", b"parent")
    with database(cache) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 3


def test_writer_turns_after_fork_time_out_instead_of_deadlocking_and_keep_the_parents_turn(tmp_path):
    """A child forked while the parent holds its turn waits (bounded) on its own descriptor, and never
    releases the parent's flock (NOTE [writers take turns])."""
    import fcntl

    from aotcache.store.smallpack import WriterTurns

    path = str(tmp_path / "write.lock")
    turns = WriterTurns(path)
    with turns.turn(5.0):
        pid = os.fork()
        if pid == 0:  # the child: must not deadlock on the inherited mutex, must not get the parent's lock
            code = 1
            try:
                started = time.monotonic()
                with turns.turn(0.2):
                    pass
                code = 0 if time.monotonic() - started >= 0.2 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        other = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # still the parent's
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    with turns.turn(0.2):  # released, and granted again
        pass


def test_writes_work_when_the_turn_lock_cannot_be_opened(tmp_path, monkeypatch):
    cache = make_cache(tmp_path, small_max_bytes=SMALL_MAX_BYTES)
    cache._pack._writers.path = str(tmp_path / "missing-dir" / "file-not-dir" / "write.lock")
    (tmp_path / "missing-dir").mkdir()
    (tmp_path / "missing-dir" / "file-not-dir").write_text("")  # makedirs/open fail: no turn, SQLite waits
    assert cache.insert("small", b"v") and cache.insert("large", b"x" * (SMALL_MAX_BYTES * 2))
    assert cache.get("small") == b"v" and cache._pack._writers._unavailable
