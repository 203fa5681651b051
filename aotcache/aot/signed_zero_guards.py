"""Dynamo guards that tell ``0.0`` from ``-0.0``: a graph Dynamo specialized on a float zero is not reused for
the other zero.

NOTE [Signed zeros in Dynamo's guards]
Dynamo guards a Python number it bakes into a graph (a float argument on the first call, a module's float
attribute, a closure cell, a float inside a tuple, list or dict) by type and ``==``, and a float symbol it or a
backend specialized by an ``==`` guard in its shape environment. ``0.0 == -0.0``, so a graph traced with
``s = 0.0`` was reused for ``s = -0.0``: ``torch.arange(4) * s`` gave ``+0.0`` where eager gives ``-0.0`` (and
``1 / s``, ``atan2`` or ``copysign`` give another sign or branch). torch's own backends (``aot_eager``,
``inductor``) share this; aotcache's backend closes it for its graphs: while it compiles Dynamo's graph it adds,
beside each of Dynamo's value guards (``CONSTANT_MATCH`` / ``EQUALS_MATCH``) and for each float symbol
specialized in the shape environment, a guard on the same source that compares the value by type and float bits
(:func:`~aotcache.aot.exact_values.exact_value`, sets included); beside each ``DICT_KEYS_MATCH`` (a dict's keys,
compared with ``==`` too: ``{-0.0: a}`` passed for ``{0.0: a}``) one that compares the keys so. The guard is added
only where the traced value holds a float or complex zero (at any depth of a tuple, list, set or dict, keys
included): other values keep Dynamo's C++ guard alone, with no Python call per frame. A guard Dynamo's guard
manager refuses is left out (logged once), never a failed compile. NaN needs nothing here (Dynamo guards it with ``isnan``), and ``1`` / ``1.0`` / ``True`` are told
apart by Dynamo's type check. A float Dynamo passes unspecialized and aotcache keeps as a graph input reads its
value at every call and needs no guard (NOTE [Dynamo's float inputs kept as graph inputs]).

The guards are private Dynamo machinery (feature-detected): where they cannot be added, nothing changes and
the gap is Dynamo's own, as under ``aot_eager``. A guard only ever makes Dynamo compile again (a graph per sign
of the zero); it never makes a graph serve a call it was not traced for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from aotcache.aot.exact_values import exact_value
from aotcache.logs import log_once

__all__ = ["exact_float", "guard_signed_zeros", "holds_a_zero", "is_zero_float", "retrace_baked_zero_floats"]

_MAX_DEPTH = 4
_MAX_ITEMS = 64


def holds_a_zero(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is a float or complex with a zero (real or imaginary part), or a tuple, list or dict
    holding one (a few levels deep): a value whose sign of zero ``==`` does not see."""
    if isinstance(value, float):
        return value == 0.0
    if isinstance(value, complex):
        return value.real == 0.0 or value.imag == 0.0
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, (tuple, list)) and len(value) <= _MAX_ITEMS:
        return any(holds_a_zero(item, depth + 1) for item in value)
    if isinstance(value, dict) and len(value) <= _MAX_ITEMS:
        return any(holds_a_zero(item, depth + 1) for item in value.values()) or _keys_hold_a_zero(value, depth)
    if isinstance(value, (set, frozenset)) and len(value) <= _MAX_ITEMS:
        return any(holds_a_zero(item, depth + 1) for item in value)
    return False


def _keys_hold_a_zero(value: dict, depth: int = 0) -> bool:
    """Whether a key of the dict ``value`` holds a float zero (``{0.0: a}`` and ``{-0.0: a}`` have equal keys)."""
    return len(value) <= _MAX_ITEMS and any(holds_a_zero(key, depth + 1) for key in value)


def _bits_key(value: Any) -> Any:
    """:func:`exact_value`, sets and dict keys included: two values get equal keys only when their floats, at
    any depth, have the same bits (``{0.0} == {-0.0}``); a set by its members in no order (Dynamo's own guard
    compares it with ``==``, so its order is not the traced value's business here)."""
    if isinstance(value, (set, frozenset)):
        return (type(value), frozenset(map(_bits_key, value)))
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(map(_bits_key, value)))
    if isinstance(value, dict):
        return (type(value), tuple((_bits_key(key), _bits_key(item)) for key, item in value.items()))
    return exact_value(value)


def _keys_bits(value: Any) -> Any:
    """The keys of a dict, in order, by :func:`_bits_key` (NOTE [Signed zeros in Dynamo's guards])."""
    return tuple(_bits_key(key) for key in value)


# NOTE [Zero floats specialized in place]
# A float Dynamo passed unspecialized that aotcache's backend specializes (NOTE [Dynamo's float inputs] in
# dynamo_graph.py) is made a constant by Dynamo's restart, which takes the value from its shape environment: a
# sympy number, which has no negative zero, so ``-0.0`` was baked in as ``0.0`` (a wrong result on the first
# call, not only a stale one). A float whose value is a zero is specialized by the backend itself instead, as
# one read in a checkpointed region is: its ``.item()`` uses replaced by the Python float Dynamo holds for it
# (sign kept), its value guarded in the shape environment, and its sign by the guard of NOTE [Signed zeros in
# Dynamo's guards]. Such a float is never kept as a graph input (a kept float whose check fails goes through
# Dynamo's restart).
def is_zero_float(value: Any) -> bool:
    """Whether the ``SymFloat`` ``value`` (Dynamo's symbol for a Python float) holds a zero of either sign."""
    hint = getattr(getattr(value, "node", None), "hint", None)
    return isinstance(hint, float) and hint == 0.0


def _zero_float_symbols(shape_env: Any) -> list:
    """The float symbols of ``shape_env`` whose value is a zero, with their sources."""
    if shape_env is None:
        return []
    values = getattr(shape_env, "backed_var_to_val", None)
    if values is None:
        values = shape_env.var_to_val
    zeros = []
    for symbol, symbol_sources in getattr(shape_env, "var_to_sources", {}).items():
        if not str(symbol).startswith("zf"):
            continue
        try:
            if values.get(symbol) is not None and float(values[symbol]) == 0.0:
                zeros.append((symbol, symbol_sources))
        except (TypeError, ValueError):
            continue
    return zeros


# NOTE [Zero floats Dynamo baked in]
# Dynamo remembers the names of the floats a restart specialized (``TensorifyState``) until a later restart for
# another reason, not per frame or per compile: a name specialized once (``zf0``, a float passed as ``alpha=``)
# is made a constant by every later trace that gives a float that name, before the backend sees the graph, from
# the shape environment's sympy number: ``-0.0`` baked in as ``0.0``. Where such a float's value is a zero, the
# backend forgets its name and has Dynamo trace again: the float then reaches the backend as an input, which
# specializes it in place (NOTE [Zero floats specialized in place]). Forgetting the name costs at most one more
# trace of that frame; it is not added back for a zero, so this does not loop.
def retrace_baked_zero_floats() -> None:
    """Inside Dynamo's call of aotcache's backend: have Dynamo trace again where it made a zero float a constant
    through its restart state (NOTE [Zero floats Dynamo baked in]). :raises TensorifyScalarRestartAnalysis:"""
    try:
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis
        from torch._dynamo.symbolic_convert import TensorifyState
        from torch._guards import TracingContext

        context = TracingContext.try_get()
        if context is None:
            return
        shape_env = getattr(context.fake_mode, "shape_env", None)
        baked = [str(symbol) for symbol, _ in _zero_float_symbols(shape_env)
                 if TensorifyState.should_specialize(str(symbol))]
    except Exception:  # noqa: BLE001 - private Dynamo state not as expected: leave Dynamo's graph as it is
        return
    if baked:
        for name in baked:
            TensorifyState.force_specializations.discard(name)
        raise TensorifyScalarRestartAnalysis


def exact_float(value: Any, guard_scalar: Any) -> float:
    """The Python float a backed ``SymFloat`` holds, sign of zero kept, its value guarded by ``guard_scalar``
    (NOTE [Zero floats specialized in place])."""
    guarded = float(guard_scalar(value))
    hint = getattr(getattr(value, "node", None), "hint", None)
    return hint if isinstance(hint, float) and hint == guarded else guarded


def _same_bits_guard(builder: Any, guard: Any) -> None:
    """A Dynamo guard builder function: where the value of ``guard``'s source holds a float zero, a guard that
    the value equals it by type and float bits (NOTE [Signed zeros in Dynamo's guards])."""
    try:
        value = builder.get(guard)
    except Exception:  # noqa: BLE001 - not readable here: Dynamo's own guard on the source decides
        return
    if not holds_a_zero(value):
        return
    if type(value) is float:  # the usual case, checked per call: Dynamo's own guard holds the type and ``== 0``
        sign = math.copysign(1.0, value)

        def same_bits(current: Any) -> bool:
            try:
                return math.copysign(1.0, current) == sign
            except TypeError:  # not a number: not the traced value
                return False
    else:
        same_bits = _same_as_traced(_bits_key, value)

    _add_lambda_guard(builder, guard, same_bits, f"__aotcache_same_float_bits({guard.name}, {value!r})")


def _same_as_traced(bits_of: Callable[[Any], Any], traced: Any) -> Callable[[Any], bool]:
    """A guard check: whether a value's ``bits_of`` equals the traced value's; a value it cannot read (unhashable,
    not a dict, odd) is not the traced one, so the frame compiles again."""
    expected = bits_of(traced)

    def same(current: Any) -> bool:
        try:
            return bits_of(current) == expected
        except Exception:  # noqa: BLE001 - see the docstring
            return False

    return same


def _same_key_bits_guard(builder: Any, guard: Any) -> None:
    """A Dynamo guard builder function: where a key of the dict at ``guard``'s source is a float zero, a guard
    that the keys equal the traced ones by type and float bits (Dynamo's ``DICT_KEYS_MATCH`` compares them with
    ``==``; NOTE [Signed zeros in Dynamo's guards]). A dict whose key order Dynamo guards takes no leaf guard of
    its own: there each zero key's own guard manager gets the same-bits guard."""
    try:
        value = builder.get(guard)
    except Exception:  # noqa: BLE001 - not readable here: Dynamo's own guard on the source decides
        return
    if not isinstance(value, dict) or not _keys_hold_a_zero(value):
        return
    from torch._C._dynamo.guards import DictGuardManager

    if not isinstance(builder.get_guard_manager(guard), DictGuardManager):
        _add_lambda_guard(builder, guard, _same_as_traced(_keys_bits, value), f"__aotcache_same_key_bits({guard.name}, {list(value)!r})")
        return
    from torch._dynamo.source import ConstDictKeySource

    for index, key in enumerate(value):
        if holds_a_zero(key):
            key_guard = ConstDictKeySource(guard.originating_source, index).make_guard(_same_bits_guard)
            _same_bits_guard(builder, key_guard)


def _add_lambda_guard(builder: Any, guard: Any, check: Any, code: str) -> None:
    """Add ``check`` as a leaf guard on ``guard``'s source; where Dynamo's guard manager refuses it, nothing is
    added (logged once): a guard that cannot be added must not fail Dynamo's compile (eager would run)."""
    try:
        from torch._dynamo.guards import get_verbose_code_parts

        builder.get_guard_manager(guard).add_lambda_guard(check, get_verbose_code_parts(code, guard),
                                                           guard.user_stack)
    except Exception as exc:  # noqa: BLE001 - private Dynamo API: Dynamo's own guard on the source stays
        log_once(logging.DEBUG, "signed-zero-guard-add",
                 f"aotcache backend: could not add a signed-zero guard on {guard.name} ({type(exc).__name__}: {exc})")


def _value_guard_builders() -> tuple:
    from torch._dynamo.guards import GuardBuilder

    return tuple(fn for fn in (getattr(GuardBuilder, "CONSTANT_MATCH", None), getattr(GuardBuilder, "EQUALS_MATCH", None),
                               getattr(GuardBuilder, "CONSTANT_SUBCLASS_MATCH", None)) if fn is not None)


def _specialized_zero_float_sources(shape_env: Any) -> list:
    """The sources of the float symbols of ``shape_env`` whose value is a zero and that a guard or a replacement
    made a constant (Dynamo's ``==`` on them passes the other zero)."""
    if shape_env is None:
        return []
    guarded: set = set()
    for shape_guard in getattr(shape_env, "guards", ()):
        guarded |= set(getattr(shape_guard.expr, "free_symbols", ()))
    guarded |= set(getattr(shape_env, "replacements", {}))
    return [source for symbol, symbol_sources in _zero_float_symbols(shape_env) if symbol in guarded
            for source in symbol_sources]


def guard_signed_zeros() -> None:
    """Inside Dynamo's call of aotcache's backend: add a same-bits guard beside each of Dynamo's value guards and
    on each specialized float symbol's source (NOTE [Signed zeros in Dynamo's guards]). Best effort: nothing is
    added where Dynamo's private guard machinery is not as expected."""
    try:
        from torch._dynamo.guards import GuardBuilder, install_guard
        from torch._guards import TracingContext

        context = TracingContext.try_get()
        if context is None:
            return
        builders = _value_guard_builders()
        keys_builder = getattr(GuardBuilder, "DICT_KEYS_MATCH", None)
        sources = []
        for guard in context.guards_context.dynamo_guards:
            created_by = guard.inner_create_fn()
            if created_by in builders:
                sources.append((guard.originating_source, _same_bits_guard))
            elif keys_builder is not None and created_by is keys_builder:
                sources.append((guard.originating_source, _same_key_bits_guard))
        sources += [(source, _same_bits_guard)
                    for source in _specialized_zero_float_sources(getattr(context.fake_mode, "shape_env", None))]
        seen: set = set()
        for source, make_guard in sources:
            name = source.name if isinstance(source.name, str) else source.name()
            if (name, make_guard) in seen:
                continue
            seen.add((name, make_guard))
            try:
                install_guard(source.make_guard(make_guard))
            except NotImplementedError:  # a constant source: nothing to guard
                continue
    except Exception as exc:  # noqa: BLE001 - private Dynamo API changed: Dynamo's own guards stay as they are
        log_once(logging.DEBUG, "signed-zero-guards",
                 f"aotcache backend: could not add the signed-zero guards ({type(exc).__name__}: {exc})")
