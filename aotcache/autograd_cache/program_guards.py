"""In-process reuse guards: a cheap check, on every call, that the program a compiled graph came from is unchanged.

NOTE [Program guards]
A graph compiled earlier in the process is reused by signature (NOTE [Signature] in aot/signature.py), and the
signature sees the arguments, not the program: a module global read by ``forward`` reassigned, a class
attribute (``M.SCALE = 3.0``), a closure cell, a forward hook swapped for another, a list attribute or a
nested config object changed in place, or an environment variable the code reads by name all left the old
graph running. :func:`watch_program` walks the program with the fingerprint's walker (NOTE [Reachable
code]) in its lenient form (NOTE [Lenient walks]) and records, for everything each token read:

======================= =================================================================================
slots                   a dict entry by identity: each global a function reads or writes (not a name
                        used only as an attribute: ``self.a`` is no read of a global ``a``, NOTE [Global
                        reads are loads, not co_names]), each attribute of a user module it reaches,
                        each class member reachable code can read, each attribute of a plain object
                        (config objects, at every depth the walk reaches)
attributes              ``cell_contents`` of each closure cell; a function's ``__code__`` / ``__defaults__``
                        / ``__kwdefaults__``; an object's ``__class__`` and ``__slots__``
lengths                 dicts of objects and classes (an added attribute may shadow another), containers
members                 the members of each mutable container reached (lists, dicts, sets, hook registries,
                        the global module hook registries) by identity
environment             each variable pinned by NOTE [Process state], by value
context variables       the value each ``contextvars.ContextVar`` the code reaches has now, by identity
                        (NOTE [Context variables in the guards])
tensor constants        the version counter of each tensor the graph bakes in (not the parameters and
                        buffers of an ``aot_module``, which are inputs): Inductor copies constants; its
                        identity is in the digest (NOTE [Tensor constants by identity in-process])
rebound attributes      each list / set / tuple attribute of a walked module, read again per call, its
                        members by identity (NOTE [Rebound list attributes])
======================= =================================================================================

:meth:`ProgramGuards.holds` checks them all with C-level iteration (``map(operator.is_, ...)`` over flat
lists, no Python loop per entry). A failed check is not yet a change: the program is walked again and its
digest compared (a value re-assigned to an equal one, a list rebuilt with the same members, keeps the
graph); a different digest selects or compiles another graph (and, with a cache, computes a new call
fingerprint: a hit under it loads instead of tracing). The digest of a lenient walk names opaque values by
``id()``: it is an in-process identity only, never stored.

What stays unseen in-process: the insides of opaque objects (C-extension objects, anything the fingerprint
calls opaque; they are guarded by identity only), library code (torch, the standard library, installed
packages: fixed while the process runs, unless monkeypatched in a module or class the walk reached), and
values that process state returns (the clock, random numbers, files), which make the fingerprint untrusted
but cannot be re-checked per call. A tensor constant changed in place is walked again and, its content
digest changed, traced again (even where the compiled code reads the tensor object itself, as the nop
compiler's does).
"""

from __future__ import annotations

import array
import dataclasses
import gc
import itertools
import operator
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from aotcache.aot.hot_path import dict_version_tag
from aotcache.autograd_cache.fingerprint import _GLOBAL_MODULE_HOOKS, state_positions
from aotcache.autograd_cache.digests import canonical_json, sha256_text
from aotcache.autograd_cache.lru_cache_values import immutable_cached_value, lru_cache_entries
from aotcache.autograd_cache.reachable import UNSET_CONTEXT_VALUE, Reachable

if TYPE_CHECKING:
    from aotcache.autograd_cache.program_restore import SavedProgramState

__all__ = ["GuardRecorder", "ProgramGuards", "WatchedProgram", "watch_program"]

# NOTE [Rebound list attributes]
# A module's list, set and tuple attributes are not all part of aot_module's settings (ModuleState leaves lists,
# sets and tuples of objects out: some modules rebuild theirs, nn.LSTM its ``_flat_weights`` whenever a weight is
# set or swapped), and the walk guarded only the members of the container object it saw. So a rebound attribute
# went unseen: peft's ``set_adapter`` rebinding its layers' ``_active_adapter`` to a new list (the previous
# adapter's graph ran), and ``self.masks = [t1, t2]`` or ``self.tup = (t,)`` rebound to other tensors (the graph
# baked with the old tensors ran). The guard reads each such attribute of every walked module again per call and
# compares its members by identity: a rebuilt container with the same members holds (an LSTM's rebuilt weight
# list holds the same Parameters), one with other members is walked again (equal plain values keep their graph:
# same digest). Tensors inside are constants guarded by identity and version (NOTE [Tensor constants by identity
# in-process]); parameters and buffers of an aot_module are its inputs, named by position. A tuple of
# plain values on an aot_module's module is compared by value in its settings and not guarded again. A dict
# attribute is guarded by identity (ModuleState only counts the entries of an aot_module's dicts: its hook
# registries); its entries are guarded as a container's members.

# NOTE [Libraries loaded after the walk]
# A library a function imports in its body is written into the digest by name and version, plus any user code
# patched into the attributes the code reads (NOTE [Function-body imports] in code_reading.py); those attributes
# are guarded only if the library is loaded when the walk runs. One loaded by the first call itself (the
# capture runs the import) had no guard, so a patch made afterwards (``mylib.f = ...``) kept the graph traced
# with the old function: a stale result. Such a library is recorded as not loaded; once it is, the guards fail
# once and the walk runs again, now guarding what the code reads of it (an unpatched library: the same digest,
# the same graph).

# NOTE [Context variables in the guards]
# The walk writes a ``contextvars.ContextVar`` down with the value it has when the program is walked (its
# ``get()`` is what ``forward`` reads), but the guards recorded only the variable itself, a slot holding the same
# object after ``cv.set(3.0)``. So a graph traced with the old value kept running: a stale result (found in
# session 16). Each variable's current value is guarded by identity; an equal value set again walks once and keeps
# the graph (same digest).

# NOTE [Whole namespaces in the guards]
# ``torch.Tensor``'s own namespace is written down member by member (NOTE [Tensor methods patched] in
# object_walk.py), ~65 methods. One slot guard each, through the class's read-only view, cost ~9 us a call on this
# machine (a slot read of a ``mappingproxy`` is ~140 ns, and no version tag skips it); the names and the values
# of the whole namespace listed and compared with the walk's lists (the values by ``id``, never by ``__eq__``: a
# user object's may raise or answer True for anything) cost ~3.5 us, still a tenth of a small module's call; so
# while the dict behind the view keeps the version tag it had when the namespace was last found unchanged, it
# was not written and nothing is listed (that dict is only read, never written: writes go through the class).
# Any difference walks again.

# NOTE [Tensor data swapped in place]
# ``t.data = other`` (or ``param.data = ...`` on a parameter of a module an ``aot_function`` closes over: a graph
# constant) gives the same tensor object other data without bumping its version counter. The guard compared
# versions only, so a compiled graph holding a copy of the constant (Inductor's; any compiler that freezes
# constants) kept computing with the old data: a stale result. Each tensor constant is also guarded by its data
# pointer and shape; a change walks again, and the new content is another digest.

# NOTE [Tensor constants by identity in-process]
# The digest of a lenient walk names each tensor constant by content *and* identity. By content only, a constant
# rebound to an equal copy (``self.masks = [m.clone()]``) kept the graph traced with the original, and a compiled
# graph that reads the tensor object itself (the nop compiler's; a custom compiler's may) then followed later
# in-place changes of the original, which the program no longer reads: a stale result. Another identity is another
# digest: the graph of that tensor is traced again or found (a rebind back to the first tensor finds its graph),
# and with a cache a trusted call fingerprint (by content) loads a saved graph instead of tracing.

_values = operator.methodcaller("values")
_chain = itertools.chain.from_iterable
_is = operator.is_
_env_get = os.environ.get


def _array_unchanged(entry: tuple) -> bool:
    """Whether a numpy array, ``bytearray``, ``array.array`` or ``memoryview`` has the state the walk saw: dtype,
    shape, flags and bytes (NOTE [numpy arrays by content], NOTE [Byte buffers by content] in byte_buffers.py)."""
    value, state = entry
    kind = type(value)
    if kind is bytearray:
        return value == state[0]  # (compared in place, no copy)
    if kind is array.array:
        return value.typecode == state[0] and value.tobytes() == state[1]
    if kind is memoryview:  # NOTE [memoryviews by content] in byte_buffers.py: released since, changed
        try:
            return value.format == state[0] and value.shape == state[1] and value.tobytes() == state[3]
        except ValueError:
            return False
    return (value.dtype == state[0] and value.shape == state[1] and value.flags.writeable is state[2]
            and value.tobytes() == state[3])
_version_of = operator.attrgetter("_version")
_pointer_of = operator.methodcaller("data_ptr")
_shape_of = operator.attrgetter("shape")


_MISSING_NAME = object()


def _namespace_unchanged(entry: tuple[Mapping, list, list, list, Any, list]) -> bool:
    """NOTE [Whole namespaces in the guards]: the same names bound to the same objects (by ``id``: ``values``
    keeps them alive, so no other object can have one of those ids, and no user ``__eq__`` is ever called)."""
    mapping, names, _values, identities, backing, tag = entry
    if backing is not None and dict_version_tag(backing) == tag[0]:
        return True  # not written since it was last found unchanged
    current = dict_version_tag(backing) if backing is not None else None
    if list(mapping) == names and list(map(id, mapping.values())) == identities:
        tag[0] = current
        return True
    return False


def _backing_dict(mapping: Mapping) -> dict | None:
    """The dict a class's read-only ``vars()`` view shows, read only for its version tag (NOTE [Dict versions] in
    aot/hot_path.py); None where version tags are not trusted or the view is not over a plain dict."""
    if dict_version_tag is None:
        return None
    backing = [item for item in gc.get_referents(mapping) if type(item) is dict]
    if len(backing) != 1 or len(backing[0]) != len(mapping) or any(
            backing[0].get(name, _MISSING_NAME) is not value for name, value in mapping.items()):
        return None
    return backing[0]


def _cache_snapshot(cache: dict) -> list:
    """A cache dict's version tag, keys and values, as the guards compare them (NOTE [Values an lru_cache holds] in
    lru_cache_values.py)."""
    return [dict_version_tag(cache) if dict_version_tag is not None else None, list(cache), list(cache.values())]


def _cache_unchanged(entry: tuple[dict, list]) -> bool:
    """Whether an lru_cache's dict holds the same keys bound to the same values (by identity; unwritten since: its
    version tag) as the walk, or the capture after it, left."""
    cache, state = entry
    if state[0] is not None and dict_version_tag(cache) == state[0]:
        return True
    keys, values = state[1], state[2]
    if len(cache) != len(keys) or not all(map(_is, cache, keys)) or not all(map(_is, cache.values(), values)):
        return False
    state[0] = dict_version_tag(cache) if dict_version_tag is not None else None
    return True


# NOTE [Cached values the capture made] (session 25 review)
# A value an lru_cache computes during the capture (the cache was empty when the walk wrote it) was taken by
# ``refresh_caches`` without a walk, so nothing guarded its state: ``@functools.cache def table(): return [2.0, 1.0]``
# (or a settings object, a tensor) changed in place by the program (``table()[0] = 7.0``) kept the graph traced with
# 2.0 where eager reads 7.0. The first graph is still kept under the walk's digest, but a value the capture put in
# the cache that is not a plain immutable value (a number, string, bytes, None, dtype or device, tuples and
# frozensets of them) leaves the guards failing once: the next call walks the program, now with that value, and
# guards its state (a second walk; the retrace loads the first graph by its fingerprint where the value is
# unchanged: NOTE [Cached values a fingerprint vouches for] in lru_cache_values.py). A bounded cache's values are
# read from its C links (NOTE [Values a bounded lru_cache holds] in lru_cache_values.py; a known gap until session
# 26).
def _cached_values(cache: dict, wrapper: Any) -> list:
    """The values ``cache`` (of the lru_cache function ``wrapper``, None if unknown) holds, a bounded cache's read
    from its links (NOTE [Values a bounded lru_cache holds] in lru_cache_values.py)."""
    if wrapper is None:
        return list(cache.values())
    return [value for _, value in lru_cache_entries(wrapper, cache)]


def _holds_new_mutable_values(values: list, walked: Sequence[Any]) -> bool:
    """Whether ``values`` (a cache's, after a capture) hold a value the walk did not see that may change unseen."""
    seen = {id(value) for value in walked}
    return any(id(value) not in seen and not immutable_cached_value(value) for value in values)


def _context_value(variable: Any) -> Any:
    """What ``variable`` holds now (the walk's marker when it was never set, as the walk records it)."""
    return variable.get(UNSET_CONTEXT_VALUE)


class GuardRecorder:
    """Collects what a walk read (the ``guards`` of :class:`~aotcache.autograd_cache.reachable.Reachable`),
    deduplicated by holder identity and key."""

    def __init__(self) -> None:
        self._slots: dict[tuple[int, Any], tuple[Any, Any, Any]] = {}
        self._slot_members: dict[tuple[int, Any], tuple[Any, Any, Any, tuple]] = {}
        self._attributes: dict[tuple[int, str], tuple[Any, str, Any]] = {}
        self._lengths: dict[int, Any] = {}
        self._contents: dict[int, Any] = {}
        self._env: dict[str, str | None] = {}
        self._tensors: dict[int, tuple[Any, int, int, Any]] = {}
        self._owners: dict[int, tuple[Any, type]] = {}
        self._unloaded: dict[str, None] = {}
        self._context: dict[int, tuple[Any, Any]] = {}
        self._namespaces: dict[int, tuple] = {}
        self._arrays: dict[int, tuple[Any, tuple]] = {}
        self._iterators: dict[int, Any] = {}
        self._caches: dict[int, dict] = {}
        self._cache_wrappers: dict[int, Any] = {}  # id(cache dict) -> its lru_cache function

    def namespace(self, mapping: Mapping) -> None:
        """NOTE [Whole namespaces in the guards]: ``mapping`` must hold the same names, in order, bound to the
        same objects."""
        if id(mapping) in self._namespaces:
            return
        values = list(mapping.values())
        backing = _backing_dict(mapping)
        tag = [dict_version_tag(backing) if backing is not None else None]
        self._namespaces[id(mapping)] = (mapping, list(mapping), values, list(map(id, values)), backing, tag)

    def context_variable(self, variable: Any, value: Any) -> None:
        """NOTE [Context variables in the guards]: ``variable.get()`` must give ``value`` again."""
        self._context.setdefault(id(variable), (variable, value))

    def unloaded_module(self, name: str) -> None:
        """A library module the code imports in a function body, not loaded yet: the walk could not see what
        the code reads of it (NOTE [Libraries loaded after the walk])."""
        self._unloaded.setdefault(name, None)

    def owner(self, namespace: Any, cls: type) -> None:
        """``namespace`` (a read-only ``vars(cls)``) belongs to ``cls``: a restore writes through the class."""
        self._owners.setdefault(id(namespace), (namespace, cls))  # the view kept alive: its id stays its own

    def slot(self, holder: Mapping, key: Any, value: Any) -> None:
        self._slots.setdefault((id(holder), key), (holder, key, value))

    def slot_members(self, holder: Mapping, key: Any, value: Any) -> None:
        """NOTE [Rebound list attributes]: whatever ``holder[key]`` holds must have ``value``'s members."""
        self._slot_members.setdefault((id(holder), key), (holder, key, value, tuple(value)))

    def cell(self, cell: Any) -> None:
        try:
            value = cell.cell_contents
        except ValueError:  # empty: the code fails (NameError) if it reads it, in the trace as later
            return
        self._attributes.setdefault((id(cell), "cell_contents"), (cell, "cell_contents", value))

    def attributes(self, obj: Any, names: tuple[str, ...]) -> None:
        for name in names:
            self._attributes.setdefault((id(obj), name), (obj, name, getattr(obj, name)))

    def length(self, sized: Any) -> None:
        self._lengths.setdefault(id(sized), sized)

    def contents(self, container: Any) -> None:
        self._contents.setdefault(id(container), container)
        self._lengths.setdefault(id(container), container)

    def env(self, name: str, value: str | None) -> None:
        self._env.setdefault(name, value)

    def array(self, array: Any, state: tuple) -> None:
        """A numpy array, ``bytearray`` or ``array.array`` read by the program, with its state (dtype, shape, flags
        and bytes: :func:`~aotcache.autograd_cache.byte_buffers.byte_buffer_state`; NOTE [numpy arrays by content] in
        byte_buffers.py)."""
        self._arrays.setdefault(id(array), (array, state))

    def iterator(self, iterator: Any) -> None:
        """An iterator the program reads, whose state each ``next()`` advances (NOTE [Iterators a program
        advances] in reachable.py)."""
        self._iterators.setdefault(id(iterator), iterator)

    def cached_values(self, cache: dict, wrapper: Any = None) -> None:
        """The dict of an lru_cache the program calls, and the function (``wrapper``) holding it (NOTE [Values an
        lru_cache holds], NOTE [Values a bounded lru_cache holds] in lru_cache_values.py)."""
        self._caches.setdefault(id(cache), cache)
        self._cache_wrappers.setdefault(id(cache), wrapper)

    def tensor(self, tensor: Any) -> None:
        """A tensor constant: its version counter (bumped by every in-place change), data pointer and shape
        (NOTE [Tensor data swapped in place])."""
        try:
            self._tensors.setdefault(id(tensor), (tensor, tensor._version, tensor.data_ptr(), tensor.shape))
        except RuntimeError:  # an inference tensor has no version counter (and cannot change outside one)
            pass

    def build(self) -> ProgramGuards:
        slots = list(self._slots.values())
        attributes = list(self._attributes.values())
        sized = list(self._lengths.values())
        filled = [c for c in self._contents.values() if len(c)]  # an empty one: its length says it all
        mappings = [c for c in filled if isinstance(c, Mapping)]
        iterables = [c for c in filled if not isinstance(c, Mapping)] + mappings  # dict keys
        rebound = list(self._slot_members.values())
        return ProgramGuards(
            holders=[h for h, _, _ in slots], keys=[k for _, k, _ in slots], values=[v for _, _, v in slots],
            member_holders=[h for h, _, _, _ in rebound], member_keys=[k for _, k, _, _ in rebound],
            member_containers=[c for _, _, c, _ in rebound], member_lengths=[len(m) for _, _, _, m in rebound],
            slot_members=list(_chain(m for _, _, _, m in rebound)),
            objects=[o for o, _, _ in attributes], names=[n for _, n, _ in attributes],
            attribute_values=[v for _, _, v in attributes],
            sized=sized, lengths=[len(s) for s in sized],
            iterables=iterables, members=list(_chain(iterables)),
            mappings=mappings, mapping_values=list(_chain(map(_values, mappings))),
            env_names=list(self._env), env_values=list(self._env.values()),
            tensors=[entry[0] for entry in self._tensors.values()],
            versions=[entry[1] for entry in self._tensors.values()],
            pointers=[entry[2] for entry in self._tensors.values()],
            shapes=[entry[3] for entry in self._tensors.values()],
            owners=dict(self._owners), unloaded_modules=list(self._unloaded),
            context_variables=[v for v, _ in self._context.values()],
            context_values=[value for _, value in self._context.values()],
            namespaces=list(self._namespaces.values()), arrays=list(self._arrays.values()),
            iterators=list(self._iterators.values()),
            caches=[(cache, _cache_snapshot(cache)) for cache in self._caches.values()],
            cache_wrappers=[self._cache_wrappers.get(key) for key in self._caches],
            walked_cache_values=[_cached_values(cache, self._cache_wrappers.get(key))
                                 for key, cache in self._caches.items()])


@dataclasses.dataclass(eq=False)
class ProgramGuards:
    """Flat lists of recorded reads and the values they gave (NOTE [Program guards]); holding them keeps every
    recorded object alive, so identities stay meaningful."""

    holders: list
    keys: list
    values: list
    member_holders: list
    member_keys: list
    member_containers: list  # the containers the walk saw there (a later one with the same members holds too)
    member_lengths: list
    slot_members: list
    objects: list
    names: list
    attribute_values: list
    sized: list
    lengths: list
    iterables: list
    members: list
    mappings: list
    mapping_values: list
    env_names: list
    env_values: list
    tensors: list
    versions: list
    pointers: list
    shapes: list
    owners: dict = dataclasses.field(default_factory=dict)  # id(vars(cls)) -> (that view, cls)
    unloaded_modules: list = dataclasses.field(default_factory=list)  # NOTE [Libraries loaded after the walk]
    context_variables: list = dataclasses.field(default_factory=list)  # NOTE [Context variables in the guards]
    context_values: list = dataclasses.field(default_factory=list)
    namespaces: list = dataclasses.field(default_factory=list)  # NOTE [Whole namespaces in the guards]
    arrays: list = dataclasses.field(default_factory=list)  # (array, its state): NOTE [numpy arrays by
    # content] in byte_buffers.py
    iterators: list = dataclasses.field(default_factory=list)  # NOTE [Iterators a program advances] in
    # reachable.py: never compared (their identity is a slot's), a capture is refused
    caches: list = dataclasses.field(default_factory=list)  # (an lru_cache's dict, its snapshot): NOTE [Values an
    # lru_cache holds] in lru_cache_values.py
    walked_cache_values: list = dataclasses.field(default_factory=list)  # each cache's values as the walk saw them
    cache_wrappers: list = dataclasses.field(default_factory=list)  # each cache's lru_cache function (or None)

    def owner_of(self, namespace: Any) -> type | None:
        """The class whose ``vars()`` view ``namespace`` is, if the walk recorded it."""
        entry = self.owners.get(id(namespace))
        return entry[1] if entry is not None and entry[0] is namespace else None

    def __post_init__(self) -> None:
        # NOTE [Program guards of unwritten dicts]
        # Most recorded reads are entries of plain dicts (module globals, objects' ``__dict__``), their lengths and
        # contents: ~300 comparisons for a tiny Llama, a tenth of what aotcache added to a decoding step. A dict
        # whose version tag (NOTE [Dict versions] in aot/hot_path.py) is unchanged was not written, so each of
        # its entries, its length and its keys are what they were. Once the whole check has passed, the tags read
        # just before it are kept; while they are unchanged only the reads outside those dicts are compared.
        # Any write falls back to the whole check, which decides as before.
        self._tagged: list = []
        self._tags: list | None = None
        self._rest: tuple | None = None
        if dict_version_tag is None:
            return
        tagged: dict[int, dict] = {}
        for container in (*self.holders, *self.sized, *self.mappings):
            if type(container) is dict:
                tagged.setdefault(id(container), container)
        if not tagged:
            return
        self._tagged = list(tagged.values())
        slots = [(h, k, v) for h, k, v in zip(self.holders, self.keys, self.values) if id(h) not in tagged]
        sized = [(c, n) for c, n in zip(self.sized, self.lengths) if id(c) not in tagged]
        iterables = [c for c in self.iterables if id(c) not in tagged]
        mappings = [c for c in self.mappings if id(c) not in tagged]
        self._rest = ([h for h, _, _ in slots], [k for _, k, _ in slots], [v for _, _, v in slots],
                      [c for c, _ in sized], [n for _, n in sized], iterables, list(_chain(iterables)), mappings,
                      list(_chain(map(_values, mappings))))

    def holds(self) -> bool:
        """Whether every recorded read gives the recorded object again (identity; env values by equality)."""
        tagged = self._tagged
        if tagged:  # NOTE [Program guards of unwritten dicts]
            tags = list(map(dict_version_tag, tagged))
            if tags == self._tags:
                return self._rest_holds()
            holds = self._holds()
            if holds:
                self._tags = tags
            return holds
        return self._holds()

    def _rest_holds(self) -> bool:
        """:meth:`_holds` for the reads outside the dicts whose version tags are unchanged."""
        return self._compare(*self._rest)

    def _holds(self) -> bool:
        """Every recorded read compared (see :meth:`holds`)."""
        return self._compare(self.holders, self.keys, self.values, self.sized, self.lengths, self.iterables,
                             self.members, self.mappings, self.mapping_values)

    def _compare(self, holders: list, keys: list, values: list, sized: list, lengths: list, iterables: list,
                 members: list, mappings: list, mapping_values: list) -> bool:
        """The recorded reads compared: the slot and container reads given (all, or those outside unchanged
        dicts), and every other kind of read."""
        try:
            if values and not all(map(_is, map(operator.getitem, holders, keys), values)):
                return False
            if self.member_keys:  # NOTE [Rebound list attributes]
                current = list(map(operator.getitem, self.member_holders, self.member_keys))
                if list(map(len, current)) != self.member_lengths or not all(map(_is, _chain(current),
                                                                                  self.slot_members)):
                    return False
            if self.attribute_values and not all(map(_is, map(getattr, self.objects, self.names),
                                                     self.attribute_values)):
                return False
            if list(map(len, sized)) != lengths:
                return False
            if members and not all(map(_is, _chain(iterables), members)):
                return False
            if mapping_values and not all(map(_is, _chain(map(_values, mappings)), mapping_values)):
                return False
            if self.tensors and (list(map(_version_of, self.tensors)) != self.versions
                                 or list(map(_pointer_of, self.tensors)) != self.pointers
                                 or list(map(_shape_of, self.tensors)) != self.shapes):
                return False
            if self.unloaded_modules and not all(name not in sys.modules for name in self.unloaded_modules):
                return False
            if self.context_values and not all(map(_is, map(_context_value, self.context_variables),
                                                    self.context_values)):
                return False
            if self.namespaces and not all(map(_namespace_unchanged, self.namespaces)):
                return False
            if self.arrays and not all(map(_array_unchanged, self.arrays)):
                return False
            if self.caches and not all(map(_cache_unchanged, self.caches)):
                return False
            return not self.env_names or all(map(operator.eq, map(_env_get, self.env_names), self.env_values))
        except (KeyError, ValueError, AttributeError, TypeError, RuntimeError):
            return False  # a slot deleted, a cell emptied, a container resized while iterated: walk again

    def __len__(self) -> int:
        return (len(self.values) + len(self.member_lengths) + len(self.attribute_values) + len(self.lengths)
                + len(self.members) + len(self.mapping_values) + len(self.env_values) + len(self.versions)
                + len(self.unloaded_modules) + len(self.context_values) + len(self.namespaces) + len(self.arrays)
                + len(self.caches))

    def refresh_caches(self, *, captured: bool = False) -> None:
        """Take the lru_caches the program calls as they are now: a capture's runs of the function filled them
        (NOTE [Values an lru_cache holds] in lru_cache_values.py); ``captured``: the capture is over, and a value it put
        there whose state can change unseen fails the guards once (NOTE [Cached values the capture made])."""
        wrappers = self.cache_wrappers or [None] * len(self.caches)
        for (cache, state), walked, wrapper in zip(self.caches, self.walked_cache_values or [()] * len(self.caches),
                                                   wrappers):
            state[:] = _cache_snapshot(cache)  # in place: ``holds`` reads these lists
            # a bounded cache's values read from its links: NOTE [Values a bounded lru_cache holds] in
            # lru_cache_values.py
            if captured and _holds_new_mutable_values(_cached_values(cache, wrapper), walked):
                state[0], state[1] = None, []  # (the cache is not empty: its length differs, the next call walks)


@dataclasses.dataclass(eq=False)
class WatchedProgram:
    """What one walk saw: ``digest`` (in-process identity of the program), its ``guards``, the first reason
    the walk could not vouch for something (``untrusted``, or None), and the pinned environment."""

    digest: str
    guards: ProgramGuards
    untrusted: str | None
    env: dict[str, str | None]

    def __post_init__(self) -> None:
        # checked on every call (NOTE [Hot path]): the guards' own method, without a frame of this class around it
        self.holds = self.guards.holds

    def saved_state(self) -> SavedProgramState:
        """What the program reads now, to be put back between the runs of one capture (NOTE [State changed by a
        capture] in aot/call_state.py)."""
        from aotcache.autograd_cache.program_restore import SavedProgramState

        return SavedProgramState(self.guards)


def watch_program(root: Any, module: nn.Module | None = None) -> WatchedProgram:
    """Walk ``root`` (an ``aot_function``'s function, or the module of an ``aot_module``: pass it as ``module``
    too, then its parameters and buffers are inputs and its tree's own attributes are left to ModuleState)
    and record the guards of NOTE [Program guards]."""
    recorder = GuardRecorder()
    managed = frozenset(id(m) for m in module.modules()) if module is not None else frozenset()
    reachable = Reachable(state_positions(module), lenient=True, guards=recorder, managed=managed,
                          process_state=True)
    tokens = [reachable.add_root(root)]
    hooks = sys.modules["torch.nn.modules.module"]
    for name in _GLOBAL_MODULE_HOOKS:  # global module hooks run inside every module call: by identity
        registry = getattr(hooks, name, None)
        if isinstance(registry, Mapping):
            recorder.contents(registry)
            tokens.append(reachable.add_root(tuple(registry.values())))
    digest = sha256_text(canonical_json({"roots": tokens, "graph": reachable.digest()}))
    untrusted = reachable.untrusted.reason if reachable.untrusted is not None else None
    return WatchedProgram(digest, recorder.build(), untrusted, dict(reachable.env))
