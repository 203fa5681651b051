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
compared in their iteration order, a dataclass's compared fields each exactly, beside the dataclass's own ``==``.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["float_bits", "exact_value", "exact_repr"]

# types whose ``==`` is exact between two values of the type: the common settings, keyed without further checks
EXACT_BY_EQUALITY = frozenset({bool, int, str, bytes, type(None)})  # types whose ``==`` is already exact


def float_bits(value: float | complex) -> bytes:
    """The IEEE-754 bits of a float or complex (sign of zero and NaN payloads included)."""
    if isinstance(value, complex):
        return struct.pack("<dd", value.real, value.imag)
    return struct.pack("<d", value)


def exact_value(value: Any) -> Any:
    """A hashable key of a plain value, equal for two values only when they have the same types and the same
    values, floats bit for bit, at every depth of tuples, lists and dicts (NOTE [Plain values by type])."""
    cls = type(value)
    if cls in EXACT_BY_EQUALITY:  # the usual settings (``training``, ``p`` as an int, names): no more to do
        return (cls, value)
    if isinstance(value, (float, complex)):
        return (cls, float_bits(value))
    if isinstance(value, (tuple, list)):
        return (cls, tuple(map(exact_value, value)))
    if isinstance(value, dict):
        return (cls, tuple((exact_value(key), exact_value(item)) for key, item in value.items()))
    if isinstance(value, (set, frozenset)):  # NOTE [Sets and dataclasses compared exactly]
        return (cls, tuple(map(exact_value, value)))
    fields = getattr(cls, "__dataclass_fields__", None)
    if fields is not None and not isinstance(value, type):
        compared = tuple(exact_value(getattr(value, name)) for name, field in fields.items() if field.compare)
        return (cls, value, compared)
    return (cls, value)


def exact_repr(value: Any) -> str:
    """``repr(value)`` of a plain value, except that a float or complex holding a NaN is written with its IEEE-754
    bits (NOTE [NaNs written down by bits])."""
    if isinstance(value, (float, complex)) and value != value:  # only a NaN (or a complex with one) is unequal
        return f"{type(value).__name__}-bits:{float_bits(value).hex()}"
    return repr(value)
