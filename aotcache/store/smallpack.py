"""SmallPack: the disk tier's small entries, as rows of one SQLite database per cache version directory.

Creating a file costs a new inode: ~250-300 us on a loaded ext4, and one unit of the inode quota that
many shared machines enforce. Entries whose frame is below ``OnDiskCache(small_max_bytes=...)`` (32 KiB by
default) are therefore kept as rows of ``<root>/small.sqlite3`` (stdlib ``sqlite3``, WAL journal,
``synchronous=NORMAL``, or ``FULL`` for a durable cache): a thousand small entries cost three files, not a
thousand. A row holds the full frame (frame.py), so checksums and signatures work exactly as for files.

Schema (``PRAGMA user_version`` = SCHEMA_VERSION; another value is treated like a corrupt database)::

    entries(digest BLOB PRIMARY KEY,   sha256 of the encoded key (32 bytes)
            size INTEGER,              frame bytes
            created_ns INTEGER,        unix time of the insert
            last_access_ns INTEGER,    LRU time: the insert, then reads (at most once a second)
            frame BLOB)                the entry, byte for byte what a file would hold
    entries_lru ON entries(last_access_ns, size, digest)   eviction scans read only this index

NOTE [one form per key]
A key lives either as a file or as a row, never both, so that "exactly one insert wins per key" holds
across processes whatever the sizes of the racing values. SQLite's write lock is the arbiter for both
forms: a row is inserted (``INSERT OR IGNORE``, whose rowcount says who won) inside a ``BEGIN IMMEDIATE``
transaction that first checks that the key's file does not exist; a file is published (``os.link``) inside
such a transaction after checking that the key has no row. Both checks and both creations happen under
one lock, so at most one form is ever created; readers may look the forms up in any order (the disk tier
tries the file first: a missing file costs ~3 us, a row lookup ~7 us). A large insert holds the write lock
only around its ``link`` (the temp file is written before); it never writes to the database.

NOTE [connections and fork]
Each thread of each process has its own connection, opened on first use. A connection inherited through
``fork`` must never be used or closed by the child (closing it could checkpoint and delete the parent's
WAL): the child notices the new pid, keeps the inherited objects referenced forever (so that garbage
collection never closes them), and opens its own.

NOTE [corrupt database]
A database that SQLite reports as corrupt ("file is not a database", "database disk image is malformed")
or that carries another schema version is renamed aside to ``small.sqlite3.corrupt`` (its ``-wal`` and
``-shm`` files are removed) under ``.locks/pack.lock``, unless another process has replaced it already
(the path's inode is no longer the one this connection opened); the next operation starts a new database.
Its rows are lost (misses; the next full scan corrects the usage counter). A process still holding the old
database notices the new inode on its next write (each write stats the path) and reopens.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import quote

import filelock

try:
    import fcntl
except ImportError:  # not POSIX: writers wait as SQLite does
    fcntl = None  # type: ignore[assignment]

__all__ = ["SmallPack", "PackFault", "DATABASE_NAME", "SCHEMA_VERSION", "RECENCY_RESOLUTION_NS"]

DATABASE_NAME = "small.sqlite3"
SCHEMA_VERSION = 1
#: A read moves a row's last_access_ns only if it is at least this old (the insert counts as an access).
RECENCY_RESOLUTION_NS = 1_000_000_000
_ASIDE_SUFFIX = ".corrupt"
# Waiting this long (ms) for the write lock to record a read's recency is the most a get ever waits.
_RECENCY_BUSY_MS = 50
_EVICT_BATCH = 256  # rows deleted per write transaction during eviction (keeps inserts from waiting long)
_LIST_BATCH = 256  # rows fetched per query when listing (no long read transaction, bounded memory)
_HEAD_BYTES = 4096 + 72  # what a listing reads of each frame: header, signature and (almost always) the key
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_CORRUPT_MESSAGES = ("file is not a database", "database disk image is malformed")

_SELECT_ENTRY = "SELECT frame, last_access_ns FROM entries WHERE digest = ?"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (digest BLOB PRIMARY KEY, size INTEGER NOT NULL, "
    "created_ns INTEGER NOT NULL, last_access_ns INTEGER NOT NULL, frame BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS entries_lru ON entries (last_access_ns, size, digest)",
)


class PackFault(Exception):
    """A fault of the pack database (locked past the timeout, I/O error, corrupt and set aside, read-only).

    ``category`` is a short word for fault keys and logs; ``cause`` the sqlite3 (or OS) error.
    """

    def __init__(self, category: str, message: str, cause: BaseException) -> None:
        super().__init__(f"{message}: {type(cause).__name__}: {cause}")
        self.category = category
        self.message = message
        self.cause = cause


class _ForeignSchema(sqlite3.DatabaseError):
    """The database exists but is not this version's pack (treated like a corrupt one)."""


class _Connection:
    """One thread's connection, with what is needed to tell whether it may still be used."""

    __slots__ = ("db", "reader", "pid", "thread", "inode")

    def __init__(self, db: sqlite3.Connection, inode: int) -> None:
        self.db = db
        self.reader = db.cursor()  # reused by get: a cursor per execute costs ~1 us
        self.pid = os.getpid()
        self.thread = threading.current_thread()
        self.inode = inode


class WriterTurns:
    """Cross-process turns for the database's writers: an ``flock`` polled finely, taken before SQLite's lock.

    NOTE [writers take turns]
    SQLite's busy handler waits for the write lock by sleeping 1, 2, 5, 10 ... ms, so two processes inserting
    at once typically cost each other a millisecond per collision (a write holds the lock ~50 us). Writers of
    this aotcache first take an exclusive ``flock`` on ``.locks/write.lock``, polled every ~20-200 us, then
    begin their SQLite transaction, which is then almost never contended. The flock only orders writers; SQLite's
    lock still decides correctness, so a process of another version (which takes no turn), a lock file that
    cannot be opened (read-only directory), or a turn not granted within the timeout only means waiting as
    SQLite does. The kernel releases a dead holder's flock. Threads of one process take turns on a mutex first
    (an flock is shared by every thread using the same descriptor).
    """

    _SLEEPS = (0.00002, 0.00005, 0.0001, 0.0002)  # then 0.0002 s until the timeout

    def __init__(self, path: str) -> None:
        self.path = path
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._fd: int | None = None
        self._unavailable = fcntl is None

    @contextmanager
    def turn(self, timeout: float) -> Iterator[None]:
        if self._pid != os.getpid():
            self._after_fork()
        with self._mutex:
            fd = self._lock_fd()
            locked = fd is not None and _flock_within(fd, timeout, self._SLEEPS)
            try:
                yield
            finally:
                if locked:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _after_fork(self) -> None:
        """A forked child never unlocks the parent's descriptor (that would release the parent's turn)."""
        self._pid = os.getpid()
        self._mutex = threading.Lock()  # possibly held by a parent's thread that does not exist here
        if self._fd is not None:
            with suppress(OSError):
                os.close(self._fd)  # closing (unlike LOCK_UN) leaves the parent's lock alone
            self._fd = None

    def _lock_fd(self) -> int | None:
        if self._fd is None and not self._unavailable:
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError:
                self._unavailable = True  # e.g. a read-only cache directory: SQLite's own waiting only
        return self._fd


def _flock_within(fd: int, timeout: float, sleeps: tuple[float, ...]) -> bool:
    """Take an exclusive flock on ``fd``, polling; False if not granted within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError:
            return False  # flock unsupported here (some network file systems)
        if time.monotonic() >= deadline:
            return False
        time.sleep(sleeps[min(attempt, len(sleeps) - 1)])
        attempt += 1


class SmallPack:
    """The rows of one disk cache version directory (see the module docstring). Thread- and fork-safe.

    Methods raise :class:`PackFault` for every fault (after setting a corrupt database aside), including
    OS errors on the directory and lock files; callers count and report it.
    """

    def __init__(self, root: Path, *, durable: bool = False, busy_timeout: float = 30.0) -> None:
        self.root = root
        self.path = str(root / DATABASE_NAME)
        self.durable = durable
        self.busy_timeout = busy_timeout
        self.refresh_recency = True  # off once the database refuses writes (a cache shared read-only)
        self._pack_lock_path = str(root / ".locks" / "pack.lock")
        self._writers = WriterTurns(str(root / ".locks" / "write.lock"))  # NOTE [writers take turns]
        self._local = threading.local()
        self._pid = os.getpid()
        self._mutex = threading.Lock()  # guards _open; replaced in a forked child (_after_fork)
        self._open: list[_Connection] = []  # this process's connections (closed by close())
        self._inherited: list[_Connection] = []  # a parent's: referenced forever, never closed

    # ------------------------------------------------------------------------------------------------
    # Entries
    # ------------------------------------------------------------------------------------------------

    def get(self, digest: bytes) -> tuple[bytes, int] | None:
        """(frame, last_access_ns) of ``digest``'s row, or None. Does not count as use (see :meth:`touch`)."""
        try:  # (not self._guard: this is the hot path, and a generator-based guard costs ~1.5 us)
            reader = self._reader()
            if reader is None:
                return None
            row = reader.execute(_SELECT_ENTRY, (digest,)).fetchone()
        except sqlite3.Error as exc:
            raise self._fault(exc, "reading an entry") from exc
        except (OSError, filelock.Timeout) as exc:
            raise PackFault("io", f"disk cache database {self.path}: reading an entry failed", exc) from exc
        return row

    def touch(self, digest: bytes, seen_last_access_ns: int) -> None:
        """Record a read of ``digest`` (LRU) unless one was recorded, or the row created, within a second.

        Best effort: a read-only database turns recency off for this handle; a write lock held longer than
        a few ms skips this one update (a get never waits on writers). A corrupt database raises PackFault.
        """
        now = time.time_ns()
        if not self.refresh_recency or now - seen_last_access_ns < RECENCY_RESOLUTION_NS:
            return
        with self._guard("recording a read"):
            db = self._connection(create=False)
            if db is None:
                return
            try:
                with _busy_timeout(db, _RECENCY_BUSY_MS, self.busy_timeout):
                    db.execute("UPDATE entries SET last_access_ns = ? WHERE digest = ? AND last_access_ns = ?",
                               (now, digest, seen_last_access_ns))
            except sqlite3.OperationalError as exc:
                code = _error_code(exc)
                if code == "SQLITE_READONLY":
                    self.refresh_recency = False  # a cache shared read-only: reads work, recency is not kept
                elif code != "SQLITE_BUSY" or _is_corrupt(exc):
                    raise

    def insert(self, digest: bytes, blob: bytes, file_path: str) -> bool:
        """Store ``blob`` as ``digest``'s row unless the key exists in either form; True if stored now.

        :raises PackFault: a database fault, or the key's file cannot be checked.
        """
        with self._guard("inserting an entry"), self._writers.turn(self.busy_timeout):
            db = self._connection(create=True, for_write=True)
            now = time.time_ns()
            db.execute("BEGIN IMMEDIATE")
            try:
                if _file_exists(file_path):  # NOTE [one form per key]
                    stored = False
                else:
                    stored = db.execute("INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?)",
                                        (digest, len(blob), now, now, blob)).rowcount == 1
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        return stored

    def publish_file(self, digest: bytes, publish: Callable[[], bool]) -> bool:
        """Run ``publish`` (which links the key's file) under the write lock unless the key has a row.

        Returns what ``publish`` returned, or False when a row exists. See NOTE [one form per key].

        :raises PackFault: a database fault (``publish`` did not run). Whatever ``publish`` raises.
        """
        with self._writers.turn(self.busy_timeout):
            with self._guard("locking the database to publish a file"):
                db = self._connection(create=True, for_write=True)
                db.execute("BEGIN IMMEDIATE")
                try:
                    has_row = db.execute("SELECT 1 FROM entries WHERE digest = ?", (digest,)).fetchone() is not None
                except BaseException:
                    _rollback(db)
                    raise
            try:
                return False if has_row else publish()
            finally:
                _rollback(db)  # nothing was written: releases the write lock

    def discard(self, digest: bytes, blob: bytes) -> bool:
        """Delete ``digest``'s row if it still holds exactly ``blob`` (a corrupt frame just read)."""
        with self._guard("removing a corrupt entry"):
            db = self._connection(create=False, for_write=True)
            if db is None:
                return False
            return db.execute("DELETE FROM entries WHERE digest = ? AND frame = ?", (digest, blob)).rowcount == 1

    def delete(self, digest: bytes) -> int:
        """Delete ``digest``'s row; its size, or 0 if there was none."""
        with self._guard("deleting an entry"):
            db = self._connection(create=False, for_write=True)
            if db is None:
                return 0
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT size FROM entries WHERE digest = ?", (digest,)).fetchone()
                if row is not None:
                    db.execute("DELETE FROM entries WHERE digest = ?", (digest,))
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        return 0 if row is None else row[0]

    def clear(self) -> int:
        """Delete every row; how many there were."""
        with self._guard("clearing"):
            db = self._connection(create=False, for_write=True)
            if db is None:
                return 0
            removed = db.execute("DELETE FROM entries").rowcount
        with suppress(sqlite3.Error), _busy_timeout(db, _RECENCY_BUSY_MS, self.busy_timeout):
            db.execute("VACUUM")  # give the space back (best effort: skipped while another process writes)
        return removed

    # ------------------------------------------------------------------------------------------------
    # Listing and eviction
    # ------------------------------------------------------------------------------------------------

    def count_and_bytes(self) -> tuple[int, int]:
        """(rows, total frame bytes)."""
        with self._guard("counting entries"):
            db = self._connection(create=False)
            if db is None:
                return 0, 0
            count, total = db.execute("SELECT count(*), total(size) FROM entries").fetchone()
        return count, int(total)

    def scan(self) -> list[tuple[bytes, int, int]]:
        """(digest, size, last_access_ns) of every row (reads only the LRU index)."""
        with self._guard("scanning entries"):
            db = self._connection(create=False)
            return [] if db is None else db.execute("SELECT digest, size, last_access_ns FROM entries").fetchall()

    def heads(self) -> Iterator[tuple[bytes, int, int, int, bytes]]:
        """(digest, size, created_ns, last_access_ns, head) of every row; ``head`` is the frame's first
        few KiB (header, signature, key). Fetched in batches: no long read transaction."""
        after = b""
        while True:
            with self._guard("listing entries"):
                db = self._connection(create=False)
                if db is None:
                    return
                rows = db.execute("SELECT digest, size, created_ns, last_access_ns, substr(frame, 1, ?) "
                                  "FROM entries WHERE digest > ? ORDER BY digest LIMIT ?",
                                  (_HEAD_BYTES, after, _LIST_BATCH)).fetchall()
            yield from rows
            if len(rows) < _LIST_BATCH:
                return
            after = rows[-1][0]

    def frame(self, digest: bytes) -> bytes | None:
        """The whole frame of ``digest``'s row (for a listing whose key is longer than the head)."""
        found = self.get(digest)
        return None if found is None else found[0]

    def evict(self, victims: list[tuple[bytes, int]]) -> list[bool | None]:
        """Delete each (digest, last_access_ns) row unless read since the scan that saw it.

        Per victim: True removed, False already gone, None kept (read since: recently used after all).
        """
        outcomes: list[bool | None] = []
        with self._guard("evicting entries"):
            db = self._connection(create=False, for_write=True)
            if db is None:
                return [False] * len(victims)
            for start in range(0, len(victims), _EVICT_BATCH):
                db.execute("BEGIN IMMEDIATE")
                try:
                    for digest, last_access_ns in victims[start:start + _EVICT_BATCH]:
                        if db.execute("DELETE FROM entries WHERE digest = ? AND last_access_ns = ?",
                                      (digest, last_access_ns)).rowcount == 1:
                            outcomes.append(True)
                        elif db.execute("SELECT 1 FROM entries WHERE digest = ?", (digest,)).fetchone():
                            outcomes.append(None)
                        else:
                            outcomes.append(False)
                    db.execute("COMMIT")
                except BaseException:
                    _rollback(db)
                    raise
        return outcomes

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turn every fault inside the block into a PackFault (a corrupt database is set aside first)."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._fault(exc, action) from exc
        except (OSError, filelock.Timeout) as exc:  # the directory, the lock file, the key's file check
            raise PackFault("io", f"disk cache database {self.path}: {action} failed", exc) from exc

    # ------------------------------------------------------------------------------------------------
    # Connections
    # ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close this process's connections (a parent's, inherited through fork, are left alone)."""
        pid = os.getpid()
        if self._pid != pid:
            self._after_fork()
        with self._mutex:
            connections, self._open = self._open, []
        for connection in connections:
            if connection.pid == pid:
                with suppress(sqlite3.Error):
                    connection.db.close()
            else:
                self._inherited.append(connection)
        self._local = threading.local()

    def _reader(self) -> sqlite3.Cursor | None:
        """This thread's reusable read cursor (the checks of :meth:`_connection` for reads); None: no database."""
        held: _Connection | None = getattr(self._local, "connection", None)
        if held is not None and held.pid == self._pid == os.getpid():
            return held.reader
        if self._connection(create=False) is None:
            return None
        return self._local.connection.reader

    def _connection(self, *, create: bool, for_write: bool = False) -> sqlite3.Connection | None:
        """This thread's connection; None when ``create`` is false and there is no database yet.

        A write first checks that the database file is still the one opened (NOTE [corrupt database]).
        """
        held: _Connection | None = getattr(self._local, "connection", None)
        pid = os.getpid()
        if held is not None and held.pid == pid and self._pid == pid:
            if not for_write or _inode(self.path) == held.inode:
                return held.db
            self._drop(held)  # set aside by another process: open the new database
        elif self._pid != pid:
            self._after_fork()
        if not create and not os.path.exists(self.path):
            return None
        return self._open_connection().db

    def _open_connection(self) -> _Connection:
        os.makedirs(self.root, exist_ok=True)
        try:
            db = self._connect(self.path, uri=False)
            try:
                self._configure(db)
            except BaseException:
                db.close()
                raise
        except sqlite3.OperationalError as exc:
            if _error_code(exc) not in ("SQLITE_CANTOPEN", "SQLITE_READONLY") or os.access(self.root, os.W_OK):
                raise
            # A read-only cache directory whose database was closed cleanly (no -shm to share): SQLite can
            # only read it as immutable. Entries stay checksummed; recency is not recorded.
            db = self._connect(f"file:{quote(self.path)}?immutable=1", uri=True)
            self.refresh_recency = False
        inode = _inode(self.path)
        connection = _Connection(db, inode)
        self._local.connection = connection
        with self._mutex:
            dead = [held for held in self._open if not held.thread.is_alive()]
            self._open = [held for held in self._open if held.thread.is_alive()] + [connection]
        for held in dead:  # threads that ended: their connections would otherwise stay open until close()
            with suppress(sqlite3.Error):
                held.db.close()
        return connection

    def _connect(self, target: str, *, uri: bool) -> sqlite3.Connection:
        return sqlite3.connect(target, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False,
                               cached_statements=32, uri=uri)

    def _configure(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]  # a garbage file fails here (NOTADB)
        if version not in (0, SCHEMA_VERSION):
            raise _ForeignSchema(f"schema version {version}, this aotcache uses {SCHEMA_VERSION}")
        if version == 0 or db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            self._initialize(db)
        db.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'}")
        db.execute("PRAGMA journal_size_limit = 16777216")  # truncate the WAL to 16 MiB after checkpoints

    def _initialize(self, db: sqlite3.Connection) -> None:
        """Switch a new database to WAL and create the schema, one process at a time.

        Two connections switching the journal mode at once can get SQLITE_BUSY without any wait (SQLite
        avoids a deadlock that way), so the first use of a database is serialized by ``.locks/pack.lock``.
        """
        with self._pack_lock():
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute("PRAGMA user_version").fetchone()[0] == 0:  # another process may have won
                    for statement in _SCHEMA:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise

    @contextmanager
    def _pack_lock(self) -> Iterator[None]:
        """``.locks/pack.lock``: creating the database, setting a corrupt one aside.

        :raises OSError: the lock file cannot be created. :raises filelock.Timeout: not acquired in time.
        """
        os.makedirs(os.path.dirname(self._pack_lock_path), exist_ok=True)
        # A new lock object each time (this is rare): filelock refuses instances inherited across fork.
        with filelock.FileLock(self._pack_lock_path).acquire(timeout=self.busy_timeout):
            yield

    def _after_fork(self) -> None:
        """In a forked child: keep the parent's connections referenced, never use or close them."""
        self._mutex = threading.Lock()  # the parent's may have been held by a thread that does not exist here
        self._inherited.extend(self._open)
        held = getattr(self._local, "connection", None)
        if held is not None:
            self._inherited.append(held)
        self._open = []
        self._local = threading.local()
        self._pid = os.getpid()

    def _drop(self, held: _Connection) -> None:
        """Close this thread's connection (same process), so that the next use reopens."""
        self._local.connection = None
        with self._mutex:
            self._open = [other for other in self._open if other is not held]
        with suppress(sqlite3.Error):
            held.db.close()

    def _fault(self, exc: sqlite3.Error, action: str) -> PackFault:
        """Classify ``exc``; a corrupt database is set aside first, a broken connection dropped."""
        held: _Connection | None = getattr(self._local, "connection", None)
        if held is not None and held.pid != os.getpid():
            held = None
        if _is_corrupt(exc):
            if held is not None:
                self._drop(held)
            where = self._set_aside(held.inode if held is not None else None)
            return PackFault("corrupt-database", f"disk cache database {self.path} is corrupt; {where}", exc)
        code = _error_code(exc)
        if held is not None and code not in ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_READONLY"):
            self._drop(held)  # after an I/O error, start over with a fresh connection
        category = {"SQLITE_BUSY": "locked", "SQLITE_LOCKED": "locked", "SQLITE_READONLY": "read-only",
                    "SQLITE_FULL": "full"}.get(code, "database")
        if category == "database" and "locked" in str(exc):
            category = "locked"
        return PackFault(category, f"disk cache database {self.path}: {action} failed", exc)

    def _set_aside(self, seen_inode: int | None) -> str:
        """Rename the corrupt database aside unless another process replaced it already; what was done."""
        aside = self.path + _ASIDE_SUFFIX
        try:
            with self._pack_lock():
                current = _inode(self.path)
                if current is None or (seen_inode is not None and current != seen_inode):
                    return "already replaced by another process"
                os.replace(self.path, aside)
                for suffix in ("-wal", "-shm"):
                    with suppress(FileNotFoundError):
                        os.unlink(self.path + suffix)
        except (OSError, filelock.Timeout) as exc:
            return f"could not set it aside ({type(exc).__name__}: {exc})"
        return f"set aside as {aside}; a new one is started"


_CODES_BY_MESSAGE = (("locked", "SQLITE_BUSY"), ("readonly", "SQLITE_READONLY"), ("disk I/O", "SQLITE_IOERR"),
                     ("is full", "SQLITE_FULL"))


def _error_code(exc: sqlite3.Error) -> str:
    """The primary SQLite result code's name (``SQLITE_BUSY`` for ``SQLITE_BUSY_SNAPSHOT``), or ""."""
    name = getattr(exc, "sqlite_errorname", None)  # Python >= 3.11; older ones: from the message
    if name:
        return "_".join(name.split("_")[:2])
    text = str(exc)
    return next((code for fragment, code in _CODES_BY_MESSAGE if fragment in text), "")


@contextmanager
def _busy_timeout(db: sqlite3.Connection, milliseconds: int, restore_seconds: float) -> Iterator[None]:
    """Wait at most ``milliseconds`` for locks inside the block (then SQLITE_BUSY)."""
    db.execute(f"PRAGMA busy_timeout = {milliseconds}")
    try:
        yield
    finally:
        db.execute(f"PRAGMA busy_timeout = {int(restore_seconds * 1000)}")


def _is_corrupt(exc: sqlite3.Error) -> bool:
    if isinstance(exc, _ForeignSchema):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return True
    return any(message in str(exc) for message in _CORRUPT_MESSAGES)


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _file_exists(path: str) -> bool:
    """Whether the key's file exists. :raises OSError: it cannot be checked (not a plain absence)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True

