"""Single-flight compiles: of all threads and processes that miss on one key at once, one compiles.

``SingleFlight.hold(name, timeout, ready=probe)`` takes, in order, an in-process lock (threads), a file lock
under ``<lock_dir>/<name>.lock`` (processes on this machine) and, when the cache has a Redis tier, a Redis
lock with a short lease (machines sharing that Redis). The holder compiles and saves. The others never queue
on the locks to load: while a lock is busy they call ``probe`` every poll, and as soon as it finds the saved
entry they go (every waiter at once, in parallel); only a waiter that finds no entry and then wins the lock
compiles.

NOTE [waiters probe, they do not queue]
Loading an entry needs no lock: entries are immutable once stored. So a waiter takes each lock with a
non-blocking attempt; when one is busy it calls ``probe()`` (normally ``try_load``) and tries again after
``_POLL_S``. When the holder saves, every waiter's next probe finds the entry. When the holder dies or gives
up without saving, its locks come free and one waiter wins them, re-checks, and compiles: still one compile.

NOTE [dead holders]
A file lock is an ``flock`` on an open file: the kernel drops it when the holder's process dies, however it
dies. The Redis lock is a lease of ``lease_s`` seconds (config ``lock_lease``, 5 s by default); a live
holder renews it from a daemon thread every quarter of that while it compiles, so a long compile keeps it,
while a holder whose process or machine died loses it within ``lease_s``.

NOTE [the timeout follows the holder]
``timeout`` (config ``lock_timeout``) bounds the wait for one live holder's compile, not the whole wait:
each lock level names its holder (the Redis lease's token, an owner file written next to the file lock, the
holding thread), and when a new holder is seen the clock restarts. A holder that dies 20 s into a compile
thus does not make the waiters give up on its successor's 40 s compile.

NOTE [lock faults are not errors]
A lock that cannot be taken because of a fault (read-only cache dir, Redis down) is skipped: the compile
goes ahead without it (at worst two processes compile the same key, which is correct, only slower). A lock
that is still held by the same live holder after ``timeout`` seconds is a fault (``handle_fault``: logged
once, or CacheFault in strict mode) and the waiter compiles anyway. Lock and owner files are small and are
never deleted while the cache is in use (deleting a lock file would let two holders lock different inodes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock

from aotcache.logs import handle_fault, logger

__all__ = ["SingleFlight", "FlightTicket", "REDIS_LOCK_EXPIRE_S", "DEFAULT_LEASE_S"]

DEFAULT_LEASE_S = 5.0
REDIS_LOCK_EXPIRE_S = DEFAULT_LEASE_S  # the former name of the lease
_POLL_S = 0.05

# Outcomes of one non-blocking attempt at a lock level.
_TAKEN, _BUSY, _SKIPPED = "taken", "busy", "skipped"


@dataclasses.dataclass
class FlightTicket:
    """What :meth:`SingleFlight.hold` obtained: whether this caller holds every lock, and whether it waited."""

    held: bool = True  # False: a lock timed out, or ``found`` is set; the caller does not hold every lock
    waited: bool = False  # True: someone else held a lock first (re-check the cache before compiling)
    timed_out: bool = False
    skipped: list[str] = dataclasses.field(default_factory=list)  # locks skipped because of a fault
    found: Any = None  # what ``ready()`` returned while waiting: use it, do not compile
    waited_s: float = 0.0  # seconds spent obtaining the locks (or until ``found``)
    holders: int = 0  # distinct holders seen while waiting (2+: a holder died or gave up, another took over)


class _Slot:
    __slots__ = ("lock", "users", "owner")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.owner: int | None = None


class _LocalLocks:
    """Reference-counted per-name thread locks (entries vanish when nobody holds or waits)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    def enter(self, name: str) -> _Slot:
        with self._guard:
            slot = self._slots.setdefault(name, _Slot())
            slot.users += 1
            return slot

    def leave(self, name: str, slot: _Slot) -> None:
        with self._guard:
            slot.users -= 1
            if slot.users == 0 and self._slots.get(name) is slot:
                del self._slots[name]


class _ThreadLevel:
    """The in-process level: a plain lock per name; its holder is the holding thread."""

    kind, skip_name = "thread", "thread"

    def __init__(self, locks: _LocalLocks, name: str) -> None:
        self._locks, self._name = locks, name
        self._slot = locks.enter(name)

    def attempt(self) -> str:
        if not self._slot.lock.acquire(blocking=False):
            return _BUSY
        self._slot.owner = threading.get_ident()
        return _TAKEN

    def holder(self) -> Any:
        return self._slot.owner

    def release(self) -> None:
        self._slot.owner = None
        self._slot.lock.release()

    def close(self) -> None:
        self._locks.leave(self._name, self._slot)


class _FileLevel:
    """The machine level: an ``flock`` on ``<name>.lock``; the holder writes who it is to ``<name>.owner``."""

    kind, skip_name = "process", "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.owner_path = path.with_suffix(".owner")
        self._lock = filelock.FileLock(str(path))

    def attempt(self) -> str:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            return _BUSY
        except OSError as exc:  # read-only or missing cache dir: compile without the lock
            logger.debug("aotcache: cannot take the compile lock %s (%s); compiling without it", self.path, exc)
            return _SKIPPED
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
        temp = self.owner_path.with_name(f".{self.owner_path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):  # the owner record only restarts waiters' clocks
            temp.write_text(owner, encoding="utf-8")
            os.replace(temp, self.owner_path)
        return _TAKEN

    def holder(self) -> Any:
        try:
            return self.owner_path.read_text(encoding="utf-8")
        except OSError:
            return None

    def release(self) -> None:
        self._lock.release()

    def close(self) -> None:
        pass


class _RedisLevel:
    """The cross-machine level: a Redis lease renewed by a heartbeat thread while held (NOTE [dead holders])."""

    kind, skip_name = "machine", "redis"

    def __init__(self, redis: Any, name: str, lease_s: float, group: str | None) -> None:
        self._lock = redis.lock(f"compile:{name}", lease_s, group=group)
        self._lease_s = lease_s
        self._heartbeat: _Heartbeat | None = None

    def attempt(self) -> str:
        taken = self._lock.try_acquire()
        if taken is None:
            return _SKIPPED  # Redis down: a fault the tier already reported
        if not taken:
            return _BUSY
        self._heartbeat = _Heartbeat(self._lock, self._lease_s / 4)
        return _TAKEN

    def holder(self) -> Any:
        return self._lock.holder()

    def release(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        self._lock.release()

    def close(self) -> None:
        pass


class _Heartbeat:
    """Renews a Redis lease from a daemon thread until stopped (see NOTE [dead holders])."""

    def __init__(self, lock: Any, interval_s: float) -> None:
        self._lock = lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name="aotcache-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            if not self._lock.refresh():
                logger.debug("aotcache: lost the compile lease %s (expired or Redis failed); another process may "
                             "compile the same key", self._lock.name)
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class SingleFlight:
    """Cross-thread, cross-process and (with Redis) cross-machine mutual exclusion per key name.

    ``lock_dir`` None skips file locks; ``redis`` (a ``RedisCache``) None skips the Redis lock. ``lease_s``
    (default config ``lock_lease``) is the Redis lease a dead holder keeps at most.
    """

    def __init__(self, lock_dir: str | os.PathLike[str] | None, redis: Any | None = None, *,
                 redis_expire_s: float | None = None) -> None:
        self.lock_dir = Path(lock_dir) if lock_dir is not None else None
        self.redis = redis
        if redis_expire_s is None:
            from aotcache import config

            redis_expire_s = config.get("lock_lease")
        if not redis_expire_s > 0:
            raise ValueError(f"the compile lock lease must be positive seconds, got {redis_expire_s!r}; "
                             "set AOTCACHE_LOCK_LEASE (e.g. 5)")
        self.redis_expire_s = float(redis_expire_s)
        self._local = _LocalLocks()

    def lock_path(self, name: str) -> Path | None:
        """The file lock of ``name`` (None without a lock dir)."""
        return None if self.lock_dir is None else self.lock_dir / f"{name}.lock"

    def _levels(self, name: str, group: str | None) -> list[Any]:
        levels: list[Any] = [_ThreadLevel(self._local, name)]
        path = self.lock_path(name)
        if path is not None:
            levels.append(_FileLevel(path))
        if self.redis is not None:
            levels.append(_RedisLevel(self.redis, name, self.redis_expire_s, group))
        return levels

    @contextlib.contextmanager
    def hold(self, name: str, timeout: float, *, ready: Callable[[], Any] | None = None,
             group: str | None = None) -> Iterator[FlightTicket]:
        """Hold the locks of ``name`` for the body, waiting at most ``timeout`` seconds per live holder.

        While a lock is busy, ``ready()`` (if given) is called every poll; the first non-None result ends the
        wait: it is in ``ticket.found`` and no lock is held (NOTE [waiters probe, they do not queue]).
        ``group`` places the Redis lock with the entries of that store-key group (one Redis Cluster node).
        Yields a :class:`FlightTicket`; the body runs whether or not every lock was obtained.

        :raises aotcache.logs.CacheFault: a lock timed out, in strict mode only.
        """
        started = time.monotonic()
        ticket = FlightTicket()
        levels = self._levels(name, group)
        with contextlib.ExitStack() as stack:
            for level in levels:
                stack.callback(level.close)
            locks = stack.enter_context(contextlib.ExitStack())
            self._acquire(locks, levels, ticket, name, timeout, ready)
            ticket.waited_s = time.monotonic() - started
            yield ticket

    def _acquire(self, locks: contextlib.ExitStack, levels: list[Any], ticket: FlightTicket, name: str,
                 timeout: float, ready: Callable[[], Any] | None) -> None:
        index = 0
        blocker: tuple[int, Any] | None = None
        deadline = time.monotonic() + timeout
        while True:
            if ticket.waited and ready is not None:  # probe before trying the lock again: a saved entry wins
                found = ready()
                if found is not None:
                    ticket.found = found
                    ticket.held = False
                    locks.close()
                    return
            while index < len(levels):
                level = levels[index]
                outcome = level.attempt()
                if outcome == _BUSY:
                    break
                if outcome == _TAKEN:
                    locks.callback(level.release)
                else:
                    ticket.skipped.append(level.skip_name)
                index += 1
            if index == len(levels):
                return
            ticket.waited = True
            level = levels[index]
            seen = (index, level.holder())
            if seen != blocker:  # NOTE [the timeout follows the holder]
                blocker = seen
                ticket.holders += 1
                deadline = time.monotonic() + timeout
            if time.monotonic() >= deadline:
                self._timed_out(ticket, name, level.kind, timeout)
                return
            time.sleep(_POLL_S)

    def _timed_out(self, ticket: FlightTicket, name: str, which: str, timeout: float) -> None:
        ticket.held = False
        ticket.timed_out = True
        handle_fault(f"singleflight:timeout:{which}",
                     f"waited {timeout:g} s (config lock_timeout) for another {which} compiling key {name[:16]}; "
                     "compiling it here too")
