"""Canonical serialization of everything reachable from a value: the one code walker behind every digest.

:class:`Reachable` walks user functions, classes, ``nn.Module`` trees and plain objects without running
them and writes each down deterministically (NOTE [Reachable code]); anything it cannot write down raises
:class:`Untrusted` with a short categorical reason. This module is the walk itself: its state, the order in
which nodes are found and written, and the dispatch over value kinds (tensors, operators, getters, ...).
The kinds with rules of their own are written down by mixins of :class:`Reachable`, each in its module: code
(functions, the modules they read, library callables) by :mod:`~aotcache.autograd_cache.code_walk`; modules,
plain objects and classes by :mod:`~aotcache.autograd_cache.object_walk`; containers by
:mod:`~aotcache.autograd_cache.container_walk`, sets' iteration orders by
:mod:`~aotcache.autograd_cache.set_orders`; ``lru_cache`` values by
:mod:`~aotcache.autograd_cache.lru_cache_values`; numpy arrays and byte buffers by
:mod:`~aotcache.autograd_cache.byte_buffers`. Both consumers build on it, so they see the same things: the call
fingerprint (:mod:`aotcache.autograd_cache.fingerprint`, docs/warmstart.md) and the code digests of the cache key
(:func:`value_digest`, :func:`custom_op_digest`; custom compilers, partitioners, decomposition tables,
``@cacheable`` functions, custom ops: docs/cache_key.md).
"""

from __future__ import annotations

import array
import collections
import collections.abc
import contextvars
import dataclasses
import enum
import functools
import importlib.metadata
import io
import logging
import operator
import os
import re
import sys
import threading
import types
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from aotcache.aot.exact_values import exact_repr
from aotcache.aot.signature import python_attributes
from aotcache.autograd_cache import process_state, safety
from aotcache.autograd_cache.byte_buffers import ByteBufferWalk, is_numpy_array
from aotcache.autograd_cache.code_walk import CodeWalk
from aotcache.autograd_cache.container_walk import ContainerWalk
from aotcache.autograd_cache.digests import (
    Untrusted,
    canonical_json,
    check_plain_tensor,
    sha256_text,
    tensor_content_digest,
)
from aotcache.autograd_cache.lru_cache_values import LRU_CACHE_WRAPPER, LruCacheWalk
from aotcache.autograd_cache.object_walk import ObjectWalk
from aotcache.autograd_cache.program_ownership import ProgramOwnership
from aotcache.autograd_cache.safety import BypassAOTAutogradCache
from aotcache.autograd_cache.set_orders import SetOrderWalk
from aotcache.autograd_cache.value_kinds import (
    describe,
    is_custom_op_def,
    is_inert_stdlib_value,
    is_observer_partial,
    is_plain_object,
    type_name,
)
from aotcache.code_origin import defining_module, is_core_library, is_library, library_version

__all__ = ["Reachable", "value_digest", "custom_op_digest", "UNSET_CONTEXT_VALUE"]

_MAX_NODES = 50_000  # reachable functions / classes / objects beyond this: too much to hash cheaply
_MAX_CONSTANT_BYTES = 64 * 1024 * 1024  # tensor constants hashed by content, in total
_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
_UNSET = object()  # the value of a context variable that was never set
UNSET_CONTEXT_VALUE = _UNSET  # the program guards compare a context variable's value with the walk's


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


class Reachable(CodeWalk, ObjectWalk, ContainerWalk, SetOrderWalk, LruCacheWalk, ByteBufferWalk):
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
        self._active_library_functions: list[int] = []  # NOTE [Library functions that reach themselves] in code_walk.py
        self._versions: dict[str, str | None] = {}  # distribution versions looked up in this computation
        self._tensor_members: dict[str, str] = {}  # NOTE [Tensor methods patched] in object_walk.py
        self._walking: Any = None  # the node whose token is being written (NOTE [Iterators a program advances])
        self._walking_index: int | None = None  # its index (None: a root's own value)
        self._sets_sorted = False  # torch's bookkeeping being written (NOTE [Sets in their iteration order])
        # NOTE [Sets in their iteration order] in set_orders.py: the name the value being written is held under (an
        # attribute, a global, a class member; None: a closure cell, a default, a root), each set's (name, order) met
        # so far, and the names reachable code uses in a way that may observe an order
        self._entry_name: str | None = None
        self._set_orders: list[tuple[str | None, str, bool]] = []  # (name, order, members ordered totally by <)
        self._order_names: set[str] = set()
        self._compared_names: set[str] = set()  # NOTE [Order-free reads that call back] in code_reading.py
        self._sorted_names: set[str] = set()
        # NOTE [Iterators a program advances]: who holds which iterator, resolved to the program's own in digest()
        self._ownership = ProgramOwnership() if guards is not None else None
        self._third_party_code = False  # NOTE [Library functions handed the program's objects] in program_ownership.py
        # (dict, function) of the lru_caches a fingerprint reached (NOTE [Cached values a fingerprint vouches for] in
        # lru_cache_values.py)
        self.lru_caches: list[tuple[dict, Any]] = []

    # -- driving ------------------------------------------------------------------------------------------

    def add_root(self, value: Any) -> str:
        self._walking, self._walking_index, self._entry_name = None, None, None
        if self._ownership is not None:
            self._ownership.root(value)  # NOTE [The module of the compiled code] in program_ownership.py
        token = self.ref(value)
        self._drain()
        return token

    def digest(self) -> str:
        """Digest over every node's token in index order (class tokens are completed here)."""
        self._drain()
        for index in self._classes:
            self._tokens[index] = self._class_token(index)
        if self._ownership is not None:  # NOTE [Iterators a program advances]
            for iterator in self._ownership.program_iterators(self._objects, self._names,
                                                              any_name=self._third_party_code):
                self._guards.iterator(iterator)
        lines = [self._tokens[i] for i in range(len(self._objects))]
        orders = self._observed_set_orders()
        if orders:  # NOTE [Sets in their iteration order] in set_orders.py
            lines.append(f"set-orders{{{orders}}}")
        if self._tensor_members:  # NOTE [Tensor methods patched] in object_walk.py
            lines.append("tensor-members{" + ",".join(f"{name}={token}" for name, token
                                                       in sorted(self._tensor_members.items())) + "}")
        return sha256_text("\n".join(lines))

    def _drain(self) -> None:
        while True:
            while self._queue:
                index = self._queue.popleft()
                # NOTE [Iterators a program advances]: whose state this is
                self._walking, self._walking_index = self._objects[index], index
                self._entry_name = None
                try:
                    self._tokens[index] = self._node_token(self._objects[index])
                except Untrusted as exc:
                    exc.where = exc.where or describe(self._objects[index])
                    self._tokens[index] = self._lenient_token(exc, self._objects[index])
            added = self._include_new_class_members()
            if not self._include_tensor_members() and not added:
                return

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
        if self._ownership is not None:
            self._ownership.edge(self._walking_index, index)
        return f"#{index}"

    # -- nodes --------------------------------------------------------------------------------------------

    def _node_token(self, value: Any) -> str:
        """A function by its code (:class:`CodeWalk`); a module or plain object by its state (:class:`ObjectWalk`)."""
        if isinstance(value, types.FunctionType):
            return self._function_token(value)
        if isinstance(value, nn.Module):
            return self._module_token(value)
        return self._object_token(value)

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
            return f"{type(value).__name__}:{exact_repr(value)}"  # NOTE [NaNs written down by bits] in exact_values.py
        if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.qscheme)):
            return str(value)
        if isinstance(value, torch.Size):
            return f"Size{tuple(value)!r}"
        if isinstance(value, torch.Tensor):
            return self._tensor_token(value)
        if isinstance(value, enum.Enum):
            return f"enum:{self.type_ref(type(value))}.{value.name}"
        if value is sys.modules:  # NOTE [sys.modules as a value]
            return "sys.modules"
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
        if type(value) in (operator.attrgetter, operator.methodcaller):
            return self._getter_token(value)
        if type(value) is operator.itemgetter:  # NOTE [Item getters as values]
            return f"itemgetter({self.ref(value.__reduce__()[1])})"
        if isinstance(value, LRU_CACHE_WRAPPER):
            return f"lru_cache({self.ref(value.__wrapped__)}){self._lru_cache_values(value)}"
        if isinstance(value, (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                              types.MethodWrapperType, types.ClassMethodDescriptorType)):
            return self._builtin_token(value)
        if isinstance(value, types.ModuleType):
            if is_library(value.__name__):
                return "module:" + value.__name__ + library_version(value.__name__)
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
        if type(value) is collections.ChainMap:
            # NOTE [ChainMaps by their maps]: a layered config (``ChainMap(overrides, defaults)``) was an opaque
            # object, its dicts unguarded: a key set in ``overrides`` kept the old graph (found in session 23). It is
            # its list of maps, each a dict guarded and written down as any other (``maps`` itself may be rebound).
            if self._guards is not None:
                self._guards.attributes(value, ("maps",))
            return f"chainmap({self.ref(value.maps)})"
        if isinstance(value, types.MappingProxyType):
            # NOTE [Mapping proxies guarded as the mapping they show]: the token is written from a copy, whose guards
            # would never fail: a write to the dict behind the proxy (``vars(cls)``, a read-only config view) kept
            # the old graph (found in session 23). The proxy itself is guarded: it reads through to that dict.
            if self._guards is not None:
                self._guards.contents(value)
            return "proxy" + self._container_token(dict(value))
        if value is os.environ:
            return self._environment_token()
        if is_numpy_array(value):
            return self._numpy_array_token(value)
        if isinstance(value, (bytearray, array.array)):
            return self._byte_buffer_token(value)
        if isinstance(value, memoryview):
            return self._memoryview_token(value)
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
            return f"thread-local:{self.type_ref(type(value))}({self._container_token(state, attributes=True)})"
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
        if is_custom_op_def(value):
            return self._op_token(value._opoverload)  # a torch.library.custom_op: by its registrations
        program_of = getattr(type(value), "fingerprint_program", None)
        if program_of is not None:  # a compiled function, by its code (NOTE [Compiled wrappers in a walked program]
            # in object_walk.py)
            return f"compiled:{self.type_ref(type(value))}({self.ref(program_of(value))})"
        if is_plain_object(value):
            return self._node(value)
        if is_observer_partial(value):
            # NOTE [QAT observer constructors]: a QConfig's ``_PartialWrapper`` (eager-mode QAT keeps it on every
            # prepared module as ``qconfig``) is a functools.partial plus a dict of callables; read as those, a
            # QAT model's fingerprint is trusted and its warm start skips the trace
            return f"observer-partial({self.ref(value.p)};{self.ref(value.callable_args)})"
        if (self._ownership is not None and isinstance(value, collections.abc.Iterator)
                and not isinstance(value, io.IOBase)):
            self._ownership.iterator(self._walking_index, value)  # NOTE [Iterators a program advances]
        raise Untrusted(f"opaque object: {type_name(type(value))}")

    # NOTE [sys.modules as a value]
    # A function holding the module table under a name (``from sys import modules``) reads modules from it by
    # name, and those lookups are guarded and fingerprinted by name (NOTE [Modules looked up by name] in
    # code_reading.py). Walked as a plain dict, its length and every member were guarded too: any import failed
    # the guards (walk again), and a module first imported while a capture ran the function (torch 2.11's
    # make_fx imports torch.distributed.tensor the first time it prints a graph) was deleted from sys.modules by
    # the capture's put-back of the program's containers, so the next import ran the module again (torch's
    # operator registrations then raise, the fallback's too). The table is written down as itself, as the
    # ``sys`` module is: imports are the process's business, not the program's state.

    # NOTE [Iterators a program advances]
    # An iterator the program reads (``next(COUNTER)`` on an ``itertools.count``, a generator, ``iter(list)``) holds
    # hidden state that every ``next()`` advances. A capture runs the function's Python more than once and cannot
    # put that state back, and a graph runs none: the counter advanced twice while capturing, and every call
    # returned the value baked into the graph (1, 1, 1 where eager gives 0, 1, 2; found in session 21). Such an
    # iterator stays opaque (untrusted across processes); the walk hands it to the guards, and a capture of a
    # program that reads one is refused before the function runs (NOTE [State changed by a capture] in
    # aot/call_state.py): the fallback runs the Python at every call. A plain object with ``__next__`` is walked
    # by its ``__dict__`` like any other; an open file (an iterator over its lines) is not taken for one.
    # Only the program's own iterators count, by positive evidence (ProgramOwnership in program_ownership.py): the
    # node holding it (a function's globals, closure cells or defaults, a class's attributes, a module's globals,
    # an object's ``__dict__``) is code or an object of a class from a real source file outside site-packages /
    # dist-packages, torch, aotcache and the standard library (or a SimpleNamespace / argparse.Namespace, or any
    # ``nn.Module``: the program sets a model's attributes whatever class built it), and a
    # path from the walk's roots reaches that node without entering code that is not the program's. Objects of a
    # library's class do not cut the path (an ``nn.Sequential`` holds the program's modules); a library's
    # function, class or module does. A denylist of libraries was not enough (session 21, then switched off):
    # pytest's ``_pytest`` has no distribution of that name, so a test's ``assert`` reached pytest's assertion
    # helpers as program code, their state every collected test, and through those another test file's global
    # ``itertools.count`` (tests/aot/test_stale_program_values.py); pytest-xdist's worker objects come from
    # execnet's ``__channelexec__``, a module without a file. An object's iterator counts only under a name the walked
    # code reads (NOTE [Iterators held under names no code reads] in program_ownership.py). Not counted: code without a
    # real source file other than the interpreter's ``__main__`` and the module defining the compiled code (NOTE [The
    # main module of a notebook], NOTE [The module of the compiled code] in program_ownership.py).


    # NOTE [Attribute getters as values] (session 25 review)
    # ``operator.attrgetter("_it")`` / ``operator.methodcaller("pop")`` made outside the walked code (in an
    # ``__init__``) and called by the forward (``next(self.take(self.source))``) reads an attribute by a name no
    # walked code holds: the object was opaque (untrusted across processes, by identity in-process), and an
    # iterator under that name was not the program's (NOTE [Iterators held under names no code reads] in
    # program_ownership.py), so the capture drew from it twice and every call gave the capture's value (2, 2, 2
    # where eager gives 1, 2, 3). Such a getter is written down by the names and arguments it holds, and those
    # names count as names the code reads (and may see a set's order through).
    # NOTE [Item getters as values] (session 26 review)
    # ``operator.itemgetter(1, "k")`` (a C object) was opaque: named by identity in-process and untrusted across
    # processes, so a program holding one (``self.pick = itemgetter(0)``) traced at every warm start. It holds
    # nothing but its items, fixed at construction (no ``__setstate__``), and reads ``container[item]`` of the
    # containers it is handed (the call's values, or program state the walk writes whole): written down by its
    # items, ``itemgetter(0)`` and ``itemgetter(1)`` differ, two made alike are equal in any process.
    def _getter_token(self, value: Any) -> str:
        """An ``operator.attrgetter`` / ``methodcaller`` by what it reads (NOTE [Attribute getters as values])."""
        maker, args = value.__reduce__()[:2]
        if type(value) is operator.attrgetter:
            names = [part for dotted in args for part in dotted.split(".")]
            self._add_names(names)
            self._order_names.update(names)
            return f"attrgetter({','.join(map(repr, args))})"
        keywords = maker.keywords if isinstance(maker, functools.partial) else {}
        name, args = (maker.args[0], args) if isinstance(maker, functools.partial) else (args[0], args[1:])
        self._add_names([name])
        self._order_names.add(name)
        return f"methodcaller({name!r};{self.ref(tuple(args))};{self.ref(dict(keywords))})"


    # NOTE [The environment as a value]
    # NOTE [Process state] pins the variables code reads by constant name through ``os.environ`` / ``getenv``. The
    # environment reached as a value instead (``env = os.environ`` in a closure or a global, ``from os import
    # environ as E``, an attribute holding it) was an opaque object: the lenient walk named it by its id, so no
    # guard saw ``os.environ["X"] = ...`` and the graph traced with the old setting ran on (a stale result, found
    # in session 20: ``"FLAG" in env``). It is written down by its whole contents and guarded by the entries of
    # the dict behind it (every set or delete replaces one: a walk; an equal setting keeps its graph, another
    # variable changed traces again, since the code may read any of them); across processes the whole environment
    # cannot be pinned, so the fingerprint is untrusted and the full key decides.
    def _environment_token(self) -> str:
        self._note("process state: os.environ reached as a value")
        backing = getattr(os.environ, "_data", None)
        if self._guards is not None and isinstance(backing, dict):
            self._guards.contents(backing)
        return "environ:" + sha256_text(canonical_json(sorted(os.environ.items())))

    def type_ref(self, cls: type) -> str:
        """A token for a class seen as the type of a value (its constructor is not reachable through it)."""
        try:
            return self._type_ref(cls)
        except Untrusted as exc:
            if not self._lenient:
                raise
            return self._lenient_token(exc, cls)

    def _library_code_reached(self, module_name: str | None) -> None:
        """Code of an installed distribution other than torch's and the standard library's is reachable: it may
        be handed the program's objects (NOTE [Library functions handed the program's objects])."""
        if not self._third_party_code and is_library(module_name) and not is_core_library(module_name):
            self._third_party_code = True

    def _type_ref(self, cls: type) -> str:
        self._library_code_reached(cls.__module__)
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
        """The tensor's own Python attributes (NOTE [Python attributes of parameters] in aot/module_call.py: code may
        read them, the capture does): empty for most tensors; guarded in-process, an added one included."""
        if self._guards is not None:
            self._guards.contents(tensor.__dict__)
        attributes = python_attributes(tensor)  # (torch.compile's own bookkeeping left out)
        return f"attrs{self._container_token(attributes, attributes=True)}" if attributes else ""

    def _distribution_version(self, root: str) -> str | None:
        if root not in self._versions:
            try:
                self._versions[root] = importlib.metadata.version(root) if root else None
            except (importlib.metadata.PackageNotFoundError, ValueError):
                self._versions[root] = None
        return self._versions[root]
