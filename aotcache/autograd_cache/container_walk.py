"""How :class:`~aotcache.autograd_cache.reachable.Reachable` writes down containers: tuples, lists, dicts, sets,
deques and slices by their members, a container subclass with the state it holds beside them.

Mappings keep their insertion order; sets are written sorted, their iteration order recorded by
:class:`~aotcache.autograd_cache.set_orders.SetOrderWalk`; a container inside itself or nested too deep is
untrusted. :class:`ContainerWalk` is one part of :class:`Reachable` (a mixin over its state and its ``ref``
dispatch), as :class:`~aotcache.autograd_cache.code_walk.CodeWalk` is.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

from aotcache.autograd_cache.digests import Untrusted
from aotcache.autograd_cache.live_containers import entries_of, members_of
from aotcache.autograd_cache.value_kinds import SET_ORDERED_ENTRIES, order_key, type_name

__all__ = ["ContainerWalk"]

_MAX_NESTING = 100  # containers nested deeper than this: untrusted (never a truncated description)
_ABSENT = object()  # a key a mapping does not hold


class ContainerWalk:
    """The part of :class:`~aotcache.autograd_cache.reachable.Reachable` that writes down containers (it uses the
    walker's state and ``ref``)."""

    def _container_token(self, value: Any, attributes: bool = False) -> str:
        """A container by its members (``attributes``: a dict of attribute names, each value held under its name)."""
        if isinstance(value, slice):
            return f"slice({self.ref(value.start)},{self.ref(value.stop)},{self.ref(value.step)})"
        marker = id(value)
        if marker in self._active_containers:
            raise Untrusted("self-referencing container")
        if len(self._active_containers) >= _MAX_NESTING:
            raise Untrusted("nesting too deep")
        self._active_containers.append(marker)
        if self._guards is not None and not isinstance(value, (tuple, frozenset)):
            self._guards.contents(value)  # mutable: its members by identity (the holder checks the container)
        try:
            kind = type_name(type(value))
            if type(value) not in (tuple, list, dict, set, frozenset, collections.OrderedDict) and not (
                    isinstance(value, tuple) and hasattr(type(value), "_fields")):
                # a user subclass of a container may change how it is read: its class is part of the token
                kind = self.type_ref(type(value)) + self._container_extras(value)
            if isinstance(value, Mapping):
                # insertion order is kept: iteration order can change what the code does
                unordered = SET_ORDERED_ENTRIES.get(f"{type(value).__module__}.{type(value).__qualname__}", ())
                held = self._named_ref if attributes else lambda _name, item: self.ref(item)
                items = [f"{self.ref(k)}={self._set_ordered_token(v) if k in unordered else held(k, v)}"
                         for k, v in entries_of(value)]  # NOTE [Containers another thread changes]
                return f"{kind}{{{','.join(items)}}}"
            if isinstance(value, (set, frozenset)):
                # order members by an index-free key first, so that node indices are assigned deterministically
                members = members_of(value)
                ordered = sorted(members, key=order_key)
                keys = [order_key(v) for v in ordered]
                if len(set(keys)) != len(keys):
                    raise Untrusted("unordered set of indistinguishable objects")
                self._record_set_order(value, members, ordered)  # NOTE [Sets in their iteration order]
                return f"{kind}{{{','.join(self.ref(v) for v in ordered)}}}"
            if isinstance(value, collections.deque):  # its bound decides what an append drops
                kind = f"{kind}[maxlen={value.maxlen}]"
            return f"{kind}({','.join(self.ref(v) for v in members_of(value))})"
        finally:
            self._active_containers.pop()

    # NOTE [Attributes of container subclasses]
    # A container of a subclass (``class Config(dict)`` setting ``self.mode`` in ``__init__``, a
    # ``defaultdict``) holds state beside its members: the instance ``__dict__`` and a ``defaultdict``'s
    # ``default_factory``. Only the members were written down, so ``cfg.mode = "b"`` kept the graph traced with
    # ``"a"`` and was the same fingerprint (found in session 21). Both are part of the token now, the attributes
    # guarded like a plain object's (their dict's entries by identity); a dict that is its own ``__dict__`` (an
    # ``AttrDict``) is written down once, by its members.
    def _container_extras(self, value: Any) -> str:
        """The state a container subclass holds beside its members (NOTE [Attributes of container subclasses])."""
        extras = ""
        if isinstance(value, collections.defaultdict):
            if self._guards is not None:
                self._guards.attributes(value, ("default_factory",))
            extras += f"[default_factory={self.ref(value.default_factory)}]"
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict) and attributes is not value:
            if self._guards is not None:
                self._guards.attributes(value, ("__dict__",))
                self._guards.contents(attributes)  # its entries by identity, as a container's
            # an attribute that mirrors an entry (diffusers' FrozenDict sets one per key) is that entry's token
            unordered = SET_ORDERED_ENTRIES.get(f"{type(value).__module__}.{type(value).__qualname__}", ())
            items = []
            for key, item in entries_of(attributes):
                if isinstance(value, Mapping) and value.get(key, _ABSENT) is item:
                    token = "entry"
                else:
                    token = self._set_ordered_token(item) if key in unordered else self._named_ref(key, item)
                items.append(f"{self.ref(key)}={token}")
            extras += f"[attrs{{{','.join(items)}}}]"
        return extras
