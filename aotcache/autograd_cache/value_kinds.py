"""What kind of value the walker meets: library code (named by its version) or user code (read), plain
objects (their whole state), inert standard-library values, custom operators; and the few library config
objects whose state needs special reading.

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
           "order_key", "describe", "is_custom_op", "defining_module", "is_user_code", "slot_names",
           "is_inert_stdlib_value", "is_plain_object", "VOLATILE_ATTRIBUTES", "SET_ORDERED_ENTRIES"]

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


def library_version(module_name: str | None) -> str:
    """``@<version>`` for code of an installed third-party distribution, "" for torch / stdlib / user code."""
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
    path = (getattr(module, "__file__", None) if module is not None else _unloaded_origin(root)) or ""
    if not path or not any(part in ("site-packages", "dist-packages") for part in path.split(os.sep)):
        return None
    try:
        return importlib.metadata.version(root)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


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


# -- names and order ---------------------------------------------------------------------------------------


_BUILTIN_CALLABLES = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                      types.ClassMethodDescriptorType)


def library_callable_name(value: Any) -> str | None:
    """Where a library function, builtin or class is defined (``fn:torch.nn.functional.relu``,
    ``builtin:torch._VariableFunctionsClass.sigmoid``, ``class:torch.nn.modules.linear.Linear``), or None for
    any other value: what is found under a name, whichever module holds it (NOTE [Library functions rebound
    in their module] in code_walk.py)."""
    if isinstance(value, type):
        return f"class:{type_name(value)}"
    if isinstance(value, types.FunctionType):
        return f"fn:{defining_module(value)}.{value.__qualname__}"
    if isinstance(value, _BUILTIN_CALLABLES):
        owner = getattr(value, "__objclass__", None) or getattr(value, "__self__", None)
        module = owner.__module__ if isinstance(owner, type) else getattr(value, "__module__", None)
        if isinstance(owner, types.ModuleType):
            module = owner.__name__
        return f"builtin:{module}.{getattr(value, '__qualname__', None) or value.__name__}"
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
