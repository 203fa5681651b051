"""Process-wide counters of the per-op kernel cache, and the "compiling on this thread" flag.

NOTE [module state]: two pieces of module state, both documented here: ``STATS`` (counters, read by
``aotcache.eager.stats()``) and a thread-local flag set while this thread compiles a kernel, so that op calls
made by Inductor itself run the stock kernels and never recurse into compile-on-miss.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

__all__ = ["EagerStats", "STATS", "compiling", "in_compile"]


@dataclass
class EagerStats:
    """Counts since process start (or ``reset``). ``fallbacks`` counts every call that ran the stock kernel."""

    hits: int = 0  # calls answered by a precompiled kernel
    misses: int = 0  # calls whose signature has no usable entry
    fallbacks: int = 0  # calls that ran the stock kernel, for any reason (miss, fault, unsupported argument)
    load_errors: int = 0  # index / library faults: corrupt index, missing or unloadable library, wrong version
    compiles: int = 0  # kernels compiled (precompile or compile on miss)
    compile_errors: int = 0  # compiles that failed (compile on miss: the call fell back)
    run_errors: int = 0  # a loaded kernel raised when run (the entry is dropped for this process)
    unsupported_calls: int = 0  # calls with arguments no entry can describe, or conj/neg/zero-tensor inputs
    stale_entries: int = 0  # of load_errors: entries built for another torch / ISA / format, skipped
    index_rebuilds: int = 0  # of load_errors: corrupt indexes rebuilt from sidecars
    kernels_loaded: int = 0  # libraries dlopen'ed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        """Increment counters atomically (``STATS.add(hits=1, fallbacks=1)``)."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def to_dict(self) -> dict[str, int]:
        """A snapshot of every counter."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, 0)


STATS = EagerStats()

_thread_state = threading.local()


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """Mark this thread as compiling a kernel: dispatched calls on it use the stock kernels meanwhile."""
    previous = getattr(_thread_state, "compiling", False)
    try:  # set inside the try: an interrupt right after it still puts the flag back (NOTE [Interrupted captures])
        _thread_state.compiling = True
        yield
    finally:
        _thread_state.compiling = previous


def in_compile() -> bool:
    """True while this thread is inside :func:`compiling`."""
    return getattr(_thread_state, "compiling", False)
