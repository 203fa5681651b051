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
installed for other threads (NOTE [Methods run the compiled forward] in module.py). Not covered: the module's
Python run eagerly by another thread while a capture swaps, in the eager fallback of a signature that cannot
be captured.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["SwapGate", "swap_gate", "share_gate", "compiling", "tracing_in_this_thread"]


class SwapGate:
    """Held by the thread that swaps a module's tensors; ``swaps`` counts the swaps begun."""

    __slots__ = ("_lock", "owner", "swaps", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None  # the thread swapping now
        self.swaps = 0

    @contextlib.contextmanager
    def swapping(self) -> Iterator[None]:
        """Hold the gate while the module's tensors are swapped (re-entrant within the swapping thread)."""
        me = threading.get_ident()
        if self.owner == me:
            yield
            return
        with self._lock:
            self.owner = me
            self.swaps += 1
            try:
                yield
            finally:
                self.owner = None

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


def share_gate(module: Any, gate: SwapGate) -> SwapGate:
    """Make ``gate`` (an enclosing module's) the gate of ``module`` too, unless it has one already; its gate.

    A submodule compiled as its own unit (NOTE [Methods that call a submodule's forward] in module.py) swaps
    part of the enclosing module's tensors when it is captured, and the enclosing module's capture swaps the
    submodule's: with one gate, a call of either waits for a capture of the other."""
    with _gates_lock:
        return _gates.setdefault(module, gate)


_this_thread = threading.local()  # .captures: how many captures this thread is running (nested)
_captures_lock = threading.Lock()
_captures_running = 0  # in all threads
_flag_before = False  # torch's is_compiling flag before the first of the running captures


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """NOTE [is_compiling during capture]: ``torch.compiler.is_compiling()`` is True while the function is
    captured, as under Dynamo and torch.export's non-strict trace. Libraries take their trace-friendly paths
    then: transformers' attention masks, for one, read mask values (a data-dependent branch that cannot be
    captured) unless they see tracing, and capture sees FunctionalTensors, not the FakeTensors they test for.

    torch keeps that flag for the whole process, so other threads see it too while one captures; aotcache's
    own decisions (inline a nested compiled function, use Dynamo for a fallback) ask
    :func:`tracing_in_this_thread` instead, which knows which thread the capture runs in."""
    global _captures_running, _flag_before
    compiler = torch.compiler
    has_flag = hasattr(compiler, "_is_compiling_flag")
    with _captures_lock:  # the flag is set while any thread captures, and put back when the last one ends
        if not _captures_running and has_flag:
            _flag_before = compiler._is_compiling_flag
            compiler._is_compiling_flag = True
        _captures_running += 1
    _this_thread.captures = getattr(_this_thread, "captures", 0) + 1
    try:
        yield
    finally:
        _this_thread.captures -= 1
        with _captures_lock:
            _captures_running -= 1
            if not _captures_running and has_flag:
                compiler._is_compiling_flag = _flag_before


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
