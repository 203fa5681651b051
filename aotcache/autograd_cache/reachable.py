"""Canonical serialization of everything reachable from a value: the one code walker behind every digest.

:class:`Reachable` walks user functions, classes, ``nn.Module`` trees and plain objects without running
them and writes each down deterministically (NOTE [Reachable code]); anything it cannot write down raises
:class:`Untrusted` with a short categorical reason. Both consumers build on it, so they see the same things:
the call fingerprint (:mod:`aotcache.autograd_cache.fingerprint`, docs/warmstart.md) and the code digests of
the cache key (:func:`value_digest`, :func:`custom_op_digest`; custom compilers, partitioners, decomposition
tables, ``@cacheable`` functions, custom ops: docs/cache_key.md).
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import enum
import functools
import importlib.metadata
import logging
import os
import re
import sys
import threading
import types
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from aotcache.aot.hot_path import generate_memos, is_method_router, setting_by_value
from aotcache.aot.rebuilt_caches import rebuilt_cache_names
from aotcache.aot.signature import python_attributes
from aotcache.autograd_cache import process_state, safety
from aotcache.autograd_cache.code_reading import (
    all_names,
    cell_contents,
    constant_token,
    global_names,
    import_for_digest,
    imported_modules,
    string_constants,
)
from aotcache.autograd_cache.digests import (
    Untrusted,
    canonical_json,
    check_plain_tensor,
    sha256_text,
    tensor_content_digest,
)
from aotcache.autograd_cache.safety import BypassAOTAutogradCache
from aotcache.autograd_cache.value_kinds import (
    SET_ORDERED_ENTRIES,
    VOLATILE_ATTRIBUTES,
    defining_module,
    describe,
    is_core_library,
    is_custom_op,
    is_inert_stdlib_value,
    is_library,
    is_plain_object,
    is_user_code,
    library_callable_name,
    library_version,
    order_key,
    slot_names,
    type_name,
)

# Untrusted, check_plain_tensor, sha256_text, canonical_json, tensor_content_digest (digests.py) and
# is_core_library (value_kinds.py) are still importable from here, where they were defined before the split
__all__ = ["Reachable", "Untrusted", "check_plain_tensor", "sha256_text", "canonical_json",
           "value_digest", "custom_op_digest", "tensor_content_digest", "is_core_library"]

_MAX_NODES = 50_000  # reachable functions / classes / objects beyond this: too much to hash cheaply
_MAX_NESTING = 100  # containers nested deeper than this: untrusted (never a truncated description)
_MAX_CONSTANT_BYTES = 64 * 1024 * 1024  # tensor constants hashed by content, in total
# Class-dict entries that describe the class rather than behave (never read by tracing).
_CLASS_METADATA = frozenset({
    "__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__annotations__", "__annotate__",
    "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__", "__type_params__",
    "__dataclass_fields__", "__dataclass_params__", "__match_args__", "__abstractmethods__", "__slots__",
    "__slotnames__", "_abc_impl", "__protocol_attrs__", "__non_callable_proto_members__", "__init__", "__new__",
    "__repr__", "__str__", "__format__", "__dir__", "__sizeof__", "__del__", "__reduce__", "__reduce_ex__",
    "__getstate__", "__setstate__", "__copy__", "__deepcopy__", "__init_subclass__", "__class_getitem__",
    "__subclasshook__", "__getnewargs__", "__getnewargs_ex__", "__rich_repr__", "__post_init__",
})
# Class-dict entries that run when the class is called (constructed): included for classes that reachable
# code can call, i.e. classes referenced as values rather than only as the type of an existing instance.
_CONSTRUCTORS = frozenset({"__init__", "__new__", "__post_init__"})
# Module-dict entries that hold hooks: forward hooks are hashed, backward hooks make the result untrusted,
# state-dict hooks do not run during a forward.
_FORWARD_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                       "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_BACKWARD_HOOK_DICTS = ("_backward_hooks", "_backward_pre_hooks")
_IGNORED_MODULE_ENTRIES = frozenset({"_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                                     "_load_state_dict_post_hooks", "_is_full_backward_hook"})
# C functions named, not read, by the fingerprint (no clocks or OS calls: their results could steer tracing)
_SAFE_BUILTIN_ROOTS = frozenset({"builtins", "math", "operator", "_operator", "itertools", "functools",
                                 "_functools", "torch", "collections", "_collections", "numpy", "cmath",
                                 "_abc", "abc", "typing", "_thread", "warnings", "_warnings",
                                 "inspect", "copy", "re", "_sre", "string", "dataclasses", "contextlib"})
_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
_LRU_CACHE_WRAPPER = type(functools.lru_cache(maxsize=None)(len))
# values whose contents a closure cell of a torch function must show (they may carry user code or data)
_TRANSPARENT_TYPES = (types.FunctionType, types.MethodType, functools.partial, type, nn.Module, torch.Tensor,
                      tuple, list, dict, set, frozenset, str, bytes, int, float, complex, bool, type(None),
                      enum.Enum, torch.dtype, torch.device)
_UNSET = object()  # the value of a context variable that was never set
UNSET_CONTEXT_VALUE = _UNSET  # the program guards compare a context variable's value with the walk's
# Methods of a torch.autograd.Function that autograd itself calls by name (user code names only ``apply``)
_AUTOGRAD_FUNCTION_METHODS = frozenset({"forward", "backward", "setup_context", "jvp", "vjp", "vmap"})
_MODULE_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _custom_op_def_type() -> type | None:
    try:
        from torch._library.custom_ops import CustomOpDef
    except ImportError:  # pragma: no cover - older torch
        return None
    return CustomOpDef


_CUSTOM_OP_DEF = _custom_op_def_type()


def _is_observer_partial(value: Any) -> bool:
    """torch.ao.quantization's ``_PartialWrapper`` (by name: importing torch.ao.quantization costs a warm start)."""
    cls = type(value)
    return (cls.__name__ == "_PartialWrapper" and cls.__module__ == "torch.ao.quantization.observer"
            and isinstance(getattr(value, "p", None), functools.partial)
            and isinstance(getattr(value, "callable_args", None), dict))


def value_digest(value: Any) -> str:
    """Digest of ``value`` and everything reachable from it: code, closures, globals, object state.

    This is how the cache key identifies a custom compiler, partitioner, decomposition table, compiler
    option or ``@cacheable`` function: the same walk as the call fingerprint, with every tensor it reaches
    counted by content. :raises Untrusted: something reachable cannot be written down deterministically.
    """
    reachable = Reachable()
    root = reachable.add_root(value)
    return sha256_text(canonical_json({"root": root, "graph": reachable.digest()}))


def custom_op_digest(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> str | None:
    """Digest of everything registered for a non-torch operator, or None for torch's own operators.

    ``torch.library.custom_op`` ops hash every registration (kernels, fake, autograd, vmap, autocast);
    C++ operators from an installed package (``torchvision::nms``) hash the package version.
    :raises Untrusted: a registration cannot be written down, or the op has hidden Python kernels.
    """
    if safety.is_torch_internal_namespace(str(op).split(".")[0]) and safety.custom_op_implementations(op) is None:
        return None
    return value_digest(op)


# ----------------------------------------------------------------------------------------------------
# The reachable-code serializer
# ----------------------------------------------------------------------------------------------------


def _is_method_like(value: Any) -> bool:
    """A class member code may call (NOTE [Tensor methods patched]): a function, builtin or class, also wrapped in
    ``staticmethod`` / ``classmethod`` / ``property``."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    elif isinstance(value, property):
        value = value.fget
    return is_user_code(value) or library_callable_name(value) is not None


class Reachable:
    """Canonical serialization of the objects reachable from some roots.

    NOTE [Reachable code]
    Functions, classes, modules and plain objects are *nodes*: each gets an index on first sight (breadth
    first, in a deterministic order) and a token that names the nodes it references by index, so sharing
    and cycles are written down exactly and two different objects with the same name cannot be swapped
    unseen. A user function's token holds its bytecode digest (names, constants, nested code), defaults,
    closure cells and the globals its code reads: its global loads and writes only (NOTE [Global reads are loads, not
    co_names]), each module among them resolved through every name the code uses, attribute names included;
    imports inside the function as NOTE [Function-body imports] says. A class's token holds its bases
    and the members that tracing can reach: dunder protocol methods and every member whose name appears in some
    reachable user code (``co_names`` or an identifier-like string constant, for ``getattr(self, "x")``);
    torch's own classes contribute only members that were monkeypatched with non-torch code. Library code
    (torch, stdlib) is named, not traversed: its behaviour is fixed by the versions in the system part.
    ``id()`` is used only to recognise an object within one computation; it never enters a digest.
    A plain object (an instance of a Python class outside torch / stdlib) is its class plus its whole
    ``__dict__`` / slots; a bound method is its function plus its ``__self__``; a class referenced as a
    value (so that code may call it) also contributes ``__init__`` / ``__new__`` / ``__post_init__``, and so
    do its bases. Nothing is ever replaced by a type name: what cannot be written down raises Untrusted,
    as do the size limits (nodes, nesting depth, tensor bytes).
    """

    def __init__(self, state_tensors: Mapping[int, int] | None = None, *, lenient: bool = False,
                 guards: Any = None, managed: frozenset[int] = frozenset(), process_state: bool = False) -> None:
        # NOTE [Lenient walks] ``lenient`` (the in-process guards, aotcache.autograd_cache.program_guards): what
        # cannot be written down is named by its id() (valid in this process only) and the first reason is
        # kept in ``untrusted``, and the walk goes on, so that everything around it still gets guards.
        # ``guards`` receives what each token read (slot, attribute, container, env); ``managed`` holds the
        # ids of modules whose own attributes the caller checks itself (aot_module's ModuleState).
        # ``process_state``: apply NOTE [Process state] (the program of a call: fingerprint and guards; not
        # the key's digests of compilers and other options, which may time or log themselves freely)
        self.process_state = process_state
        self._lenient = lenient
        self._guards = guards
        self._managed = managed
        self.untrusted: Untrusted | None = None
        self._opaque: list[Any] = []  # kept alive: their id() is in a token
        self.env: dict[str, str | None] = {}  # environment variables pinned by the code (NOTE [Process state])
        self._code_digests: dict[types.CodeType, str] = {}
        self._index: dict[int, int] = {}
        self._objects: list[Any] = []  # keeps every node alive (ids stay unique) and in discovery order
        self._tokens: dict[int, str] = {}
        self._queue: collections.deque[int] = collections.deque()
        self._classes: dict[int, set[str]] = {}  # class node -> member names included so far
        self._constructible: set[int] = set()  # class nodes that reachable code may call (see the NOTE)
        self._names: set[str] = {"forward"}  # attribute names reachable code may read (nn.Module calls forward)
        self._state_tensors = state_tensors or {}  # id(tensor) -> position among the module's parameters/buffers
        self._constant_bytes = 0
        self._user_attributes = 0  # module attributes written down by their value (_imported_module_token)
        self._active_containers: list[int] = []
        self._active_library_functions: list[int] = []  # NOTE [Library functions that reach themselves]
        self._versions: dict[str, str | None] = {}  # distribution versions looked up in this computation
        self._tensor_members: dict[str, str] = {}  # NOTE [Tensor methods patched]

    # -- driving ------------------------------------------------------------------------------------------

    def add_root(self, value: Any) -> str:
        token = self.ref(value)
        self._drain()
        return token

    def digest(self) -> str:
        """Digest over every node's token in index order (class tokens are completed here)."""
        self._drain()
        for index in self._classes:
            self._tokens[index] = self._class_token(index)
        lines = [self._tokens[i] for i in range(len(self._objects))]
        if self._tensor_members:  # NOTE [Tensor methods patched]
            lines.append("tensor-members{" + ",".join(f"{name}={token}" for name, token
                                                       in sorted(self._tensor_members.items())) + "}")
        return sha256_text("\n".join(lines))

    def _drain(self) -> None:
        while True:
            while self._queue:
                index = self._queue.popleft()
                try:
                    self._tokens[index] = self._node_token(self._objects[index])
                except Untrusted as exc:
                    exc.where = exc.where or describe(self._objects[index])
                    self._tokens[index] = self._lenient_token(exc, self._objects[index])
            added = self._include_new_class_members()
            if not self._include_tensor_members() and not added:
                return

    # NOTE [Tensor methods patched]
    # ``y.sigmoid()`` on a tensor reaches ``torch.Tensor``'s members through no object the walk sees (the type of
    # ``y`` is known only when the code runs), so ``torch.Tensor.sigmoid = my_sigmoid`` (or ``= torch.Tensor.tanh``)
    # changed neither the digest nor the guards: the graph traced with the old method kept running in-process
    # and a warm process with the patch loaded it through the same fingerprint (found in session 16). Every name
    # reachable code uses that ``torch.Tensor``'s own namespace holds, and every method there (``y * 2`` names no
    # ``__mul__``: ``torch.Tensor.__mul__ = f`` shadows TensorBase's; ``F.normalize`` calls ``Tensor.norm`` from
    # torch's code, which the walk does not read: found in the session 16 review), is written down: user code by its code,
    # library code by where it is defined (the torch version fixes the unpatched ones). The guards hold the
    # whole namespace (a method set on ``torch.Tensor`` shadows ``TensorBase``'s C method, which cannot be
    # patched itself; NOTE [Whole namespaces in the guards] in program_guards.py). Only methods count: torch adds
    # ``__slotnames__`` (a list) to the class on the first deepcopy, which must not change a digest.
    def _include_tensor_members(self) -> bool:
        """Write down the ``torch.Tensor`` members reachable code may name; True when that queued new nodes."""
        namespace = vars(torch.Tensor)
        if self._guards is not None and not self._tensor_members:
            self._guards.owner(namespace, torch.Tensor)
            self._guards.namespace(namespace)  # NOTE [Whole namespaces in the guards] in program_guards.py
        methods = [name for name, value in namespace.items() if _is_method_like(value)]
        for name in sorted(self._names.intersection(namespace).union(methods).difference(self._tensor_members)):
            value = namespace[name]
            if is_user_code(value) or not is_library(getattr(value, "__module__", None) or "torch"):
                self._tensor_members[name] = self.ref(value)
            else:
                self._tensor_members[name] = self._library_member_token(value) or self.ref(value)
        return bool(self._queue)

    def _node(self, value: Any) -> str:
        index = self._index.get(id(value))
        if index is None:
            if len(self._objects) >= _MAX_NODES:
                raise Untrusted("too much reachable code")
            index = len(self._objects)
            self._index[id(value)] = index
            self._objects.append(value)
            if isinstance(value, type):
                self._classes[index] = set()
                self._tokens[index] = ""
            else:
                self._queue.append(index)
        return f"#{index}"

    # -- values -------------------------------------------------------------------------------------------

    def _note(self, reason: str) -> None:
        """Something the walk cannot vouch for: raise (strict) or remember the first reason (lenient)."""
        if not self._lenient:
            raise Untrusted(reason)
        if self.untrusted is None:
            self.untrusted = Untrusted(reason)

    def _lenient_token(self, exc: Untrusted, value: Any) -> str:
        if not self._lenient:
            raise exc
        if self.untrusted is None:
            self.untrusted = exc
        self._opaque.append(value)
        return f"opaque@{id(value)}"

    def ref(self, value: Any) -> str:
        """A token for any value reachable from the call; nodes by index. :raises Untrusted: opaque values."""
        try:
            return self._ref(value)
        except Untrusted as exc:
            if not self._lenient:
                raise
            exc.where = exc.where or describe(value)
            return self._lenient_token(exc, value)

    def _ref(self, value: Any) -> str:  # noqa: C901 - one dispatch over value kinds, kept flat on purpose
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)) or value is Ellipsis:
            return f"{type(value).__name__}:{value!r}"
        if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.qscheme)):
            return str(value)
        if isinstance(value, torch.Size):
            return f"Size{tuple(value)!r}"
        if isinstance(value, torch.Tensor):
            return self._tensor_token(value)
        if isinstance(value, enum.Enum):
            return f"enum:{self.type_ref(type(value))}.{value.name}"
        if isinstance(value, (tuple, list, dict, set, frozenset, slice, collections.deque)):
            return self._container_token(value)
        if isinstance(value, type):
            token = self.type_ref(value)
            if token.startswith("#"):
                self._constructible.add(int(token[1:]))  # a class as a value: code may construct it
            return token
        if isinstance(value, (types.FunctionType, nn.Module)):
            if isinstance(value, types.FunctionType) and is_library(defining_module(value)):
                return self._library_function_token(value)
            return self._node(value)
        if isinstance(value, types.MethodType):
            return f"method({self.ref(value.__self__)};{self.ref(value.__func__)})"
        if isinstance(value, functools.partial):
            if self._guards is not None:  # ``__setstate__`` replaces all three in place
                self._guards.attributes(value, ("func", "args", "keywords"))
            return f"partial({self.ref(value.func)};{self.ref(value.args)};{self.ref(value.keywords)})"
        if isinstance(value, (staticmethod, classmethod)):
            return f"{type(value).__name__}({self.ref(value.__func__)})"
        if isinstance(value, property):
            return f"property({self.ref(value.fget)};{self.ref(value.fset)};{self.ref(value.fdel)})"
        if isinstance(value, functools.cached_property):
            return f"cached_property({self.ref(value.func)})"
        if isinstance(value, _LRU_CACHE_WRAPPER):
            return f"lru_cache({self.ref(value.__wrapped__)})"
        if isinstance(value, (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                              types.MethodWrapperType, types.ClassMethodDescriptorType)):
            return self._builtin_token(value)
        if isinstance(value, types.ModuleType):
            if is_library(value.__name__):
                return "module:" + value.__name__
            raise Untrusted(f"module object as a value: {value.__name__}")
        if isinstance(value, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return self._op_token(value)
        if isinstance(value, torch._ops.HigherOrderOperator):
            return f"hop:{value.name()}"
        if isinstance(value, torch.Tag):
            return f"tag:{value.name}"
        if isinstance(value, (logging.Logger, logging.Handler, logging.Formatter, logging.Filter)):
            return "logging"  # logging never changes a traced graph
        if isinstance(value, re.Pattern):
            return f"pattern:{value.pattern!r}/{value.flags}"
        if isinstance(value, types.MappingProxyType):
            return "proxy" + self._container_token(dict(value))
        if isinstance(value, dataclasses.Field):
            settings = (value.name, value.default, value.default_factory, value.init, value.metadata)
            return f"field{self.ref(settings)}"
        if isinstance(value, weakref.ReferenceType):
            # NOTE [weak references]: a weak reference reads as what it refers to now (nn.RNNBase keeps
            # weakrefs to its own parameters, i.e. runtime inputs), or as dead: both are all a trace can see
            referent = value()
            return "weakref:dead" if referent is None else f"weakref({self.ref(referent)})"
        if isinstance(value, contextvars.ContextVar):
            current = value.get(_UNSET)
            if self._guards is not None:  # NOTE [Context variables in the guards]
                self._guards.context_variable(value, current)
            return f"contextvar:{value.name}={self.ref(current)}"
        if isinstance(value, threading.local):
            # NOTE [Thread-local objects]: read as the calling thread's attributes (its own ``__dict__``); the
            # guards hold that dict's identity, so a call from another thread, whose attributes may differ, walks
            # again (found in session 16: opaque, a changed attribute was a stale result in-process)
            state = value.__dict__
            if self._guards is not None:
                self._guards.attributes(value, ("__dict__",))
            return f"thread-local:{self.type_ref(type(value))}({self._container_token(state)})"
        if isinstance(value, _LOCK_TYPES):
            return "lock"  # synchronization only: nothing a trace reads
        if isinstance(value, RemovableHandle):
            # the hook it removes is hashed where it is registered (the module's hook dicts); transformers
            # keeps one as an attribute (gradient checkpointing's _require_grads_hook)
            return "hook-handle"
        if value is _UNSET:
            return "unset"
        if value is dataclasses.MISSING:
            return "dataclasses.MISSING"
        if is_inert_stdlib_value(value):
            return f"{type(value).__module__}:{value!r}"
        if _CUSTOM_OP_DEF is not None and isinstance(value, _CUSTOM_OP_DEF):
            return self._op_token(value._opoverload)  # a torch.library.custom_op: by its registrations
        program_of = getattr(type(value), "fingerprint_program", None)
        if program_of is not None:  # NOTE [Compiled wrappers in a walked program]: a compiled function, by its code
            return f"compiled:{self.type_ref(type(value))}({self.ref(program_of(value))})"
        if is_plain_object(value):
            return self._node(value)
        if _is_observer_partial(value):
            # NOTE [QAT observer constructors]: a QConfig's ``_PartialWrapper`` (eager-mode QAT keeps it on every
            # prepared module as ``qconfig``) is a functools.partial plus a dict of callables; read as those, a
            # QAT model's fingerprint is trusted and its warm start skips the trace
            return f"observer-partial({self.ref(value.p)};{self.ref(value.callable_args)})"
        raise Untrusted(f"opaque object: {type_name(type(value))}")

    def type_ref(self, cls: type) -> str:
        """A token for a class seen as the type of a value (its constructor is not reachable through it)."""
        try:
            return self._type_ref(cls)
        except Untrusted as exc:
            if not self._lenient:
                raise
            return self._lenient_token(exc, cls)

    def _type_ref(self, cls: type) -> str:
        if is_library(cls.__module__) and not issubclass(cls, nn.Module):
            reason = process_state.module_reason(cls.__module__) if self.process_state else None
            if reason:
                raise Untrusted(reason)
            return f"class:{type_name(cls)}{library_version(cls.__module__)}"
        return self._node(cls)

    def _op_token(self, op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> str:
        """torch's operators by name; others with every registration (custom_op) or their distribution's version."""
        namespace = str(op).split(".")[0]
        registrations = safety.custom_op_implementations(op)
        if registrations is None:
            if safety.is_torch_internal_namespace(namespace):
                return f"op:{op}"
            try:
                safety.check_operator_safe(op)  # Python kernels hidden in the dispatcher cannot be read
            except BypassAOTAutogradCache as exc:
                raise Untrusted(exc.reason) from None
            # a C++ operator of an installed distribution (checked above): its version
            return f"op:{op}:{getattr(op, '_schema', '')}@{self._distribution_version(namespace)}"
        schema = str(getattr(op, "_schema", ""))
        opdef = safety.custom_op_def(op) if self._guards is not None else None
        if opdef is not None:  # a registration added or replaced later: its attributes by identity
            self._guards.length(vars(opdef))
            for field, value in vars(opdef).items():
                self._guards.slot(vars(opdef), field, value)
        body = ",".join(f"{name}={self.ref(value)}" for name, value in registrations.items())
        return f"op:{op}:{schema}{{{body}}}"

    def _container_token(self, value: Any) -> str:
        if isinstance(value, slice):
            return f"slice({self.ref(value.start)},{self.ref(value.stop)},{self.ref(value.step)})"
        marker = id(value)
        if marker in self._active_containers:
            raise Untrusted("self-referencing container")
        if len(self._active_containers) >= _MAX_NESTING:
            raise Untrusted("nesting too deep")
        self._active_containers.append(marker)
        if self._guards is not None and not isinstance(value, (tuple, frozenset)):
            self._guards.contents(value)  # mutable: its members by identity (the holder checks the container)
        try:
            kind = type_name(type(value))
            if type(value) not in (tuple, list, dict, set, frozenset, collections.OrderedDict) and not (
                    isinstance(value, tuple) and hasattr(type(value), "_fields")):
                # a user subclass of a container may change how it is read: its class is part of the token
                kind = self.type_ref(type(value))
            if isinstance(value, Mapping):
                # insertion order is kept: iteration order can change what the code does
                unordered = SET_ORDERED_ENTRIES.get(f"{type(value).__module__}.{type(value).__qualname__}", ())
                items = [f"{self.ref(k)}={self._set_ordered_token(v) if k in unordered else self.ref(v)}"
                         for k, v in value.items()]
                return f"{kind}{{{','.join(items)}}}"
            if isinstance(value, (set, frozenset)):
                # order members by an index-free key first, so that node indices are assigned deterministically
                ordered = sorted(value, key=order_key)
                keys = [order_key(v) for v in ordered]
                if len(set(keys)) != len(keys):
                    raise Untrusted("unordered set of indistinguishable objects")
                return f"{kind}{{{','.join(self.ref(v) for v in ordered)}}}"
            if isinstance(value, collections.deque):  # its bound decides what an append drops
                kind = f"{kind}[maxlen={value.maxlen}]"
            return f"{kind}({','.join(self.ref(v) for v in value)})"
        finally:
            self._active_containers.pop()

    def _set_ordered_token(self, value: Any) -> str:
        """NOTE [Set-ordered library metadata]: a list of strings made from a set, by its sorted members."""
        if not isinstance(value, list) or not all(type(item) is str for item in value):
            return self.ref(value)
        if self._guards is not None:
            self._guards.contents(value)
        return f"sorted({','.join(sorted(self.ref(item) for item in value))})"

    def _tensor_token(self, value: torch.Tensor) -> str:
        position = self._state_tensors.get(id(value))
        if position is not None:  # a parameter or buffer of the compiled module: a runtime input
            return f"state#{position}{self._tensor_attributes(value)}"
        check_plain_tensor(value, "tensor constant")
        if self._guards is not None:
            self._guards.tensor(value)  # changed in place: compiled code may hold a copy (Inductor does)
        size = value.numel() * value.element_size()
        self._constant_bytes += size
        if self._constant_bytes > _MAX_CONSTANT_BYTES:
            raise Untrusted("large tensor constants")
        try:
            digest = tensor_content_digest(value)
        except BypassAOTAutogradCache as exc:
            raise Untrusted(exc.reason) from None
        # NOTE [Tensor constants by identity in-process] (program_guards.py): the in-process digest names it too
        where = f"@{id(value)}" if self._lenient else ""
        return f"tensor:{digest}:{value.requires_grad}{where}{self._tensor_attributes(value)}"

    def _tensor_attributes(self, tensor: torch.Tensor) -> str:
        """The tensor's own Python attributes (NOTE [Python attributes of parameters] in aot/module.py: code may
        read them, the capture does): empty for most tensors; guarded in-process, an added one included."""
        if self._guards is not None:
            self._guards.contents(tensor.__dict__)
        attributes = python_attributes(tensor)  # (torch.compile's own bookkeeping left out)
        return f"attrs{self._container_token(attributes)}" if attributes else ""

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

    def _distribution_version(self, root: str) -> str | None:
        if root not in self._versions:
            try:
                self._versions[root] = importlib.metadata.version(root) if root else None
            except (importlib.metadata.PackageNotFoundError, ValueError):
                self._versions[root] = None
        return self._versions[root]

    # -- nodes --------------------------------------------------------------------------------------------

    def _node_token(self, value: Any) -> str:
        if isinstance(value, types.FunctionType):
            return self._function_token(value)
        if isinstance(value, nn.Module):
            return self._module_token(value)
        return self._object_token(value)

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
        names = sorted(name_set)
        self._add_names(names)
        self._add_names(strings)
        guards = self._guards
        referenced = []
        for name in sorted(global_set):
            if name in fn_globals:
                value = fn_globals[name]
                if guards is not None:
                    guards.slot(fn_globals, name, value)
                referenced.append(f"{name}={self._global_token(value, names)}")
        for module_name in imported_modules(fn):
            referenced.append(f"import {module_name}={self._imported_module_token(module_name, names)}")
        # a module in a closure cell is read like a module global: through the attribute names the code uses
        cells = []
        for cell in fn.__closure__ or ():
            value = cell_contents(cell)
            if guards is not None:
                guards.cell(cell)
            cells.append(self._global_token(value, names))
        if guards is not None:
            guards.attributes(fn, ("__code__", "__defaults__", "__kwdefaults__"))
            guards.length(fn.__dict__)
        attributes = {k: v for k, v in fn.__dict__.items() if not k.startswith("__aotcache")}
        return (f"fn {self._code_digest(code)} defaults={self.ref(fn.__defaults__ or ())} "
                f"kwdefaults={self.ref(fn.__kwdefaults__ or {})} closure=[{','.join(cells)}] "
                f"globals=[{';'.join(referenced)}] attrs={self.ref(attributes)}"
                f"{self._process_state_token(fn, name_set) if self.process_state else ''}")

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

    def _global_token(self, value: Any, names: Sequence[str]) -> str:
        if isinstance(value, types.ModuleType):
            return self._module_attributes_token(value, names, set())
        return self.ref(value)

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
                entries.append(f"{name}={self.ref(value)}")
            elif library_members:  # NOTE [Library functions rebound in their module]
                named = self._library_member_token(value)
                if named is not None:
                    entries.append(f"{name}={named}")
        return f"module:{module.__name__}{{{','.join(entries)}}}"

    # NOTE [Compiled wrappers in a walked program]
    # A compiled wrapper (aotcache's AOTModule) inside a walked model runs its wrapped module inline while the
    # enclosing call is captured (NOTE [Nested compiled functions] in aot/module.py), so what it contributes to
    # the graph is that module (in its ``_modules``), its hooks and its class's code. Its compile machinery (the
    # AOTFunction and its compiled graphs, locks, counters) is not program: the class names those attributes in
    # ``fingerprint_skips`` and the walk leaves them out, instead of calling the whole program untrusted. A
    # compiled function (AOTFunction, aotcache.compile's) likewise runs its function inline: its class's
    # ``fingerprint_program(obj)`` returns that function, which the walk sees in its place.
    def _module_token(self, module: nn.Module) -> str:
        cls = type(module)
        if type_name(cls).startswith("torch._dynamo"):
            raise Untrusted("torch.compile-d submodule")
        if isinstance(module, torch.jit.ScriptModule):  # TorchScript: C++ code and C++-backed registries
            raise Untrusted("torch.jit.script-ed submodule")
        call = cls.__call__
        if call is not nn.Module.__call__ and not (isinstance(call, types.FunctionType)
                                                   and is_library(defining_module(call))):
            # NOTE [Library __call__ overrides]: a user's __call__ is code the walk does not read; one defined
            # by torch or an installed library is pinned by its version in the key, as library forwards are
            # (torch's ParameterDict / ParameterList define a raising __call__, and peft's LoRA layers hold them)
            self._note(f"module overrides __call__: {type_name(cls)}")
        entries = []
        guards = self._guards
        managed = id(module) in self._managed  # its attributes and entries: ModuleState checks them per call
        if guards is not None and not managed:
            guards.attributes(module, ("__class__",))
            guards.length(module.__dict__)
        machinery = getattr(cls, "fingerprint_skips", ())  # NOTE [Compiled wrappers in a walked program]
        machinery = (*machinery, *rebuilt_cache_names(module))  # NOTE [Caches a module rebuilds from its weights]
        memos = generate_memos(cls)  # NOTE [Generate memos] in aot/hot_path.py: only generate reads them
        for name, value in module.__dict__.items():
            if name in _IGNORED_MODULE_ENTRIES or name in machinery or name in memos or is_method_router(name, value):
                continue
            if guards is not None:
                self._module_attribute_guard(module.__dict__, name, value, managed)
            if name in _BACKWARD_HOOK_DICTS:
                if value:
                    self._note("module backward hooks")
                    if guards is not None:
                        guards.contents(value)
                    entries.append(f"{name}=[{','.join(self.ref(hook) for hook in value.values())}]")
                continue
            if name in _FORWARD_HOOK_DICTS:
                if guards is not None and (value or not managed):
                    guards.contents(value)  # hooks by identity (ModuleState counts them)
                entries.append(f"{name}=[{','.join(self.ref(hook) for hook in value.values())}]")
            elif name in _MODULE_CONTAINERS:
                # a managed module's children by identity too: ModuleState's settings may not tell a child
                # swapped for another of the same type and settings (whose lists or hooks differ)
                if guards is not None and (not managed or name == "_modules"):
                    guards.contents(value)
                entries.append(f"{name}=[{','.join(f'{k}:{self.ref(v)}' for k, v in value.items())}]")
            elif name == "_non_persistent_buffers_set":  # names state_dict leaves out: never read by forward
                entries.append(f"{name}={self._without_guards(value)}")
            else:
                entries.append(f"{name}={self.ref(value)}")
        entries.sort()
        return f"module {self.type_ref(cls)} " + " ".join(entries)

    def _module_attribute_guard(self, attributes: dict, name: str, value: Any, managed: bool) -> None:
        """Guard ``attributes[name]`` of a walked module (NOTE [Rebound list attributes] in program_guards.py)."""
        if name in _MODULE_CONTAINERS or name in _FORWARD_HOOK_DICTS or name in _BACKWARD_HOOK_DICTS:
            if not managed:
                self._guards.slot(attributes, name, value)
        elif isinstance(value, (list, set)) or (isinstance(value, tuple) and not (managed and setting_by_value(value))):
            self._guards.slot_members(attributes, name, value)  # rebuilt by some modules: read again, by members
        elif not managed or isinstance(value, dict):
            self._guards.slot(attributes, name, value)  # ModuleState counts a managed module's dicts only

    def _without_guards(self, value: Any) -> str:
        guards, self._guards = self._guards, None
        try:
            return self.ref(value)
        finally:
            self._guards = guards

    def _object_token(self, value: Any) -> str:
        state = value.__dict__ if hasattr(value, "__dict__") else {}
        slots = [(name, getattr(value, name)) for name in slot_names(type(value)) if hasattr(value, name)]
        if self._guards is not None:
            # NOTE [An object's __dict__ replaced]: its entries are read from the dict the walk saw, so that dict is
            # guarded by identity too (``obj.__dict__ = {...}`` rebinds every attribute and writes no recorded dict)
            dict_attribute = ("__dict__",) if hasattr(value, "__dict__") else ()
            self._guards.attributes(value, ("__class__", *dict_attribute, *(name for name, _ in slots)))
            if hasattr(value, "__dict__"):
                self._guards.length(state)
                for name, item in state.items():
                    if name not in VOLATILE_ATTRIBUTES:
                        self._guards.slot(state, name, item)
        items = sorted(f"{k}={self.ref(v)}" for k, v in (*state.items(), *slots) if k not in VOLATILE_ATTRIBUTES)
        return f"object {self.type_ref(type(value))} " + " ".join(items)

    def _code_digest(self, code: types.CodeType) -> str:
        """Digest of a code object: bytecode, names, constants (nested code recursively); no file or line."""
        cached = self._code_digests.get(code)
        if cached is None:
            consts = [self._code_digest(c) if isinstance(c, types.CodeType) else constant_token(c)
                      for c in code.co_consts]
            cached = sha256_text(canonical_json([
                code.co_name, code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags,
                code.co_code.hex(), list(code.co_names), list(code.co_varnames), list(code.co_freevars),
                list(code.co_cellvars), consts]))
            self._code_digests[code] = cached
        return cached

    # -- classes ------------------------------------------------------------------------------------------

    def _add_names(self, names: Iterable[str]) -> None:
        self._names.update(names)

    def _member_included(self, index: int, cls: type, name: str, value: Any) -> bool:
        if name in _CONSTRUCTORS and index in self._constructible and not is_library(cls.__module__):
            return True
        if name in _CLASS_METADATA:
            return False
        if is_library(cls.__module__):
            return is_user_code(value)  # torch's own members: only when monkeypatched with user code
        if name in _AUTOGRAD_FUNCTION_METHODS and issubclass(cls, torch.autograd.Function):
            return True  # autograd calls them by name: backward runs though no user code names it
        if name.startswith("__") and name.endswith("__"):
            return True
        return name in self._names

    def _include_new_class_members(self) -> bool:
        """Add class members newly reachable by name; True when something new must be processed."""
        added = False
        for index, included in list(self._classes.items()):
            cls = self._objects[index]
            if not included:  # first visit: the class's bases and metaclass
                included.add("")
                for base in cls.__bases__:
                    if base is not object:
                        self.type_ref(base)
                if type(cls) is not type:
                    self.type_ref(type(cls))
                added = True
            if index in self._constructible:  # super().__init__() reaches the bases' constructors
                for base in cls.__mro__[1:]:
                    base_index = self._index.get(id(base))
                    if base_index in self._classes and base_index not in self._constructible:
                        self._constructible.add(base_index)
                        added = True
            for name, value in list(vars(cls).items()):
                if name not in included and self._member_included(index, cls, name, value):
                    included.add(name)
                    try:
                        self.ref(value)
                    except Untrusted as exc:
                        exc.where = exc.where or f"{type_name(cls)}.{name}"
                        raise
                    added = True
        return added or bool(self._queue)

    def _class_token(self, index: int) -> str:
        cls = self._objects[index]
        bases = ",".join(self.type_ref(base) for base in cls.__bases__)
        members = sorted(name for name in self._classes[index] if name)
        body = ";".join(f"{name}={self.ref(vars(cls)[name])}" for name in members)
        if self._guards is not None:
            namespace = vars(cls)
            self._guards.owner(namespace, cls)  # a read-only view: written back through the class
            if not is_library(cls.__module__):
                self._guards.length(namespace)  # an attribute added here may shadow one of a base class
            for name in self._names.intersection(namespace).union(members):
                self._guards.slot(namespace, name, namespace[name])
        return (f"class {type_name(cls)}{library_version(cls.__module__)} bases=({bases}) "
                f"meta={self.type_ref(type(cls))} members={{{body}}}")


