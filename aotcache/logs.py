"""The aotcache logger, log-once, and the fault policy (degrade to a miss, or raise in strict mode)."""

from __future__ import annotations

import logging
import threading

from aotcache import config

__all__ = ["logger", "log_once", "CacheFault", "handle_fault"]

logger = logging.getLogger("aotcache")

_seen_lock = threading.Lock()
_seen: set[str] = set()


class CacheFault(RuntimeError):
    """Raised instead of degrading to a miss when ``strict`` mode is on (AOTCACHE_STRICT=1)."""


def _apply_level() -> None:
    level = getattr(logging, config.get("log_level").upper())
    if logger.level != level:
        logger.setLevel(level)


def log_once(level: int, key: str, message: str, *args: object) -> bool:
    """Log ``message`` the first time ``key`` is seen in this process; True if it was logged."""
    with _seen_lock:
        if key in _seen:
            return False
        _seen.add(key)
    _apply_level()
    logger.log(level, message, *args)
    return True


def handle_fault(key: str, message: str, exc: BaseException | None = None) -> None:
    """A cache fault: raise :class:`CacheFault` in strict mode, else warn once per ``key`` and return.

    Callers count the fault and treat it as a miss; this function only decides between log and raise.
    """
    detail = f"{message}: {type(exc).__name__}: {exc}" if exc is not None else message
    if config.get("strict"):
        raise CacheFault(detail) from exc
    log_once(logging.WARNING, key, "aotcache: %s (treated as a cache miss; further such faults are not logged)",
             detail)
