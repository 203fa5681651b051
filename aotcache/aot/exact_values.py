"""Plain values compared exactly: by type, and floats by their bits, where ``==`` would call them equal.

NOTE [Floats by bits]
``0.0 == -0.0`` and ``nan != nan``: compared by value, a graph traced with ``0.0`` baked in would be reused for
``-0.0`` (``1 / x`` gives +inf where eager gives -inf), and a NaN would never match itself (a re-trace on every
call). Float and complex constants are compared by their IEEE-754 bits instead.

NOTE [Plain values by type]
``1 == 1.0 == True`` (and their hashes agree), but ``x * 1`` keeps an int tensor's dtype where ``x * 1.0``
promotes it to float. A module setting compared with ``==`` (``self.k = 1`` then ``self.k = 1.0``) kept the
graph traced with the int: an int64 result where eager gives float32. :func:`exact_value` is the key such values
are compared by: the type, then the value (floats by bits), at every depth of tuples, lists and dicts.

NOTE [NaNs written down by bits]
``repr(float("-nan"))`` is ``'nan'``, as is every NaN's, whatever its sign bit and payload. Written down by
``repr``, a program global rebound from ``nan`` to ``-nan`` walked to the same digest (the graph traced with the
old one kept: ``math.copysign(1.0, v)`` gave 1 where eager gives -1), and a NaN argument or graph constant was
the same fingerprint and cache key either way (found in session 21). :func:`exact_repr` is ``repr`` except for a
float or complex holding a NaN, which it writes with its bits: every other value keeps the token it had.

NOTE [Sets and dataclasses compared exactly]
A frozenset or a frozen dataclass passed as an argument is a constant compared by ``==``, which compares a set's
members in no order and a dataclass's fields with ``==``: ``frozenset({0, 8})`` and one filled ``8`` first are equal
but iterate ``0, 8`` and ``8, 0`` (a loop over it traces another graph), ``Cfg(k=1) == Cfg(k=1.0)`` although
``x * cfg.k`` keeps an int dtype for one, and ``Cfg(k=0.0) == Cfg(k=-0.0)`` although ``1 / cfg.k`` differs in sign.
The graph traced for the first was reused for the second (stale results, found in session 23). A set's members are
compared in their iteration order (one of members all of one exactly-compared type, the usual set of names, by a
C-level copy), a dataclass by its class and its whole instance state, each attribute exactly.
NOTE [Dataclasses by their whole state] (session 24 review) The dataclass's fields with ``compare=True`` were compared
beside its own ``==``, which left three holes and brought two crashes: a field declared ``compare=False``
(``mode: str = field(compare=False)``) and an attribute ``__post_init__`` sets from an ``InitVar`` are not in
``==``, so a forward reading either reused the graph of the other value (a false hit, found before session 23 too);
an ``InitVar`` pseudo-field has no attribute to read (``AttributeError``: a job eager runs failed); a dataclass
holding itself recursed without end. The key is the class and every instance attribute (``__dict__`` and slots,
each exactly), so two instances get one key only when a forward can read nothing different from them. A tensor
inside such a constant (``==`` is elementwise: ``Cfg(t1) == Cfg(t2)`` raised in the signature lookup) and a value
nested deeper than ``_MAX_DEPTH`` cannot be compared so: :func:`exact_value` raises ``TypeError`` and the argument
is refused (NOTE [Constant arguments] in signature.py: it takes the fallback).

NOTE [Objects compared by identity inside a constant] (session 25 review) An argument compared by identity is
refused (its changes in place would not be seen), but one nested in a constant was keyed by itself: a frozen
dataclass or a frozenset holding a plain object (``Cfg(opts)``, ``frozenset({opts})``) kept the graph traced with
``opts.scale == 2.0`` after ``opts.scale = 3.0``, and an ``attrs`` class (``@attrs.frozen``) was compared by its
own ``==`` (``ACfg(k=1) == ACfg(k=1.0)``: the int graph for a float setting). An ``attrs`` instance is keyed as a
dataclass is, by its whole state; an object compared by identity by itself and its whole state (a tensor there is
refused, as in a dataclass). Functions, modules, enums and partials keep their identity alone.
"""

from __future__ import annotations

import enum
import functools
import struct
import types
from typing import Any

import torch

__all__ = ["float_bits", "exact_value", "exact_repr"]

# types whose ``==`` is exact between two values of the type: the common settings, keyed without further checks
EXACT_BY_EQUALITY = frozenset({bool, int, str, bytes, type(None)})  # types whose ``==`` is already exact


def float_bits(value: float | complex) -> bytes:
    """The IEEE-754 bits of a float or complex (sign of zero and NaN payloads included)."""
    if isinstance(value, complex):
        return struct.pack("<dd", value.real, value.imag)
    return struct.pack("<d", value)


_MAX_DEPTH = 64  # NOTE [Dataclasses by their whole state]: deeper (or a value holding itself) is not compared
# objects compared by identity whose own state no forward reads as a setting (functions, classes' members, enums)
_STATELESS_IDENTITY_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial,
                             types.ModuleType, enum.Enum, torch.Generator, torch._ops.OpOverload,
                             torch._ops.OpOverloadPacket)


def exact_value(value: Any, *, object_state: bool = False) -> Any:
    """A hashable key of a plain value, equal for two values only when they have the same types and the same
    values, floats bit for bit, at every depth of tuples, lists, dicts, sets and dataclasses (NOTE [Plain values by
    type], NOTE [Sets and dataclasses compared exactly]); ``object_state``: an object compared by identity with its
    whole state too (a constant argument: NOTE [Objects compared by identity inside a constant]).

    :raises TypeError: a value that cannot be compared so (a tensor inside it, nesting past ``_MAX_DEPTH``).
    """
    return _exact(value, 0, object_state)


def _exact(value: Any, depth: int, object_state: bool = False) -> Any:
    cls = type(value)
    if cls in EXACT_BY_EQUALITY:  # the usual settings (``training``, ``p`` as an int, names): no more to do
        return (cls, value)
    if isinstance(value, (float, complex)):
        return (cls, float_bits(value))
    if depth >= _MAX_DEPTH:
        raise TypeError("nested too deep to be compared exactly")
    depth += 1
    if isinstance(value, (tuple, list)):
        return (cls, tuple([_exact(item, depth, object_state) for item in value]))
    if isinstance(value, dict):
        return (cls, tuple([(_exact(key, depth, object_state), _exact(item, depth, object_state))
                            for key, item in value.items()]))
    if isinstance(value, (set, frozenset)):  # NOTE [Sets and dataclasses compared exactly]: in iteration order
        kinds = set(map(type, value))
        if len(kinds) == 1 and next(iter(kinds)) in EXACT_BY_EQUALITY:
            return (cls, kinds.pop(), tuple(value))
        return (cls, tuple([_exact(item, depth, object_state) for item in value]))
    if isinstance(value, torch.Tensor):
        raise TypeError("a tensor inside a constant compares elementwise")
    if isinstance(value, type):
        return (cls, value)
    if getattr(cls, "__dataclass_fields__", None) is not None or getattr(cls, "__attrs_attrs__", None) is not None:
        return (cls, tuple([(name, _exact(item, depth, object_state)) for name, item in _instance_state(value)]))
    if object_state and cls.__eq__ is object.__eq__ and not isinstance(value, _STATELESS_IDENTITY_TYPES):
        # NOTE [Objects compared by identity inside a constant]
        state = _instance_state(value)
        return (cls, value, tuple([(name, _exact(item, depth, object_state)) for name, item in state]))
    return (cls, value)


def _instance_state(value: Any) -> list[tuple[str, Any]]:
    """Every attribute of an instance: its ``__dict__`` and its slots (NOTE [Dataclasses by their whole state])."""
    attributes = getattr(value, "__dict__", None)
    state = list(attributes.items()) if isinstance(attributes, dict) else []
    for name in _slot_names(type(value)):
        if hasattr(value, name):
            state.append((name, getattr(value, name)))
    return state


@functools.lru_cache(maxsize=1024)
def _slot_names(cls: type) -> tuple[str, ...]:
    """The slots of ``cls`` and its bases, private ones by their mangled names."""
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name.startswith("__") and not name.endswith("__"):  # stored under its mangled name
                name = f"_{klass.__name__.lstrip('_')}{name}"
            if name not in ("__dict__", "__weakref__"):
                names.append(name)
    return tuple(names)


def exact_repr(value: Any) -> str:
    """``repr(value)`` of a plain value, except that a float or complex holding a NaN is written with its IEEE-754
    bits (NOTE [NaNs written down by bits])."""
    if isinstance(value, (float, complex)) and value != value:  # only a NaN (or a complex with one) is unequal
        return f"{type(value).__name__}-bits:{float_bits(value).hex()}"
    return repr(value)
