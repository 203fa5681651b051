"""FetchGate: the processes of one machine fetch a remote entry once; the others read the local copy.

NOTE [per-machine fan-out]
Eight ranks on one machine that miss on disk and hit in Redis would each download the same entry (8 x 100 MB
through one server, for one machine). A :class:`~aotcache.store.tiered.TieredCache` given a gate asks a
remote tier (one with ``remote = True``, i.e. Redis) first whether the key exists (a cheap ``EXISTS``); only
then does it take the gate's file lock for that key (``<lock_dir>/<key digest>.fetch.lock``, shared by every
process using the same cache dir), look again in the faster tiers (another process may have just put the
entry on disk), and only if they still miss read the remote tier and backfill the disk. So one process
downloads, the others wait on the local lock and read the disk copy. A lock that cannot be taken (read-only
dir) or is held past ``timeout`` seconds is skipped: the process fetches for itself (slower, still correct).
The kernel drops the lock of a process that dies mid-download.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import filelock

from aotcache.logs import logger

__all__ = ["FetchGate"]


class FetchGate:
    """Per-key file locks under ``lock_dir`` serializing remote fetches of one key on one machine."""

    def __init__(self, lock_dir: str | os.PathLike[str], *, timeout: float = 300.0) -> None:
        self.lock_dir = Path(lock_dir)
        self.timeout = timeout

    @contextlib.contextmanager
    def hold(self, digest: str) -> Iterator[bool]:
        """Hold the fetch lock of ``digest`` for the body; yields whether it is held (False: skipped)."""
        lock = filelock.FileLock(str(self.lock_dir / f"{digest}.fetch.lock"))
        try:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=self.timeout, poll_interval=0.02)
        except (OSError, filelock.Timeout) as exc:
            logger.debug("aotcache: fetching %s without the machine's fetch lock (%s)", digest[:16], exc)
            yield False
            return
        try:
            yield True
        finally:
            lock.release()
