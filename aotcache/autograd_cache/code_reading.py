"""What a function's code names, read from its code object without running it: global and attribute names,
identifier-like string constants, the modules it imports in its body, its literal constants, closure cells.

The walker (:mod:`aotcache.autograd_cache.reachable`) follows these names to the globals, class members and
modules a function can reach (NOTE [Reachable code]); reading bytecode is a concern of its own, kept here.
"""

from __future__ import annotations

import dis
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import types
from collections.abc import Iterable
from typing import Any

from aotcache.autograd_cache.digests import Untrusted
from aotcache.autograd_cache.value_kinds import type_name

__all__ = ["constant_token", "cell_contents", "all_names", "string_constants", "imported_modules",
           "unloaded_module_token"]

_IMPORT_NAME = dis.opmap["IMPORT_NAME"]
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def constant_token(value: Any) -> str:
    """A code object's constant: literals, tuples and frozensets of them (frozensets in sorted order)."""
    if isinstance(value, frozenset):
        return "set{" + ",".join(sorted(constant_token(v) for v in value)) + "}"
    if isinstance(value, tuple):
        return "tuple(" + ",".join(constant_token(v) for v in value) + ")"
    if value is None or value is Ellipsis or isinstance(value, (int, float, complex, str, bytes)):
        return f"{type(value).__name__}:{value!r}"
    raise Untrusted(f"code constant: {type_name(type(value))}")


def cell_contents(cell: types.CellType) -> Any:
    """A closure cell's value; None for a cell not assigned yet."""
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (variable not assigned yet)
        return None


def all_names(code: types.CodeType) -> Iterable[str]:
    """The global and attribute names of a code object and the code nested in it."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from all_names(const)


def string_constants(code: types.CodeType) -> Iterable[str]:
    """Identifier-like string constants (``getattr(self, "x")`` reads ``x``), nested code included."""
    for const in code.co_consts:
        if isinstance(const, str) and _IDENTIFIER.match(const):
            yield const
        elif isinstance(const, tuple):
            yield from (item for item in const if isinstance(item, str) and _IDENTIFIER.match(item))
        elif isinstance(const, types.CodeType):
            yield from string_constants(const)


def _has_import(code: types.CodeType) -> bool:
    """Whether the code imports anything (a cheap scan before :func:`imported_modules` disassembles it)."""
    raw = code.co_code
    if any(raw[i] == _IMPORT_NAME for i in range(0, len(raw), 2)):
        return True
    return any(isinstance(c, types.CodeType) and _has_import(c) for c in code.co_consts)


def imported_modules(fn: types.FunctionType) -> list[str]:
    """Absolute names of the modules a function imports in its body (``import x`` / ``from .y import z``)."""
    if not _has_import(fn.__code__):
        return []
    found = []
    codes = [fn.__code__]
    while codes:
        code = codes.pop()
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        level = 0
        for instruction in dis.get_instructions(code):
            if instruction.opname == "LOAD_CONST" and isinstance(instruction.argval, int):
                level = instruction.argval
            elif instruction.opname == "IMPORT_NAME":
                name = "." * level + instruction.argval
                try:
                    found.append(importlib.util.resolve_name(name, fn.__globals__.get("__package__")))
                except (ImportError, ValueError):
                    raise Untrusted(f"import inside function: {name}") from None
    return sorted(set(found))


def unloaded_module_token(name: str) -> str:
    """A module a function would import when it runs, not imported yet: its source file and distribution.

    NOTE [Unloaded imports] The import can only happen during the call (capture, on a cold start), so the
    fingerprint pins the module's source bytes and its distribution's version; the code that module imports
    in turn is pinned by that version only (documented in docs/warmstart.md).
    """
    top, parent = name.split(".")[0], name.rpartition(".")[0]
    try:
        if top not in sys.modules and importlib.util.find_spec(top) is None:
            return f"absent:{name}"  # the import would fail, as it fails now
        if parent and parent not in sys.modules:
            raise Untrusted(f"import inside function: {name}")  # find_spec would import the parent
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        raise Untrusted(f"import inside function: {name}") from None
    if spec is None:
        return f"absent:{name}"
    if not spec.origin or not os.path.isfile(spec.origin):
        raise Untrusted(f"import inside function: {name}")
    with open(spec.origin, "rb") as source:
        digest = hashlib.sha256(source.read()).hexdigest()
    try:
        version = importlib.metadata.version(name.split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        version = None
    return f"unloaded:{name}:{digest}:{version}"
