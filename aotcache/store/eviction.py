"""Size bound of the disk tier: a shared approximate usage counter, full scans, LRU eviction, sweeping.

Entries are files and rows of the small-entry pack (smallpack.py); a scan lists both, and eviction removes
the least recently used of either form, in one LRU order (files: ``max(atime, mtime)``; rows:
``last_access_ns``). ``prune`` is an on-demand pass down to an exact bound, reporting what it removed.

The disk tier must not rescan its directory on every insert, yet its bound must hold while several processes
write. :class:`DiskUsage` keeps an approximate total of entry bytes in a small shared file (``.usage``).
Each process batches its own additions and flushes them under a short lock; when a flush finds the total
past the bound, or the last full scan is old, one process (whoever takes the eviction lock without
waiting) scans the directory, evicts the least recently used entries down to a low-water mark, sweeps
stale temporary files and old-version directories, and writes the true total back.

NOTE [usage counter arithmetic]
The scan takes a while, and other processes keep adding to the counter meanwhile. So the scanner does not
overwrite the counter with what it saw; it records the counter value when it starts (C0) and at the end
(C1) writes ``remaining + (C1 - C0)``. Entries written during the scan may be counted twice, which only
makes the next scan come earlier. A writer killed between publishing an entry and flushing loses its
count; the periodic full scan (at most every ``MAINTENANCE_INTERVAL_SECONDS``) corrects that drift.

NOTE [eviction never blocks readers]
Readers take no lock at all: an evicted entry that is open in a reader stays readable (POSIX unlink
semantics). Writers only *try* the eviction lock. After releasing it the evictor re-reads the counter
once, so growth added by a writer that found the lock taken is not left unhandled.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import filelock

from aotcache.store.interface import EntryInfo
from aotcache.store.smallpack import PackFault, SmallPack

__all__ = [
    "STALE_TEMP_SECONDS",
    "MAINTENANCE_INTERVAL_SECONDS",
    "EVICT_TO_FRACTION",
    "LOCK_TIMEOUT_SECONDS",
    "TEMP_PREFIX",
    "is_entry_name",
    "iter_entry_files",
    "last_access_ns",
    "acquire_lock",
    "ForkSafeFileLock",
    "DiskUsage",
    "MaintenanceReport",
    "PruneReport",
    "ScannedEntry",
]

#: A temporary file not modified for this long was left by a killed writer and is removed by maintenance.
STALE_TEMP_SECONDS = 600.0
#: A full scan (drift correction, sweeping) happens at least this often while the cache is written.
MAINTENANCE_INTERVAL_SECONDS = 900.0
#: Eviction removes entries until the total is at most this fraction of ``max_bytes`` (hysteresis).
EVICT_TO_FRACTION = 0.9
#: Waiting longer than this for a short-held lock (usage counter, entry prefix) is a fault.
LOCK_TIMEOUT_SECONDS = 30.0
#: Name prefix of in-progress writes; such files are never read as entries.
TEMP_PREFIX = ".tmp."
#: Largest batch of unflushed byte counts a process keeps (also capped at max_bytes / 64).
_MAX_FLUSH_BATCH = 1024 * 1024

_USAGE_FILE = ".usage"
_USAGE_FORMAT = struct.Struct("<qd")  # approximate total entry bytes, unix time of the last full scan
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}")
_FANOUT_NAME = re.compile(r"[0-9a-f]{2}")
_VERSION_DIR = re.compile(r"v\d+\.\d+")

FaultReporter = Callable[[str, str, BaseException], None]


def is_entry_name(name: str) -> bool:
    """True for the file name of an entry (a sha256 hex digest)."""
    return len(name) == 64 and _ENTRY_NAME.fullmatch(name) is not None


def last_access_ns(stat_result: os.stat_result) -> int:
    """LRU time of an entry: its mtime is its creation, its atime is set forward by reads."""
    return max(stat_result.st_atime_ns, stat_result.st_mtime_ns)


def iter_entry_files(root: str) -> Iterator[os.DirEntry[str]]:
    """Every entry file (digest-named) under the fan-out directories of ``root``; missing root: nothing."""
    try:
        fanouts = [entry.path for entry in os.scandir(root)
                   if _FANOUT_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for fanout in fanouts:
        try:
            with os.scandir(fanout) as listing:
                for entry in listing:
                    if is_entry_name(entry.name):
                        yield entry
        except FileNotFoundError:  # removed by a concurrent clear()
            continue


class ForkSafeFileLock:
    """A ``filelock.FileLock`` that a forked child re-creates: filelock refuses to use an inherited instance
    (RuntimeError), and a cache object made before a fork (DataLoader workers) must keep working after it."""

    def __init__(self, lock_file: str) -> None:
        self.lock_file = lock_file
        self._pid = os.getpid()
        self._lock = filelock.FileLock(lock_file)

    def _current(self) -> filelock.BaseFileLock:
        if self._pid != os.getpid():
            self._pid, self._lock = os.getpid(), filelock.FileLock(self.lock_file)
        return self._lock

    def acquire(self, timeout: float) -> object:
        return self._current().acquire(timeout=timeout)

    def release(self) -> None:
        self._current().release()


def acquire_lock(lock: ForkSafeFileLock | filelock.BaseFileLock, timeout: float) -> None:
    """Acquire ``lock``, creating its directory on first use.

    :raises filelock.Timeout: not acquired within ``timeout`` (0 = a single attempt).
    :raises OSError: the lock file cannot be created (read-only directory, ...).
    """
    try:
        lock.acquire(timeout=timeout)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(lock.lock_file), exist_ok=True)
        lock.acquire(timeout=timeout)


@dataclass
class MaintenanceReport:
    """What one maintenance pass did."""

    scanned_entries: int = 0
    total_before: int = 0
    total_after: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    temp_files_removed: int = 0
    old_version_dirs_removed: int = 0


@dataclass
class PruneReport:
    """What ``OnDiskCache.prune`` removed (or, with ``dry_run``, would remove), oldest first."""

    max_bytes: int
    dry_run: bool = False
    entries_before: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    removed: list[EntryInfo] = field(default_factory=list)

    @property
    def removed_bytes(self) -> int:
        return sum(info.size for info in self.removed)


@dataclass(frozen=True)
class ScannedEntry:
    """One entry seen by a scan: a file (``path`` set) or a row of the small-entry pack (``path`` None)."""

    digest: str
    path: str | None
    size: int
    last_access_ns: int
    inode: tuple[int, int] | None = None


Describer = Callable[[ScannedEntry], EntryInfo]


class DiskUsage:
    """The shared, approximate byte total of one disk cache version directory, and its maintenance.

    ``record(delta)`` is called after every publish (positive) or removal (negative); it is cheap: counts are
    batched per process and flushed under a short lock. ``maintain()`` runs a full scan now.
    """

    def __init__(self, root: Path, max_bytes: int, report_fault: FaultReporter, pack: SmallPack | None = None
                 ) -> None:
        self.root = root
        self.pack = pack
        self.max_bytes = max_bytes
        self._report_fault = report_fault
        self._usage_path = str(root / _USAGE_FILE)
        lock_dir = root / ".locks"
        self._usage_lock = ForkSafeFileLock(str(lock_dir / "usage.lock"))
        self._evict_lock = ForkSafeFileLock(str(lock_dir / "evict.lock"))
        if max_bytes:
            self._flush_batch = max(1, min(_MAX_FLUSH_BATCH, max_bytes // 64))
        else:
            self._flush_batch = _MAX_FLUSH_BATCH
        self._mutex = threading.Lock()
        self._pending = 0
        self._flushed_once = False  # the first record() of a process flushes (and so checks maintenance)
        self._pid = os.getpid()

    # ------------------------------------------------------------------------------------------------
    # Counting
    # ------------------------------------------------------------------------------------------------

    def record(self, delta: int) -> int:
        """Account ``delta`` bytes; flushes (and maybe maintains) when the batch is full. Evictions made."""
        with self._mutex:
            if self._pid != os.getpid():  # forked: the parent flushes what it had pending
                self._pid, self._pending, self._flushed_once = os.getpid(), 0, False
            self._pending += delta
            due = abs(self._pending) >= self._flush_batch or not self._flushed_once
        return self.flush() if due else 0

    def flush(self, *, maintain_if_due: bool = True) -> int:
        """Add this process's pending count to the shared total; maintain if over the bound or due.

        Returns the number of entries evicted. Faults (lock or counter I/O) are reported, never raised
        (unless the fault policy raises in strict mode).
        """
        with self._mutex:
            pending, self._pending = self._pending, 0
            self._flushed_once = True
        if not pending:
            return 0  # nothing written by this process (e.g. close() of a reader): touch nothing
        try:
            total, last_scan = self._update_counter(lambda total: total + pending)
        except (OSError, filelock.Timeout) as exc:
            self._report_fault("usage", f"cannot update the disk cache usage counter in {self.root}", exc)
            return 0
        if not maintain_if_due:
            return 0
        over_bound = bool(self.max_bytes) and total > self.max_bytes
        if over_bound or time.time() - last_scan > MAINTENANCE_INTERVAL_SECONDS:
            return self.maintain(wait=False).evicted
        return 0

    def approximate_total(self) -> int:
        """The shared counter's current value (without this process's unflushed batch)."""
        try:
            return self._read_counter()[0]
        except OSError:
            return 0

    def reset(self, total: int) -> None:
        """Set the shared total (after ``clear()``), keeping the last-scan time."""
        with self._mutex:
            self._pending = 0
        try:
            self._update_counter(lambda _: total)
        except (OSError, filelock.Timeout) as exc:
            self._report_fault("usage", f"cannot update the disk cache usage counter in {self.root}", exc)

    def _read_counter(self) -> tuple[int, float]:
        try:
            with open(self._usage_path, "rb") as file:
                blob = file.read(_USAGE_FORMAT.size)
        except FileNotFoundError:
            return 0, 0.0
        if len(blob) != _USAGE_FORMAT.size:
            return 0, 0.0  # torn or foreign: forces a scan, which rewrites it
        return _USAGE_FORMAT.unpack(blob)

    def _update_counter(self, change: Callable[[int], int], scanned: bool = False) -> tuple[int, float]:
        """Apply ``change`` to the shared total under the usage lock; returns (new total, last scan time)."""
        acquire_lock(self._usage_lock, LOCK_TIMEOUT_SECONDS)
        try:
            fd = os.open(self._usage_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                blob = os.pread(fd, _USAGE_FORMAT.size, 0)
                total, last_scan = _USAGE_FORMAT.unpack(blob) if len(blob) == _USAGE_FORMAT.size else (0, 0.0)
                total = max(0, change(total))
                if scanned:
                    last_scan = time.time()
                os.pwrite(fd, _USAGE_FORMAT.pack(total, last_scan), 0)
            finally:
                os.close(fd)
        finally:
            self._usage_lock.release()
        return total, last_scan

    # ------------------------------------------------------------------------------------------------
    # Maintenance: scan, evict, sweep
    # ------------------------------------------------------------------------------------------------

    def maintain(self, *, wait: bool = False, temp_max_age: float = STALE_TEMP_SECONDS) -> MaintenanceReport:
        """One full scan: evict LRU entries past the bound, sweep stale temp files and old versions.

        With ``wait=False`` (writers), returns an empty report at once if another process is maintaining.
        """
        report = MaintenanceReport()
        for _ in range(3):  # re-check after release: see NOTE [eviction never blocks readers]
            try:
                acquire_lock(self._evict_lock, LOCK_TIMEOUT_SECONDS if wait else 0)
            except filelock.Timeout:
                return report
            except OSError as exc:
                self._report_fault("evict-lock", f"cannot take the disk cache eviction lock in {self.root}", exc)
                return report
            try:
                self._maintain_locked(report, temp_max_age)
            except (OSError, filelock.Timeout, PackFault) as exc:
                self._report_fault("maintenance", f"disk cache maintenance failed in {self.root}", exc)
                return report
            finally:
                self._evict_lock.release()
            if not self.max_bytes or self.approximate_total() <= self.max_bytes:
                break
        return report

    def _maintain_locked(self, report: MaintenanceReport, temp_max_age: float) -> None:
        counter_at_start = self._read_counter()[0]
        entries, report.temp_files_removed = self._scan(temp_max_age)
        report.old_version_dirs_removed = self._remove_other_versions()
        total = sum(entry.size for entry in entries)
        report.scanned_entries = len(entries)
        report.total_before = total
        if self.max_bytes and total > self.max_bytes:
            total, removed = self._evict_down_to(entries, total, int(self.max_bytes * EVICT_TO_FRACTION))
            report.evicted += len(removed)
            report.evicted_bytes += sum(entry.size for entry in removed)
        report.total_after = total
        self._update_counter(lambda counter_now: total + (counter_now - counter_at_start), scanned=True)

    def prune(self, max_bytes: int, *, dry_run: bool = False, describe: Describer,
              recency: Mapping[str, int] | None = None) -> PruneReport:
        """Remove least recently used entries (files and rows) until they total at most ``max_bytes``.

        No hysteresis: the bound asked for is the bound reached. Waits for a maintenance pass of another
        process. ``describe`` turns an entry about to be removed into its EntryInfo (read before removal).
        ``recency`` (digest -> ns) orders the named entries as if last used then (NOTE [ordered with another
        entry]); whether an entry was read since the scan is still decided by its own recency.

        :raises OSError: a lock or the directory cannot be used. :raises PackFault: a database fault.
        """
        report = PruneReport(max_bytes=max_bytes, dry_run=dry_run)
        acquire_lock(self._evict_lock, LOCK_TIMEOUT_SECONDS)
        try:
            counter_at_start = self._read_counter()[0]
            entries, _ = self._scan(temp_max_age=math.inf)
            total = sum(entry.size for entry in entries)
            report.entries_before, report.bytes_before = len(entries), total
            described: dict[str, EntryInfo] = {}

            def describe_batch(batch: list[ScannedEntry]) -> None:
                described.update((entry.digest, describe(entry)) for entry in batch)

            total, removed = self._evict_down_to(entries, total, max_bytes, dry_run=dry_run,
                                                 before_removal=describe_batch, recency=recency)
            report.bytes_after = total
            report.removed = [described[entry.digest] for entry in removed]
            if removed and not dry_run:
                self._update_counter(lambda counter_now: total + (counter_now - counter_at_start), scanned=True)
        finally:
            self._evict_lock.release()
        return report

    def _evict_down_to(self, entries: list[ScannedEntry], total: int, target: int, *, dry_run: bool = False,
                       before_removal: Callable[[list[ScannedEntry]], None] | None = None,
                       recency: Mapping[str, int] | None = None) -> tuple[int, list[ScannedEntry]]:
        """Remove entries, least recently used first, until ``total`` is at most ``target``.

        Returns the new total and the entries this call removed. An entry read since the scan is kept, and
        the next one in LRU order is taken instead; one already removed by another process counts as gone.

        NOTE [ordered with another entry]
        A caller that knows an entry is only useful with another (a fingerprint record and the compiled
        entry it names) passes, in ``recency``, an order time just after the other's: it then goes after it,
        never before it.
        """
        order = recency or {}
        entries.sort(key=lambda entry: (order.get(entry.digest, entry.last_access_ns), entry.digest))
        removed: list[ScannedEntry] = []
        position = 0
        while total > target and position < len(entries):
            batch: list[ScannedEntry] = []
            planned = total
            while planned > target and position < len(entries):
                batch.append(entries[position])
                planned -= entries[position].size
                position += 1
            if before_removal is not None:
                before_removal(batch)
            if dry_run:
                removed += batch
                total = planned
                continue
            for entry, outcome in zip(batch, self._remove(batch)):
                if outcome is None:
                    continue  # read since the scan: recently used after all
                total -= entry.size
                if outcome:
                    removed.append(entry)
        return total, removed

    def _remove(self, batch: list[ScannedEntry]) -> list[bool | None]:
        """Per entry: True removed, False already gone, None kept (changed or read since the scan)."""
        rows = [(bytes.fromhex(entry.digest), entry.last_access_ns) for entry in batch if entry.path is None]
        row_outcomes = iter(self.pack.evict(rows) if rows and self.pack is not None else [False] * len(rows))
        return [next(row_outcomes) if entry.path is None else self._evict_one(entry) for entry in batch]

    def _evict_one(self, entry: ScannedEntry) -> bool | None:
        """Unlink ``entry`` if it is unchanged since the scan. True: removed; False: already gone; None: kept."""
        assert entry.path is not None
        try:
            current = os.stat(entry.path)
        except FileNotFoundError:
            return False
        if (current.st_ino, current.st_dev) != entry.inode or last_access_ns(current) != entry.last_access_ns:
            return None  # replaced, or read since the scan: recently used after all
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            return False
        return True

    def _scan(self, temp_max_age: float) -> tuple[list[ScannedEntry], int]:
        """Stat every entry file, list every row; remove temp files untouched for ``temp_max_age`` seconds."""
        entries: list[ScannedEntry] = []
        if self.pack is not None:
            entries += [ScannedEntry(digest.hex(), None, size, last_access)
                        for digest, size, last_access in self.pack.scan()]
        temp_removed = 0
        stale_before = time.time() - temp_max_age
        try:
            fanouts = [entry.path for entry in os.scandir(self.root)
                       if _FANOUT_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return entries, 0
        for fanout in fanouts:
            try:
                listing = list(os.scandir(fanout))
            except FileNotFoundError:
                continue
            for item in listing:
                try:
                    if is_entry_name(item.name):
                        st = item.stat(follow_symlinks=False)
                        entries.append(ScannedEntry(item.name, item.path, st.st_size, last_access_ns(st),
                                                    (st.st_ino, st.st_dev)))
                    elif item.name.startswith(TEMP_PREFIX):
                        if item.stat(follow_symlinks=False).st_mtime <= stale_before:
                            os.unlink(item.path)
                            temp_removed += 1
                except FileNotFoundError:  # published, evicted or swept by another process meanwhile
                    continue
        return entries, temp_removed

    def _remove_other_versions(self) -> int:
        """Remove sibling ``v<frame>.<layout>`` directories of other format versions (their entries are misses)."""
        removed = 0
        try:
            siblings = list(os.scandir(self.root.parent))
        except FileNotFoundError:
            return 0
        for sibling in siblings:
            if sibling.name != self.root.name and _VERSION_DIR.fullmatch(sibling.name) and sibling.is_dir():
                # Best effort: two processes may remove the same tree at once; what is left is retried next time.
                shutil.rmtree(sibling.path, ignore_errors=True)
                removed += 1
        return removed

