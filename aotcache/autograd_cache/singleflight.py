"""Single-flight compiles: of all threads and processes that miss on one key at once, one compiles.

``SingleFlight.hold(name, timeout)`` takes, in order, an in-process lock (threads), a file lock under
``<lock_dir>/<name>.lock`` (processes on this machine) and, when the cache has a Redis tier, a Redis lock
with expiry (machines sharing that Redis). The holder compiles and saves; the others wait, then re-check the
cache and load what the holder saved.

NOTE [dead holders]
A file lock is an ``flock`` on an open file: the kernel drops it when the holder's process dies, however it
dies. The Redis lock expires ``REDIS_LOCK_EXPIRE_S`` after its last refresh; a live holder refreshes it
from a daemon thread every third of that, so a long compile keeps it while a killed holder loses it quickly.

NOTE [lock faults are not errors]
A lock that cannot be taken because of a fault (read-only cache dir, Redis down) is skipped: the compile
goes ahead without it (at worst two processes compile the same key, which is correct, only slower). A lock
that is still held by someone else after ``timeout`` seconds is a fault (``handle_fault``: logged once, or
CacheFault in strict mode) and the waiter compiles anyway. Lock files are empty and are never deleted while
the cache is in use (deleting one would let two holders lock different inodes of one name).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

from aotcache.logs import handle_fault, logger

__all__ = ["SingleFlight", "FlightTicket", "REDIS_LOCK_EXPIRE_S"]

REDIS_LOCK_EXPIRE_S = 30.0
_POLL_S = 0.05


@dataclasses.dataclass
class FlightTicket:
    """What :meth:`SingleFlight.hold` obtained: whether this caller holds every lock, and whether it waited."""

    held: bool = True  # False: a lock timed out; the caller compiles anyway
    waited: bool = False  # True: someone else held a lock first (re-check the cache before compiling)
    timed_out: bool = False
    skipped: list[str] = dataclasses.field(default_factory=list)  # locks skipped because of a fault


class _LocalLocks:
    """Reference-counted per-name thread locks (entries vanish when nobody holds or waits)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, list[Any]] = {}  # name -> [lock, users]

    @contextlib.contextmanager
    def hold(self, name: str, timeout: float) -> Iterator[tuple[bool, bool]]:
        with self._guard:
            slot = self._locks.setdefault(name, [threading.Lock(), 0])
            slot[1] += 1
        lock = slot[0]
        waited = not lock.acquire(blocking=False)
        acquired = True if not waited else lock.acquire(timeout=max(timeout, 0.0))
        try:
            yield acquired, waited
        finally:
            if acquired:
                lock.release()
            with self._guard:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._locks[name]


class _Heartbeat:
    """Refreshes a Redis lock from a daemon thread until stopped (see NOTE [dead holders])."""

    def __init__(self, lock: Any, interval_s: float) -> None:
        self._lock = lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name="aotcache-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            if not self._lock.refresh():
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class SingleFlight:
    """Cross-thread, cross-process and (with Redis) cross-machine mutual exclusion per key name.

    ``lock_dir`` None skips file locks; ``redis`` (a ``RedisCache``) None skips the Redis lock.
    """

    def __init__(self, lock_dir: str | os.PathLike[str] | None, redis: Any | None = None, *,
                 redis_expire_s: float = REDIS_LOCK_EXPIRE_S) -> None:
        self.lock_dir = Path(lock_dir) if lock_dir is not None else None
        self.redis = redis
        self.redis_expire_s = redis_expire_s
        self._local = _LocalLocks()

    def lock_path(self, name: str) -> Path | None:
        """The file lock of ``name`` (None without a lock dir)."""
        return None if self.lock_dir is None else self.lock_dir / f"{name}.lock"

    @contextlib.contextmanager
    def hold(self, name: str, timeout: float) -> Iterator[FlightTicket]:
        """Hold the locks of ``name`` for the body, waiting at most ``timeout`` seconds in all.

        Yields a :class:`FlightTicket`; the body runs whether or not every lock was obtained.

        :raises aotcache.logs.CacheFault: a lock timed out, in strict mode only.
        """
        deadline = time.monotonic() + timeout
        ticket = FlightTicket()
        with contextlib.ExitStack() as stack:
            acquired, waited = stack.enter_context(self._local.hold(name, timeout))
            ticket.waited |= waited
            if not acquired:
                self._timed_out(ticket, name, "thread", timeout)
            else:
                self._take_file_lock(stack, ticket, name, deadline, timeout)
                if ticket.held:
                    self._take_redis_lock(stack, ticket, name, deadline, timeout)
            yield ticket

    def _remaining(self, deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    def _timed_out(self, ticket: FlightTicket, name: str, which: str, timeout: float) -> None:
        ticket.held = False
        ticket.timed_out = True
        handle_fault(f"singleflight:timeout:{which}",
                     f"waited {timeout:g} s (config lock_timeout) for another {which} compiling key {name[:16]}; "
                     "compiling it here too")

    def _take_file_lock(self, stack: contextlib.ExitStack, ticket: FlightTicket, name: str, deadline: float,
                        timeout: float) -> None:
        path = self.lock_path(name)
        if path is None:
            return
        lock = filelock.FileLock(str(path))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                ticket.waited = True
                lock.acquire(timeout=self._remaining(deadline), poll_interval=_POLL_S)
        except filelock.Timeout:
            self._timed_out(ticket, name, "process", timeout)
            return
        except OSError as exc:  # read-only or missing cache dir: compile without the lock
            ticket.skipped.append("file")
            logger.debug("aotcache: cannot take the compile lock %s (%s); compiling without it", path, exc)
            return
        stack.callback(lock.release)

    def _take_redis_lock(self, stack: contextlib.ExitStack, ticket: FlightTicket, name: str, deadline: float,
                         timeout: float) -> None:
        if self.redis is None:
            return
        lock = self.redis.lock(f"compile:{name}", self.redis_expire_s, poll_s=_POLL_S)
        if not lock.acquire(timeout=0):
            if not self.redis.ping():
                ticket.skipped.append("redis")  # Redis down: a fault the tier already reported
                return
            ticket.waited = True
            if not lock.acquire(timeout=self._remaining(deadline)):
                if time.monotonic() < deadline:
                    ticket.skipped.append("redis")  # gave up early: Redis failed while we waited
                else:
                    self._timed_out(ticket, name, "machine", timeout)
                return
        heartbeat = _Heartbeat(lock, self.redis_expire_s / 3)
        stack.callback(lock.release)
        stack.callback(heartbeat.stop)
