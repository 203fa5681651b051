"""What an ``AOTFunction`` asks of the layers above it: program watching, guard checks, cached compiles.

NOTE [Compile services]
``aot/`` captures, partitions, compiles and runs graphs; it knows nothing of the compiled-graph cache, the
call fingerprint or the program walker, which live in ``autograd_cache/`` (a layer above, that itself
builds on ``aot/``). The public entry points that combine both (``aotcache.api``: ``aot_function``,
``aot_module``, ``aot_module_simplified``; ``aotcache.compile``) hand every ``AOTFunction`` a
:class:`CompileServices` object that does those parts, so no module under ``aot/`` imports the cache.
``aotcache.compile`` passes a subclass that also checks its route records before a capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["CompileServices", "WatchedProgram"]


class WatchedProgram:
    """The program a function's graphs came from, as watched for in-process reuse (NOTE [Program guards]); an
    interface (plain classes, not ``typing.Protocol``: their creation cost ~2 ms of every warm start)."""

    digest: str  # part of every in-process signature: a changed program selects other graphs
    untrusted: str | None  # why part of the program is guarded by identity only (None: seen whole)

    def holds(self) -> bool:
        """Whether nothing watched changed since the walk (cheap; checked on every call)."""
        raise NotImplementedError

    def saved_state(self) -> Any:
        """What the program reads now, as an object whose ``restore()`` writes back what changed since and returns
        None, or names what it could not put back (NOTE [State changed by a capture] in ``call_state.py``), and
        whose ``trace_tensors()`` lists, as ``(name, value)``, where that state holds a trace tensor now (NOTE
        [Tensors stored in program state] in ``module_state.py``), and whose ``modules()`` lists the modules that
        state reaches (NOTE [Caches a module rebuilds from its weights] in ``rebuilt_caches.py``)."""
        raise NotImplementedError


class CompileServices:
    """The services an :class:`~aotcache.aot.api.AOTFunction` and the Dynamo-graph form call (NOTE [Compile
    services]); ``cache`` is the user's ``cache=`` argument, opaque to ``aot/``."""

    def watch_program(self, target: Callable, module: Any) -> WatchedProgram:
        """Walk ``target`` (or ``module``, for an ``aot_module``) and return what guards its in-process reuse."""
        raise NotImplementedError

    def guards_hold(self, runtime: Any, graph_args: Sequence[Any]) -> bool:
        """Whether the symbolic-shape guards of ``runtime`` (a dynamic graph) admit ``graph_args``."""
        raise NotImplementedError

    def pinned_guards(self, runtime: Any, pinned: frozenset[int]) -> Callable[[Sequence[Any]], bool] | None:
        """A check that answers as :meth:`guards_hold` does for graph arguments whose inputs at the positions
        ``pinned`` read as at a call the guards admitted (the call hot path: NOTE [Call hot path]); None where
        there is none cheaper (the caller then uses :meth:`guards_hold`)."""
        return None

    def compile_call(self, function: Any, flat_fn: Callable, flat_args: list, in_spec: Any, options: Any) -> Any:
        """The runtime of one new call signature of ``function`` (an ``AOTFunction``): loaded from its cache,
        or captured, partitioned and compiled (and stored).

        :raises CaptureError: the call cannot be captured.
        """
        raise NotImplementedError

    def ran_eagerly_for_busy_capture(self, function: Any) -> None:
        """This thread's call of ``function`` runs eagerly, this once, because another thread held the module or the
        trace lock (NOTE [A swap waits a bounded time] in capture_threads.py): nothing about the call is decided."""

    def compile_graph(self, cache: Any, gm: Any, example_inputs: Sequence[Any], flat_fn: Callable,
                      flat_example: Sequence[Any], options: Any, lifted_attributes: Sequence[str], *,
                      captured_check: Callable | None = None) -> Any:
        """The runtime of a Dynamo graph ``gm`` (``aot_module_simplified``), loaded or compiled and stored;
        ``captured_check(captured)`` runs after a capture, before the compile, and may raise to abandon it."""
        raise NotImplementedError
