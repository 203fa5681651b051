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
a one-layer module whose setting changed, where eager takes 0.2 ms). ``AOTCACHE_STRICT=1`` raises
:class:`RecompileLimitReached` instead.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import torch

from aotcache import config

__all__ = ["RecompileLimitReached", "TraceBudget"]


class RecompileLimitReached(RuntimeError):
    """A call of a compiled function that would trace past its recompile limit (NOTE [Recompile limit])."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(f"aotcache: {name} reached its recompile limit ({limit} new traces in this process; "
                         f"AOTCACHE_RECOMPILE_LIMIT)")
        self.name = name
        self.limit = limit


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
