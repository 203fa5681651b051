"""OnDiskCache: the local disk tier, safe for many concurrent processes.

Large entries are files, one per key; small ones (frame below ``small_max_bytes``, 32 KiB by default) are
rows of one SQLite database per cache (smallpack.py): creating a file costs a new inode, several times the
cost of a small write, and many shared machines have inode quotas. Both forms hold the same frame.

On-disk layout::

    <directory>/                       default: config cache_dir / "store" / <name>
      v<F>.<L>/                        F = frame.FRAME_VERSION, L = LAYOUT_VERSION; other v*.* dirs are
                                       another format: never read, removed by maintenance
        00/ .. ff/                     fan-out by the first two hex digits of the key digest
          <key digest>                 one large entry: a frame (see frame.py) under sha256(encode_key(key))
          .tmp.<pid>.<n>.<digest[:12]> a write in progress, or left by a killed writer (never read as an
                                       entry; removed by maintenance once untouched for STALE_TEMP_SECONDS)
        small.sqlite3 (-wal, -shm)     the small entries, one row each (smallpack.py)
        .usage                         approximate total entry bytes + time of the last full scan (eviction.py)
        .locks/0.lock .. f.lock        prefix locks, by the first hex digit of the digest (not one per key:
                                       inodes): corrupt-entry removal and the rename fallback of publishing
        .locks/usage.lock, evict.lock  the usage counter; one maintenance pass (scan/evict/sweep) at a time
        .locks/pack.lock               setting a corrupt small.sqlite3 aside

A file's mtime is its creation time; its atime is its last read (set by ``get``): LRU order is
``max(atime, mtime)``. A row has ``created_ns`` and ``last_access_ns``. Eviction merges both in one order.

NOTE [one form per key]
A key is stored as a row or as a file, never both: see smallpack.py. ``small_max_bytes`` only decides
where *this* process writes; lookups, inserts and removals always consult both forms, so processes
configured with different thresholds share a directory safely. ``get`` probes for the file first (~1 us
when there is none), then looks up the row (~7 us, and ~6 us for a row that is not there: measured, the
other order costs a 100 KB read more than it saves a 1 KB one).

NOTE [atomic publish, insert never overwrites]
A large value is written to a temp file in the entry's own directory, then published with
``os.link(tmp, entry)``, which fails if the entry exists: exactly one of several racing writers (threads or
processes) wins, and no reader ever sees a partial entry, even if the writer is killed (it leaves only a temp
file). Where hard links are unsupported, publishing falls back to ``os.replace`` under the key's prefix lock
after checking that the entry does not exist. A small value is one ``INSERT OR IGNORE`` in a SQLite
transaction: atomic, and exactly one racing insert changes a row.

NOTE [corrupt entries]
A truncated, bit-flipped, foreign, other-version, unsigned or wrongly signed entry is a miss: it is counted
(``stats.errors`` and ``stats.corrupt``), reported through ``handle_fault`` (which raises CacheFault in strict
mode), and removed -- a file under its prefix lock and only if it is still the same inode that was read, a
row only if it still holds the very bytes that were read -- so that a valid entry another process stored in
its place survives. A database fault (locked past the timeout, I/O error) is counted and reported like an
I/O error; a corrupt database is set aside and replaced by a new one (smallpack.py).

NOTE [durability]
By default nothing is fsynced: a process crash never leaves a partial entry (see above), but a power loss
may leave an entry with missing data, which the frame checksum turns into a miss, and may lose the last
rows written (SQLite ``synchronous=NORMAL``). ``durable=True`` fsyncs each file and its directory, and
commits rows with ``synchronous=FULL``, before ``insert`` returns (much slower).
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import filelock

from aotcache import config
from aotcache.logs import handle_fault
from aotcache.store import entryfiles, frame
from aotcache.store.eviction import (
    LOCK_TIMEOUT_SECONDS,
    STALE_TEMP_SECONDS,
    DiskUsage,
    ForkSafeFileLock,
    MaintenanceReport,
    PruneReport,
    ScannedEntry,
    acquire_lock,
    is_entry_name,
    iter_entry_files,
    last_access_ns,
)
from aotcache.store.interface import (
    AsyncCache,
    CacheError,
    EntryInfo,
    K,
    Lookup,
    LookupStatus,
    V,
    display_key,
    encode_key,
)
from aotcache.store.smallpack import RECENCY_RESOLUTION_NS, PackFault, SmallPack

__all__ = ["OnDiskCache", "LAYOUT_VERSION", "SMALL_MAX_BYTES", "PruneReport", "version_dir_name"]

#: Version of the directory layout (fan-out, file naming, usage file, small-entry pack); bump on
#: incompatible changes. 2: small entries moved into small.sqlite3.
LAYOUT_VERSION = 2
#: Default ``small_max_bytes``: entries whose frame is smaller are rows of the small-entry pack.
SMALL_MAX_BYTES = 32 * 1024

# A read refreshes an entry's atime unless an earlier read already did within this window: keeps hot
# loops from issuing a metadata write per get, at the price of sub-second LRU resolution among read entries.
_RECENCY_RESOLUTION_NS = 1_000_000_000
_MISS = object()  # _read's result for an absent entry


class _Failure:
    """_read's result for a fault (already counted and reported): the error text for Lookup."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def version_dir_name() -> str:
    """Name of the version directory this aotcache reads and writes, e.g. ``v1.1``."""
    return f"v{frame.FRAME_VERSION}.{LAYOUT_VERSION}"


class OnDiskCache(AsyncCache[K, V]):
    """A disk cache of framed entries (checksummed, optionally signed and compressed) with an LRU size bound.

    Safe for concurrent use by threads and processes sharing ``directory``. Faults (I/O errors, corrupt
    entries, a read-only directory) never raise out of ``get``/``insert``: they are counted, reported once
    through :func:`aotcache.logs.handle_fault` and become a miss / ``False`` (strict mode raises CacheFault).
    """

    name = "disk"
    #: NOTE [user version]: an application's own version of what it stores (PyTorch's OnDiskCache.version).
    #: Entries written under another version are misses and removed when read, as PyTorch's are.
    version: int = 0

    def __init__(self, name: str = "on_disk_cache", base_dir: str | os.PathLike[str] | None = None, *,
                 max_bytes: int | None = None, secret: str | bytes | None = None,
                 compress_min_bytes: int | None = None, durable: bool = False,
                 small_max_bytes: int = SMALL_MAX_BYTES) -> None:
        """
        :param name: the cache's name, a single path component (e.g. ``"graphs"``).
        :param base_dir: the directory holding this cache; default ``config cache_dir / "store" / name``.
        :param max_bytes: size bound of the entries, 0 = unbounded; default config ``max_bytes``.
        :param secret: HMAC secret; entries must then be signed with it. Default config ``secret``;
            ``""`` turns signing off whatever the config says.
        :param compress_min_bytes: zstd-compress values at least this large, 0 = never; default config
            ``compress_min_bytes``.
        :param durable: fsync every entry before ``insert`` returns (see NOTE [durability]).
        :param small_max_bytes: entries whose frame (header, key, payload) is smaller than this are stored
            as rows of one SQLite database instead of one file each (saves inodes and ~0.3 ms per small
            insert); 0 = files only. Only decides where this handle writes (NOTE [one form per key]).
        :raises CacheError: a name that is not a plain directory name, or a negative bound.
        """
        super().__init__()
        if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
            raise CacheError(f"disk cache name {name!r} must be a single directory name such as 'graphs'")
        self.cache_name = name
        self.directory = Path(base_dir) if base_dir is not None else Path(config.get("cache_dir")) / "store" / name
        self.max_bytes = _non_negative("max_bytes", config.get("max_bytes") if max_bytes is None else max_bytes)
        self.compress_min_bytes = _non_negative(
            "compress_min_bytes", config.get("compress_min_bytes") if compress_min_bytes is None
            else compress_min_bytes)
        self._secret = config.get("secret") if secret is None else (secret or None)
        self.durable = durable
        self.small_max_bytes = _non_negative("small_max_bytes", small_max_bytes)
        self._open_at(self.directory)

    def _open_at(self, directory: Path) -> None:
        """Point this handle at the cache in ``directory`` (its layout, locks, small-entry pack, usage)."""
        self.directory = directory
        self.root = self.directory / version_dir_name()
        self._root = str(self.root)
        self._lock_dir = self.root / ".locks"
        self._prefix_locks = {digit: ForkSafeFileLock(str(self._lock_dir / f"{digit}.lock"))
                              for digit in "0123456789abcdef"}
        self._pack = SmallPack(self.root, durable=self.durable, busy_timeout=LOCK_TIMEOUT_SECONDS)
        self._usage = DiskUsage(self.root, self.max_bytes, self._report_fault, self._pack)
        self._use_hardlinks = True
        self._refresh_recency = True  # off once utime is refused (a cache dir shared read-only)

    @property
    def base_dir(self) -> Path:
        """The directory of this cache (PyTorch's ``OnDiskCache.base_dir``); assigning it moves the handle."""
        return self.directory

    @base_dir.setter
    def base_dir(self, directory: str | os.PathLike[str]) -> None:
        self._open_at(Path(directory))

    def _fpath_from_key(self, key: K) -> Path:
        """The path of ``key``'s entry file (PyTorch's helper; small entries live in the pack instead).

        :raises CacheError: the key is not picklable.
        """
        digest = hashlib.sha256(encode_key(key)).hexdigest()
        return self.root / digest[:2] / digest

    def _flock_from_fpath(self, fpath: str | os.PathLike[str]) -> filelock.FileLock:
        """The lock that guards the entry file ``fpath`` (shared by its digest's first hex digit)."""
        self._lock_dir.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self._lock_dir / f"{Path(fpath).name[0]}.lock"))

    @property
    def version_prefix(self) -> bytes:
        """What an entry's stored key starts with under :attr:`version` (empty for version 0)."""
        return b"v%d|" % self.version if self.version else b""

    def _frame_key(self, encoded: bytes) -> bytes:
        """The key bytes an entry of ``encoded`` carries in its frame: the encoded key under the version."""
        return self.version_prefix + encoded if self.version else encoded

    @staticmethod
    def _of_other_version(stored_key: bytes | None, encoded: bytes) -> bool:
        """Whether a frame's ``stored_key`` is ``encoded`` written under another version (NOTE [user version])."""
        if stored_key is None:
            return False
        if stored_key.startswith(b"v") and b"|" in stored_key[:24]:  # encoded keys start with s:, b: or p:
            stored_key = stored_key.split(b"|", 1)[1]
        return stored_key == encoded

    def __repr__(self) -> str:
        return f"OnDiskCache({self.cache_name!r}, {str(self.directory)!r}, max_bytes={self.max_bytes})"

    @property
    def signed(self) -> bool:
        """Whether entries are signed and signatures required."""
        return self._secret is not None

    # ------------------------------------------------------------------------------------------------
    # Reading
    # ------------------------------------------------------------------------------------------------

    def get(self, key: K) -> V | None:
        """The value for ``key``, or None on a miss or fault (see :meth:`lookup`).

        :raises CacheError: the key is not picklable.
        :raises aotcache.logs.CacheFault: a fault, in strict mode only.
        """
        result = self._read(key)
        return None if result is _MISS or type(result) is _Failure else result  # type: ignore[return-value]

    def lookup(self, key: K) -> Lookup[V]:
        """Read ``key``: HIT with the value, MISS, or ERROR (unreadable or corrupt entry, counted, removed; an
        entry of another secret, counted as ``unverified`` and kept).

        :raises CacheError: the key is not picklable.
        :raises aotcache.logs.CacheFault: a fault, in strict mode only.
        """
        result = self._read(key)
        if result is _MISS:
            return Lookup(LookupStatus.MISS, tier=self.name)
        if type(result) is _Failure:
            return Lookup(LookupStatus.ERROR, tier=self.name, error=result.error)  # type: ignore[union-attr]
        return Lookup(LookupStatus.HIT, result, tier=self.name)  # type: ignore[arg-type]

    def _read(self, key: K) -> object:
        """The value, ``_MISS``, or a ``_Failure`` (counted and reported)."""
        start = time.perf_counter()
        encoded = encode_key(key)
        raw_digest = hashlib.sha256(encoded).digest()
        digest = raw_digest.hex()
        path = f"{self._root}/{digest[:2]}/{digest}"
        if not os.access(path, os.F_OK):  # no file (cheaper than a failed open): maybe a row (NOTE [one form
            row = self._read_row(start, encoded, raw_digest)  # per key]); a file published meanwhile: a miss
            if row is _MISS:
                self.stats.add(misses=1, get_seconds=time.perf_counter() - start)
            return row
        try:
            fd = os.open(path, os.O_RDONLY | entryfiles.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):  # evicted or deleted since the check
            self.stats.add(misses=1, get_seconds=time.perf_counter() - start)
            return _MISS
        except OSError as exc:
            return self._read_fault(start, f"cannot open disk cache entry {path}", exc)
        try:
            st = os.fstat(fd)
            value = entryfiles.read_value(fd, st.st_size, self._frame_key(encoded), self._secret)
            if self._refresh_recency:
                self._touch(fd, st)
        except OSError as exc:
            return self._read_fault(start, f"cannot read disk cache entry {path}", exc)
        except frame.FrameError as exc:
            if not exc.corrupt:
                return self._unverified(start, st.st_size, exc)
            stale = exc.reason == "key mismatch" and self._of_other_version(self._file_key(path), encoded)
            self._discard_corrupt(digest, path, st)
            if stale:
                self.stats.add(misses=1, get_seconds=time.perf_counter() - start)
                return _MISS
            self.stats.add(errors=1, corrupt=1, bytes_read=st.st_size, get_seconds=time.perf_counter() - start)
            handle_fault(f"disk-corrupt:{self._root}",
                         f"corrupt disk cache entry {path} ({exc.reason}); removed", exc)
            return _Failure(f"corrupt entry ({exc.reason})")
        finally:
            os.close(fd)
        self.stats.add_hit(st.st_size, time.perf_counter() - start)
        return value

    def _read_row(self, start: float, encoded: bytes, raw_digest: bytes) -> object:
        """The value of the key's row in the small-entry pack, ``_MISS``, or a ``_Failure``."""
        try:
            found = self._pack.get(raw_digest)
        except PackFault as exc:
            return self._pack_read_fault(start, exc)
        if found is None:
            return _MISS  # counted by the caller
        blob, seen_last_access = found
        try:
            value = frame.decode_value(blob, secret=self._secret, expected_key=self._frame_key(encoded))
        except frame.FrameError as exc:
            if not exc.corrupt:
                return self._unverified(start, len(blob), exc)
            try:
                removed = self._pack.discard(raw_digest, blob)
            except PackFault:
                removed = False  # left in place: every reader treats it as a miss anyway
            if removed:
                self._usage.record(-len(blob))
            if exc.reason == "key mismatch" and self._of_other_version(self._row_key(raw_digest, blob), encoded):
                return _MISS  # counted by the caller
            self.stats.add(errors=1, corrupt=1, bytes_read=len(blob), get_seconds=time.perf_counter() - start)
            handle_fault(f"disk-corrupt:{self._root}", f"corrupt disk cache entry {raw_digest.hex()} in "
                                                       f"{self._pack.path} ({exc.reason}); removed", exc)
            return _Failure(f"corrupt entry ({exc.reason})")
        if time.time_ns() - seen_last_access >= RECENCY_RESOLUTION_NS:  # (the common case skips the call)
            try:
                self._pack.touch(raw_digest, seen_last_access)
            except PackFault as exc:  # the value read is sound; the database just failed afterwards
                self._report_fault(f"pack-{exc.category}", exc.message, exc.cause)
        self.stats.add_hit(len(blob), time.perf_counter() - start)
        return value

    def _pack_read_fault(self, start: float, exc: PackFault) -> _Failure:
        self.stats.add(errors=1, get_seconds=time.perf_counter() - start)
        handle_fault(f"disk-pack-{exc.category}:{self._root}", exc.message, exc.cause)
        return _Failure(str(exc))

    def _touch(self, fd: int, st: os.stat_result) -> None:
        """Move the entry's atime to now (LRU recency), keeping mtime (its creation time)."""
        now = time.time_ns()
        if st.st_atime_ns > st.st_mtime_ns and now - st.st_atime_ns < _RECENCY_RESOLUTION_NS:
            return  # read recently already
        try:
            os.utime(fd, ns=(now, st.st_mtime_ns))
        except OSError:
            # Not the owner of a shared cache, or a read-only file system: reading still works, recency
            # just is not recorded (this process's reads will not protect entries from eviction).
            self._refresh_recency = False

    def _read_fault(self, start: float, message: str, exc: OSError) -> _Failure:
        self.stats.add(errors=1, get_seconds=time.perf_counter() - start)
        handle_fault(f"disk-read:{errno.errorcode.get(exc.errno or 0, exc.errno)}:{self._root}", message, exc)
        return _Failure(f"{type(exc).__name__}: {exc}")

    def _unverified(self, start: float, size: int, exc: frame.FrameError) -> _Failure:
        """An entry of another secret (or unsigned): a miss here, kept for its writers (counted, warned once)."""
        self.stats.add(unverified=1, bytes_read=size, get_seconds=time.perf_counter() - start)
        frame.report_secret_mismatch(str(self._root), exc)
        return _Failure(f"unverified entry ({exc.reason})")

    def _discard_corrupt(self, digest: str, path: str, seen: os.stat_result) -> None:
        """Remove the corrupt file just read, unless another process has already replaced it."""
        lock = self._prefix_locks[digest[0]]
        try:
            acquire_lock(lock, LOCK_TIMEOUT_SECONDS)
        except (OSError, filelock.Timeout):
            return  # cannot lock (read-only cache dir): leave it; every reader treats it as a miss anyway
        removed = False
        try:
            current = os.stat(path)
            if (current.st_ino, current.st_dev) == (seen.st_ino, seen.st_dev):
                os.unlink(path)
                removed = True
        except OSError:
            pass  # gone already (FileNotFoundError) or not removable (read-only): a miss either way
        finally:
            lock.release()
        if removed:
            self._usage.record(-seen.st_size)

    # ------------------------------------------------------------------------------------------------
    # Writing
    # ------------------------------------------------------------------------------------------------

    def insert(self, key: K, value: V) -> bool:
        """Store ``value`` under ``key`` unless an entry exists (in any process). True if stored now.

        A value whose entry is larger than ``max_bytes`` is not stored (False, counted as an eviction).
        Write faults (no space, read-only, permission) return False.

        :raises CacheError: the key or value is not picklable, or the value is None.
        :raises aotcache.logs.CacheFault: a fault, in strict mode only.
        """
        start = time.perf_counter()
        encoded = encode_key(key)
        if value is None:
            raise CacheError("cannot cache None: get() returns None for a miss; wrap the value instead")
        raw_digest = hashlib.sha256(encoded).digest()
        digest = raw_digest.hex()
        subdir = f"{self._root}/{digest[:2]}"
        path = f"{subdir}/{digest}"
        if entryfiles.file_exists(path):  # cheap early exit; the link or the row insert below is what decides under races
            self.stats.add(insert_conflicts=1, insert_seconds=time.perf_counter() - start)
            return False
        try:
            parts = frame.encode_parts(self._frame_key(encoded), value, secret=self._secret,
                                       compress_min_bytes=self.compress_min_bytes)
        except TypeError as exc:
            raise CacheError(str(exc)) from exc
        size = sum(len(part) for part in parts)
        if self.max_bytes and size > self.max_bytes:
            self.stats.add(evictions=1, insert_seconds=time.perf_counter() - start)
            return False
        try:
            if size < self.small_max_bytes:
                stored = self._pack.insert(raw_digest, b"".join(parts), path)
            else:
                stored = self._publish(subdir, path, raw_digest, parts, size)
        except PackFault as exc:
            self.stats.add(errors=1, insert_seconds=time.perf_counter() - start)
            handle_fault(f"disk-pack-{exc.category}:{self._root}", exc.message, exc.cause)
            return False
        except (OSError, filelock.Timeout) as exc:
            self.stats.add(errors=1, insert_seconds=time.perf_counter() - start)
            code = errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)
            handle_fault(f"disk-write:{code}:{self._root}", f"cannot write disk cache entry {path}", exc)
            return False
        if not stored:
            self.stats.add(insert_conflicts=1, insert_seconds=time.perf_counter() - start)
            return False
        evicted = self._usage.record(size)
        self.stats.add(inserts=1, bytes_written=size, evictions=evicted,
                       insert_seconds=time.perf_counter() - start)
        return True

    def _publish(self, subdir: str, path: str, raw_digest: bytes, parts: list[bytes], size: int) -> bool:
        """Write ``parts`` to a temp file and publish it as ``path``; False if the key exists (either form).

        :raises PackFault: the small-entry pack cannot be locked (NOTE [one form per key]).
        """
        digest = raw_digest.hex()
        fd, temp_path = entryfiles.create_temp(subdir, digest)
        try:
            try:
                entryfiles.write_all(fd, parts, size)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            stored = self._pack.publish_file(raw_digest, lambda: self._link_or_rename(temp_path, path, digest))
            if stored and self.durable:
                entryfiles.fsync_directory(subdir)
            return stored
        finally:
            with suppress(FileNotFoundError):  # gone after a rename
                os.unlink(temp_path)

    def _link_or_rename(self, temp_path: str, path: str, digest: str) -> bool:
        if self._use_hardlinks:
            try:
                os.link(temp_path, path)
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in entryfiles.HARDLINK_UNSUPPORTED:
                    raise
                self._use_hardlinks = False
        lock = self._prefix_locks[digest[0]]
        acquire_lock(lock, LOCK_TIMEOUT_SECONDS)
        try:
            if os.path.lexists(path):
                return False
            os.replace(temp_path, path)
            return True
        finally:
            lock.release()

    # ------------------------------------------------------------------------------------------------
    # Maintenance
    # ------------------------------------------------------------------------------------------------

    def delete(self, key: K) -> bool:
        """Remove ``key``'s entry; True if one was removed.

        :raises CacheError: the key is not picklable.
        :raises OSError: the entry exists but cannot be removed (a database fault included).
        """
        return self.delete_digest(hashlib.sha256(encode_key(key)).hexdigest())

    def delete_digest(self, digest: str) -> bool:
        """Remove the entry named ``digest`` (as listed by :meth:`entries`), file or row; True if removed.

        :raises CacheError: ``digest`` is not a 64-digit lowercase hex sha256.
        :raises OSError: the entry exists but cannot be removed (a database fault included).
        """
        if not isinstance(digest, str) or not is_entry_name(digest):
            raise CacheError(f"{digest!r} is not an entry digest: expected 64 lowercase hex digits, as listed "
                             "by OnDiskCache.entries() or `aotcache ls --json`")
        removed = 0
        path = f"{self._root}/{digest[:2]}/{digest}"
        try:
            size = os.stat(path).st_size
            os.unlink(path)
            removed += size
            found = True
        except FileNotFoundError:
            found = False
        try:
            row_size = self._pack.delete(bytes.fromhex(digest))
        except PackFault as exc:
            raise _as_os_error(exc) from exc
        if row_size:
            removed += row_size
            found = True
        if found:
            self._usage.record(-removed)
        return found

    def clear(self) -> int:
        """Remove every entry (writes in progress are left to finish); the number removed.

        :raises OSError: an entry cannot be removed (a database fault included).
        """
        removed = 0
        for entry in iter_entry_files(self._root):
            with suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        try:
            removed += self._pack.clear()
        except PackFault as exc:
            raise _as_os_error(exc) from exc
        self._usage.reset(0)
        return removed

    def entries(self) -> Iterator[EntryInfo]:
        """Metadata of every readable entry, files and rows (unreadable or corrupt ones are skipped).

        Listing does not count as use: files are opened with O_NOATIME where permitted, so that the
        kernel does not move their access time (their LRU position); rows are only read. A database fault
        is counted and reported, and ends the listing of rows.
        """
        for item in iter_entry_files(self._root):
            try:
                st, encoded_key = entryfiles.read_key_without_access(item.path)
            except (OSError, frame.FrameError):
                continue  # removed meanwhile, or corrupt (a get of its key will count and remove it)
            yield EntryInfo(digest=item.name, key=display_key(encoded_key), size=st.st_size,
                            created=st.st_mtime_ns / 1e9, last_access=last_access_ns(st) / 1e9, tier=self.name)
        try:
            for raw_digest, size, created_ns, last_access, head in self._pack.heads():
                encoded_key = self._row_key(raw_digest, head)
                if encoded_key is not None:
                    yield EntryInfo(digest=raw_digest.hex(), key=display_key(encoded_key), size=size,
                                    created=created_ns / 1e9, last_access=last_access / 1e9, tier=self.name)
        except PackFault as exc:
            self._report_fault(f"pack-{exc.category}", exc.message, exc.cause)

    @staticmethod
    def _file_key(path: str) -> bytes | None:
        """The stored key of the entry file at ``path``, or None when it cannot be read."""
        try:
            return entryfiles.read_key_without_access(path)[1]
        except (OSError, frame.FrameError):
            return None

    def _row_key(self, raw_digest: bytes, head: bytes) -> bytes | None:
        """The encoded key of a row, from the head of its frame (the whole frame for very long keys)."""
        try:
            header = frame.read_header(head)
            key_end = header.body_offset + header.key_length
            if key_end > len(head):
                head = self._pack.frame(raw_digest) or b""
        except frame.FrameError:
            return None
        return head[header.body_offset:key_end] if key_end <= len(head) else None

    def total_bytes(self) -> int:
        """Bytes of all entries, files and rows (a scan, exact at the time of the call)."""
        total = 0
        for item in iter_entry_files(self._root):
            with suppress(FileNotFoundError):
                total += item.stat(follow_symlinks=False).st_size
        return total + self._row_count_and_bytes()[1]

    def __len__(self) -> int:
        return sum(1 for _ in iter_entry_files(self._root)) + self._row_count_and_bytes()[0]

    def _row_count_and_bytes(self) -> tuple[int, int]:
        try:
            return self._pack.count_and_bytes()
        except PackFault as exc:
            self._report_fault(f"pack-{exc.category}", exc.message, exc.cause)
            return 0, 0

    def prune(self, max_bytes: int, *, dry_run: bool = False, recency: Mapping[str, int] | None = None
              ) -> PruneReport:
        """Remove least recently used entries (files and rows) until they total at most ``max_bytes``.

        Unlike the automatic eviction (down to 90 % of the configured bound), the bound given is the bound
        reached; an entry read while pruning is kept. With ``dry_run``, only reports what would go.
        ``recency``: order times (ns) for some entries by digest (NOTE [ordered with another entry]).

        :raises CacheError: ``max_bytes`` is not a non-negative integer.
        :raises OSError: the cache directory, a lock or the database cannot be used.
        """
        _non_negative("prune max_bytes", max_bytes)
        self.close()  # count this handle's own writes before the scan
        try:
            return self._usage.prune(max_bytes, dry_run=dry_run, describe=self._describe, recency=recency)
        except PackFault as exc:
            raise _as_os_error(exc) from exc

    def _describe(self, entry: ScannedEntry) -> EntryInfo:
        """An entry seen by a scan, with its key (read without counting as use); key "?" if unreadable."""
        encoded_key: bytes | None = None
        created_ns = entry.last_access_ns
        if entry.path is not None:
            with suppress(OSError, frame.FrameError):
                st, encoded_key = entryfiles.read_key_without_access(entry.path)
                created_ns = st.st_mtime_ns
        else:
            with suppress(PackFault):
                encoded_key = self._row_key(bytes.fromhex(entry.digest), self._pack.frame(
                    bytes.fromhex(entry.digest)) or b"")
        return EntryInfo(digest=entry.digest, key=display_key(encoded_key) if encoded_key is not None else "?",
                         size=entry.size, created=created_ns / 1e9, last_access=entry.last_access_ns / 1e9,
                         tier=self.name)

    def maintain(self, *, temp_max_age: float = STALE_TEMP_SECONDS) -> MaintenanceReport:
        """Scan now: evict past the bound, remove temp files untouched for ``temp_max_age`` s, old versions.

        Waits for a maintenance pass running in another process instead of skipping.
        """
        self._usage.flush(maintain_if_due=False)
        report = self._usage.maintain(wait=True, temp_max_age=temp_max_age)
        if report.evicted:
            self.stats.add(evictions=report.evicted)
        return report

    def close(self) -> None:
        """Flush this process's pending usage count (so the shared size bound sees every write) and close
        its database connections (a later use reopens them)."""
        evicted = self._usage.flush()
        if evicted:
            self.stats.add(evictions=evicted)
        self._pack.close()

    def _report_fault(self, category: str, message: str, exc: BaseException) -> None:
        self.stats.add(errors=1)
        handle_fault(f"disk-{category}:{self._root}", message, exc)


def _non_negative(option: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CacheError(f"OnDiskCache {option} must be a non-negative integer (0 = off), got {value!r}")
    return value


def _as_os_error(exc: PackFault) -> OSError:
    """A database fault, for the maintenance methods whose contract is OSError."""
    return OSError(errno.EIO, str(exc))
