"""Which iteration orders of sets the walk of :class:`~aotcache.autograd_cache.reachable.Reachable` writes down.

A set's members are written sorted (the same token in every process), and the order it iterates in beside them
where the walked code may observe it (NOTE [Sets in their iteration order]): :class:`SetOrderWalk` records each
set under the name it is held by and writes, at the end of the walk, the orders whose names the code reads in a
way that may see an order. It is one part of :class:`Reachable` (a mixin over its state and its ``ref``
dispatch), as :class:`~aotcache.autograd_cache.code_walk.CodeWalk` is.
"""

from __future__ import annotations

import types
from typing import Any

from aotcache.autograd_cache.code_reading import computed_getattr
from aotcache.autograd_cache.program_ownership import UNNAMED_ATTRIBUTE_READS
from aotcache.autograd_cache.value_kinds import is_library

__all__ = ["SetOrderWalk"]

# NOTE [Order-free reads that call back] in code_reading.py
_COMPARISON_METHODS = frozenset({"__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__"})
_SET_OPERATOR_METHODS = frozenset({"__contains__", "__len__", "__bool__", "__iter__", *_COMPARISON_METHODS})


def _overrides_set_operators(cls: type) -> bool:
    """Whether a set's class (a subclass of ``set`` / ``frozenset``) defines an operator ``in``, ``len``, a truth
    test or a comparison calls, which may iterate the set."""
    return cls not in (set, frozenset) and any(
        not _SET_OPERATOR_METHODS.isdisjoint(vars(klass)) for klass in cls.__mro__
        if klass not in (set, frozenset, object))


def _totally_ordered(members: tuple) -> bool:
    """Whether ``sorted`` puts ``members`` in one order whatever order they come in: all str, all bytes, or all
    numbers without a NaN (no two of them neither less nor greater than each other)."""
    kinds = set()
    for member in members:
        kind = type(member)
        if kind is bool or kind is float and member == member:
            kind = int
        if kind not in (str, bytes, int):
            return False
        kinds.add(kind)
    return len(kinds) == 1


class SetOrderWalk:
    """The part of :class:`~aotcache.autograd_cache.reachable.Reachable` that records sets' iteration orders and
    the names values are held under (NOTE [Sets in their iteration order]); it uses the walker's state and ``ref``."""

    # NOTE [Sets in their iteration order]
    # A set's members are written down sorted, so that the token is the same in every process. But code that
    # iterates a set (``for name in self.names``) runs in the set's iteration order, which for strings depends on the
    # hash seed (a new one per process) and for any members on the order they were added in where their hashes
    # collide (``{0, 8}`` and ``{8, 0}`` iterate differently): a warm process with another seed loaded the graph
    # traced in the first one's order (a false cache hit: another result than its eager run), and in-process a set
    # refilled in another order passed the digest check after its guards failed (a stale graph; found in session 23).
    # So the program of a call (``process_state``: the fingerprint and the in-process guards) writes the iteration
    # order of each set with 2+ members beside its sorted members, where code can observe it. Written everywhere (as
    # session 23 did), a program object holding a set of strings no code reads (``self.skip = {"a", "b"}`` tested
    # only with ``in``, an unused frozenset) was another fingerprint in every process under a random hash seed: a
    # trace per process. Each set is recorded with the name it is held under (an object's or module's attribute, a
    # tensor's Python attribute, a function's global, a user module's attribute, a class member; none for a closure
    # cell, a default or a root, whose order is always written), and digest() writes the order of those whose name
    # the walked code uses in a way that may see an order (NOTE [Names whose order the code can observe] in
    # code_reading.py: a loop, a call passing it on, a method of it, a local bound to it, ``getattr(self, "x")``;
    # not ``k in self.x``, ``sorted(self.x)``, ``len(self.x)``, a truth test or a comparison), by their position
    # among all sets recorded (the same in every process). A set inside a list, tuple or dict counts under the name
    # that holds the container (a dict's keys do not narrow it: ``.values()`` and ``.items()`` read entries unnamed).
    # Every order is written where the code may read attributes without naming them: ``vars()``, ``__dict__``,
    # ``getattr`` with a computed name, ``attrgetter``, ``inspect.getmembers``, ``dataclasses.asdict`` / ``astuple``,
    # a positional class pattern (NOTE [Iterators held under names no code reads] in program_ownership.py reads
    # iterators by the same names). Left sorted: the key's digests of compilers and options (a key must not depend
    # on the hash seed), torch's ``_non_persistent_buffers_set`` (bookkeeping), and sets only a library's own code
    # reads by its own names (transformers' ``_no_split_modules``: library code is not walked; a library that
    # iterated a set of str to build a graph would give each process another eager result). Iterated constants of
    # the code itself (``for n in {"a", "b"}`` compiles to a frozenset constant) are written with their order in the
    # code digest; one only tested with ``in`` is sorted. Still written though order-free: a user dataclass's fields
    # (its generated ``__eq__`` / ``__repr__``, walked as dunders, load each field into a tuple or a string).
    def _record_set_order(self, value: Any, members: tuple, ordered: list) -> None:
        """Record a set's iteration order (positions among ``ordered``; "" where it is the sorted order) under the
        name it is held by (NOTE [Sets in their iteration order]); a subclass overriding an operator under no name
        (NOTE [Order-free reads that call back] in code_reading.py)."""
        if not self.process_state or len(members) < 2 or self._sets_sorted:
            return
        position = {id(member): index for index, member in enumerate(ordered)}
        order = [position[id(member)] for member in members]
        name = None if _overrides_set_operators(type(value)) else self._entry_name
        self._set_orders.append((name, "" if order == sorted(order) else f"{order}", _totally_ordered(members)))

    def _observed_set_orders(self) -> str:
        """The iteration orders the walked code may observe, by the position of their set among those recorded
        (NOTE [Sets in their iteration order])."""
        if not any(order for _, order, _ in self._set_orders):
            return ""
        unnamed = (not UNNAMED_ATTRIBUTE_READS.isdisjoint(self._names) or "__match_args__" in self._order_names
                   or any(isinstance(o, types.FunctionType) and computed_getattr(o.__code__) for o in self._objects))
        # NOTE [Order-free reads that call back] in code_reading.py: a comparison may run a user's method
        compared = any(not is_library(self._objects[index].__module__) and
                       not _COMPARISON_METHODS.isdisjoint(vars(self._objects[index])) for index in self._classes)
        return ",".join(f"{index}:{order}" for index, (name, order, total) in enumerate(self._set_orders)
                        if order and (name is None or unnamed or name in self._order_names
                                      or (compared and name in self._compared_names)
                                      or (not total and name in self._sorted_names)))

    def _named_ref(self, name: Any, value: Any) -> str:
        """:meth:`ref` of a value held under ``name`` (an attribute, global or member; NOTE [Sets in their
        iteration order])."""
        outer, self._entry_name = self._entry_name, name if isinstance(name, str) else None
        try:
            return self.ref(value)
        finally:
            self._entry_name = outer

    def _set_ordered_token(self, value: Any) -> str:
        """NOTE [Set-ordered library metadata]: a list of strings made from a set, by its sorted members."""
        if not isinstance(value, list) or not all(type(item) is str for item in value):
            return self.ref(value)
        if self._guards is not None:
            self._guards.contents(value)
        return f"sorted({','.join(sorted(self.ref(item) for item in value))})"
