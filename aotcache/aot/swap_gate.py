"""A gate that keeps other threads from reading a module's tensors while a capture has swapped them.

NOTE [Calls during a capture's swap]
An ``aot_module`` capture runs the module with trace tensors swapped in for its parameters and buffers
(``torch.func.functional_call``), on the user's module object itself. Another thread calling the wrapper at
that moment read those trace tensors as the module's parameters and failed ("Attempting to use
FunctionalTensor on its own"): a server answering its first requests from several threads broke where eager
runs. Each module has one :class:`SwapGate`: the capture holds it while the tensors are swapped; a call reads
the module's tensors, then checks that no swap by another thread began or was under way meanwhile, and if one
was, waits for it and reads again. The check costs two attribute reads on the hot path. torch's process-wide
is_compiling flag, which the capture sets, made such a call take the inlined path too; aotcache's own checks
ask ``tracing_in_this_thread`` (NOTE [is_compiling during capture] in capture.py), and a method's router stays
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

__all__ = ["SwapGate", "swap_gate"]


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
