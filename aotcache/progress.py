"""Live progress of long compiles on a terminal, and the compile's stages for logs.

NOTE [Compile progress]
A compile runs inside :func:`compile_progress` (one per graph: ``aot_function`` signature, Dynamo graph),
and its steps inside :func:`stage` (``capture``, ``partition``, ``compile forward``, ``compile backward``,
``store``). When the compile is still running after ``_SHOW_AFTER_S`` seconds, a one-line live display
(``rich``) on stderr shows the graph's name, the current stage and the elapsed time, and a final line
replaces it when the compile ends; short compiles show nothing. The display is off when stderr is not a
terminal or ``AOTCACHE_PROGRESS=0`` (option ``progress``), and never changes what is compiled: a failure to
draw is swallowed after one debug log. Every compile is logged at INFO with its time either way.
Stages outside a compile (e.g. a capture for an export) are no-ops. Progress state is per thread.

NOTE [Stage times]
Each stage's time is added up per compile (a stage entered twice, such as ``compile forward`` and its
fallback, sums); the compile's INFO event lists them, and :func:`collecting_stages` hands them to a caller
(``bench/cold_profile.py``, tests) together with ``total``, the compile's whole time: what no stage covers
(the call fingerprint, waiting for another process's compile) is ``total`` minus the stages. Timing adds two
clock reads per stage, nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from aotcache import config
from aotcache.logs import event, log_once, logger

__all__ = ["compile_progress", "stage", "current_stage", "collecting_stages"]

_SHOW_AFTER_S = 1.0
_REFRESH_S = 0.1
_local = threading.local()


class _Task:
    """One running compile: its name, current stage, start time and (once shown) its display thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stage = "starting"
        self.started = time.perf_counter()
        self.stages: dict[str, float] = {}  # seconds per stage (NOTE [Stage times])
        self.done = threading.Event()
        self.shown = False
        self.thread: threading.Thread | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def line(self) -> str:
        return f"aotcache: compiling {self.name} [{self.stage}] {self.elapsed():.1f} s"

    def breakdown(self) -> str:
        """``capture 0.41 s, compile forward 9.80 s, ...`` in the order the stages first ran."""
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.stages.items())


def _display_enabled() -> bool:
    if not config.get("progress"):
        return False
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


# NOTE [Importing rich moves Python's random]
# ``rich.style`` draws from Python's global generator when it is imported (``getrandbits`` seeds its style ids).
# Imported by the display thread a second into a compile, that draw landed in the middle of a capture, which
# took it for the function's own draw and refused the graph (NOTE [Host random numbers]): a slow capture on a
# terminal fell back to torch.compile, and the user's seeded ``random`` sequence differed from eager's. So where
# the display is on, rich is imported by the compiling thread as a capture stage begins (a warm load that captures
# nothing does not pay for the import), with Python's generator put back afterwards.
def _import_rich() -> bool:
    """Import the display's rich modules, leaving Python's global random state as it was; False if rich fails."""
    if "rich.live" in sys.modules:
        return True
    import random

    state = random.getstate()
    try:
        import rich.console  # noqa: F401 - imported here for the display thread
        import rich.live  # noqa: F401
        import rich.text  # noqa: F401
    except Exception as exc:  # no display without rich; never a failed compile
        log_once(logging.DEBUG, "progress:import", "aotcache: progress display unavailable: %s: %s",
                 type(exc).__name__, exc)
        return False
    finally:
        random.setstate(state)
    return True


def _show(task: _Task) -> None:
    """The display thread: wait, then draw a live line until the compile ends (NOTE [Compile progress])."""
    if task.done.wait(_SHOW_AFTER_S):
        return
    try:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        console = Console(file=sys.stderr)
        with Live(Text(task.line()), console=console, refresh_per_second=1 / _REFRESH_S, transient=True) as live:
            task.shown = True
            while not task.done.wait(_REFRESH_S):
                live.update(Text(task.line()))
        console.print(Text(f"aotcache: {task.name} ready in {task.elapsed():.1f} s", style="dim"))
    except Exception as exc:  # drawing must never break a compile: report once and stop drawing
        log_once(logging.DEBUG, "progress:display", "aotcache: progress display failed: %s: %s",
                 type(exc).__name__, exc)


@contextlib.contextmanager
def compile_progress(name: str) -> Iterator[_Task]:
    """Run a compile of the graph ``name`` with progress (NOTE [Compile progress]); nested calls reuse the
    outer compile's display."""
    outer = getattr(_local, "task", None)
    if outer is not None:
        yield outer
        return
    task = _Task(name)
    _local.task = task
    if _display_enabled():
        task.thread = threading.Thread(target=_show, args=(task,), name="aotcache-progress", daemon=True)
        task.thread.start()
    failed = True
    try:
        yield task
        failed = False
    finally:
        _local.task = None
        task.done.set()
        if task.thread is not None:
            task.thread.join(timeout=2.0)
        elapsed = task.elapsed()
        for collected in getattr(_local, "collectors", ()):
            collected.append({**task.stages, "total": elapsed})
        if failed:
            event(logging.INFO, "aotcache: compiling %s failed after %.2f s in stage %s", name, elapsed,
                  task.stage)
        else:
            event(logging.INFO, "aotcache: %s ready in %.2f s (compiled, or loaded from the cache; %s)", name,
                  elapsed, task.breakdown() or "no stages")


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark the current compile's stage (``capture``, ``partition``, ...); a no-op outside a compile."""
    task: Any = getattr(_local, "task", None)
    if task is None:
        yield
        return
    task.stage = name  # kept after the step: a failure's log names the stage it stopped in
    if task.thread is not None and "capture" in name:
        _import_rich()  # NOTE [Importing rich moves Python's random]
    logger.debug("aotcache: %s: %s", task.name, name)
    started = time.perf_counter()
    try:
        yield
    finally:
        task.stages[name] = task.stages.get(name, 0.0) + time.perf_counter() - started


def current_stage() -> str | None:
    """The stage of this thread's running compile, or None (tests, diagnostics)."""
    task = getattr(_local, "task", None)
    return None if task is None else task.stage


@contextlib.contextmanager
def collecting_stages() -> Iterator[list[dict[str, float]]]:
    """Collect the stage times of the compiles this thread finishes inside the block (NOTE [Stage times]):
    one ``{stage: seconds, ..., "total": seconds}`` per compile, in the order they finish."""
    collected: list[dict[str, float]] = []
    collectors = getattr(_local, "collectors", None)
    if collectors is None:
        collectors = _local.collectors = []
    collectors.append(collected)
    try:
        yield collected
    finally:
        collectors[:] = [other for other in collectors if other is not collected]  # by identity
