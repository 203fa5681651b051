"""The state changes a captured call's Python makes to its model, as a replayable delta: plain values assigned to
attributes of the module tree and of the plain objects it holds (``config.problem_type``), recorded with the
call's fingerprint alias so that a warm start makes them without tracing (NOTE [Replaying a call's state
change]).

NOTE [Replaying a call's state change]
A call that assigns state its fingerprint covers (transformers' classifiers set ``config.problem_type`` on their
first call with labels) cannot be served by an alias alone: a graph runs no Python, so the assignment would never
happen (NOTE [State changed by the call] in ``fingerprint_cache.py``). Such an alias records the change too, as a
:class:`StateDelta`: for each attribute changed, where it is (child module names from the ``aot_module``'s root,
then attribute names through plain objects), its value before (or "absent") and after. A delta is recorded
only when it is the whole change and can be written back exactly:

* every changed attribute held, before and after, a *plain value*: None, bool, int, float, str, or a tuple of
  those (exact types: a subclass such as an enum is not plain), compared and stored by value (a float by its
  hex form, so ``-0.0`` and NaN keep their bits);
* nothing else changed in the state :class:`StateSnapshot` watches: a submodule or tensor replaced, an attribute
  deleted, a list, dict or set changed in place (BigBird's ``set_attention_type`` swapping attention submodules;
  a history list appended to) make the call not replayable, and it keeps today's behaviour (no alias, a warm
  start traces);
* every str assigned (also in a tuple) is interned (a literal that is an identifier, such as
  ``"single_label_classification"``, or ``sys.intern``-ed): the replay writes the warm process's interned str of
  that text, the object its own literal is, so a later ``self.mode is MODE`` behaves as in eager. A str built at
  run time or a literal with a space is another object than any copy a record could give back (found in review:
  a replayed ``self.mode = "x mode"`` failed the next call's ``self.mode is MODE`` test, which took the other
  branch); such a change is not replayed. The identity of an int, float or tuple is not kept (known limit);
* the capture was static (no dynamic dimension: every size and Python scalar of the call is then part of the
  fingerprint, so the delta is a function of the fingerprint, as the graph is);
* checked on the cold path with the fingerprint itself: the state with the delta undone must give the
  fingerprint the call started from, and the delta written back from its record (new value objects) must give
  the fingerprint the capture left. So a change the snapshot cannot see (a slot, an object deeper than it
  looks, an ambient flag) but the fingerprint covers makes the call not replayable, and replaying the record
  reproduces what the fingerprint sees of eager's state after the call.

A warm start through such an alias (``compile_with_fingerprint``) loads the entry (its guards must hold and be
those recorded), then :meth:`StateDelta.apply` checks each attribute's value before against the record and
writes the values after; the fingerprint computed again must equal the recorded "after" digest. Any mismatch
puts every attribute back as it was and the call traces (counted as ``fingerprint_replay_refused``), so a
replay is never a wrong hit, only at worst a trace. The writes go straight to the objects' ``__dict__`` (as
``nn.Module.__setattr__`` stores a plain value), under the compiled function's lock; another thread running
the model's Python at the same moment races as it does with eager.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["StateDelta", "StateSnapshot", "Change", "StateBeforeCall", "encode_plain", "decode_plain"]

_MISSING = object()


def _put(attributes: dict, name: str, value: Any) -> None:
    """Set ``name`` in an object's ``__dict__`` to ``value``, or remove it where ``value`` is ``_MISSING``."""
    if value is _MISSING:
        attributes.pop(name, None)
    else:
        attributes[name] = value

_MAX_DEPTH = 3  # plain objects followed below a module (config -> text_config -> ...)
_MAX_TUPLE_DEPTH = 3
_MAX_ITEMS = 64  # tuple items
_MAX_TEXT = 4096  # characters of a str
_MAX_CHANGES = 64
_NOT_PLAIN_OBJECTS = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType,
                      nn.Module, torch.Tensor)


def encode_plain(value: Any, depth: int = 0) -> list | None:
    """The JSON token of a plain value (NOTE [Replaying a call's state change]), or None when ``value`` is not
    one."""
    kind = type(value)
    if value is None:
        return ["none"]
    if kind is bool:
        return ["bool", value]
    if kind is int:
        return ["int", str(value)]
    if kind is float:
        return ["float", value.hex()]
    if kind is str:
        return ["str", value] if len(value) <= _MAX_TEXT else None
    if kind is tuple and depth < _MAX_TUPLE_DEPTH and len(value) <= _MAX_ITEMS:
        items = [encode_plain(item, depth + 1) for item in value]
        return None if any(item is None for item in items) else ["tuple", items]
    return None


def decode_plain(token: Any, depth: int = 0) -> Any:
    """The value of a token written by :func:`encode_plain` (tuples nested no deeper than it writes them).

    :raises ValueError: ``token`` is not such a token.
    """
    try:
        tag = token[0]
        if tag == "none" and len(token) == 1:
            return None
        if len(token) != 2:
            raise ValueError(f"plain-value token of {len(token)} items")
        if tag == "bool" and type(token[1]) is bool:
            return token[1]
        if tag == "int" and type(token[1]) is str:
            return int(token[1])
        if tag == "float" and type(token[1]) is str:
            return float.fromhex(token[1])
        if tag == "str" and type(token[1]) is str:
            return sys.intern(token[1])  # the object an interned constant of this process is (NOTE above)
        if tag == "tuple" and type(token[1]) is list and depth < _MAX_TUPLE_DEPTH and len(token[1]) <= _MAX_ITEMS:
            return tuple(decode_plain(item, depth + 1) for item in token[1])
    except (TypeError, IndexError, KeyError) as exc:
        raise ValueError(f"malformed plain-value token: {exc}") from None
    raise ValueError(f"unknown plain-value token {str(token)[:60]}")


def _same_object_when_replayed(value: Any) -> bool:
    """Whether :func:`decode_plain` gives back ``value`` itself, not a copy, in any process: a str that is
    interned (every str of a tuple too); None, bools, numbers and tuples are taken as values (a known limit)."""
    if type(value) is tuple:
        return all(_same_object_when_replayed(item) for item in value)
    if type(value) is not str:
        return True
    probe = (value + "\0")[:-1]  # an equal str, another object (unless a shared one-character singleton)
    return probe is value or sys.intern(probe) is value


def _plain_object(value: Any) -> bool:
    """Whether ``value`` is an attribute bag to look into (a config): it has a ``__dict__`` and is not a class,
    function, module, torch module or tensor."""
    return not isinstance(value, _NOT_PLAIN_OBJECTS) and type(getattr(value, "__dict__", None)) is dict


def _contents(value: Any) -> Any:
    """A copy of a mutable container's members (to see an in-place change), else None."""
    if isinstance(value, (list, collections.deque)):
        return list(value)
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, set):
        return set(map(id, value))
    return None


def _same_contents(value: Any, saved: Any) -> bool:
    """Whether a container holds the members :func:`_contents` saved (by identity; dict keys also by equal text)."""
    current = _contents(value)
    if isinstance(value, set):
        return current == saved
    if len(current) != len(saved):
        return False
    if isinstance(value, dict):
        return all((key is old_key or (type(key) is str and key == old_key)) and item is old_item
                   for (key, item), (old_key, old_item) in zip(current, saved))
    return all(item is old for item, old in zip(current, saved))


Steps = tuple[tuple[str, str], ...]  # ("m", child module name) or ("a", attribute name), from the root


def _where(steps: Steps, name: str) -> str:
    return ".".join([step for _, step in steps] + [name])


def _resolve(root: nn.Module, steps: Steps) -> Any:
    """The object ``steps`` lead to from ``root`` (through ``_modules`` and ``__dict__`` only), or None."""
    obj: Any = root
    for kind, name in steps:
        if kind == "m":
            children = vars(obj).get("_modules") if isinstance(obj, nn.Module) else None
            obj = children.get(name) if isinstance(children, dict) else None
            if not isinstance(obj, nn.Module):
                return None
        elif kind == "a":
            attributes = getattr(obj, "__dict__", None)
            obj = attributes.get(name) if type(attributes) is dict else None
            if not _plain_object(obj):
                return None
        else:
            return None
    return obj


@dataclass(frozen=True)
class Change:
    """One attribute a call assigned: where (``steps`` from the root, then ``name``), its plain value before
    (a token; None: the attribute was absent) and after."""

    steps: Steps
    name: str
    before: list | None
    after: list

    def where(self) -> str:
        return _where(self.steps, self.name)


@dataclass(frozen=True)
class StateDelta:
    """The plain-value assignments of one call, to replay at a warm start (NOTE [Replaying a call's state
    change])."""

    changes: tuple[Change, ...]

    def to_json(self) -> list:
        return [[[list(step) for step in change.steps], change.name, change.before, change.after]
                for change in self.changes]

    @classmethod
    def from_json(cls, data: Any) -> StateDelta:
        """:raises ValueError: ``data`` is not a delta :meth:`to_json` wrote (values checked by decoding them)."""
        if type(data) is not list or not data or len(data) > _MAX_CHANGES:
            raise ValueError("a state delta is a non-empty list of changes")
        changes = []
        try:
            for steps, name, before, after in data:
                if type(name) is not str or any(len(step) != 2 or step[0] not in ("m", "a") or type(step[1]) is not str
                                                for step in steps):
                    raise ValueError("malformed state-delta change")
                if before is not None:
                    decode_plain(before)
                decode_plain(after)
                changes.append(Change(tuple((str(kind), str(step)) for kind, step in steps), name, before, after))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed state delta: {exc}") from None
        return cls(tuple(changes))

    def describe(self) -> str:
        return ", ".join(change.where() for change in self.changes)

    def apply(self, root: nn.Module) -> Callable[[], None] | None:
        """Write the values after into the live objects under ``root`` when every attribute holds the value
        before (absent where recorded absent); returns the undo (puts back the very objects found), or None,
        having written nothing, when the state is not the recorded one."""
        targets = []
        for change in self.changes:
            obj = _resolve(root, change.steps)
            attributes = getattr(obj, "__dict__", None) if obj is not None else None
            if type(attributes) is not dict:
                return None
            current = attributes.get(change.name, _MISSING)
            if change.before is None:
                if current is not _MISSING:
                    return None
            elif current is _MISSING or encode_plain(current) != change.before:
                return None
            targets.append((attributes, change.name, current, decode_plain(change.after)))
        if len({(id(attributes), name) for attributes, name, _, _ in targets}) != len(targets):
            return None
        for attributes, name, _, value in targets:
            attributes[name] = value

        def undo() -> None:
            for attributes, name, old, _ in reversed(targets):
                _put(attributes, name, old)

        return undo


class StateBeforeCall:
    """Kept on a runtime whose call's change was replayed (``before_call_state``): ``with it() as reset``, each
    ``reset()`` puts the changed attributes back to their values before the call, and leaving the block restores
    the values found at entry. A capture of that call again (the joint graph for a double backward, NOTE [Double
    backward through the joint graph] in aot/double_backward.py) runs the Python from the call's state, as the first
    capture did, and leaves the state as it found it.

    :raises ValueError: on entry, when an attribute's object is no longer where the change was recorded.
    """

    def __init__(self, delta: StateDelta, root: nn.Module) -> None:
        self._delta = delta
        self._root = root

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Callable[[], None]]:
        found = []
        for change in self._delta.changes:
            attributes = getattr(_resolve(self._root, change.steps), "__dict__", None)
            if type(attributes) is not dict:
                raise ValueError(f"{change.where()} is no longer an attribute of the model")
            found.append((attributes, change.name, attributes.get(change.name, _MISSING), change.before))

        def reset() -> None:
            for attributes, name, _, before in found:
                _put(attributes, name, _MISSING if before is None else decode_plain(before))

        try:
            yield reset
        finally:
            for attributes, name, live, _ in found:
                _put(attributes, name, live)


class StateSnapshot:
    """What a call may change of an ``aot_module``'s state, saved before its capture: every submodule's
    ``__dict__``, that of the plain objects they hold (to a small depth), and the members of the containers
    held in those (``_modules``, ``_parameters``, hook registries, a list attribute)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._objects: list[tuple[Steps, Any, dict]] = []
        self._containers: list[tuple[Steps, str, Any, Any]] = []
        self._originals: dict[int, Any] = {}  # id(change) -> what it replaced, for the changes of the last delta()
        seen: set[int] = set()
        for path, module in root.named_modules():
            self._add(tuple(("m", part) for part in path.split(".")) if path else (), module, seen, 0)

    def _add(self, steps: Steps, obj: Any, seen: set[int], depth: int) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        attributes = vars(obj)
        self._objects.append((steps, obj, dict(attributes)))
        for name, value in attributes.items():
            contents = _contents(value)
            if contents is not None:
                self._containers.append((steps, name, value, contents))
            elif depth < _MAX_DEPTH and _plain_object(value):
                self._add(steps + (("a", name),), value, seen, depth + 1)

    def delta(self) -> StateDelta | str:
        """The plain-value changes made since the snapshot, or why they cannot be replayed (a sentence)."""
        changes = []
        self._originals.clear()
        for steps, obj, saved in self._objects:
            current = vars(obj)
            if len(current) == len(saved) and all(current.get(name, _MISSING) is value
                                                  for name, value in saved.items()):
                continue
            for name in saved:
                if name not in current:
                    return f"the call deletes {_where(steps, name)}"
            for name, value in current.items():
                old = saved.get(name, _MISSING)
                if old is value:
                    continue
                after = encode_plain(value)
                before = None if old is _MISSING else encode_plain(old)
                if after is None or (old is not _MISSING and before is None):
                    shown = value if after is None else old
                    return f"the call sets {_where(steps, name)} to a {type(shown).__name__}"
                if before != after and not _same_object_when_replayed(value):
                    return (f"the call sets {_where(steps, name)} to a str that is not interned (a replayed copy "
                            "would fail an `is` test the original passes)")
                if before != after:
                    change = Change(steps, name, before, after)
                    self._originals[id(change)] = old
                    changes.append(change)
        for steps, name, container, saved in self._containers:
            owner = _resolve(self.root, steps)
            if owner is not None and vars(owner).get(name) is container and not _same_contents(container, saved):
                if name == "_modules" and isinstance(owner, nn.Module):
                    return f"the call replaces a submodule of {_where(steps, '')[:-1] or 'the model'}"
                return f"the call changes {_where(steps, name)} in place"
        if len(changes) > _MAX_CHANGES:
            return f"the call changes {len(changes)} attributes"
        return StateDelta(tuple(changes))

    def check_replay(self, delta: StateDelta, fingerprint: Callable[[], Any], before: str, after: str) -> str | None:
        """Whether ``delta`` (from :meth:`delta`) is the whole change the fingerprint sees: with it undone the
        fingerprint must be ``before``, and with it replayed from its record ``after`` (NOTE [Replaying a call's
        state change]). The state is left as found (the same objects). Returns None, or what failed."""
        found = []
        for change in delta.changes:
            attributes = vars(_resolve(self.root, change.steps))
            found.append((attributes, change.name, attributes[change.name], self._originals[id(change)]))
        try:
            for attributes, name, _, old in found:
                _put(attributes, name, old)
            undone = fingerprint()
            if not undone.trusted or undone.digest != before:
                return "the fingerprint sees more changes than the attributes assigned"
            if delta.apply(self.root) is None:
                return "the recorded change does not apply to the state it was recorded from"
            replayed = fingerprint()
            if not replayed.trusted or replayed.digest != after:
                return "the change replayed from its record gives another fingerprint"
            return None
        finally:
            for attributes, name, value, _ in found:
                attributes[name] = value
