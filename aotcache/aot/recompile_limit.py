"""How many new traces one compiled function may make in a process before new calls run eagerly.

NOTE [Recompile limit]
A call whose signature has no graph yet is traced (and compiled) again. Something that changes at every call
and never becomes a symbol (a float module setting annealed every step, a float argument under a compiler that
cannot take float symbols: NOTE [Float arguments] in dynamic_dims.py, a string built per call) made a trace at
every call, forever, each costing seconds, and a graph stored per value. As torch.compile does past
``torch._dynamo.config.recompile_limit`` (8), each compiled function (per grad mode and, for a module, per
``training`` flag) makes at most ``AOTCACHE_RECOMPILE_LIMIT`` new traces in a process (default 8; 0: no limit).
Loads from the cache (a fingerprint warm start) do not count, and calls that match a graph already compiled or
loaded keep using it. Past the limit a call that would trace runs the function as written (eager's results),
is counted as the fallback reason ``eager:recompile_limit`` (``aotcache stats``), and is warned about once per
function, with what changed at its last new trace and the fixes (``dynamic=True``, a tensor instead of the
Python value, a higher limit). Such a call is not remembered (its value may never come again, and remembering
each one grew a dict per call): the next new signature looks in the cache again (a warm start may hold it),
until as many calls past the limit as the limit itself found nothing there; from then on a new signature in
that mode runs eagerly without the lookup (the call fingerprint and the store reads cost ~11 ms per call for
a one-layer module whose setting changed, where eager takes 0.2 ms). ``AOTCACHE_STRICT=1``,
``on_capture_error="raise"`` (``aot_function`` / ``aot_module``) and ``aotcache.compile(..., fullgraph=True)``
(as torch.compile's ``fullgraph=True`` fails at its limit) raise :class:`RecompileLimitReached` instead, naming
the function, the limit, ``AOTCACHE_RECOMPILE_LIMIT`` and what changed at the last new trace.

NOTE [Resetting compiled functions]
The count used to live as long as its function: a process that meant to start over (a notebook re-running a
cell, a test, a sweep compiling the same model per trial) had nothing but a new wrapper. torch.compile counts
its limit per code object and ``torch.compiler.reset()`` forgets the compiled code and the counts together.
``aotcache.reset()`` does the same for every compiled function of the process (``aot_function``, ``aot_module``,
``aotcache.compile``'s AOT way; ``LIVE_FUNCTIONS``, held weakly): their graphs, fallbacks, automatic dynamic
dimensions and recompile budgets are forgotten, and the next call of a signature loads its entry from the store
(a warm start, which counts against no limit) or traces. The store is untouched, and so are the Dynamo way's
compiled frames (``torch.compiler.reset()`` forgets those, with Dynamo's own limit). Nothing else resets the
count: dropping a graph is what would justify a new trace, and no graph is dropped otherwise.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from typing import Any

import torch

from aotcache import config

__all__ = ["LIVE_FUNCTIONS", "RecompileLimitReached", "TraceBudget", "reset_all"]

LIVE_FUNCTIONS: "weakref.WeakSet[Any]" = weakref.WeakSet()  # every compiled function (NOTE [Resetting compiled
# functions])


class RecompileLimitReached(RuntimeError):
    """A call of a compiled function that would trace past its recompile limit (NOTE [Recompile limit])."""

    def __init__(self, name: str, limit: int, changed: str = "") -> None:
        super().__init__(
            f"aotcache: {name} reached its recompile limit: {limit} new traces in this process "
            f"(AOTCACHE_RECOMPILE_LIMIT={limit}), and this call would trace again"
            + (f" ({changed})" if changed else "") + ". Fix: pass a value that changes every call as a tensor (or, "
            "for a size, use dynamic=True), raise AOTCACHE_RECOMPILE_LIMIT (0: no limit; the fix where the traces "
            "are distinct call forms that each repeat, such as several generate modes on one model), or call "
            "aotcache.reset() to start the count over.")
        self.name = name
        self.limit = limit
        self.changed = changed


class TraceBudget:
    """The new traces one compiled function made in this process, per mode (NOTE [Recompile limit])."""

    def __init__(self) -> None:
        self._traces: Counter[Any] = Counter()
        self._refused: Counter[Any] = Counter()  # per mode, calls past the limit that found no entry to load
        self._lock = threading.Lock()

    @staticmethod
    def mode(module: Any = None) -> tuple:
        """The mode a trace counts against: grad mode, and an ``aot_module``'s ``training`` flag."""
        return (torch.is_grad_enabled(), getattr(module, "training", None))

    def take(self, name: str, module: Any = None) -> None:
        """Count one new trace of ``name`` in the current mode.

        :raises RecompileLimitReached: the mode has made ``AOTCACHE_RECOMPILE_LIMIT`` traces already (nothing
            counted).
        """
        limit = config.get("recompile_limit")
        mode = self.mode(module)
        with self._lock:
            if limit and self._traces[mode] >= limit:
                self._refused[mode] += 1
                raise RecompileLimitReached(name, limit)
            self._traces[mode] += 1

    def spent(self, module: Any = None) -> bool:
        """Whether the current mode has made its ``AOTCACHE_RECOMPILE_LIMIT`` traces (a new call will not trace)."""
        limit = config.get("recompile_limit")
        return bool(limit) and self._traces[self.mode(module)] >= limit

    def exhausted(self, name: str, module: Any = None) -> RecompileLimitReached | None:
        """The error to act on, without a cache lookup, when the current mode is past its limit and that many
        calls past it found nothing in the cache (NOTE [Recompile limit]); None otherwise."""
        limit = config.get("recompile_limit")
        mode = self.mode(module)
        if limit and self._traces[mode] >= limit and self._refused[mode] >= limit:
            self._refused[mode] += 1
            return RecompileLimitReached(name, limit)
        return None

    def traces(self, module: Any = None) -> int:
        """The traces made in the current mode (tests, diagnostics)."""
        return self._traces[self.mode(module)]


def reset_all() -> int:
    """Reset every live compiled function (NOTE [Resetting compiled functions]); returns how many."""
    functions = list(LIVE_FUNCTIONS)
    for function in functions:
        function.reset()
    return len(functions)
