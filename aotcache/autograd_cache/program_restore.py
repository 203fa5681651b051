"""Put back what a program reads: the state a capture's earlier run of the function changed.

:class:`SavedProgramState` saves, when a capture starts, everything the program guards of the call recorded
(NOTE [Program guards]): the dict slots (globals, class and object attributes), the other attributes (closure
cells, ``__class__``, ``__slots__``), the containers and attribute dicts whose entries they count, and the pinned
environment. :meth:`SavedProgramState.restore` writes back what differs, so the next run of the function's Python
starts from the state of the call (NOTE [State changed by a capture] in ``aot/call_state.py``).
"""

from __future__ import annotations

import collections
import functools
import os
from types import FunctionType, MappingProxyType
from typing import Any

from aotcache.aot.call_state import restore_list, restore_mapping, restore_set
from aotcache.aot.module_state import holds_trace_tensor, trace_tensor_ids
from aotcache.aot.rebuilt_caches import modules_among
from aotcache.autograd_cache.live_containers import entries_of
from aotcache.autograd_cache.program_guards import ProgramGuards

__all__ = ["SavedProgramState"]

_MISSING = object()
# containers restored in place, subclasses included, with their saved members (others: see ``restore``)
_RESTORABLE = (dict, list, set, MappingProxyType, collections.deque)


def _saved_copy(container: Any) -> Any:
    if isinstance(container, (dict, MappingProxyType)):
        return dict(container)
    if isinstance(container, (list, collections.deque)):
        return list(container)
    if isinstance(container, set):
        return set(container)
    return None


class SavedProgramState:
    """The values of a program's recorded reads at one moment (copies of containers, one level deep)."""

    def __init__(self, guards: ProgramGuards) -> None:
        self._guards = guards
        self._containers = [(container, _saved_copy(container)) for container in guards.sized
                            if isinstance(container, _RESTORABLE)]
        self._environment = dict(zip(guards.env_names, guards.env_values))
        # NOTE [Rebound containers are put back as the call found them]
        # A rebound list attribute's guard compares members, so it holds for the user's new list with the same
        # members (``m.masks = list(m.masks)``) without a walk: the container the walk saw is an older one. A
        # restore wrote that one back, so after the capture the module held the old list and the user's later
        # changes to their list went unseen (a stale result). What each such slot holds when the capture starts
        # is what is put back, and its members too where the walk never saw it.
        self._member_entries = [holder.get(key, _MISSING) for holder, key in
                                zip(guards.member_holders, guards.member_keys)]
        seen = {id(container) for container, _ in self._containers}
        self._containers.extend((entry, _saved_copy(entry)) for entry in self._member_entries
                                if isinstance(entry, _RESTORABLE) and id(entry) not in seen)
        # the namespaces holding the recorded slots (globals, class and object attributes), whole: a global the
        # function creates or rebinds to a trace tensor is put back too (NOTE [Tensors stored in program state])
        namespaces = {id(holder): holder for holder in (*guards.holders, *guards.member_holders)
                      if isinstance(holder, (dict, MappingProxyType))}
        self._namespaces = [(holder, dict(holder)) for holder in namespaces.values()]
        # trace tensors already there (another trace's, kept by the user) are not this capture's
        self._known = frozenset(trace_tensor_ids([*(value for _, saved in self._namespaces for value in saved.values()),
                                                  *guards.sized, *guards.attribute_values]))
        self._cache_entries = [(cache, dict(entries_of(cache))) for cache, _ in guards.caches]

    # NOTE [Trace tensors an lru_cache keeps] (session 25 review)
    # A ``functools.cache`` function computing a tensor (``@functools.cache def positions(n): return
    # torch.arange(float(n))``, a mask, a rotary table) called by the forward was first called by the capture: the
    # cache kept the trace's fake tensor, the capture's next run read it as a constant and was refused, and the
    # fallback left it there, so every later eager call of the model raised ("FunctionalTensor on its own"). After
    # each run of the Python in a capture (and when it gives up), an entry the run added whose key or value holds a
    # trace tensor is taken out of the cache again: the next run computes it anew, the graph holds those ops, and
    # eager's first call fills the cache with real tensors (as under torch.compile, whose Dynamo ignores the cache
    # wrapper). A bounded cache's values are C links no walk can read: such a value stays (a known gap).
    def drop_traced_cache_entries(self) -> None:
        """Take out the lru_cache entries a capture's run added that hold a trace tensor (NOTE [Trace tensors an
        lru_cache keeps])."""
        for cache, saved in self._cache_entries:
            for key, value in entries_of(cache):
                if saved.get(key, _MISSING) is value:
                    continue
                if holds_trace_tensor(key, known=self._known) or (
                        type(value).__name__ != "_lru_list_elem" and holds_trace_tensor(value, known=self._known)):
                    cache.pop(key, None)

    def modules(self) -> list:
        """The modules the recorded reads reach (values of globals, closure cells, attributes, and the items of the
        containers the walk saw), whose own caches a capture puts back (NOTE [Caches a module rebuilds from its
        weights] in ``aot/rebuilt_caches.py``)."""
        guards = self._guards
        return modules_among([*guards.values, *guards.attribute_values, *self._member_entries,
                              *(container for container in guards.sized if isinstance(container, (dict, list, tuple)))])

    def trace_tensors(self) -> list[tuple[str, Any]]:
        """Where the program state now holds a tensor of a trace (NOTE [Tensors stored in program state] in
        ``aot/module_state.py``): ``(name, value)`` pairs, a global or attribute by its name, else by its type."""
        found: list[tuple[str, Any]] = []
        seen: set[int] = set()
        for holder, saved in self._namespaces:
            owner = self._guards.owner_of(holder) if isinstance(holder, MappingProxyType) else None
            for key, value in list(holder.items()):
                if id(value) not in seen and holds_trace_tensor(value, known=self._known):
                    seen.add(id(value))
                    found.append((f"{owner.__name__}.{key}" if owner is not None else str(key), value))
        cells = {id(cell): name for obj in self._guards.objects  # a closure variable by its name
                 if isinstance(obj, FunctionType)  # not getattr probes: some objects answer any name
                 for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ())}
        for obj, name in zip(self._guards.objects, self._guards.names):
            value = getattr(obj, name, None)
            if id(value) not in seen and holds_trace_tensor(value, known=self._known):
                seen.add(id(value))
                found.append((f"closure variable {cells.get(id(obj), '?')}" if name == "cell_contents"
                              else f"{type(obj).__name__}.{name}", value))
        for container in self._guards.sized:
            if id(container) not in seen and holds_trace_tensor(container, known=self._known):
                seen.add(id(container))
                found.append((f"a {type(container).__name__}", container))
        return found

    def restore(self) -> str | None:
        """Write back whatever differs from the saved state; None when the program reads the saved state again,
        else what could not be put back (a tensor constant changed in place, a container of another type)."""
        guards = self._guards
        self.drop_traced_cache_entries()  # NOTE [Trace tensors an lru_cache keeps]
        guards.refresh_caches()  # an lru_cache's values are not put back: NOTE [Values an lru_cache holds]
        for holder, saved in self._namespaces:  # entries the guards do not cover: only those left holding a trace
            for key in [key for key, value in holder.items()  # tensor (NOTE [Tensors stored in program state])
                        if saved.get(key, _MISSING) is not value and holds_trace_tensor(value, known=self._known)]:
                try:
                    self._put_entry(holder, key, saved.get(key, _MISSING))
                except (AttributeError, TypeError, KeyError) as exc:
                    return f"entry {key!r} of a {type(holder).__name__} ({exc})"
        if guards.holds():
            return None
        for container, saved in self._containers:
            try:
                self._restore_container(container, saved)
            except (AttributeError, TypeError, KeyError) as exc:  # a subclass refusing the write
                return f"a {type(container).__name__} ({exc})"
        for holder, key, value in zip((*guards.holders, *guards.member_holders), (*guards.keys, *guards.member_keys),
                                      (*guards.values, *self._member_entries)):
            if value is _MISSING:  # not there when the capture started (the guards then failed): nothing to put
                continue
            try:
                self._set_entry(holder, key, value)
            except (AttributeError, TypeError) as exc:
                return f"entry {key!r} of a {type(holder).__name__} ({exc})"
        for obj, name, value in zip(guards.objects, guards.names, guards.attribute_values):
            try:
                if getattr(obj, name) is value:
                    continue
            except (AttributeError, ValueError):  # deleted, or a closure cell emptied
                pass
            try:
                setattr(obj, name, value)
            except (AttributeError, TypeError):
                try:  # a class whose __setattr__ refuses (a read-only config): its slot or attribute directly
                    object.__setattr__(obj, name, value)
                except (AttributeError, TypeError) as exc:
                    return f"attribute {name} of a {type(obj).__name__} ({exc})"
        for name, value in self._environment.items():
            if os.environ.get(name) != value:
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        if guards.holds():
            return None
        if guards.tensors and [tensor._version for tensor in guards.tensors] != guards.versions:
            return "a tensor constant changed in place"
        unknown = [type(c).__name__ for c in guards.sized if not isinstance(c, _RESTORABLE)]
        return f"a container of type {unknown[0]}" if unknown else "state read by the program"

    def _restore_container(self, container: Any, saved: Any) -> None:
        if isinstance(container, MappingProxyType):  # a class's namespace: through the class
            owner = self._guards.owner_of(container)
            if owner is not None:
                restore_mapping(container, saved, functools.partial(delattr, owner), functools.partial(setattr, owner))
        elif isinstance(container, dict):
            restore_mapping(container, saved)
        elif isinstance(container, list):
            restore_list(container, saved)
        elif isinstance(container, collections.deque):
            if len(container) != len(saved) or any(a is not b for a, b in zip(container, saved)):
                container.clear()
                container.extend(saved)
        else:  # a set
            restore_set(container, saved)

    def _put_entry(self, holder: Any, key: Any, value: Any) -> None:
        """``holder[key] = value``, or the entry deleted where ``value`` is missing (through a class's view)."""
        owner = self._guards.owner_of(holder) if isinstance(holder, MappingProxyType) else None
        if value is _MISSING:
            if owner is not None:
                delattr(owner, key)
            elif not isinstance(holder, MappingProxyType):
                del holder[key]
        elif owner is not None:
            setattr(owner, key, value)
        elif not isinstance(holder, MappingProxyType):
            holder[key] = value

    def _set_entry(self, holder: Any, key: Any, value: Any) -> None:
        if holder.get(key, _MISSING) is value:
            return
        if isinstance(holder, MappingProxyType):
            owner = self._guards.owner_of(holder)
            if owner is not None:
                setattr(owner, key, value)
        else:
            holder[key] = value
