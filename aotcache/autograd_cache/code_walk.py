"""How :class:`~aotcache.autograd_cache.reachable.Reachable` writes down code: user functions and what they read.

A user function is its bytecode digest, defaults, closure cells, the globals its code loads, the modules it
imports in its body and the environment variables it reads (NOTE [Reachable code] in reachable.py); a Python
module it reaches is written down through the names the code uses; library functions and C builtins are named
with their library's version, never read. :class:`CodeWalk` is one part of :class:`Reachable` (a mixin over its
state and its ``ref`` dispatch), not a walker of its own.
"""

from __future__ import annotations

import enum
import functools
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from aotcache.autograd_cache import process_state
from aotcache.autograd_cache.code_reading import (
    all_names,
    cell_contents,
    computed_getattr,
    constant_token,
    global_names,
    import_for_digest,
    imported_modules,
    iterated_constant_sets,
    modules_looked_up,
    operator_read_names,
    order_observed_names,
    string_constants,
)
from aotcache.autograd_cache.digests import Untrusted, canonical_json, sha256_text
from aotcache.autograd_cache.live_containers import entries_of
from aotcache.autograd_cache.value_kinds import (
    is_custom_op,
    is_user_code,
    library_callable_name,
    type_name,
)
from aotcache.code_origin import defining_module, is_library, library_version

__all__ = ["CodeWalk"]

# C functions named, not read, by the fingerprint (no clocks or OS calls: their results could steer tracing)
_SAFE_BUILTIN_ROOTS = frozenset({"builtins", "math", "operator", "_operator", "itertools", "functools",
                                 "_functools", "torch", "collections", "_collections", "numpy", "cmath",
                                 "_abc", "abc", "typing", "_thread", "warnings", "_warnings",
                                 "inspect", "copy", "re", "_sre", "string", "dataclasses", "contextlib"})
# values whose contents a closure cell of a torch function must show (they may carry user code or data)
_TRANSPARENT_TYPES = (types.FunctionType, types.MethodType, functools.partial, type, nn.Module, torch.Tensor,
                      tuple, list, dict, set, frozenset, str, bytes, int, float, complex, bool, type(None),
                      enum.Enum, torch.dtype, torch.device)


def _constant_order(constant: frozenset) -> str:
    """The iteration order of a frozenset constant, as positions among its members' sorted tokens ("" where that
    is the order it iterates in)."""
    tokens = [constant_token(member) for member in constant]
    order = sorted(range(len(tokens)), key=tokens.__getitem__)
    ranks = [0] * len(order)
    for rank, position in enumerate(order):
        ranks[position] = rank
    return "" if ranks == sorted(ranks) else f"order{ranks}"


class CodeWalk:
    """The part of :class:`~aotcache.autograd_cache.reachable.Reachable` that writes down code: user functions,
    the Python modules they read, library functions and builtins (it uses the walker's state and ``ref``)."""

    # -- functions ----------------------------------------------------------------------------------------

    def _function_token(self, fn: types.FunctionType) -> str:
        code = fn.__code__
        name_set = set(all_names(code))
        strings = set(string_constants(code))
        fn_globals = fn.__globals__
        # the globals the code reads are its global loads, not every name in co_names (an attribute ``self.a``
        # is no read of a global ``a``: NOTE [Global reads are loads, not co_names] in code_reading.py)
        global_set = set(global_names(code))
        if "globals" in global_set and "globals" not in fn_globals:
            # ``globals()["NAME"]``: constant names the code may read through its module's dict
            read_by_name = {name for name in strings if name in fn_globals}
            name_set |= read_by_name
            global_set |= read_by_name
        self._add_names(name_set)
        self._add_names(strings)
        # NOTE [Names whose order the code can observe] in code_reading.py (``sorted`` / ``len`` shadowed: every name)
        self._order_names.update(name_set | strings if "sorted" in fn_globals or "len" in fn_globals
                                 else order_observed_names(code))
        compared, sorted_ = operator_read_names(code)  # NOTE [Order-free reads that call back] in code_reading.py
        self._compared_names.update(compared)
        self._sorted_names.update(sorted_)
        # a module's attributes are read through the names the code uses and its string constants (NOTE [Module
        # attributes read by getattr] in code_reading.py)
        names = sorted(name_set | strings)
        guards = self._guards
        referenced = []
        modules: list[types.ModuleType] = []  # the modules the code reads as values
        for name in sorted(global_set):
            if name in fn_globals:
                value = fn_globals[name]
                if guards is not None:
                    guards.slot(fn_globals, name, value)
                if isinstance(value, types.ModuleType):
                    modules.append(value)
                outer, self._entry_name = self._entry_name, name  # NOTE [Sets in their iteration order]
                try:
                    referenced.append(f"{name}={self._global_token(value, names)}")
                finally:
                    self._entry_name = outer
        for module_name in imported_modules(fn):
            modules.append(sys.modules.get(module_name))
            referenced.append(f"import {module_name}={self._imported_module_token(module_name, names)}")
        looked_up, computed = modules_looked_up(fn)  # NOTE [Modules looked up by name] in code_reading.py
        if computed:
            self._note("module looked up by a computed name")
        for module_name in looked_up:
            modules.append(sys.modules.get(module_name))
            referenced.append(f"lookup {module_name}={self._looked_up_module_token(module_name, names)}")
        # a module in a closure cell is read like a module global: through the attribute names the code uses
        cells = []
        for cell in fn.__closure__ or ():
            value = cell_contents(cell)
            if guards is not None:
                guards.cell(cell)
            if isinstance(value, types.ModuleType):
                modules.append(value)
            cells.append(self._global_token(value, names))
        if modules and "getattr" not in fn_globals and computed_getattr(code):
            referenced.extend(self._whole_namespace_tokens(modules))
        if guards is not None:
            guards.attributes(fn, ("__code__", "__defaults__", "__kwdefaults__"))
            guards.length(fn.__dict__)
        attributes = {k: v for k, v in entries_of(fn.__dict__) if not k.startswith("__aotcache")}
        return (f"fn {self._code_digest(code)} defaults={self.ref(fn.__defaults__ or ())} "
                f"kwdefaults={self.ref(fn.__kwdefaults__ or {})} closure=[{','.join(cells)}] "
                f"globals=[{';'.join(referenced)}] attrs={self.ref(attributes)}"
                f"{self._process_state_token(fn, name_set) if self.process_state else ''}")

    def _whole_namespace_tokens(self, modules: Sequence[Any]) -> list[str]:
        """The user modules among ``modules``, read by ``getattr`` with a computed name: every global by identity,
        the namespace guarded whole (NOTE [Module attributes read by getattr] in code_reading.py)."""
        tokens = []
        for module in dict.fromkeys(m for m in modules if isinstance(m, types.ModuleType)):
            if is_library(module.__name__):
                continue
            self._note(f"module attribute read by getattr with a computed name: {module.__name__}")
            namespace = vars(module)
            if self._guards is not None:
                self._guards.namespace(namespace)
            self._opaque.append(list(namespace.values()))  # (kept alive: their ids are in the token)
            tokens.append(f"namespace {module.__name__}@" + ",".join(f"{name}:{id(value)}"
                                                                      for name, value in namespace.items()))
        return tokens

    def _process_state_token(self, fn: types.FunctionType, names: set[str]) -> str:
        """The environment variables ``fn`` reads by constant name, with their values (NOTE [Process state]);
        other process state it reads is noted as untrusted."""
        reason = process_state.builtin_reads_reason(fn.__code__, names, fn.__globals__)
        if reason:
            self._note(reason)
        if names.isdisjoint(process_state.ENV_ACCESSORS):
            return ""
        pinned, reason = process_state.env_reads(fn.__code__)
        if reason:
            self._note(reason)
        values = []
        for variable in pinned:
            value = os.environ.get(variable)
            self.env[variable] = value
            if self._guards is not None:
                self._guards.env(variable, value)
            values.append(f"{variable}={'absent' if value is None else repr(value)}")
        return f" env[{';'.join(values)}]"

    def _imported_module_token(self, name: str, names: Sequence[str]) -> str:
        """A module a function imports in its body, the same before and after it is loaded (NOTE [Function-body
        imports] in code_reading.py)."""
        module = sys.modules.get(name)
        if is_library(name):
            patched = ""
            reason = process_state.module_reason(name) if self.process_state and module is None else None
            if reason:  # once loaded, the walk below notes what the code reads of it
                self._note(reason)
            if module is None and self._guards is not None:  # NOTE [Libraries loaded after the walk]
                self._guards.unloaded_module(name)
            if module is not None and isinstance(module, types.ModuleType):
                before = self._user_attributes
                token = self._module_attributes_token(module, names, set(), library_members=False)
                patched = token if self._user_attributes != before else ""
            return f"library:{name}{library_version(name)}{patched}"
        if module is None:
            parent, _, last = name.rpartition(".")
            holder = sys.modules.get(parent)
            if isinstance(holder, types.ModuleType) and last in vars(holder):
                # ``from parent import last`` reads the attribute and imports nothing (as Python does); the
                # parent's token covers it
                return f"attribute:{name}"
            module = import_for_digest(name)
            if module is None:
                return f"absent:{name}"
        return self._global_token(module, names)

    def _looked_up_module_token(self, name: str, names: Sequence[str]) -> str:
        """A module the code looks up by a constant name (NOTE [Modules looked up by name] in code_reading.py):
        the module now in ``sys.modules`` under that name (guarded there: a module put in its place is another
        program), read as a function-body import is."""
        if self._guards is not None and name in sys.modules:
            self._guards.slot(sys.modules, name, sys.modules[name])
        return self._imported_module_token(name, names)

    def _global_token(self, value: Any, names: Sequence[str]) -> str:
        if isinstance(value, types.ModuleType):
            return self._module_attributes_token(value, names, set())
        return self.ref(value)

    def _code_digest(self, code: types.CodeType) -> str:
        """Digest of a code object: bytecode, names, constants (nested code recursively); no file or line."""
        cached = self._code_digests.get(code)
        if cached is None:
            consts = [self._code_digest(c) if isinstance(c, types.CodeType) else constant_token(c)
                      for c in code.co_consts]
            if self.process_state:  # a loop over a set display: the constant's order (NOTE [Sets in their iteration
                for position in iterated_constant_sets(code):  # order] in set_orders.py)
                    consts[position] += _constant_order(code.co_consts[position])
            cached = sha256_text(canonical_json([
                code.co_name, code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags,
                code.co_code.hex(), list(code.co_names), list(code.co_varnames), list(code.co_freevars),
                list(code.co_cellvars), consts]))
            self._code_digests[code] = cached
        return cached

    # -- Python modules read by code ----------------------------------------------------------------------

    # NOTE [Library functions rebound in their module]
    # A library module's attributes were written down only where they held user code (a monkeypatch with a
    # function of the user's): ``torch.sigmoid = torch.tanh`` (or ``F.gelu = F.silu``, a library function put
    # in another's place) left both the digest and, after its walk, the in-process identity unchanged, so the
    # graph traced with sigmoid kept running in-process and a warm process with the patch loaded it through the
    # same fingerprint: a stale result (found in session 16). Each library callable the code reaches through a
    # module is now written down by the qualified name of what is there (``torch.sigmoid`` reads
    # ``builtin:torch._VariableFunctionsClass.sigmoid``), which the torch version fixes in every process. Not for
    # a module imported in a function body (``library_members=False``): its token must read the same before
    # the module is loaded (NOTE [Function-body imports]), so only user code patched there is seen.
    # NOTE [Library functions made by a factory]
    # A qualified name identifies a library function only when it is unique: ``boolean_dispatch`` makes
    # ``F.adaptive_max_pool1d`` / ``2d`` / ``3d``, ``torch.unique`` and ``torch.lu`` all as
    # ``boolean_dispatch.<locals>.fn``, so ``F.adaptive_max_pool2d = F.adaptive_max_pool1d`` (another result on a
    # 3-d input) kept the fingerprint and a warm process loaded the 2-d graph (found in the session 16 review). A
    # function defined in another function's body is written down with its closure (its library token), which
    # tells those apart the same way in every process.
    def _library_member_token(self, value: Any) -> str | None:
        """A library callable found under a name: where it is defined, with its closure when that name is shared
        by every function one factory makes; None for a value that is not a library callable."""
        if isinstance(value, types.FunctionType) and "<locals>" in value.__qualname__:
            return self.ref(value)
        return library_callable_name(value)

    # NOTE [aotcache's own state is not program state]
    # Program code may name aotcache's module globals (a test or a monitor reading the count of running captures;
    # pytest's assertion rewriting reaches every test module's code). The guards then recorded them as state the
    # program reads, and the capture's restore between its runs of the function (NOTE [State changed by a
    # capture]) wrote the count as it was before the capture (0) over the running capture's 1: at the end it went
    # to -1, and torch's is_compiling flag, put back only when the count returns to 0, stayed True for every
    # later eager call of the process (found as tests failing after other tests in the same pytest worker). Its
    # private data (counts, flags, locks, thread-locals) is aotcache's machinery, which changes during every
    # capture, so the walk leaves it out of the guards; its code (a user's monkeypatch is still seen) and public
    # settings (``capture_threads.SWAP_WAIT_S``) stay guarded.
    def _module_attributes_token(self, module: types.ModuleType, names: Sequence[str], seen: set[int], *,
                                 library_members: bool = True) -> str:
        """A Python module as seen by code using ``names``: the attributes it can reach by those names."""
        if id(module) in seen:
            return f"module:{module.__name__}"
        seen.add(id(module))
        library = is_library(module.__name__)
        own = module.__name__.partition(".")[0] == "aotcache"  # NOTE [aotcache's own state is not program state]
        entries = []
        namespace = vars(module)
        for name in names:
            if name not in namespace:
                # a submodule imported lazily on first access (``np.random``): refused by its name
                reason = process_state.module_reason(f"{module.__name__}.{name}") if self.process_state else None
                if reason:
                    self._note(reason)
                continue
            value = namespace[name]
            reason = process_state.module_attribute_reason(module.__name__, name) if self.process_state else None
            if reason:
                self._note(reason)
                continue
            machinery = (own and name.startswith("_") and not callable(value)
                         and not isinstance(value, types.ModuleType))
            if self._guards is not None and not machinery:
                self._guards.slot(namespace, name, value)
            if isinstance(value, types.ModuleType):
                token = self._module_attributes_token(value, names, seen, library_members=library_members)
                entries.append(f"{name}={token}")
            elif not library or is_user_code(value) or is_custom_op(value):
                # torch's own attributes are named by the version; monkeypatched user code is hashed, and so
                # are custom operators reached through ``torch.ops.<namespace>.<name>``
                self._user_attributes += 1
                entries.append(f"{name}={self._named_ref(name, value)}")  # NOTE [Sets in their iteration order]
            elif library_members:  # NOTE [Library functions rebound in their module]
                named = self._library_member_token(value)
                if named is not None:
                    self._library_code_reached(getattr(value, "__module__", None) or module.__name__)
                    entries.append(f"{name}={named}")
        version = library_version(module.__name__) if library else ""  # NOTE [Library versions in every library token]
        return f"module:{module.__name__}{version}{{{','.join(entries)}}}"

    # -- library callables --------------------------------------------------------------------------------

    def _library_function_token(self, fn: types.FunctionType) -> str:
        # NOTE [Library functions that reach themselves]
        # A library wrapper may hold itself in its own closure (torch's ``Tensor.__rsub__`` and the other
        # reflected operators: the wrapper passes itself to ``handle_torch_function``), directly or through the
        # function it wraps. A library function is written down by its name and its library's version, not its
        # identity, so a function already being written further up the walk is written as a back-reference by
        # its distance up that chain: the same structure gives the same token in every process.
        marker = id(fn)
        if marker in self._active_library_functions:
            return f"lib-back:{len(self._active_library_functions) - self._active_library_functions.index(marker)}"
        self._active_library_functions.append(marker)
        try:
            return self._library_function_body_token(fn)
        finally:
            self._active_library_functions.pop()

    def _library_function_body_token(self, fn: types.FunctionType) -> str:
        # torch's decorators (no_grad, wraps) keep the user's function in a closure cell or __wrapped__
        cells = [self._library_cell_token(cell_contents(cell)) for cell in (fn.__closure__ or ())]
        wrapped = fn.__dict__.get("__wrapped__")
        inner = self.ref(wrapped) if wrapped is not None else ""
        module = defining_module(fn)
        reason = process_state.module_reason(module) if self.process_state else None
        if reason:
            raise Untrusted(reason)
        self._library_code_reached(module)
        return f"lib:{module}{library_version(module)}.{fn.__qualname__}({','.join(cells)}){inner}"

    def _library_cell_token(self, value: Any) -> str:
        # torch-owned helper objects in torch's closures (a dynamo DisableContext) are fixed by the version
        if isinstance(value, types.MethodType) and is_library(type(value.__self__).__module__) and not (
                isinstance(value.__self__, _TRANSPARENT_TYPES) or is_user_code(value.__func__)):
            return f"libmethod:{type_name(type(value.__self__))}.{value.__func__.__qualname__}"
        if is_library(type(value).__module__) and not isinstance(value, _TRANSPARENT_TYPES):
            return "libopaque:" + type_name(type(value))
        return self.ref(value)

    def _builtin_token(self, fn: Any) -> str:
        owner = getattr(fn, "__self__", None)
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "?")
        if owner is not None and not isinstance(owner, (type, types.ModuleType)):
            return f"bound-builtin({self.ref(owner)}).{name}"  # e.g. a dict's .get: its contents matter
        module = getattr(fn, "__module__", None) or getattr(owner, "__name__", None) or ""
        objclass = getattr(fn, "__objclass__", None)
        if isinstance(objclass, type):
            module = objclass.__module__
        root = module.split(".")[0]
        reason = process_state.module_reason(module) if self.process_state else None
        if reason:
            raise Untrusted(f"{reason}.{name}")
        if root in _SAFE_BUILTIN_ROOTS:
            return f"builtin:{module}.{name}"
        version = self._distribution_version(root)
        if version is None:
            raise Untrusted(f"C-extension callable: {module}.{name}")
        return f"builtin:{module}.{name}@{version}"  # compiled code of an installed package: its version
