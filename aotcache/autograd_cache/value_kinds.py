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
import types
import typing
from typing import Any

import torch

from aotcache.autograd_cache import safety
from aotcache.code_origin import defining_module, is_core_library, is_library, library_version

__all__ = ["type_name", "order_key", "describe", "is_custom_op", "is_custom_op_def", "is_observer_partial",
           "is_user_code", "slot_names", "is_inert_stdlib_value", "is_plain_object", "VOLATILE_ATTRIBUTES",
           "SET_ORDERED_ENTRIES"]


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
