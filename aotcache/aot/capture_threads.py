"""What other threads see while one thread captures: torch's is_compiling flag, and a module's swapped tensors.

NOTE [Calls during a capture's swap]
An ``aot_module`` capture runs the module with trace tensors swapped in for its parameters and buffers
(``torch.func.functional_call``), on the user's module object itself. Another thread calling the wrapper at
that moment read those trace tensors as the module's parameters and failed ("Attempting to use
FunctionalTensor on its own"): a server answering its first requests from several threads broke where eager
runs. Each module has one :class:`SwapGate`: the capture holds it while the tensors are swapped; a call reads
the module's tensors, then checks that no swap by another thread began or was under way meanwhile, and if one
was, waits for it and reads again. The check costs two attribute reads on the hot path. torch's process-wide
is_compiling flag, which the capture sets, made such a call take the inlined path too; aotcache's own checks
ask ``tracing_in_this_thread`` (NOTE [is_compiling during capture], below), and a method's router stays
installed for other threads (NOTE [Methods run the compiled forward] in module.py).

NOTE [Eager runs beside a capture]
The module's own Python can also run eagerly in another thread while one thread captures: the fallback of a
signature that cannot be captured (EagerRuntime, PartialRuntime: NOTE [Capture fallback]), and the code of a
routed method (``generate``) around its compiled forward. Such a run reads the module's tensors at any point,
not once at the start, so a swap beginning in the middle of it made it fail with "Attempting to use
FunctionalTensor on its own". These runs hold the gate shared (:meth:`SwapGate.running`): a swap waits until
the runs of other threads have ended (``pending`` counts the swaps waiting; a bounded time: NOTE [A swap waits
a bounded time]), and a run waits while a swap is under way or pending (so that a stream of runs cannot hold a
capture back forever). A thread's own runs never
block its own swap, and a routed method lets go of its hold while its compiled forward runs
(:meth:`SwapGate.paused`): that call may capture, or wait for another thread's capture, which holds the
function's lock while it waits for the runs to end. Compiled graphs take the tensors as inputs, read once
(:meth:`SwapGate.read`), and need no hold. Still seen by such a run: torch's process-wide is_compiling flag,
while another thread's capture is under way (NOTE [is_compiling during capture]).

NOTE [Interrupted captures]
An exception raised asynchronously (Ctrl-C in a notebook, pytest-timeout's signal, any signal handler) can land
between any two lines of a capture. A process-wide change made before its ``try`` (torch's is_compiling flag set,
the count of running captures not yet raised) then stayed for good: ``torch.compiler.is_compiling()`` answered
True in every later eager call of the process, and libraries took their tracing paths there. :func:`compiling`
makes each change inside its ``try`` together with the local that says it was made (one statement), and undoes
only what was made, each undo in its own ``finally``. ``tests/aot/test_interrupted_capture.py`` raises at each
line of the capture's process-wide bookkeeping.

NOTE [A swap waits a bounded time]
A run holding the gate may itself wait for another thread that calls the module: a method mapping ``self`` over
a ``ThreadPoolExecutor`` holds the gate (a routed method) while it waits for its workers, and a worker's first
call captures, so its swap waited for that hold, which waited for the worker: the job hung for good. Nothing
tells a thread blocked on its workers from one still running the module's Python, so a swap waits for the runs
of other threads at most :data:`SWAP_WAIT_S` seconds; past that it raises :class:`SwapBusy`, and the call that
was to be captured runs eagerly under a shared hold instead (``eager_for_busy_swap`` in fallback.py: counted as
``eager:swap_busy``, logged once, not remembered, so a later call captures once the module is free). A swap
finding only holds that a swap already gave up on (the same method call, its next worker call) gives up at
once: one wait per hold, not one per call of a pool of workers. The protection stays whole: no swap ever
begins while another thread's run holds the gate. A run waiting for a swap pending waits at most that swap's
bounded wait. Workaround for the slow first calls: call the model once outside the method (it captures then).

NOTE [One trace at a time]
torch's tracing machinery keeps process-wide state: ``torch.fx``'s tracer installs its patcher in a module global
(``CURRENT_PATCHER``) for the length of a trace, and make_fx's decomposition table is a module global too. Two
threads capturing at once (a server's first requests, three different models' first calls) overwrote each other's:
a capture failed with "CURRENT_PATCHER is None in finally block", so a model that captures alone went the fallback
way (``aotcache.compile`` even recorded the Dynamo route for it in the store for later processes). Captures are
now serialized process-wide by :func:`one_trace_at_a_time` (re-entrant in the thread that traces: a capture
nested in a capture runs); compiling the captured graphs stays concurrent. A trace can run the user's Python,
which may wait for another thread that needs to trace (a forward handing work to a thread pool), so the wait is
bounded as a swap's is (NOTE [A swap waits a bounded time]), though longer, since another thread's trace of a
large model takes that long: past :func:`trace_wait_s` seconds, :class:`TraceBusy` (a :class:`SwapBusy`) runs
this call eagerly and a later call captures; a thread finding the same trace it already gave up on gives up at once.

NOTE [How long a call waits for another thread's trace]
The wait is ``AOTCACHE_TRACE_WAIT_S`` seconds, 60 by default. No fixed wait covers every model: a capture's cost is
its op count (trace tensors are fake), and on a 2-core CPU a Llama of bench/hf_tiny.py's widths took 20 s (16
layers) and 37 s (32 layers, Llama-7B's depth) to capture for inference, 32 s and 84 s for a training step; an
80-layer model takes minutes. Giving up is never wrong, only slower: the call runs eagerly (eager's result), a
later call captures, and the other calls of the same turn give up at once (one wait per turn of the lock, not per
call); a waiter even answers sooner by giving up than by waiting for another model's capture and then capturing
its own. Waiting saves eager runs where the other capture is short. So the default stays what a small or mid-size
model's capture fits in (three first calls at once all capture), and the variable lets a server lower it (0: never
wait; its first answers come from eager runs while another model captures) or a job raise it to capture every
model at its first call. It is read at every capture, before the lock (a
microsecond's ``config.get`` per capture, none per warm call), so a bad value (not a finite, non-negative
number) raises a ``ConfigError`` naming the variable at the first capture instead of at the first wait; a
``config.patch(trace_wait_s=...)`` is checked the same way when patched (an ``inf`` there made the wait raise
OverflowError, a trace failure that sent the model to the fallback; a ``nan`` never gave up).

NOTE [A trace lent while its swap waits]
A capture's swap waits for the eager runs of other threads (NOTE [Eager runs beside a capture]), and such a run
may itself capture: a fallback running through torch.compile compiles its regions with aotcache. Holding the trace
lock through that wait, the capture waited for a run that waited for the lock, until the swap gave up (5 s, then
the call ran eagerly). So a swap that must wait lends the trace lock meanwhile (:meth:`_TraceLock.lend`) and takes it
back before it swaps (:meth:`_TraceLock.take_back`). torch.fx restores its patcher as a stack, so another thread's
trace may run within the paused one but must end first: a turn is taken back only when no thread traces and no
thread that lent later still waits to take its own back. Other waits of a thread that traces (a run waiting for
another thread's swap) are bounded by :func:`trace_wait_s`.

NOTE [A child forked while another thread captures]
``fork`` copies only the forking thread, but every lock and count of this module as they were: a DataLoader worker
(or any ``multiprocessing`` child) started while another thread captured inherited a trace lock owned by a thread
that does not exist in the child, so its first capture waited :func:`trace_wait_s` seconds and every later one gave
up at once (running eagerly for the life of the worker), and ``torch.compiler.is_compiling()`` stayed True in it for
good. After a fork the child forgets what other threads held (:func:`_forget_other_threads_after_fork`) and keeps
only the forking thread's own state.

NOTE [A child forked while another thread captures the same model]
Forked while another thread captured the model the child then calls, the child inherited two things of that
capture that no thread of its own would ever end: the compiled function's lock (``AOTFunction._lock``, held for the
whole trace and compile), on which the child's first call of the model waited for good, and the module itself with
the capture's trace tensors swapped in for its parameters and buffers (``functional_call``'s swap, put back only by
the capturing thread). Each such lock is a :class:`ForkSafeLock`, which knows its holder (a re-entrant lock records
it): a forked child gets it anew where a thread the fork did not copy held it. A swap saves how to put the module
back (``SwapGate.swapping``'s ``put_back``, made once the gate is held, before the tensors are swapped; per capture,
not per call), and a child whose module was swapped by another thread puts it back: its parameters, buffers and
the attributes the trace set become the module's own again, and the child captures (or runs) the real module (a
put-back that raises is logged, after the gate's lock is renewed, and the rest of the fork handler still runs).
Not put back: the router a
routed method (``generate``) running in another thread at the fork installed on the module (NOTE [Methods run the
compiled forward] in module.py) stays installed in the child, counted for that thread; it routes the module's
``forward`` to the compiled call there, as in the parent while the method runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from aotcache import config

__all__ = ["SWAP_WAIT_S", "trace_wait_s", "SwapBusy", "TraceBusy", "one_trace_at_a_time", "SwapGate", "swap_gate",
           "compiling", "tracing_in_this_thread", "capturing_in_this_thread", "ForkSafeLock"]


SWAP_WAIT_S = 5.0  # the longest a swap waits for other threads' eager runs: NOTE [A swap waits a bounded time]


def trace_wait_s() -> float:
    """The longest a capture waits for another thread's trace: ``AOTCACHE_TRACE_WAIT_S`` (default 60 s; NOTE [How
    long a call waits for another thread's trace]).

    :raises ConfigError: the variable is no finite, non-negative number of seconds.
    """
    return config.get("trace_wait_s")


class SwapBusy(RuntimeError):
    """Another thread's eager run held the module for :data:`SWAP_WAIT_S` seconds while this thread was to
    swap its tensors: this call runs eagerly (NOTE [A swap waits a bounded time]). Not a ``CaptureError``:
    nothing about the call is refused for good."""


class SwapGate:
    """Held by the thread that swaps a module's tensors; ``swaps`` counts the swaps begun. Eager runs of the
    module hold it shared (NOTE [Eager runs beside a capture])."""

    __slots__ = ("_lock", "_state", "owner", "swaps", "pending", "_runs", "_holds", "_next_hold", "_given_up",
                 "_put_back", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held for a whole swap: :meth:`read` waits on it
        self._state = threading.Condition(threading.Lock())  # guards owner / pending / _runs changes
        self.owner: int | None = None  # the thread swapping now
        self.swaps = 0
        self.pending = 0  # swaps waiting for other threads' eager runs to end
        self._runs: dict[int, int] = {}  # thread id -> eager runs under way in it (nested)
        self._holds: dict[int, int] = {}  # thread id -> number of its hold (taken anew when its runs begin)
        self._next_hold = 0
        self._given_up: frozenset[int] = frozenset()  # the holds a swap last gave up waiting for
        self._put_back: Callable[[], None] | None = None  # puts the module back, in a child forked mid-swap

    @contextlib.contextmanager
    def swapping(self, put_back: Callable[[], Callable[[], None]] | None = None) -> Iterator[None]:
        """Hold the gate while the module's tensors are swapped (re-entrant within the swapping thread); waits
        for the eager runs of other threads to end first, at most :data:`SWAP_WAIT_S` seconds. ``put_back()``,
        called once the gate is held, returns what puts the module back as it is then: a child forked during the
        swap calls it (NOTE [A child forked while another thread captures the same model]).

        :raises SwapBusy: they did not end in time (NOTE [A swap waits a bounded time]).
        """
        me = threading.get_ident()
        if self.owner == me:
            yield
            return
        with self._lock:
            with self._state:
                self.pending += 1
                lent = None  # this thread's trace, lent while it waits: NOTE [A trace lent while its swap waits]
                try:
                    deadline = time.monotonic() + SWAP_WAIT_S
                    while True:
                        holds = frozenset(hold for thread, hold in self._holds.items() if thread != me)
                        if not holds and lent is None:
                            break
                        left = deadline - time.monotonic()
                        if not holds or left <= 0 or holds <= self._given_up:
                            if lent is not None:  # taken back first, outside the gate's state lock
                                self._state.release()
                                try:
                                    _trace_lock.take_back(lent)
                                finally:
                                    lent = None
                                    self._state.acquire()
                                continue
                            self._given_up = holds  # a hold already waited for: not again
                            raise SwapBusy(f"another thread held the module for its Python for {SWAP_WAIT_S:g} s "
                                           "while this call was to capture it")
                        if lent is None:
                            lent = _trace_lock.lend()
                        self._state.wait(left)
                finally:
                    self.pending -= 1
                    if not self.pending:
                        self._state.notify_all()  # runs waiting for this pending swap go on (it may give up)
                self.owner = me
                self.swaps += 1
            try:
                self._put_back = put_back() if put_back is not None else None
                yield
            finally:
                with self._state:
                    self.owner, self._put_back = None, None
                    self._state.notify_all()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Hold the gate shared while this thread runs the module's Python eagerly: no other thread swaps the
        module's tensors meanwhile (waits for a swap under way or pending; re-entrant)."""
        me = threading.get_ident()
        with self._state:
            if me not in self._runs:
                if self.owner != me:
                    while self.owner is not None or self.pending:
                        self._state.wait()
                self._hold(me)
            self._runs[me] = self._runs.get(me, 0) + 1
        try:
            yield
        finally:
            with self._state:
                left = self._runs.pop(me) - 1
                if left:
                    self._runs[me] = left
                else:
                    del self._holds[me]
                    self._state.notify_all()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Let go of this thread's eager runs for the duration (a routed method's compiled forward, which may
        capture or wait for another thread's capture), and take them again after it."""
        me = threading.get_ident()
        if me not in self._runs:  # the usual case, without the lock: only this thread adds its own entry
            yield
            return
        with self._state:
            held = self._runs.pop(me)
            del self._holds[me]
            self._state.notify_all()
        try:
            yield
        finally:
            with self._state:
                while (self.owner is not None and self.owner != me) or self.pending:
                    self._state.wait()
                self._hold(me)
                self._runs[me] = held

    def forget_other_threads(self, me: int) -> None:
        """In a forked child: drop the swap and runs of threads that were not copied (NOTE [A child forked while
        another thread captures]); new locks, but the swap lock the forking thread holds itself stays (its swap
        releases that one)."""
        self._state = threading.Condition(threading.Lock())
        if self.owner != me:
            swapped_by_another, put_back = self.owner is not None, self._put_back
            self._lock, self.owner, self._put_back = threading.Lock(), None, None
            if swapped_by_another and put_back is not None:  # NOTE [A child forked while another thread captures
                try:  # the same model]: the trace tensors out, the module's own back
                    put_back()
                except Exception as exc:  # noqa: BLE001 - the rest of the fork handler must run (the locks)
                    logging.getLogger(__name__).warning(
                        "aotcache: a child forked during another thread's capture could not put the module back "
                        "(%s: %s); it may hold that capture's trace tensors", type(exc).__name__, exc)
        self.pending, self._given_up = 0, frozenset()
        self._runs = {thread: runs for thread, runs in self._runs.items() if thread == me}
        self._holds = {thread: hold for thread, hold in self._holds.items() if thread == me}

    def _hold(self, me: int) -> None:
        """Number this thread's hold anew (called under ``_state``, as its runs begin or resume)."""
        self._next_hold += 1
        self._holds[me] = self._next_hold

    def read(self, read: Any) -> Any:
        """``read()`` (the module's tensors), made when no other thread had them swapped."""
        while True:
            swaps = self.swaps
            value = read()
            owner = self.owner
            if (owner is None or owner == threading.get_ident()) and self.swaps == swaps:
                return value
            with self._lock:  # another thread's swap began or is under way: wait for its end, read again
                pass


_gates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_gates_lock = threading.Lock()


def swap_gate(module: Any) -> SwapGate:
    """The gate of ``module`` (one per module object, whichever wrappers share it)."""
    gate = _gates.get(module)
    if gate is None:
        with _gates_lock:
            gate = _gates.get(module)
            if gate is None:
                gate = _gates[module] = SwapGate()
    return gate


class ForkSafeLock:
    """A lock (``with lock:``) that a forked child gets anew where a thread the fork did not copy held it (NOTE [A child
    forked while another thread captures the same model]), and that an interrupt landing just after it was taken does
    not leave held (NOTE [Interrupted captures])."""

    __slots__ = ("_lock", "__weakref__")

    def __init__(self) -> None:
        # re-entrant only for what it records: its owner is set by the acquire itself (in C), so that an interrupt
        # after the acquire can tell whether it was taken, and a forked child whether another thread holds it
        self._lock = threading.RLock()
        _fork_safe_locks.add(self)

    def __enter__(self) -> ForkSafeLock:
        try:
            self._lock.acquire()
            return self
        except BaseException:  # interrupted (Ctrl-C): as the acquire returned, or while it waited (nothing taken)
            with contextlib.suppress(RuntimeError):  # RuntimeError: not taken
                self._lock.release()
            raise

    def __exit__(self, *exc_info: Any) -> None:
        self._lock.release()

    def locked(self) -> bool:
        """Held by a thread other than the caller (tests, diagnostics)."""
        if self._lock.acquire(blocking=False):
            self._lock.release()
            return False
        return True

    def forget_other_threads(self, me: int) -> None:
        """In a forked child (``me``, the only thread): a new lock where another thread held this one."""
        if self.locked():
            self._lock = threading.RLock()


_fork_safe_locks: weakref.WeakSet = weakref.WeakSet()


class TraceBusy(SwapBusy):
    """Another thread's trace held the process's trace lock for :func:`trace_wait_s` seconds: this call runs eagerly
    (NOTE [One trace at a time])."""


class _TraceLock:
    """The process-wide lock of :func:`one_trace_at_a_time`: re-entrant, with a bounded wait, and lent by a thread
    whose swap waits for other threads (NOTE [A trace lent while its swap waits])."""

    __slots__ = ("_state", "owner", "depth", "turn", "given_up", "lenders")

    def __init__(self) -> None:
        self._state = threading.Condition(threading.Lock())
        self.owner: int | None = None  # the thread tracing now
        self.depth = 0  # its nested captures
        self.turn = 0  # numbers each thread's turn, so that waiters give up on one turn only once
        self.given_up = -1  # the turn a waiter last gave up on
        self.lenders: list[int] = []  # threads whose traces are paused, lent; the last one takes its turn back first

    @contextlib.contextmanager
    def held(self, wait_s: float) -> Iterator[None]:
        me = threading.get_ident()
        taken = False
        try:  # NOTE [Interrupted captures]: taken in one statement, inside the try; released only if taken
            with self._state:
                if self.owner != me:
                    self._wait_for_turn(lambda: self.owner is None, wait_s)
                    self.owner, self.turn, self.depth, taken = me, self.turn + 1, 1, True
                else:
                    self.depth, taken = self.depth + 1, True
            yield
        finally:
            if taken:
                with self._state:
                    if self.owner == me:  # (not where taking a lent turn back failed)
                        self.depth -= 1
                        if not self.depth:
                            self.owner = None
                            self._state.notify_all()

    def _wait_for_turn(self, ready: Callable[[], bool], wait_s: float) -> None:
        """Wait (under ``_state``) until ``ready()``, at most ``wait_s`` seconds.

        :raises TraceBusy: not in time, or the turn under way is one a waiter already gave up on.
        """
        if ready():
            return
        deadline = time.monotonic() + wait_s
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0 or self.turn == self.given_up:
                self.given_up = self.turn
                raise TraceBusy(f"another thread's capture held the trace lock for {wait_s:g} s while this call "
                                "was to capture")
            self._state.wait(left)

    def forget_other_threads(self, me: int) -> None:
        """In a forked child: drop the turns of threads that were not copied (NOTE [A child forked while another
        thread captures]); new locks, since one may have been held at the fork."""
        self._state = threading.Condition(threading.Lock())
        if self.owner != me:
            self.owner, self.depth = None, 0
        self.lenders = [thread for thread in self.lenders if thread == me]

    def lend(self) -> int | None:
        """Let other threads trace while this thread's trace waits; the depth to take back, or None where this
        thread holds no turn."""
        me = threading.get_ident()
        with self._state:
            if self.owner != me:
                return None
            depth = self.depth
            self.lenders.append(me)
            self.owner, self.depth = None, 0
            self._state.notify_all()
            return depth

    def take_back(self, depth: int) -> None:
        """Take back the turn :meth:`lend` gave away, once no other thread traces and no thread that lent after
        this one waits to take its own back.

        :raises TraceBusy: not within :func:`trace_wait_s` seconds (the lent turn is then given up).
        """
        me = threading.get_ident()
        with self._state:
            try:
                self._wait_for_turn(lambda: self.owner is None and self.lenders[-1] == me, trace_wait_s())
            except BaseException:  # TraceBusy, a ConfigError, an interrupt: the turn is no longer waited for
                self.lenders.remove(me)
                self._state.notify_all()
                raise
            self.lenders.pop()
            self.owner, self.depth = me, depth


_trace_lock = _TraceLock()


def one_trace_at_a_time() -> contextlib.AbstractContextManager:
    """Hold the process-wide trace lock for a capture (NOTE [One trace at a time]).

    :raises TraceBusy: another thread's trace held it for :func:`trace_wait_s` seconds.
    :raises ConfigError: ``AOTCACHE_TRACE_WAIT_S`` does not parse (read at every capture, so a bad value shows at the
        first one, not at the first wait).
    """
    return _trace_lock.held(trace_wait_s())


_this_thread = threading.local()  # .captures: how many captures this thread is running (nested)
_captures_lock = threading.Lock()
_captures_running = 0  # in all threads
_flag_lock = threading.Lock()
_flag_holders = 0  # aotcache captures and Dynamo compile sessions holding torch's is_compiling flag, all threads
_flag_before = False  # torch's is_compiling flag before the first of the holders


@contextlib.contextmanager
def _flag_held() -> Iterator[None]:
    """NOTE [is_compiling held by count]: torch's is_compiling flag is one value for the process. torch 2.13's
    Dynamo sets it for a compile session by saving the value it finds and putting it back at the end, and so did
    a capture. Overlapping in two threads (a capture beside another thread's torch.compile: aotcache.compile's
    first calls from a thread pool), the one ending last put back the True the other had set, and the flag stayed
    True for the rest of the process: every library then took its tracing paths in eager code (transformers'
    generate skipped its own steps). The flag is now held by count: True while any capture or compile session
    runs, put back to what the first holder found when the last one ends. Dynamo's session joins the count
    (``torch.compiler._compile_session_context`` is replaced at import: torch looks it up per compile; a torch
    without it keeps its own)."""
    global _flag_holders, _flag_before
    compiler = torch.compiler
    if not hasattr(compiler, "_is_compiling_flag"):
        yield
        return
    counted = False
    try:  # NOTE [Interrupted captures]: every change is made inside the try, and undone only if made
        with _flag_lock:
            if not _flag_holders:
                _flag_before = compiler._is_compiling_flag
            holds = getattr(_this_thread, "flag_holds", 0) + 1  # this thread's, for a forked child
            _flag_holders, _this_thread.flag_holds, counted = _flag_holders + 1, holds, True  # one statement
            compiler._is_compiling_flag = True
        yield
    finally:
        if counted:
            with _flag_lock:
                _flag_holders -= 1
                _this_thread.flag_holds -= 1
                if not _flag_holders:
                    compiler._is_compiling_flag = _flag_before


def _counted_compile_session() -> contextlib.AbstractContextManager:
    """Dynamo's compile session, holding the is_compiling flag by count (NOTE [is_compiling held by count])."""
    return _flag_held()


if hasattr(torch.compiler, "_compile_session_context") and hasattr(torch.compiler, "_is_compiling_flag"):
    torch.compiler._compile_session_context = _counted_compile_session


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """NOTE [is_compiling during capture]: ``torch.compiler.is_compiling()`` is True while the function is
    captured, as under Dynamo and torch.export's non-strict trace. Libraries take their trace-friendly paths
    then: transformers' attention masks, for one, read mask values (a data-dependent branch that cannot be
    captured) unless they see tracing, and capture sees FunctionalTensors, not the FakeTensors they test for.

    torch keeps that flag for the whole process, so other threads see it too while one captures; aotcache's
    own decisions (inline a nested compiled function, use Dynamo for a fallback) ask
    :func:`tracing_in_this_thread` instead, which knows which thread the capture runs in."""
    global _captures_running
    counted = in_thread = False
    try:  # NOTE [Interrupted captures]: every change is made inside the try, and undone only if made
        with _captures_lock:
            _captures_running, counted = _captures_running + 1, True  # one statement: no interrupt between
        _this_thread.captures, in_thread = getattr(_this_thread, "captures", 0) + 1, True
        with _flag_held():
            yield
    finally:
        try:
            if in_thread:
                _this_thread.captures -= 1
        finally:
            if counted:
                with _captures_lock:
                    _captures_running -= 1


def _forget_other_threads_after_fork() -> None:
    """NOTE [A child forked while another thread captures]: only the forking thread goes on in the child."""
    global _gates_lock, _captures_lock, _captures_running, _flag_lock, _flag_holders
    me = threading.get_ident()
    _trace_lock.forget_other_threads(me)
    _gates_lock = threading.Lock()
    for gate in list(_gates.values()):
        gate.forget_other_threads(me)
    for lock in list(_fork_safe_locks):  # NOTE [A child forked while another thread captures the same model]
        lock.forget_other_threads(me)
    _captures_lock, _flag_lock = threading.Lock(), threading.Lock()
    mine = getattr(_this_thread, "captures", 0)
    _captures_running = mine
    held = getattr(_this_thread, "flag_holds", 0)
    if _flag_holders != held:
        _flag_holders = held
        if not held and hasattr(torch.compiler, "_is_compiling_flag"):
            torch.compiler._is_compiling_flag = _flag_before


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_other_threads_after_fork)


def capturing_in_this_thread() -> bool:
    """Whether the calling thread runs an aotcache capture (not merely Dynamo or another tracer)."""
    return bool(getattr(_this_thread, "captures", 0))


def tracing_in_this_thread() -> bool:
    """Whether the calling thread is being traced: by an aotcache capture, by Dynamo, or by another tracer that
    set torch's is_compiling flag while no aotcache capture runs (NOTE [is_compiling during capture]).

    A thread that merely runs while another thread captures is not: it took the inlined path before and ran
    the module with the capture's swapped trace tensors (NOTE [Calls during a capture's swap])."""
    if not torch.compiler.is_compiling():
        return False
    if getattr(_this_thread, "captures", 0) or not _captures_running:
        return True
    return torch.compiler.is_dynamo_compiling()
