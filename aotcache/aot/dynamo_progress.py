"""Whether anything of a call on aotcache's Dynamo ways may have run before Dynamo failed: an eager rerun of the
call is safe only where nothing did (NOTE [Dynamo failures after part of the call ran])."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["DynamoProgress", "dynamo_failed", "marks_region_calls"]


# NOTE [Dynamo failures after part of the call ran]
# Where torch.compile fails on one of aotcache's Dynamo ways (``aotcache.compile``'s, the capture fallback's
# ``PartialRuntime``), the call may run eagerly instead (NOTE [Dynamo failing where eager runs] in compile_api.py).
# But Dynamo compiles a frame only when the call reaches it: a failure in the frame after a graph break comes after
# the graph before the break ran (``buf.add_(1)`` wrote an input) and after Dynamo replayed that frame's Python side
# effects (``log.append(...)``). Rerunning the whole call eagerly then applied them twice: a silently wrong result
# where the call raised before the fallback existed. So the eager rerun is taken only where nothing of the call can
# have run; otherwise Dynamo's error is raised as it is (with a note saying why it was not rerun). Nothing has run
# when, since the call began, (1) no region aotcache's backends handed Dynamo was called in this thread (a count
# each region's callable bumps: :func:`marks_region_calls`, one thread-local add per region call), (2) Dynamo
# completed no frame (``counters["frames"]["ok"]``, process-wide: another thread's compile makes this conservative,
# never wrong; the capture fallback's own entry frame, which only calls the user's function, is not counted: with a
# graph break in the function Dynamo compiles it first, and a compiler failing on the function's first graph
# still runs eagerly), and (3) the entry has no compiled frame from an earlier call that could have run without compiling
# or calling a region (a frame whose only effects are replayed Python): once a call of the entry completed, or got
# as far as (1) or (2), its later failures always raise. The first-frame failure that motivated the fallback (a
# tensor ``__dict__`` write refused by the capture and failing Dynamo's first frame) still runs eagerly.
# NOTE [Dynamo errors that are not TorchDynamoException]
# The eager rerun above is for Dynamo's own failures, not for a user's error Dynamo let through (that one eager
# raises again, so it is raised as it is). Dynamo's failures are mostly ``TorchDynamoException``s, but torch
# 2.11 / 2.13 re-raise some errors of a frame's compile as they are: an ``AssertionError`` or ``IndexError`` out
# of its own tracer or fake-tensor conversion (a ``TwoTensor`` argument whose ``.grad`` is a ``TwoTensor``, set
# by an earlier backward: "Expected SubclassSymbolicContext or None, got StatefulSymbolicContext", met by
# PyTorch's test_with_effects.py, where PyTorch's ``aot_function`` runs). Every error that fails a frame's
# compile gets Dynamo's ``compile_id`` attribute (``convert_frame._compile``), one a user's code raises while a
# compiled frame runs does not: :func:`dynamo_failed` takes either mark. A user's error raised while Dynamo
# traced (and so marked) runs again eagerly only where nothing of the call ran, and eager raises it again.
def dynamo_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is Dynamo's failure (NOTE [Dynamo errors that are not TorchDynamoException])."""
    from torch._dynamo.exc import TorchDynamoException  # Dynamo is imported once its way has run

    return isinstance(exc, TorchDynamoException) or getattr(exc, "compile_id", None) is not None


class _RegionCalls(threading.local):
    count = 0  # the regions of aotcache's backends called in this thread (a class default: no per-thread setup)


_region_calls = _RegionCalls()


def marks_region_calls(backend: Callable[..., Callable]) -> Callable[..., Callable]:
    """``backend`` (a Dynamo backend) whose returned callables count their calls for :class:`DynamoProgress`."""

    @functools.wraps(backend)
    def marking_backend(*args: Any, **kwargs: Any) -> Callable:
        compiled = backend(*args, **kwargs)

        def region(*region_args: Any) -> Any:  # Dynamo calls a graph with positional arguments only
            _region_calls.count += 1
            return compiled(*region_args)

        return region

    return marking_backend


class DynamoProgress:
    """Of one Dynamo entry (a router's, a capture fallback's): whether a failed call may rerun eagerly (NOTE
    [Dynamo failures after part of the call ran]). ``settled`` turns True once the entry may hold a compiled frame;
    then :meth:`mark` is skipped and every failure raises. ``trampoline``: the code of an entry whose frame only
    calls the user's function (the capture fallback's, NOTE [A code object per fallback]); Dynamo compiling it
    runs nothing of the user's, so its compiles are not counted as progress."""

    __slots__ = ("settled", "trampoline")

    def __init__(self, trampoline: Any = None) -> None:
        self.settled = False
        self.trampoline = trampoline

    def mark(self) -> tuple[int, int, int]:
        """Where this thread's region calls, Dynamo's completed frames and the trampoline's compiled frames stand,
        before a call of an unsettled entry."""
        from torch._dynamo.utils import counters  # Dynamo is imported once its way runs

        return _region_calls.count, counters["frames"]["ok"], self._trampoline_frames()

    def nothing_ran_since(self, mark: tuple[int, int, int]) -> bool:
        """Whether a call that began at ``mark`` and failed can have run nothing; settles the entry where it may
        have. Frames Dynamo completed count unless each was a compile of the trampoline."""
        regions, frames, trampoline_frames = self.mark()
        nothing = (not self.settled and regions == mark[0]
                   and frames - mark[1] == max(trampoline_frames - mark[2], 0))
        if not nothing:
            self.settled = True
        return nothing

    def _trampoline_frames(self) -> int:
        if self.trampoline is None:
            return 0
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # torch 2.11 and 2.13 both have it

        return len(_debug_get_cache_entry_list(self.trampoline))
