"""The Python state one call of a compiled function changes: put back between the runs of its capture.

NOTE [State changed by a capture]
A capture runs the function's Python more than once: the analysis on static probes, then the trace (NOTE
[Analysis without symbols] in capture.py), and again on a mismatch, a failed automatic dynamic compile, or a
fallback after a refusal. A forward that changes state it reads (``if self.mode is None: self.mode = "set"``,
a counter ``self.calls += 1``, a ``global`` or ``nonlocal`` it reassigns, a list it appends to) made the change
in the analysis, and the trace then saw the changed state: the first call returned what eager returns on the
second, and the state had advanced twice. So when a call is captured, :class:`SavedCallState` saves the state
its Python can read, and each later run of the Python (and the fallback's, after a failed capture) starts from
it again; the last run's changes stay, as one eager call's do. What is saved and put back:

* an ``aot_module``'s module tree: each submodule's ``__dict__`` (attributes set, added or deleted, by
  identity) and the containers held directly in it (``_parameters``, ``_buffers``, ``_modules``, hook
  registries, a list or dict attribute changed in place);
* everything the program guards recorded (NOTE [Program guards]): globals and module attributes the code
  names, class attributes (written back through the class), attributes of plain objects at any depth the walk
  reached (config objects), closure cells, the members of lists, dicts and sets reached, and the environment
  variables the code reads by name.

What is not put back: state the walk does not reach (the insides of C-extension objects, a global the
function creates that it did not read before, files, the clock, prints and logs), which changes once per run
as before; and state it reaches but cannot write back (a container subclass refusing the write), for which
the call is refused before the next run (``unsupported_construct``): that change stays, and the fallback
runs the Python from it (once per call from then on). An object whose ``__setattr__`` refuses is written
back with ``object.__setattr__``.

A graph whose capture changed the program state is used for that call only (``single_use``; not remembered
under its signature): reusing it later, when the state came back to the one it was traced in (a flag toggled
by each call), would skip the change its Python makes, because a compiled graph runs no Python. Each such
call is traced again; a forward that changes its own state on every call (a counter) is therefore traced on
every call, and its state advances once per call, as in eager. After 8 such calls in a row (Dynamo's own
recompile limit) that call signature runs eagerly, whatever the settings it changes (``eager:changes_own_state``,
warned about once); a call whose graph is kept (the state settled) starts the count again. With
``on_capture_error="raise"`` or strict mode it keeps being traced. Across processes, the cache records such a
call's change with its warm-start alias when it is a plain value set on the model or its config, and a warm
start replays it instead of tracing (NOTE [Replaying a call's state change] in autograd_cache/state_delta.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from aotcache.aot.errors import CaptureError
from aotcache.aot.hot_path import ModuleState
from aotcache.aot.module_state import bounded_deque, holds_trace_tensor, symbolic_size_stored_error
from aotcache.aot.rebuilt_caches import SavedRebuiltCaches

__all__ = ["SavedCallState", "restore_mapping", "restore_list", "restore_set"]

_MISSING = object()


def restore_mapping(current: Any, saved: dict, delete: Callable | None = None,
                    assign: Callable | None = None) -> None:
    """Make ``current`` hold exactly ``saved``'s entries (by identity), writing only what differs; ``delete`` and
    ``assign`` write through an owner (a class, for its read-only ``vars()`` view)."""
    if len(current) == len(saved) and all(current.get(key, _MISSING) is value for key, value in saved.items()):
        return
    delete = current.__delitem__ if delete is None else delete
    assign = current.__setitem__ if assign is None else assign
    for key in [key for key in current if key not in saved]:
        delete(key)
    for key, value in saved.items():
        if current.get(key, _MISSING) is not value:
            assign(key, value)


def restore_list(current: list, saved: list) -> None:
    """Make ``current`` hold ``saved``'s members (by identity), in place."""
    if len(current) != len(saved) or any(a is not b for a, b in zip(current, saved)):
        current[:] = saved


def restore_set(current: set, saved: set) -> None:
    """Make ``current`` hold ``saved``'s members (by identity: ``{1} == {1.0}``), in place."""
    if len(current) != len(saved) or set(map(id, current)) != set(map(id, saved)):
        current.clear()
        current.update(saved)


_BUFFER_BYTES = 1 << 22  # a larger buffer is not copied (NOTE [Buffers written by a failed capture])


def _buffer_values(module: nn.Module) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """``(buffer, version, copy)`` for ``module``'s plain buffers up to ``_BUFFER_BYTES``.

    NOTE [Buffers written by a failed capture]
    A capture sees a module's buffers as traced inputs, but Python that reads them after the module call (eager's
    checkpoint recomputing a region with a BatchNorm in the traced backward) reaches the real ones: the write ran
    for real, the capture then failed and the fallback ran the step again (``num_batches_tracked`` counted one
    batch more than eager). A buffer whose version moved is put back from its copy before the next run of the
    Python, as the module's attributes are. Buffers over 4 MiB are not copied (that write stays, as before).
    """
    values = []
    for buffer in module.buffers():
        try:
            if type(buffer) is torch.Tensor and buffer.numel() * buffer.element_size() <= _BUFFER_BYTES:
                values.append((buffer, buffer._version, buffer.detach().clone()))
        except RuntimeError:  # an inference tensor has no version counter
            continue
    return values


class SavedCallState:
    """The state a call's Python may change, saved before its capture (NOTE [State changed by a capture]).

    ``module``: an ``aot_module``'s module (its tree is saved); ``program``: the call's watched program (its
    ``saved_state()`` saves what the program guards recorded), or None.
    """

    def __init__(self, module: nn.Module | None, program: Any) -> None:
        self._dicts: list[tuple[dict, dict]] = []
        self._lists: list[tuple[list, list]] = []
        self._sets: list[tuple[set, set]] = []
        self._settings: ModuleState | None = None
        self._buffers: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        if module is not None:
            for submodule in module.modules():
                attributes = submodule.__dict__
                self._dicts.append((attributes, dict(attributes)))
                for value in attributes.values():
                    if isinstance(value, dict):
                        self._dicts.append((value, dict(value)))
                    elif isinstance(value, list):
                        self._lists.append((value, list(value)))
                    elif isinstance(value, set):
                        self._sets.append((value, set(value)))
            self._buffers = _buffer_values(module)
            self._settings = ModuleState(module)
            self._settings_id = self._settings.current()[3]
        saved = getattr(program, "saved_state", None)
        self._program = saved() if saved is not None else None
        self._iterators = list(getattr(getattr(program, "guards", None), "iterators", ()))
        # NOTE [Caches a module rebuilds from its weights]: an RNN's weight lists, under functional_call
        reached = getattr(self._program, "modules", None)
        self._rebuilt = SavedRebuiltCaches(reached() if reached is not None else ())

    def restore(self) -> None:
        """Put the saved state back (the module tree first, then what the program reads).

        :raises CaptureError: something the program reads could not be put back.
        """
        self._rebuilt.put_back()
        for current, saved in self._dicts:
            restore_mapping(current, saved)
        for current, saved in self._lists:
            restore_list(current, saved)
        for current, saved in self._sets:
            restore_set(current, saved)
        restored = []
        for buffer, version, value in self._buffers:  # NOTE [Buffers written by a failed capture]
            if buffer._version != version:
                with torch.no_grad():
                    buffer.copy_(value)
                version = buffer._version
            restored.append((buffer, version, value))
        self._buffers = restored
        if self._program is not None:
            failure = self._program.restore()
            if failure is not None:
                raise CaptureError(
                    f"aotcache: the function changes Python state it reads, and a capture runs the function more "
                    f"than once (NOTE [State changed by a capture]); aotcache could not put that state back "
                    f"between the runs ({failure}), so the traced graph would not be the one eager runs. Change "
                    f"that state outside the compiled function.", reason="unsupported_construct")

    def refuse_advancing_iterators(self) -> None:
        """Before a run of the Python in a capture: refuse a program that reads an iterator each call advances
        (NOTE [Iterators a program advances] in autograd_cache/reachable.py), before the run advances it.

        :raises CaptureError: ``unsupported_construct``; the fallback runs the Python at every call.
        """
        if self._iterators:
            raise CaptureError(
                f"aotcache: the function reads an iterator ({type(self._iterators[0]).__qualname__}: "
                f"itertools.count, a generator, iter(...)) whose next() advances at every call: a graph would "
                f"return the value its capture drew at every call, and the capture would draw more than once. The "
                f"call runs through the fallback, which runs that Python at every call.",
                reason="unsupported_construct")

    def refuse_trace_tensors(self) -> None:
        """After a run of the Python in a capture: when the program state it reads (globals, closure cells, class
        attributes and the containers they hold) was left holding a trace tensor, put the state back and raise
        (NOTE [Tensors stored in program state] in ``module_state.py``).

        :raises CaptureError: ``unsupported_construct``, for any settings; the fallback runs the Python.
        """
        self._rebuilt.put_back()  # not refused: NOTE [Caches a module rebuilds from its weights]
        drop = getattr(self._program, "drop_traced_cache_entries", None)
        if drop is not None:  # NOTE [Trace tensors an lru_cache keeps] in autograd_cache/program_restore.py
            drop()
        find = getattr(self._program, "trace_tensors", None)
        found = find() if find is not None else []
        if not found:
            return
        names = ", ".join(dict.fromkeys(name for name, _ in found[:3]))
        dynamo_safe = not any(bounded_deque(value) for _, value in found)
        sizes_only = not any(holds_trace_tensor(value, sizes=False) for _, value in found)
        try:
            self.restore()
        except CaptureError:
            pass  # refused all the same; what could not be put back stays, as in NOTE [State changed by a capture]
        if sizes_only:
            raise symbolic_size_stored_error(f"in program state ({names})")
        raise CaptureError(
            f"aotcache: the call keeps a tensor it computed in program state ({names}): a graph cannot store a "
            f"tensor in a global, a closure variable or a class attribute at every call, and that state would hold "
            f"the capture's trace tensors. Return the tensor from the function instead, or keep it in a registered "
            f"buffer updated in place (self.buf.copy_(...)).", reason="unsupported_construct", any_settings=True,
            dynamo_safe=dynamo_safe)

    def settings_changed(self) -> bool:
        """Whether the module tree's settings (those an ``aot_module`` selects graphs by) differ from the saved."""
        return self._settings is not None and self._settings.current()[3] != self._settings_id
