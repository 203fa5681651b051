"""An exception raised asynchronously in the middle of a capture (Ctrl-C, pytest-timeout's signal) leaves no
process-wide or thread-local state behind (NOTE [Interrupted captures] in aotcache/aot/capture_threads.py).

The exception is injected deterministically: a ``sys.settrace`` hook raises ``KeyboardInterrupt`` at the first
line event after a named line of a named function, as a signal handler would raise there."""

from __future__ import annotations

import dis
import inspect
import sys
import threading

import pytest
import torch
from torch import nn

import aotcache
from aotcache.aot import capture_threads, tensor_checks, trace_environment
from aotcache.aot.call_state import SavedCallState
from aotcache.aot.fallback import fallback_counts

_LOAD_CONST, _PRECALL = dis.opmap["LOAD_CONST"], dis.opmap.get("PRECALL", dis.opmap.get("CALL"))


def _is_with_exit(frame) -> bool:
    """The line event of a ``with`` block's exit call: a signal cannot land there, and raising there would leave
    the lock held (an artefact of injecting through the trace hook)."""
    code, i = frame.f_code.co_code, frame.f_lasti
    return len(code) > i + 6 and code[i] == code[i + 2] == code[i + 4] == _LOAD_CONST and code[i + 6] == _PRECALL


class _InterruptAfter:
    """Raise KeyboardInterrupt at the first line event after the line of ``function`` that contains ``text``
    (``text=None``: at its first line event, before its first line runs); with ``inside``, only once a call of
    that function has begun (e.g. torch's ``_pop_mode`` during a compiler, not during the capture before it);
    with ``where``, only in a call of ``function`` whose frame ``where(frame)`` accepts. ``threads=True`` also
    traces threads started meanwhile (a compile on a helper thread)."""

    def __init__(self, function, text: str | None, *, inside=None, where=None, threads: bool = False) -> None:
        self.code, self.line = function.__code__, None
        if text is not None:
            source, first = inspect.getsourcelines(function)
            lines = [first + i for i, line in enumerate(source) if text in line]
            assert lines, f"{text!r} not in {function.__qualname__}: update the injection point"
            self.line = lines[0]
        self.seen, self.fired = text is None, False
        self.inside, self.armed, self.threads = (inside.__code__ if inside is not None else None), inside is None, threads
        self.where = where

    def __enter__(self):
        sys.settrace(self._global)
        if self.threads:
            threading.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)
        if self.threads:
            threading.settrace(None)

    def _global(self, frame, event, arg):
        if self.fired:
            return None
        if frame.f_code is self.inside:
            self.armed = True
        if not self.armed or frame.f_code is not self.code:
            return None
        if self.where is not None and not self.where(frame):
            return None
        return self._local

    def _local(self, frame, event, arg):
        if event == "line" and not self.fired:
            if self.seen and not _is_with_exit(frame):
                self.fired = True
                sys.settrace(None)
                raise KeyboardInterrupt("injected by the test")
            self.seen = self.seen or frame.f_lineno == self.line
        return self._local


POINTS = {
    "compiling, this thread's count": (lambda: capture_threads.compiling.__wrapped__, "_this_thread.captures"),
    "compiling, torch flag set": (lambda: capture_threads._flag_held.__wrapped__, "_is_compiling_flag = True"),
    # NOTE [One trace at a time]: an interrupt right after the process-wide trace lock is taken must release it
    "trace lock taken": (lambda: capture_threads._TraceLock.held.__wrapped__, "self.owner, self.turn, self.depth"),
    "tensor checks depth": (lambda: tensor_checks.tensor_checks_in_graph.__wrapped__, "depth + 1"),
    "fake-tensor log filter": (lambda: trace_environment.quiet_fake_tensor_failures.__wrapped__, "addFilter"),
    # torch's own: a mode's exit interrupted before it pops the mode (NOTE [Modes left by an interrupted capture])
    "torch pops a dispatch mode": (lambda: torch.utils._python_dispatch._pop_mode, None),
    "torch exits a dispatch mode": (lambda: torch.utils._python_dispatch.TorchDispatchMode.__exit__, None),
    "the call state put back between runs": (lambda: SavedCallState.restore, None),
}


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _state_left() -> dict:
    return {"is_compiling": torch.compiler.is_compiling(),
            "captures running": capture_threads._captures_running,
            "is_compiling holders": capture_threads._flag_holders,
            "captures in this thread": getattr(capture_threads._this_thread, "captures", 0),
            "trace lock owner": capture_threads._trace_lock.owner,
            "tensor-check depth": getattr(tensor_checks._this_thread, "depth", 0),
            "fake-tensor log filters": trace_environment._quiet_depth,
            "torch dispatch modes": torch._C._len_torch_dispatch_stack(),
            "torch function modes": torch._C._len_torch_function_stack(),
            "in a torch dispatch mode": torch.utils._python_dispatch.is_in_torch_dispatch_mode()}


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("api", ["aot_module", "aot_function"])
def test_interrupt_leaves_no_state_and_later_compiles_work(point, api):
    clean = _state_left()
    assert clean == {"is_compiling": False, "captures running": 0, "is_compiling holders": 0,
                     "captures in this thread": 0,
                     "trace lock owner": None, "tensor-check depth": 0, "fake-tensor log filters": 0,
                     "torch dispatch modes": 0, "torch function modes": 0, "in a torch dispatch mode": False}
    torch.manual_seed(0)
    model = _MLP()
    x = torch.randn(4, 8, requires_grad=True)
    if api == "aot_module":
        compiled, eager = aotcache.aot_module(model, "nop", cache=False, on_capture_error="raise"), model
        args = (x,)
    else:
        def eager(x, w):
            return torch.tanh(x @ w).sum(-1)
        compiled = aotcache.aot_function(eager, "nop", cache=False, on_capture_error="raise")
        args = (x, torch.randn(8, 3, requires_grad=True))
    function, text = POINTS[point]
    with pytest.raises(KeyboardInterrupt), _InterruptAfter(function(), text) as injected:
        compiled(*args)
    assert injected.fired
    assert _state_left() == clean

    before = fallback_counts()

    def unrelated(a, b):
        return (a.sin() * b).relu().sum(0)

    a, b = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3)
    out = aotcache.aot_function(unrelated, "nop", cache=False, on_capture_error="raise")(a, b)
    torch.testing.assert_close(out, unrelated(a, b))
    out.sum().backward()
    again = compiled(*args)  # the interrupted function itself captures on its next call
    torch.testing.assert_close(again, eager(*args))
    assert not torch.compiler.is_compiling()
    assert fallback_counts() == before


def _reads_aotcache_bookkeeping(x):
    """Program code that names aotcache's own counters (a test's or a monitor's): the walk reaches them."""
    if capture_threads._captures_running < 0 or trace_environment._quiet_depth < 0:
        raise AssertionError("negative count")
    return x * 2


@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_capture_never_puts_back_aotcaches_own_counters(requires_grad):
    """The program state a capture puts back between its runs of the function (NOTE [State changed by a capture])
    included aotcache's counters of running captures and log filters when the function's code named them: put
    back to 0 while the capture ran, they ended at -1 and torch's is_compiling flag stayed True for good (seen in
    the suite through pytest's assertion rewriting, which reaches every test module's code)."""
    clean = _state_left()
    compiled = aotcache.aot_function(_reads_aotcache_bookkeeping, "nop", cache=False, on_capture_error="raise")
    x = torch.randn(3, 4, requires_grad=requires_grad)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), x * 2)
        assert _state_left() == clean
    assert len(compiled._entries) == 1  # the counters changing during a capture did not fail the guards


def test_an_interrupt_just_after_a_compiled_functions_lock_was_taken_leaves_it_free():
    """Ctrl-C landing after ``ForkSafeLock``'s acquire returned, before the lock recorded its owner, left it held
    for good: every later call of that function, in any thread, waited on it forever."""
    lock = capture_threads.ForkSafeLock()
    with pytest.raises(KeyboardInterrupt), _InterruptAfter(capture_threads.ForkSafeLock.__enter__,
                                                           "self._lock.acquire()"):
        with lock:
            pass
    taken = threading.Event()

    def other_thread():
        with lock:
            taken.set()

    thread = threading.Thread(target=other_thread, daemon=True)
    thread.start()
    assert taken.wait(30), "another thread could not take the lock after the interrupt"
    thread.join(30)
    with lock:  # and this thread
        assert not lock.locked()
