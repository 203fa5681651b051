"""StatsJournal: cumulative cache counters kept in one JSON file, summed across processes.

A process adds counters in memory (``add``, or collectors such as ``TieredCache.attach_journal``) and merges
them into the file with ``flush()`` (under a file lock, with an atomic replace), typically once at exit.
``aotcache stats`` in a later process then shows the totals with ``read()``.

File layout (``<cache_dir>/stats.json`` for :func:`default_journal`)::

    {"format": "aotcache-stats", "version": 1, "updated": <unix time>,
     "sections": {"tier:disk": {"hits": 12, "misses": 3, ...}, ...}}
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import filelock

from aotcache import config
from aotcache.logs import CacheFault, handle_fault, log_once, logger
from aotcache.store.interface import CacheError

__all__ = ["StatsJournal", "JOURNAL_FILE_NAME", "JOB_SECTION_PREFIX", "default_journal_path", "default_journal",
           "current_job_id"]

JOURNAL_FILE_NAME = "stats.json"
JOB_SECTION_PREFIX = "job:"  # per-job counters: section "job:<job id>" (see current_job_id)
_FORMAT = "aotcache-stats"
_VERSION = 1

Sections = dict[str, dict[str, float]]
Collector = Callable[[], Mapping[str, Mapping[str, float]]]


def _merge_into(target: Sections, source: Mapping[str, Mapping[str, float]]) -> Sections:
    for section, counts in source.items():
        row = target.setdefault(section, {})
        for name, value in counts.items():
            row[name] = row.get(name, 0) + value
    return target


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class StatsJournal:
    """Counters by section (``{"tier:disk": {"hits": 3, ...}}``) accumulated in memory and merged into ``path``.

    Thread-safe. After a fork the child forgets the counters it inherited (the parent flushes those).
    """

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._pending: Sections = {}
        self._collectors: list[Collector] = []
        self._lock = threading.Lock()
        self._at_exit_registered = False
        _LIVE_JOURNALS.add(self)

    @property
    def _file_lock(self) -> filelock.FileLock:
        return filelock.FileLock(str(self.path) + ".lock", timeout=self.lock_timeout)

    # ------------------------------------------------------------------------------------------------
    # Accumulating
    # ------------------------------------------------------------------------------------------------

    def add(self, section: str, counts: Mapping[str, float]) -> None:
        """Add ``counts`` to ``section`` in memory (written by the next :meth:`flush`).

        :raises CacheError: a section or counter name that is not a non-empty string, or a non-numeric count.
        """
        if not isinstance(section, str) or not section:
            raise CacheError(f"stats journal section must be a non-empty string, got {section!r}")
        for name, value in counts.items():
            if not isinstance(name, str) or not name:
                raise CacheError(f"stats journal counter names must be non-empty strings, got {name!r}")
            if not _is_number(value):
                raise CacheError(f"stats journal counter {section}/{name} must be a finite number, got {value!r}")
        with self._lock:
            _merge_into(self._pending, {section: counts})

    def add_collector(self, collector: Collector) -> None:
        """Call ``collector()`` at each flush and read; it returns ``{section: counts}`` deltas to add.

        A collector may define ``forget_inherited()``, called (lock-free) in a forked child so that it
        stops counting the parent's activity.
        """
        with self._lock:
            self._collectors.append(collector)

    def _collect(self) -> None:
        with self._lock:
            collectors = list(self._collectors)
        for collector in collectors:
            for section, counts in collector().items():
                self.add(section, counts)

    def pending(self) -> Sections:
        """Counters added in this process and not yet flushed (collectors included)."""
        self._collect()
        with self._lock:
            return {section: dict(counts) for section, counts in self._pending.items()}

    # ------------------------------------------------------------------------------------------------
    # The file
    # ------------------------------------------------------------------------------------------------

    def _load(self) -> Sections:
        """The file's sections; {} when missing, and {} (logged once) when unreadable or malformed."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            self._warn_corrupt(f"{type(exc).__name__}: {exc}")
            return {}
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            self._warn_corrupt(f"not JSON ({exc})")
            return {}
        sections = document.get("sections") if isinstance(document, dict) else None
        if (not isinstance(document, dict) or document.get("format") != _FORMAT
                or not isinstance(sections, dict)
                or not all(isinstance(counts, dict) and all(_is_number(value) for value in counts.values())
                           for counts in sections.values())):
            self._warn_corrupt("not an aotcache stats journal")
            return {}
        return sections

    def _warn_corrupt(self, detail: str) -> None:
        log_once(logging.WARNING, f"journal:corrupt:{self.path}",
                 "aotcache: stats journal %s is unreadable (%s); treating it as empty", self.path, detail)

    def _write(self, sections: Sections) -> None:
        # NOTE [atomic journal replace]: write a private temp file in the same directory, then os.replace:
        # readers see the old or the new file, never a partial one. No fsync: the journal is statistics.
        document = {"format": _FORMAT, "version": _VERSION, "updated": time.time(), "sections": sections}
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            temp.write_text(json.dumps(document, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(temp, self.path)
        finally:
            temp.unlink(missing_ok=True)

    def flush(self) -> bool:
        """Merge the pending counters into the file; True on success (or nothing to write).

        A failure (unwritable directory, lock timeout) is a fault: the counters stay pending for a later
        flush, it is logged once, and it raises CacheFault in strict mode.
        """
        self._collect()
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._file_lock:
                self._write(_merge_into(self._load(), pending))
        except (OSError, filelock.Timeout) as exc:
            with self._lock:
                self._pending = _merge_into(pending, self._pending)
            handle_fault(f"journal:flush:{self.path}", f"could not write the stats journal {self.path}", exc)
            return False
        return True

    def read(self, *, include_pending: bool = True) -> Sections:
        """Totals by section: the file's, plus (by default) this process's unflushed counters."""
        sections = self._load()
        if include_pending:
            _merge_into(sections, self.pending())
        return sections

    def reset(self) -> None:
        """Forget every counter: remove the file and drop this process's pending counts.

        :raises CacheError: the file cannot be removed (permission) or its lock cannot be taken.
        """
        self._collect()  # advance the collectors' baselines so that old activity is not re-added
        with self._lock:
            self._pending = {}
        if not self.path.parent.is_dir():
            return
        try:
            with self._file_lock:
                self.path.unlink(missing_ok=True)
        except (OSError, filelock.Timeout) as exc:
            raise CacheError(f"cannot reset the stats journal {self.path}: {exc}") from exc

    def register_at_exit(self) -> None:
        """Flush this journal when the interpreter exits (once, however often this is called)."""
        with self._lock:
            if self._at_exit_registered:
                return
            self._at_exit_registered = True
        atexit.register(self._flush_at_exit)

    def _flush_at_exit(self) -> None:
        try:
            self.flush()
        except CacheFault as exc:  # strict mode: nothing can be raised usefully at exit; say it instead
            logger.error("aotcache: %s", exc)

    def _forget_inherited(self) -> None:
        """In a forked child: drop the parent's pending counts and re-baseline collectors that can."""
        self._lock = threading.Lock()  # the parent's lock may have been held by another thread at fork time
        self._pending = {}
        for collector in self._collectors:
            forget = getattr(collector, "forget_inherited", None)
            if forget is not None:
                forget()


# NOTE [journal process state]: the weak set of live journals exists only so that a forked child can drop
# counters inherited from its parent; _DEFAULT_JOURNALS holds the one default journal per journal path.
_LIVE_JOURNALS: weakref.WeakSet[StatsJournal] = weakref.WeakSet()
_DEFAULT_JOURNALS: dict[Path, StatsJournal] = {}
_DEFAULT_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    for journal in list(_LIVE_JOURNALS):
        journal._forget_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def current_job_id() -> str | None:
    """The job this process belongs to: config ``job_id`` (AOTCACHE_JOB_ID), else ``TORCHELASTIC_RUN_ID``
    (which torchrun sets to one value for every rank of a job), else None (no per-job counters)."""
    job = config.get("job_id")
    if job is None:  # torchrun's id is outside our control: keep the characters a job id may hold
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        job = "".join(char for char in run_id if char.isalnum() or char in "._:@+-")[:128] or None
    return job


def default_journal_path() -> Path:
    """``<cache_dir>/stats.json`` (config ``cache_dir``): where ``aotcache stats`` reads totals."""
    return Path(config.get("cache_dir")) / JOURNAL_FILE_NAME


def default_journal() -> StatsJournal:
    """This process's journal at :func:`default_journal_path`, created on first use and flushed at exit."""
    path = default_journal_path()
    with _DEFAULT_LOCK:
        journal = _DEFAULT_JOURNALS.get(path)
        if journal is None:
            journal = _DEFAULT_JOURNALS[path] = StatsJournal(path)
            journal.register_at_exit()
        return journal
