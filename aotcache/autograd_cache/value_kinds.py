"""What kind of value the walker meets: library code (named by its version) or user code (read), plain
objects (their whole state), inert standard-library values, custom operators (``custom_op`` objects
included); and the few library objects whose state needs special reading (config objects, QAT observer
constructors).

Split out of :mod:`aotcache.autograd_cache.reachable` so that the walk reads as a dispatch over kinds, and the
rules deciding each kind (which are what make a fingerprint sound, docs/warmstart.md) sit in one place.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import os
import sys
import types
import typing
from typing import Any

import torch

from aotcache.autograd_cache import safety

__all__ = ["is_library", "is_core_library", "library_version", "installed_distribution", "type_name",
           "order_key", "describe", "is_custom_op", "is_custom_op_def", "is_observer_partial", "defining_module",
           "is_user_code", "slot_names", "is_inert_stdlib_value", "is_plain_object", "VOLATILE_ATTRIBUTES",
           "SET_ORDERED_ENTRIES"]

_LIBRARY_ROOTS = frozenset({"torch", "functorch", "numpy", "sympy", "triton", "aotcache", "typing_extensions"})

# -- config objects ------------------------------------------------------------------------------------------

# Standard-library attribute bags whose whole state is their ``__dict__`` (configs are often held in them)
_NAMESPACE_TYPES = (types.SimpleNamespace, argparse.Namespace)
# Object attributes that hold a per-process hash()/id() of the object itself (they differ in every process and
# are never read by a forward): transformers' GenerationConfig records one to notice later edits.
VOLATILE_ATTRIBUTES = frozenset({"_original_object_hash"})

# NOTE [Set-ordered library metadata]
# diffusers' ``ConfigMixin`` keeps in every model's config (``_internal_dict``, a ``FrozenDict``) the names of the
# arguments left at their defaults as ``list(set(...))``: its order follows string hashing, which differs per
# process (PYTHONHASHSEED), so every diffusers model had another fingerprint in each process and a warm start
# traced again to find its entry. The entry is provenance for saving and loading configs (no forward reads it,
# and its order means nothing to any reader); it is fingerprinted by its sorted members. Keyed by the holding
# class and entry name, so nothing else is reordered.
SET_ORDERED_ENTRIES: dict[str, frozenset[str]] = {
    "diffusers.configuration_utils.FrozenDict": frozenset({"_use_default_values"}),
}


# -- library or user code -----------------------------------------------------------------------------------


def is_library(module_name: str | None) -> bool:
    """Code named, not traversed: torch, the standard library, and installed third-party distributions."""
    return is_core_library(module_name) or installed_distribution((module_name or "").split(".")[0]) is not None


def is_core_library(module_name: str | None) -> bool:
    """torch (and its companions), aotcache and the standard library: pinned by the versions in the key."""
    root = (module_name or "").split(".")[0]
    # code without a module name (exec'd into a bare namespace) is user code: it is read, never just named
    return root in _LIBRARY_ROOTS or root in sys.stdlib_module_names or root == "builtins"


# NOTE [Library versions in every library token]
# Library code is named, not read, so the name must carry what pins its behaviour: the version of the
# distribution that installed it. Classes and functions walked as values carried it, but a library function reached
# through its module (``import einops`` then ``einops.rearrange(x, ...)``: the module global's token lists what the
# code reads of it by qualified name) and a library module held as a value did not: after ``pip install -U`` of
# that library, a warm process found the same fingerprint and loaded the graph traced with the old version's
# code (session 22). Every library token now ends in the version (``@1.2``; "" where there is none: the standard
# library, user code).
def library_version(module_name: str | None) -> str:
    """``@<version>`` for code of an installed distribution (torch included), "" for the stdlib and user code."""
    version = installed_distribution((module_name or "").split(".")[0])
    return f"@{version}" if version else ""


@functools.lru_cache(maxsize=None)
def installed_distribution(root: str) -> str | None:
    """The version of the installed (non-editable) distribution that provides top-level module ``root``.

    NOTE [Installed packages are pinned by version] Code of a package installed into site-packages (e.g.
    transformers) is treated like torch's: named with its version, not traversed (traversing transformers'
    registries reaches hundreds of functions and costs ~0.1 s). Memoized per process: where a top-level
    module lives does not change under a running program. Editable installs and scripts are user code.
    """
    module = sys.modules.get(root)
    # a namespace package has no ``__file__``: its first search location, as the unloaded spec gives it (else it
    # was library code before its import and the program's after, within one process)
    path = ((getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or ()), None))
            if module is not None else _unloaded_origin(root)) or ""
    if not path or not any(part in ("site-packages", "dist-packages") for part in path.split(os.sep)):
        return None
    try:
        return importlib.metadata.version(root)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pass
    # NOTE [Import names that are not distribution names]
    return _site_top_level_versions(_site_directory(path)).get(root)


def _site_directory(path: str) -> str:
    """The site-packages (or dist-packages) directory that ``path`` lies in."""
    parts = path.split(os.sep)
    last = max(i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages"))
    return os.sep.join(parts[:last + 1])


# NOTE [Import names that are not distribution names]
# Many packages are imported under another name than the one they are installed as: ``_pytest`` (pytest),
# ``yaml`` (PyYAML), ``PIL`` (pillow), ``sklearn`` (scikit-learn), ``attr`` (attrs). Looked up by their import
# name they had no version, so their code was walked as the program's own: slowly, and a forward with an
# ``assert`` in a pytest test module reached pytest's session state through the rewritten assert's helpers,
# which the capture then refused as Python state the call changes (session 22, torch 2.11 run of
# test_odd_forwards). Such a module is found among the distributions of the site directory it lies in, by their
# top-level names (``top_level.txt``, else the first part of each path in ``RECORD``); a name several
# distributions share (a namespace package like ``google``) is pinned by all their versions. Read once per site
# directory and process (~0.1 s), only when a module under one is not a distribution's own name.
@functools.lru_cache(maxsize=None)
def _site_top_level_versions(site_dir: str) -> dict[str, str]:
    """Top-level import name -> the version(s) of the distribution(s) in ``site_dir`` that provide it."""
    providers: dict[str, set[str]] = {}
    try:
        distributions = list(importlib.metadata.distributions(path=[site_dir]))
    except OSError:
        return {}
    for distribution in distributions:
        try:
            name, version = distribution.metadata["Name"], distribution.version
            top_level = distribution.read_text("top_level.txt")
            names = set(top_level.split()) if top_level else _recorded_top_level_names(distribution.read_text("RECORD"))
        except (OSError, KeyError, ValueError):
            continue
        for top in names:
            providers.setdefault(top, set()).add(f"{name}=={version}")
    return {top: next(iter(pins)).split("==", 1)[1] if len(pins) == 1 else "+".join(sorted(pins))
            for top, pins in providers.items()}


def _recorded_top_level_names(record: str | None) -> set[str]:
    """The top-level modules and packages a distribution's ``RECORD`` installs."""
    names = set()
    for line in (record or "").splitlines():
        first, _, rest = line.split(",", 1)[0].partition("/")
        if rest:  # a package directory
            if not first.endswith((".dist-info", ".data")) and first not in ("__pycache__", "..", ""):
                names.add(first)
        elif first.endswith((".py", ".so", ".pyd")):  # a top-level module (an extension's name ends at its first dot)
            names.add(first.split(".", 1)[0])
    return names


def _unloaded_origin(root: str) -> str | None:
    """Where top-level module ``root`` would be imported from, found without importing it (a top-level spec
    imports nothing): an unloaded distribution is recognised as one, as it is once loaded."""
    try:
        spec = importlib.util.find_spec(root) if root else None
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and os.path.isabs(spec.origin):
        return spec.origin
    return next(iter(spec.submodule_search_locations or ()), None)


def defining_module(fn: types.FunctionType) -> str:
    """The module whose code defined ``fn`` (``functools.wraps`` copies ``__module__``, not the globals)."""
    return fn.__globals__.get("__name__") or fn.__module__ or ""


def is_user_code(value: Any) -> bool:
    """A Python function (or wrapper of one) defined outside torch and the standard library."""
    for attribute in ("__func__", "fget", "func"):
        value = getattr(value, attribute, value) if not isinstance(value, types.FunctionType) else value
    return isinstance(value, types.FunctionType) and not is_library(defining_module(value))


def is_custom_op(value: Any) -> bool:
    """An operator outside torch's own namespaces, or a custom_op (its registrations decide what it does)."""
    return isinstance(value, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and not (
        safety.is_torch_internal_namespace(str(value).split(".")[0])
        and safety.custom_op_implementations(value) is None)


def _custom_op_def_type() -> type | None:
    try:
        from torch._library.custom_ops import CustomOpDef
    except ImportError:  # pragma: no cover - older torch
        return None
    return CustomOpDef


_CUSTOM_OP_DEF = _custom_op_def_type()


def is_custom_op_def(value: Any) -> bool:
    """A ``torch.library.custom_op`` object (written down by its operator's registrations)."""
    return _CUSTOM_OP_DEF is not None and isinstance(value, _CUSTOM_OP_DEF)


def is_observer_partial(value: Any) -> bool:
    """torch.ao.quantization's ``_PartialWrapper`` (by name: importing torch.ao.quantization costs a warm start)."""
    cls = type(value)
    return (cls.__name__ == "_PartialWrapper" and cls.__module__ == "torch.ao.quantization.observer"
            and isinstance(getattr(value, "p", None), functools.partial)
            and isinstance(getattr(value, "callable_args", None), dict))


# -- names and order ---------------------------------------------------------------------------------------


_BUILTIN_CALLABLES = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                      types.ClassMethodDescriptorType)


def library_callable_name(value: Any) -> str | None:
    """Where a library function, builtin or class is defined (``fn:torch.nn.functional.relu``,
    ``builtin:torch._VariableFunctionsClass.sigmoid``, ``class:torch.nn.modules.linear.Linear``), or None for
    any other value: what is found under a name, whichever module holds it (NOTE [Library functions rebound
    in their module] in code_walk.py)."""
    # (with the version of the distribution that defines it: NOTE [Library versions in every library token])
    if isinstance(value, type):
        return f"class:{type_name(value)}{library_version(value.__module__)}"
    if isinstance(value, types.FunctionType):
        module = defining_module(value)
        return f"fn:{module}.{value.__qualname__}{library_version(module)}"
    if isinstance(value, _BUILTIN_CALLABLES):
        owner = getattr(value, "__objclass__", None) or getattr(value, "__self__", None)
        module = owner.__module__ if isinstance(owner, type) else getattr(value, "__module__", None)
        if isinstance(owner, types.ModuleType):
            module = owner.__name__
        return f"builtin:{module}.{getattr(value, '__qualname__', None) or value.__name__}{library_version(module)}"
    return None


def type_name(cls: type) -> str:
    """``module.QualName`` of a class (never an address)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def order_key(value: Any) -> tuple[str, str]:
    """A sort key for set members that does not depend on addresses or hash seeds."""
    if isinstance(value, (types.FunctionType, type)):
        return ("code", f"{value.__module__}.{value.__qualname__}")
    if isinstance(value, tuple):
        return ("tuple", repr([order_key(item) for item in value]))
    return (type_name(type(value)), repr(value) if " at 0x" not in repr(value) else "")


def describe(value: Any) -> str:
    """What a log line names as the thing being described (a function or class, else its type)."""
    if isinstance(value, (types.FunctionType, type)):
        return f"{value.__module__}.{value.__qualname__}"
    return f"a {type_name(type(value))} object"


# -- objects -----------------------------------------------------------------------------------------------


def slot_names(cls: type) -> list[str]:
    """The ``__slots__`` of a class and its bases (state that ``__dict__`` does not show)."""
    names = []
    for klass in cls.__mro__:
        slots = vars(klass).get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    return [name for name in names if name not in ("__dict__", "__weakref__")]


def is_inert_stdlib_value(value: Any) -> bool:
    """Type annotations and dataclasses sentinels: never read by tracing; their repr is address-free."""
    module = type(value).__module__
    annotation = module == "typing" or isinstance(value, (types.GenericAlias, types.UnionType))
    if not (annotation or module == "dataclasses" or isinstance(value, typing.TypeVar)):
        return False
    return " at 0x" not in repr(value)


def is_plain_object(value: Any) -> bool:
    """An instance of a Python class outside torch / stdlib whose state is its ``__dict__`` / slots."""
    cls = type(value)
    if cls is object or cls in _NAMESPACE_TYPES:
        return True  # a bare sentinel (its identity is its node index), or attribute bags (config holders)
    if is_core_library(cls.__module__) or not (hasattr(value, "__dict__") or slot_names(cls)):
        return False
    # a C-extension base class keeps state where __dict__ cannot show it
    return all(base is object or not _is_c_type(base) for base in cls.__mro__)


def _is_c_type(cls: type) -> bool:
    return (cls.__flags__ & (1 << 9)) == 0  # Py_TPFLAGS_HEAPTYPE: classes defined in Python are heap types
