"""The aotcache logger, log-once, and the fault policy (degrade to a miss, or raise in strict mode)."""

from __future__ import annotations

import logging
import threading

from aotcache import config

__all__ = ["logger", "log_once", "event", "warn_not_cached", "fix_for", "CacheFault", "handle_fault"]

logger = logging.getLogger("aotcache")

_seen_lock = threading.Lock()
_seen: set[str] = set()


class CacheFault(RuntimeError):
    """Raised instead of degrading to a miss when ``strict`` mode is on (AOTCACHE_STRICT=1)."""


def _apply_level() -> None:
    """Apply ``AOTCACHE_LOG_LEVEL`` when it is set (left unset, the application's logging configuration decides,
    e.g. ``logging.getLogger("aotcache").setLevel(logging.INFO)``); below WARNING, give the logger a stderr
    handler if logging is not set up (Python's last-resort handler prints warnings only, so
    ``AOTCACHE_LOG_LEVEL=info`` would show nothing)."""
    if config.source("log_level") == "default":
        return
    level = getattr(logging, config.get("log_level").upper())
    if logger.level != level:
        logger.setLevel(level)
    if level < logging.WARNING and not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def event(level: int, message: str, *args: object) -> None:
    """Log a compiled-graph event (compile, hit, bypass, fallback, re-trace) at ``level``, at the configured
    log level (NOTE [Events at INFO] in docs/logging.md: ``AOTCACHE_LOG_LEVEL=info`` shows every one)."""
    _apply_level()
    logger.log(level, message, *args)


# A bypass or untrusted-fingerprint reason (its prefix) -> what the user can do about it.
_FIXES = (
    ("object output", "register the output's type with torch.utils._pytree.register_pytree_node(..., "
                      "serialized_type_name=...) or return its tensors in a tuple or dict"),
    ("unhashable compiler", "use a named compiler ('nop', 'inductor', 'aoti') or a module-level function"),
    ("unhashable partitioner", "use partition_fn='default' / 'min_cut' or a module-level function"),
    ("compile added shape guards", "compile with dynamic=False, or mark the dimension static"),
    ("shape guards not", "compile with dynamic=False, or mark the dimension static (docs/cache.md: Dynamo graphs)"),
    ("opaque", "keep objects the model reads plain (config objects, ints, strings) or pass them as arguments"),
    ("symbolic input", "call it with real tensors (the warm path then skips the trace)"),
    ("active mode", "call the compiled model outside the torch function / dispatch mode"),
    ("tensor subclass", "pass plain tensors"),
    ("module backward hooks", "remove the module's backward hooks (read gradients from .grad after backward); a "
                              "training call of such a module runs through torch.compile, which runs the hooks"),
    ("module overrides __call__", "override forward instead of __call__"),
    ("import inside function", "move the import to the top of its module"),
    ("C-extension callable", "call torch operators, or wrap the extension as a torch custom op"),
    ("call changes program state", "set that state before the first call (for BigBird: "
                                   "model.set_attention_type(...)), or compute it outside forward; a change of plain "
                                   "values on the model or its config (config.problem_type) is replayed instead"),
    ("recorded state change does not replay", "none needed: the state before the call was not the recorded one, so "
                                              "the call was traced (eager's results and state)"),
)


def fix_for(reason: str) -> str:
    """The advice for a bypass / fallback ``reason``: the matching entry of ``_FIXES``, else the docs page."""
    for prefix, fix in _FIXES:
        if reason.startswith(prefix) or prefix in reason:
            return fix
    return "see docs/cache.md (bypass reasons) and docs/warmstart.md (what the fingerprint sees)"


def warn_not_cached(key: str, what: str, reason: str) -> None:
    """Warn once per ``key``: ``what`` happens (a graph is not cached, a warm start must trace) and why/fix."""
    log_once(logging.WARNING, key, "aotcache: %s (%s). Fix: %s.", what, reason, fix_for(reason))


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
