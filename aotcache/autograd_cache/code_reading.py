"""What a function's code names, read from its code object without running it: global and attribute names,
identifier-like string constants, the modules it imports in its body, its literal constants, closure cells.

The walker (:mod:`aotcache.autograd_cache.reachable`) follows these names to the globals, class members and
modules a function can reach (NOTE [Reachable code]); reading bytecode is a concern of its own, kept here.
"""

from __future__ import annotations

import builtins
import dis
import functools
import importlib
import importlib.util
import re
import sys
import types
from collections.abc import Iterable, Iterator
from typing import Any

from aotcache.autograd_cache.digests import Untrusted
from aotcache.autograd_cache.value_kinds import type_name

__all__ = ["computed_getattr", "constant_token", "order_observed_names", "operator_read_names", "iterated_constant_sets", "cell_contents", "all_names", "global_names", "string_constants", "imported_modules",
           "import_for_digest", "modules_looked_up"]

_IMPORT_NAME = dis.opmap["IMPORT_NAME"]
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The instructions that use a name of the function's globals: the loads (``LOAD_NAME`` in a class body or
# module code falls back to the globals, as ``LOAD_FROM_DICT_OR_GLOBALS`` does, 3.12+ annotation scopes) and
# the writes under a ``global`` declaration (a forward writing a global changes state the guards must see).
_GLOBAL_USES = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS", "STORE_GLOBAL", "DELETE_GLOBAL"})


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
    """The global and attribute names of a code object and the code nested in it (``co_names`` mixes the two:
    the attributes a class or module may be read through; :func:`global_names` for the globals alone)."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from all_names(const)


def _code_and_nested(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and the code nested in it (functions, lambdas, comprehensions, class bodies)."""
    codes = [code]
    while codes:
        current = codes.pop()
        codes.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
        yield current


def _instructions(code: types.CodeType) -> list[dis.Instruction]:
    """``code``'s instructions without the inline caches and argument extensions, so neighbours are real ops."""
    return [i for i in dis.get_instructions(code) if i.opname not in ("CACHE", "EXTENDED_ARG")]


@functools.lru_cache(maxsize=4096)
def global_names(code: types.CodeType) -> frozenset[str]:
    """The names a code object and the code nested in it (functions, lambdas, comprehensions, class bodies)
    read from its globals, or write there under a ``global`` declaration.

    NOTE [Global reads are loads, not co_names] ``co_names`` holds attribute names too: ``self.a`` puts ``a``
    there, and treating it as a global read guarded the function's module global ``a`` as well, so a script
    with a top-level loop variable ``a`` re-traced its module on every call (the program "changed"), and
    its value entered the fingerprint. Only the global loads (and ``global`` writes, which the guards must
    see change) use the module's dict; attribute and method names, imports and local stores do not.
    """
    found = set()
    for current in _code_and_nested(code):
        found.update(instruction.argval for instruction in dis.get_instructions(current)
                     if instruction.opname in _GLOBAL_USES)
    return frozenset(found)


# NOTE [Names whose order the code can observe]
# A set's iteration order matters only where code iterates it (NOTE [Sets in their iteration order] in
# set_orders.py). :func:`order_observed_names` reads the bytecode for the names whose value the code may iterate:
# every name it loads, stores or imports, except a load whose value goes straight into an order-free use: the
# container of an ``in`` test (``k in self.skip``), a comparison or identity test, a truth test
# (``if self.skip:``, ``not self.skip``), or the one argument of the builtin ``sorted`` or ``len``
# (``sorted(self.skip)``, through a chain of attribute loads). Anything else (a loop, a comprehension, a call
# passing it on, a method of it, a local bound to it) counts, as does every identifier-like string constant
# (``getattr(self, "skip")``). A positional class pattern (``case Cfg(a, b):``) reads attributes through
# ``__match_args__`` without naming them: it adds the name ``__match_args__``, which the walk takes as reads it
# cannot tell.
# NOTE [Order-free reads that call back] (session 25 review) Three of those uses run code that can see the order
# after all, so a second process under another hash seed loaded the graph of another eager result (false hits):
# a comparison hands the set to the other operand's ``__eq__`` / ``__lt__`` (``self.probe == self.skip`` calls a
# user's ``__eq__(other)``, which may iterate ``other``); ``sorted`` keeps the iteration order of members neither
# less nor greater than each other (``{nan, 1.0}``: a NaN's hash is its address; frozensets by inclusion; user
# objects by their ``__lt__``); and a subclass of ``set`` may define ``__contains__`` / ``__len__`` / ``__bool__``
# that iterate it. So :func:`operator_read_names` lists the names loaded straight into a comparison and into
# ``sorted``; the walk writes the order of a set under the first where a user class reached defines a comparison
# method (a dataclass's generated ``__eq__`` included), under the second where its members are not all of one
# kind ``<`` orders totally (str, bytes, or numbers without NaN), and of a set of a subclass overriding an
# operator wherever it is held.
_ORDER_FREE_CONSUMERS = frozenset({"CONTAINS_OP", "COMPARE_OP", "IS_OP", "UNARY_NOT", "TO_BOOL",
                                   "POP_JUMP_IF_FALSE", "POP_JUMP_IF_TRUE", "POP_JUMP_FORWARD_IF_FALSE",
                                   "POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_BACKWARD_IF_FALSE",
                                   "POP_JUMP_BACKWARD_IF_TRUE"})
_ORDER_FREE_CALLS = frozenset({"sorted", "len"})
_BASE_LOADS = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_DEREF", "LOAD_GLOBAL", "LOAD_NAME", "LOAD_CLOSURE",
                         "LOAD_CLASSDEREF"})
_NAME_OPS = frozenset(dis.opname[op] for op in dis.hasname)


def order_observed_names(code: types.CodeType) -> frozenset[str]:
    """The names ``code`` (and code nested in it) uses in a way that may see a set's iteration order (NOTE [Names
    whose order the code can observe])."""
    return _name_uses(code)[0]


def operator_read_names(code: types.CodeType) -> tuple[frozenset[str], frozenset[str]]:
    """The names ``code`` (and code nested in it) loads straight into a comparison, and into ``sorted(...)``:
    order-free for a set compared with a set, or of members ``<`` orders totally, not where a user's comparison
    method or ties come in (NOTE [Order-free reads that call back]); their other uses are
    :func:`order_observed_names`'."""
    return _name_uses(code)[1:]


@functools.lru_cache(maxsize=4096)
def _name_uses(code: types.CodeType) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The names of :func:`order_observed_names`, and those of :func:`operator_read_names` (compared, sorted),
    from one read of the bytecode (the walk asks for both of every code it meets)."""
    observed: set[str] = set(string_constants(code))
    compared: set[str] = set()
    sorted_: set[str] = set()
    for current in _code_and_nested(code):
        instructions = _instructions(current)
        for index, instruction in enumerate(instructions):
            if instruction.opname == "MATCH_CLASS":
                observed.add("__match_args__")
            if instruction.opname in _NAME_OPS and isinstance(instruction.argval, str):
                use = _order_free_use(instructions, index)
                if use is None:
                    observed.add(instruction.argval)
                elif use == "compare":
                    compared.add(instruction.argval)
                elif use == "sorted":
                    sorted_.add(instruction.argval)
    return frozenset(observed), frozenset(compared), frozenset(sorted_)


def _order_free_use(instructions: list, index: int) -> str | None:
    """The order-free use the name load at ``index`` goes straight into (see the NOTE): "compare", "sorted" (NOTE
    [Order-free reads that call back]) or "free" (``in``, ``is``, a truth test, ``len``); None for any other use."""
    instruction = instructions[index]
    if not instruction.opname.startswith("LOAD_") or "NULL" in (instruction.argrepr or "") or \
            index + 1 >= len(instructions):
        return None  # not a load, or a load of something called (a function, a method: ``self.skip.copy()``)
    following = instructions[index + 1]
    if following.opname in _ORDER_FREE_CONSUMERS:
        return "compare" if following.opname == "COMPARE_OP" else "free"
    # the one argument of ``sorted(...)`` / ``len(...)``: [sorted] [base] [LOAD_ATTR]* [this] [PRECALL 1] CALL 1
    if following.opname == "PRECALL":
        following = instructions[index + 2] if index + 2 < len(instructions) else following
    if following.opname != "CALL" or following.arg != 1:
        return None
    start = index
    while start > 0 and instructions[start].opname == "LOAD_ATTR":
        start -= 1
    if instructions[start].opname not in _BASE_LOADS or start == 0:
        return None
    callable_load = instructions[start - 1]
    if callable_load.opname not in ("LOAD_GLOBAL", "LOAD_NAME") or callable_load.argval not in _ORDER_FREE_CALLS:
        return None
    return "sorted" if callable_load.argval == "sorted" else "free"


@functools.lru_cache(maxsize=4096)
def iterated_constant_sets(code: types.CodeType) -> frozenset[int]:
    """The positions in ``code.co_consts`` of frozenset constants the code may iterate: a ``for`` loop or a
    comprehension over a set display is compiled to one (``for n in {"a", "b"}``); one only tested with ``in``
    is not iterated (NOTE [Sets in their iteration order] in set_orders.py)."""
    positions = set()
    instructions = _instructions(code)
    for index, instruction in enumerate(instructions):
        if instruction.opname == "LOAD_CONST" and isinstance(instruction.argval, frozenset) and (
                index + 1 >= len(instructions) or instructions[index + 1].opname != "CONTAINS_OP"):
            positions.add(instruction.arg)
    return frozenset(positions)


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
    """Absolute names of the modules a function imports in its body (``import x`` / ``from .y import z``), with
    ``y.z`` for each name a ``from`` import takes (it may be a submodule, which the import loads)."""
    if not _has_import(fn.__code__):
        return []
    found = []
    for code in _code_and_nested(fn.__code__):
        level, previous = 0, None
        for instruction in dis.get_instructions(code):
            if instruction.opname == "LOAD_CONST" and isinstance(instruction.argval, int):
                level = instruction.argval
            elif instruction.opname == "IMPORT_NAME":
                # the fromlist is the constant loaded right before (None for a plain ``import x``)
                fromlist = previous.argval if previous is not None and previous.opname == "LOAD_CONST" else None
                name = "." * level + instruction.argval
                try:
                    module = importlib.util.resolve_name(name, fn.__globals__.get("__package__"))
                except (ImportError, ValueError):
                    raise Untrusted(f"import inside function: {name}") from None
                found.append(module)
                if isinstance(fromlist, tuple):
                    found.extend(f"{module}.{item}" for item in fromlist
                                 if isinstance(item, str) and _IDENTIFIER.match(item))
            if instruction.opname not in ("CACHE", "EXTENDED_ARG"):
                previous = instruction
    return sorted(set(found))


# NOTE [Modules looked up by name]
# A function can reach a module without an import statement: ``importlib.import_module("cfg")``,
# ``__import__("cfg")``, ``sys.modules["cfg"]`` (or ``sys.modules[__name__]``, its own module). The walk saw only
# ``importlib`` / ``sys``, library modules named by version, so what the code read of ``cfg`` (``cfg.K``) was in
# neither the fingerprint nor the guards: ``cfg.K = 5`` kept the graph of ``K = 2`` in-process, and a process
# with another ``cfg`` loaded the first one's graph through the same fingerprint (found in session 20). With a
# constant name the module is read as a module imported in the function's body is (NOTE [Function-body
# imports]); with a computed name the walk cannot know which module, and the program is untrusted.
# The names are those of the function's globals and closure cells bound to ``sys``, ``sys.modules``,
# ``importlib.import_module`` or ``__import__`` under any name (``import sys as _sys``, ``from sys import modules``,
# ``from importlib import import_module as load``): under an alias the lookup was missed, a stale graph.
_LOOKUP_CALLS = frozenset({"import_module", "__import__"})
_NAME_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_FAST", "LOAD_ATTR", "LOAD_METHOD"})
_SYS_NAMES = frozenset({"sys"})
_NO_NAMES: frozenset[str] = frozenset()


@functools.lru_cache(maxsize=4096)
def _module_lookups(code: types.CodeType, call_names: frozenset[str] = _LOOKUP_CALLS,
                    sys_names: frozenset[str] = _SYS_NAMES,
                    modules_names: frozenset[str] = _NO_NAMES) -> tuple[tuple[str, ...], bool]:
    """The module names ``code`` (and code nested in it) looks up by a constant name (NOTE [Modules looked up by
    name]); ``"__name__"`` stands for the function's own module. And whether some lookup has a computed name.
    ``call_names`` load a lookup function, ``sys_names`` the ``sys`` module, ``modules_names`` ``sys.modules``
    itself (the function's aliases: ``import sys as _sys``, ``from sys import modules``, :func:`_lookup_aliases`)."""
    found: set[str] = set()
    computed = False
    for current in _code_and_nested(code):
        instructions = _instructions(current)
        for index, instruction in enumerate(instructions):
            after = instructions[index + 1] if index + 1 < len(instructions) else None
            later = instructions[index + 2] if index + 2 < len(instructions) else None
            if instruction.opname in _NAME_LOADS and instruction.argval in call_names:
                if (after is not None and after.opname == "LOAD_CONST" and isinstance(after.argval, str)
                        and not after.argval.startswith(".")):
                    found.add(after.argval)
                else:
                    computed = True
                continue
            through_sys = (instruction.opname in ("LOAD_ATTR", "LOAD_METHOD") and instruction.argval == "modules"
                           and index > 0 and instructions[index - 1].opname in _NAME_LOADS
                           and instructions[index - 1].argval in sys_names)
            by_alias = (instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF")
                        and instruction.argval in modules_names)
            if through_sys or by_alias:
                if after is not None and after.opname in ("LOAD_ATTR", "LOAD_METHOD") and after.argval == "get":
                    after, later = later, instructions[index + 3] if index + 3 < len(instructions) else None
                if after is not None and after.opname == "LOAD_CONST" and isinstance(after.argval, str):
                    found.add(after.argval)
                elif after is not None and after.opname in ("LOAD_GLOBAL", "LOAD_NAME") and after.argval == "__name__":
                    found.add("__name__")
                else:
                    computed = True
    return tuple(sorted(found)), computed


def _lookup_aliases(fn: types.FunctionType) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The names ``fn`` reads (globals, closure cells) bound to a lookup function (``from importlib import
    import_module as load``), to the ``sys`` module (``import sys as _sys``) or to ``sys.modules`` (``from sys
    import modules``), added to the usual names (NOTE [Modules looked up by name])."""
    calls, sys_names, modules_names = set(_LOOKUP_CALLS), set(_SYS_NAMES), set()
    fn_globals = fn.__globals__
    bound = [(name, fn_globals[name]) for name in global_names(fn.__code__) if name in fn_globals]
    bound += [(name, cell_contents(cell)) for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ())]
    for name, value in bound:
        if value is sys:
            sys_names.add(name)
        elif value is sys.modules:
            modules_names.add(name)
        elif value is importlib.import_module or value is builtins.__import__:
            calls.add(name)
    return frozenset(calls), frozenset(sys_names), frozenset(modules_names)


def modules_looked_up(fn: types.FunctionType) -> tuple[list[str], bool]:
    """The modules ``fn`` looks up by constant name (NOTE [Modules looked up by name]), and whether it also
    looks one up by a computed name."""
    code = fn.__code__
    calls, sys_names, modules_names = _lookup_aliases(fn)
    names = set(code.co_names) | set(code.co_freevars)
    if not (names & calls or names & modules_names or "modules" in names
            or any(isinstance(c, types.CodeType) for c in code.co_consts)):
        return [], False
    found, computed = _module_lookups(code, calls, sys_names, frozenset(modules_names))
    own = fn.__globals__.get("__name__")
    return sorted({own if name == "__name__" else name for name in found if name != "__name__" or own}), computed


def import_for_digest(name: str) -> types.ModuleType | None:
    """A project module (not a library's) that a function imports in its body, imported now; None where it
    cannot be found (the function's import fails as it would now).

    NOTE [Function-body imports] A module imported inside a function is written down the same whether or not
    something imported it already, so a digest never depends on what happened to run before (a compiler
    importing ``aotcache.compilers.nop`` inside its body had one key before its first compile and another
    after, a miss in every warm process). A library's module (torch, the standard library, an installed
    distribution, aotcache) is named with its version and never imported here (``import torch._inductor``
    would cost a second); where it is loaded, user code monkeypatched into the attributes the function uses is
    added. A project module is imported now and read like any module global, so the digest follows the code
    the function reaches through it; its import would run at the function's first call anyway. A name that
    ``from pkg import name`` takes is imported as ``pkg.name`` only where ``pkg`` has no such attribute, as
    Python's import does (an attribute is read through ``pkg``'s token; importing a submodule of that name
    would replace it).

    :raises Untrusted: the module exists but importing it failed.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            return None
        raise Untrusted(f"import inside function: {name} (ModuleNotFoundError: {exc.name})") from None
    except Exception as exc:  # user code runs on import: any failure means the import cannot be written down
        raise Untrusted(f"import inside function: {name} (importing it raised {type(exc).__name__})") from None


# NOTE [Module attributes read by getattr]
# ``getattr(sys.modules[__name__], "K")`` or ``getattr(cfg, "K")`` reads ``K`` without naming it in ``co_names``:
# the walk read a module through the names the code uses, so ``K`` was in neither the guards nor the fingerprint
# (``K = 5`` kept the graph of ``K = 2``, found in session 20 and 21). An identifier-like string constant of the
# code counts as such a name now, as it does for class members. A *computed* name (``getattr(cfg, NAME)``) may be
# any attribute: for the user modules such code reads, the in-process walk writes down every global by identity
# and guards the whole namespace (NOTE [Whole namespaces in the guards] in program_guards.py), and the fingerprint
# is untrusted (the full key decides). :func:`computed_getattr` finds such a call in the bytecode: the second
# argument of a call of the builtin ``getattr`` that is not one string constant (anything it cannot follow,
# a conditional expression in an argument, counts as computed).
_JUMP_OPCODES = frozenset(dis.hasjrel) | frozenset(dis.hasjabs)
_CALL_OPS = frozenset({"CALL", "PRECALL", "CALL_FUNCTION", "CALL_FUNCTION_KW", "CALL_KW", "KW_NAMES"})


@functools.lru_cache(maxsize=4096)
def computed_getattr(code: types.CodeType) -> bool:
    """Whether ``code`` (or code nested in it) calls ``getattr`` with a name that is not a string constant
    (NOTE [Module attributes read by getattr])."""
    if "getattr" in code.co_names:
        instructions = _instructions(code)
        for index, instruction in enumerate(instructions):
            if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME") and instruction.argval == "getattr" and \
                    not _constant_second_argument(instructions, index + 1):
                return True
    return any(isinstance(c, types.CodeType) and computed_getattr(c) for c in code.co_consts)


def _constant_second_argument(instructions: list, start: int) -> bool:
    """Whether the call whose callable was loaded just before ``start`` gets a string constant as its second
    argument: the stack depth is followed (relative to the callable) up to the call taking 2 or 3 arguments."""
    depths = []  # the depth before each instruction
    depth = 0
    previous = None
    for offset, instruction in enumerate(instructions[start:]):
        if instruction.opcode in _JUMP_OPCODES:
            return False  # a branch inside the arguments
        if instruction.opname in _CALL_OPS and instruction.arg == depth and depth in (2, 3) and not (
                previous == "PRECALL" and instruction.opname == "CALL"):  # (3.11: a PRECALL's CALL is its second half)
            return _pushes_constant_second(instructions[start:start + offset], depths, depth)
        try:
            effect = dis.stack_effect(instruction.opcode, instruction.arg if instruction.opcode >= dis.HAVE_ARGUMENT
                                      else None, jump=False)
        except ValueError:
            return False
        depths.append(depth)
        depth += effect
        previous = instruction.opname
        if depth < 0:
            return False
    return False


def _pushes_constant_second(arguments: list, depths: list, count: int) -> bool:
    """Whether the argument instructions push the second of ``count`` arguments with one ``LOAD_CONST`` of a
    string: the last push from depth 1, with the stack above 1 from there on."""
    pushes = [k for k, depth in enumerate(depths) if depth == 1 and (depths[k + 1] if k + 1 < len(depths) else count) > 1]
    if not pushes:
        return False
    first = pushes[-1]
    if any(depth < 2 for depth in depths[first + 1:]):
        return False
    constant = arguments[first]
    if constant.opname != "LOAD_CONST" or not isinstance(constant.argval, str):
        return False
    rest = depths[first + 1:]  # the instructions after it: none (two arguments), or the third argument's
    return not rest if count == 2 else bool(rest) and rest[0] == 2 and all(depth >= 3 for depth in rest[1:])
