"""Whether code run by a capture checks the type of an int or float argument traced as a symbol.

NOTE [Type checks on scalar symbols]
An int or float argument that changes between calls is traced as a symbol (NOTE [Integer arguments], NOTE
[Float arguments] in dynamic_dims.py): the traced code receives a ``torch.SymInt`` / ``torch.SymFloat``, not an
``int`` / ``float``. A type check on it -- ``isinstance(s, float)``, ``isinstance(n, (int, float))``,
``type(s) is float``, ``type(s).__name__ == "float"`` -- then takes the other branch than eager would, and the
graph, reused for every later value, keeps that branch: a false result, not a guard. No trace can see a type
check, so the capture watches which Python code is called with a symbol among its arguments while it traces
(a ``sys.settrace`` hook on calls, chained to any tracer already set, only for those captures) and reads that
code's bytecode: code
that loads ``float`` (``int``) as a value -- not as a function called, as in ``float(s)`` -- or a ``numbers``
abstract class, or compares a ``__name__`` with ``"float"`` (``"int"``), may check the type of such a value. Then
the capture raises :class:`ScalarTypeChecked`, and the compiled function makes that kind of argument a constant
of its graphs from then on (a graph per value, bounded by the recompile limit), as before symbols. torch's and
aotcache's own code is left out: it handles symbols (it checks ``SymInt`` / ``SymFloat`` where it checks types).
The check is conservative -- ``x.to(float)`` or ``dtype=int`` count as type checks -- at the cost of speed only.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import os
import sys
import types
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["ScalarTypeChecked", "watch_code", "kinds_type_checked"]

_NUMBERS_CLASSES = {"Number": ("int", "float"), "Complex": ("int", "float"), "Real": ("int", "float"),
                    "Rational": ("int",), "Integral": ("int",)}
_OWN_DIRS = tuple(os.path.dirname(module.__file__) + os.sep for module in (torch,) if module.__file__) + (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,)
# 3.11+: LOAD_GLOBAL's low bit pushes the NULL of a call, so ``float(s)`` is told apart from ``float`` as a value
_LOAD_GLOBAL_MARKS_CALLS = sys.version_info >= (3, 11)


class ScalarTypeChecked(RuntimeError):
    """A capture ran code that may check the type of an int or float argument traced as a symbol (NOTE [Type
    checks on scalar symbols]); ``kinds``: ``"int"`` and/or ``"float"``."""

    def __init__(self, kinds: frozenset[str], where: str) -> None:
        super().__init__(f"{where} may check the type of a{'n' if 'int' in kinds else ''} "
                         f"{' or '.join(sorted(kinds))} argument, which the trace would see as a symbol")
        self.kinds = kinds
        self.where = where


_SYMBOLS = (torch.SymInt, torch.SymFloat)


def _is_symbol(value: Any) -> bool:
    if isinstance(value, _SYMBOLS):
        return True
    if isinstance(value, (tuple, list)):  # *args
        return any(isinstance(item, _SYMBOLS) for item in value)
    if isinstance(value, dict):  # **kwargs
        return any(isinstance(item, _SYMBOLS) for item in value.values())
    return False


@contextlib.contextmanager
def watch_code(into: set) -> Iterator[None]:
    """Adds to ``into`` the code object of every Python function outside torch and aotcache called in this thread
    meanwhile with a symbolic int or float among its arguments (its ``*args`` and ``**kwargs`` included)."""
    previous = sys.gettrace()
    own: dict[str, bool] = {}

    def on_call(frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "call":
            code = frame.f_code
            filename = code.co_filename
            inside = own.get(filename)
            if inside is None:
                inside = own[filename] = filename.startswith(_OWN_DIRS)
            if not inside and code not in into and any(map(_is_symbol, frame.f_locals.values())):
                into.add(code)
        return previous(frame, event, arg) if previous is not None else None

    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def kinds_type_checked(codes: Iterable[types.CodeType], kinds: frozenset[str]) -> ScalarTypeChecked | None:
    """The first of ``codes`` that may check the type of one of ``kinds``, as an error to raise; None if none
    does."""
    for code in codes:
        found = _type_checks(code) & kinds
        if found:
            return ScalarTypeChecked(frozenset(found), f"{code.co_qualname if hasattr(code, 'co_qualname') else code.co_name} "
                                     f"({code.co_filename}:{code.co_firstlineno})")
    return None


@functools.lru_cache(maxsize=8192)
def _type_checks(code: types.CodeType) -> frozenset[str]:
    """The scalar kinds (``"int"``, ``"float"``) whose type ``code`` may check (NOTE [Type checks on scalar
    symbols])."""
    found: set[str] = set()
    names_compared = "__name__" in code.co_names
    for constant in code.co_consts:
        if names_compared and constant in ("int", "float"):
            found.add(constant)
    for instruction in dis.get_instructions(code):
        name = instruction.argval
        if instruction.opname == "LOAD_GLOBAL" and name in ("int", "float"):
            if not (_LOAD_GLOBAL_MARKS_CALLS and instruction.arg is not None and instruction.arg & 1):
                found.add(name)
        elif instruction.opname in ("LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_GLOBALS") \
                and name in ("int", "float"):
            found.add(name)
        elif instruction.opname in ("LOAD_ATTR", "LOAD_METHOD") and name in _NUMBERS_CLASSES:
            found.update(_NUMBERS_CLASSES[name])
    return frozenset(found)
