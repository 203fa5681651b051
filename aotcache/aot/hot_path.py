"""The per-call fast path: check the last signatures in place instead of rebuilding and hashing one.

NOTE [Hot path]
Every call of an ``aot_function`` must find the compiled runtime of its signature (NOTE [Signature] in
``signature.py``). Building that signature (a tuple per argument, a pytree spec, a storage-sharing map) and hashing
it costs ~100 us for a module with 20 tensors, about a tenth of a small training step. The hot path keeps,
per argument structure, the signatures already seen as :class:`HotSignature` records and compares the
arguments with them field by field: the same fields as the signature, so a match selects exactly the runtime
the slow path would select. Anything unusual (kwargs, containers, non-tensor arguments) takes the slow path, or
the call hot path of those calls (NOTE [Call hot path] in ``call_hot_path.py``).

:class:`ModuleState` serves ``aot_module``: the module's parameters and buffers by name, re-read only when
the module tree changed. ``named_parameters()`` walks every submodule (~30 us); checking that each
``_parameters`` / ``_buffers`` / ``_modules`` dict still holds the same objects is a few microseconds.
"""

from __future__ import annotations

import collections
import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from aotcache.aot.ambient import numerics_signature
from aotcache.aot.exact_values import exact_value
from aotcache.aot.runtime import storage_pointer
from aotcache.aot.tensor_metadata import TensorMetadata, taker

__all__ = ["HotSignature", "ModuleState", "simple_structure", "autocast_state", "storage_sharing", "relative_offsets",
           "storage_object", "setting_by_value", "taker", "dict_version_tag"]

_MAX_HOT_PER_STRUCTURE = 8


def autocast_state() -> tuple:
    """Autocast enabled flag and dtype per device type this build knows (part of every signature)."""
    state = []
    for device_type in ("cpu", "cuda"):
        try:
            state.append((torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)))
        except (RuntimeError, TypeError, AttributeError):  # device type unknown to this build
            state.append(None)
    return tuple(state)


def storage_sharing(tensors: Sequence[torch.Tensor], identity: Any = storage_pointer) -> tuple:
    """For each (strided, non-meta) tensor, the index of the first one sharing its storage by ``identity``
    (default: its data pointer; 0-pointers never share)."""
    first: dict[int, int] = {}
    sharing = []
    for index, tensor in enumerate(tensors):
        pointer = identity(tensor)
        sharing.append(first.setdefault(pointer, index) if pointer else index)
    return tuple(sharing)


def relative_offsets(tensors: Sequence[torch.Tensor], sharing: Sequence[int]) -> list[int]:
    """Per tensor, its storage offset *in bytes* less the smallest among the tensors sharing its storage
    (``sharing`` as :func:`storage_sharing` gives it): NOTE [Offsets of arguments that share memory]. Bytes,
    not elements: views of one storage as dtypes of other sizes count their offsets in other units, and element
    differences that match can overlap at one call and not at another."""
    offsets = [tensor.storage_offset() * tensor.element_size() for tensor in tensors]
    low: dict[int, int] = {}
    for offset, group in zip(offsets, sharing):
        if group not in low or offset < low[group]:
            low[group] = offset
    return [offset - low[group] for offset, group in zip(offsets, sharing)]


def storage_object(tensor: torch.Tensor) -> int:
    """The identity of ``tensor``'s storage object: alike for fake tensors (whose data pointers are all 0)."""
    return tensor.untyped_storage()._cdata


def simple_structure(args: tuple, kwargs: dict) -> int | None:
    """``len(args)`` when the call is plain positional tensors (flat args are ``args`` itself), else None."""
    if kwargs:
        return None
    for arg in args:
        if type(arg) is not torch.Tensor and type(arg) is not nn.Parameter:
            return None
    return len(args)


# NOTE [Static signatures in bulk]
# A signature without dynamic dimensions is checked as three lists built by ``map`` over the arguments with
# C-level getters (``attrgetter`` / ``methodcaller``, no Python frame per tensor) and compared with ``==``: the
# same fields as the loop of :meth:`HotSignature.matches` (``is_leaf`` compared for every tensor: one that does
# not require grad is always a leaf), about a third of its cost. Memory sharing, in the usual case of no two
# arguments sharing storage, is one set of data pointers (0-pointers never share).
_STATIC_FIELDS = operator.attrgetter("dtype", "device", "requires_grad", "is_leaf", "shape")
_STRIDE = operator.methodcaller("stride")
_OFFSET = operator.methodcaller("storage_offset")
_STORAGE = operator.methodcaller("untyped_storage")
_DATA_PTR = operator.methodcaller("data_ptr")
_IS_CONJ = operator.methodcaller("is_conj")
_IS_NEG = operator.methodcaller("is_neg")


def _all_distinct(tensors: Sequence[torch.Tensor]) -> bool | None:
    """Whether no two tensors share memory (as :func:`storage_sharing` sees it); None where a storage has no
    data pointer (a wrapper subclass), which the caller decides with :func:`storage_sharing`."""
    try:
        pointers = list(map(_DATA_PTR, map(_STORAGE, tensors)))
    except RuntimeError:
        return None
    distinct = set(pointers)
    distinct.discard(0)
    return len(distinct) == len(pointers) - pointers.count(0)


class HotSignature:
    """One seen signature of plain tensor arguments and the runtime it selected (NOTE [Hot path])."""

    __slots__ = ("grad_enabled", "autocast", "numerics", "fields", "sharing", "dynamic", "runtime",
                 "_static", "_strides", "_offsets", "_distinct", "_exact_offsets", "_absolute_offsets", "_mixed",
                 "_types", "_metadata")

    def __init__(self, flat_args: Sequence[torch.Tensor], dynamic: bool | tuple, runtime: Any) -> None:
        self.grad_enabled = torch.is_grad_enabled()
        self.autocast = autocast_state()
        self.numerics = numerics_signature()  # NOTE [Numerics flags]
        self.dynamic = dynamic
        self.fields = [self._fields(arg, dynamic[index] if isinstance(dynamic, tuple) else dynamic)
                       for index, arg in enumerate(flat_args)]
        self.sharing = storage_sharing(flat_args)
        self.runtime = runtime
        self._types = list(map(type, flat_args))  # NOTE [Tensor subclasses that change what ops do]
        # NOTE [Static signatures in bulk]
        static = not dynamic or (isinstance(dynamic, tuple) and not any(dynamic))
        self._static = list(map(_STATIC_FIELDS, flat_args)) if static else None
        self._strides = list(map(_STRIDE, flat_args)) if static else None
        self._distinct = self.sharing == tuple(range(len(flat_args)))
        # NOTE [Mixed signatures]: with some dimensions dynamic, the static arguments in bulk, the others one by one
        self._mixed: _MixedSignature | None = None
        if not static and isinstance(dynamic, tuple) and len(dynamic) == len(flat_args):
            self._mixed = _MixedSignature(flat_args, dynamic, self.fields)
        # NOTE [Storage offsets are not part of the signature] (signature.py): another offset selects the same
        # runtime, unless its graph depends on offsets (absolute offsets compared) or arguments share memory
        # (offsets relative to the group's lowest compared: NOTE [Offsets of arguments that share memory])
        self._absolute_offsets = getattr(runtime, "input_offsets", ()) is not None
        self._exact_offsets = not self._distinct or self._absolute_offsets
        self._offsets = self._offsets_of(flat_args) if static else None
        # NOTE [Tensor metadata checked in C]: the fields above in one C call, where torch has it (the Python
        # comparison below otherwise); storage offsets and memory sharing stay here
        self._metadata: TensorMetadata | None = None
        dims = dynamic if isinstance(dynamic, tuple) else [dynamic is True] * len(flat_args)
        if (static or self._mixed is not None or dynamic is True) and len(dims) == len(flat_args):
            self._metadata = TensorMetadata.of(flat_args, dims)

    def checks_layouts(self) -> bool:
        """Whether :meth:`matches` itself refuses tensors of another layout and nested tensors (NOTE [Tensor
        metadata checked in C]), so that a caller need not."""
        return self._metadata is not None

    def pin_offsets(self) -> bool:
        """Make :meth:`matches` compare the storage offsets of the arguments without dynamic dimensions too, where
        this signature checks those apart (NOTE [Mixed signatures]); False where it does not (the caller checks)."""
        if self._mixed is None:
            return False
        self._mixed.pin_offsets = True
        return True

    def _offsets_of(self, flat_args: Sequence[torch.Tensor]) -> list[int]:
        if self._absolute_offsets:
            return list(map(_OFFSET, flat_args))
        return relative_offsets(flat_args, self.sharing)

    @staticmethod
    def _fields(arg: torch.Tensor, dynamic: bool | tuple[int, ...]) -> tuple:
        # dynamic: True (rank only), a tuple of dynamic dims (sizes masked there; guards check the rest,
        # NOTE [Dynamic dimensions]), or falsy (exact geometry)
        geometry = ((arg.dim(), None, dynamic) if dynamic is True else
                    (tuple(None if dim in dynamic else size for dim, size in enumerate(arg.shape)), None, dynamic)
                    if dynamic else (arg.shape, arg.stride(), arg.storage_offset()))
        return (arg.dtype, arg.device, arg.requires_grad, arg.requires_grad and arg.is_leaf, *geometry)

    @staticmethod
    def eligible(flat_args: Sequence[Any]) -> bool:
        """Only plain strided, non-meta tensors without conj / neg bits (the other cases need the full signature's
        checks: NOTE [View bits] in signature.py)."""
        return all(isinstance(arg, torch.Tensor) and arg.layout == torch.strided and not arg.is_meta
                   and not arg.is_conj() and not arg.is_neg() for arg in flat_args)

    def matches(self, flat_args: Sequence[torch.Tensor]) -> bool:
        """Whether ``flat_args`` have this signature (the caller checked they are plain tensors)."""
        if torch.is_grad_enabled() is not self.grad_enabled or list(map(type, flat_args)) != self._types:
            return False  # a class the full path refuses (a parameter's __class__ assigned since) takes that path
        metadata = self._metadata
        if metadata is not None:  # NOTE [Tensor metadata checked in C]
            if not metadata(flat_args):
                return False
            if self._static is not None:
                if self._exact_offsets and (storage_sharing(flat_args) != self.sharing
                                            or self._offsets_of(flat_args) != self._offsets):
                    return False
            elif self._mixed is not None and not self._mixed.offsets_hold(flat_args, self._exact_offsets):
                return False
            if autocast_state() != self.autocast or numerics_signature() != self.numerics:
                return False
            distinct = _all_distinct(flat_args) if self._distinct else None
            return distinct if distinct is not None else storage_sharing(flat_args) == self.sharing
        if any(map(_IS_CONJ, flat_args)) or any(map(_IS_NEG, flat_args)):
            return False  # never recorded (:meth:`eligible`): the full path keys them (NOTE [View bits])
        if self._static is not None:  # NOTE [Static signatures in bulk]
            if list(map(_STATIC_FIELDS, flat_args)) != self._static or list(map(_STRIDE, flat_args)) != self._strides:
                return False
            if self._exact_offsets and (storage_sharing(flat_args) != self.sharing
                                        or self._offsets_of(flat_args) != self._offsets):
                return False
            if autocast_state() != self.autocast or numerics_signature() != self.numerics:
                return False
            distinct = _all_distinct(flat_args) if self._distinct else None
            return distinct if distinct is not None else storage_sharing(flat_args) == self.sharing
        mixed = self._mixed
        if mixed is not None:  # NOTE [Mixed signatures]
            if not mixed.matches(flat_args, self._exact_offsets):
                return False
            if autocast_state() != self.autocast or numerics_signature() != self.numerics:
                return False
            distinct = _all_distinct(flat_args) if self._distinct else None
            return distinct if distinct is not None else storage_sharing(flat_args) == self.sharing
        for arg, (dtype, device, requires_grad, leaf, shape, stride, offset) in zip(flat_args, self.fields):
            if arg.dtype is not dtype or arg.requires_grad is not requires_grad or arg.device != device:
                return False
            if requires_grad and arg.is_leaf is not leaf:
                return False
            if stride is not None:
                if arg.shape != shape or arg.stride() != stride:
                    return False
                if self._exact_offsets and arg.storage_offset() != offset:
                    return False
            elif offset is True:
                if arg.dim() != shape:
                    return False
            elif len(arg.shape) != len(shape) or any(
                    expected is not None and size != expected for size, expected in zip(arg.shape, shape)):
                return False
        return (autocast_state() == self.autocast and numerics_signature() == self.numerics
                and storage_sharing(flat_args) == self.sharing)


# NOTE [Mixed signatures]
# A KV-cache decoding step under automatic dynamic shapes has a few arguments with a dynamic dimension (the cache's
# keys and values) among many static ones (the module's parameters and buffers, the step's ids). Its signature was
# checked by the loop of :meth:`HotSignature.matches`, a Python frame of comparisons per tensor; the static ones
# are now checked in bulk as NOTE [Static signatures in bulk] does (their dtype, device, requires_grad, leafness,
# sizes, strides, and storage offsets where the signature compares them), and only the dynamic ones one by one
# (dtype, device, requires_grad, leafness, the sizes outside their dynamic dimensions): the same fields as the loop.
class _MixedSignature:
    """The static and the dynamic arguments of a signature with some dynamic dimensions, checked apart."""

    __slots__ = ("_take_static", "_static", "_strides", "_offsets", "_take_dynamic", "_dynamic", "pin_offsets")

    def __init__(self, flat_args: Sequence[torch.Tensor], dynamic: tuple, fields: list[tuple]) -> None:
        static = [index for index, dims in enumerate(dynamic) if not dims]
        moving = [index for index, dims in enumerate(dynamic) if dims]
        self._take_static = taker(static)
        self._take_dynamic = taker(moving)
        static_args = self._take_static(flat_args)
        self._static = list(map(_STATIC_FIELDS, static_args))
        self._strides = list(map(_STRIDE, static_args))
        self._offsets = list(map(_OFFSET, static_args))
        self.pin_offsets = False  # compare the static arguments' storage offsets at every call (see pin_offsets)
        # per dynamic argument: dtype, device, requires_grad, leafness, rank, and the (dim, size) pairs kept
        self._dynamic = [(dtype, device, requires_grad, leaf, len(shape),
                          tuple((dim, size) for dim, size in enumerate(shape) if size is not None))
                         for dtype, device, requires_grad, leaf, shape, _, _ in map(fields.__getitem__, moving)]

    def offsets_hold(self, flat_args: Sequence[torch.Tensor], exact_offsets: bool) -> bool:
        """The storage offsets of the static arguments, where they are compared (the rest of :meth:`matches` is
        checked apart: NOTE [Tensor metadata checked in C])."""
        return not (exact_offsets or self.pin_offsets) or list(map(_OFFSET, self._take_static(flat_args))) == \
            self._offsets

    def matches(self, flat_args: Sequence[torch.Tensor], exact_offsets: bool) -> bool:
        static_args = self._take_static(flat_args)
        if list(map(_STATIC_FIELDS, static_args)) != self._static or list(map(_STRIDE, static_args)) != self._strides:
            return False
        if (exact_offsets or self.pin_offsets) and list(map(_OFFSET, static_args)) != self._offsets:
            return False
        for arg, (dtype, device, requires_grad, leaf, rank, sizes) in zip(self._take_dynamic(flat_args),
                                                                         self._dynamic):
            if arg.dtype is not dtype or arg.requires_grad is not requires_grad or arg.device != device:
                return False
            if requires_grad and arg.is_leaf is not leaf:
                return False
            shape = arg.shape
            if len(shape) != rank:
                return False
            for dim, size in sizes:
                if shape[dim] != size:
                    return False
        return True


class HotSignatures:
    """Per argument structure, the signatures seen most recently (at most a few each)."""

    def __init__(self) -> None:
        self._by_structure: dict[Any, list[HotSignature]] = {}

    def find(self, structure: Any, flat_args: Sequence[torch.Tensor]) -> HotSignature | None:
        try:
            for hot in self._by_structure.get(structure, ()):
                if hot.matches(flat_args):
                    return hot
        except NotImplementedError:  # NOTE [Transform tensors on the hot path]
            return None
        except RuntimeError:  # a tensor without sizes or strides (a nested one): the full path names or runs it
            return None
        return None

    # NOTE [Transform tensors on the hot path]
    # A tensor of a torch.func transform (``torch.func.grad(lambda p: functional_call(compiled, p, x))``: the
    # swapped-in parameters are grad-tracking wrappers) has the plain Tensor type and a plain tensor's fields, so
    # it reached the storage comparison of a signature seen before, where reading its storage raised
    # NotImplementedError out of the call. No signature matches it: the full path refuses it with its
    # CaptureError, which the call's fallback runs eagerly (never a compiled graph over transform tensors).

    def remember(self, structure: Any, flat_args: Sequence[torch.Tensor], dynamic: bool, runtime: Any) -> None:
        seen = [hot for hot in self._by_structure.get(structure, ()) if not hot.matches(flat_args)]
        seen.insert(0, HotSignature(flat_args, dynamic, runtime))
        self._by_structure[structure] = seen[:_MAX_HOT_PER_STRUCTURE]  # one assignment: readers need no lock


def _overrides(module: nn.Module, names: Sequence[str]) -> bool:
    cls = type(module)
    return any(getattr(cls, name, None) is not getattr(nn.Module, name) for name in names)


# Module attributes that never change what a forward computes (state_dict plumbing), and the three dicts the
# parameter/buffer snapshot already checks entry by entry.
_SETTINGS_IGNORED = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                               "_load_state_dict_post_hooks"})
_PLAIN_TYPES = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


# NOTE [Generate memos]
# transformers' ``generate`` (GenerationMixin._prepare_static_cache, transformers 5) writes
# ``model._previous_max_cache_length``, the largest static-cache length asked for so far, so that its next static
# cache is at least as long. Only ``generate`` reads it, never a forward. As a plain int setting it changed the
# module settings, the program digest and the fingerprint whenever a longer prompt came: with
# ``cache_implementation="static"`` every such ``generate`` started a new signature whose first calls compile
# statically (prefill and decoding step: 2 graphs per call where torch.compile, which guards only what the
# forward reads, made them dynamic once and then compiled none). The settings, the program walk and the
# fingerprint leave such attributes out, on modules whose class has transformers' GenerationMixin in its bases.
GENERATE_MEMOS = frozenset({"_previous_max_cache_length"})


def is_method_router(name: str, value: Any) -> bool:
    """Whether ``name = value`` is the router a wrapper installs while a method of its module runs (NOTE [Methods
    run the compiled forward] in module.py): compile machinery, not part of the module's settings or program."""
    return name == "forward" and getattr(value, "_aotcache_router", False) is True


@functools.lru_cache(maxsize=256)
def generate_memos(cls: type) -> frozenset[str]:
    """The attributes of ``cls``'s instances that only transformers' ``generate`` reads (NOTE [Generate memos])."""
    generation = any(base.__name__ == "GenerationMixin" and base.__module__.startswith("transformers.")
                     for base in cls.__mro__)
    return GENERATE_MEMOS if generation else frozenset()
_PLAIN, _COUNTED, _IDENTITY, _UNTRACKED = 0, 1, 2, 3
# settings interned per module before the table starts over: a module whose forward or loop rebinds an attribute
# at every call (``self.prev = h``) kept every value alive (for its id) and grew the table without bound
MAX_SETTINGS = 256


def _kind(value: Any) -> int:
    if type(value) in _PLAIN_TYPES or (type(value) is tuple and len(value) <= 16
                                        and all(type(item) in _PLAIN_TYPES for item in value)):
        return _PLAIN
    if isinstance(value, dict):  # hook registries (OrderedDict): a hook added or removed changes the length
        return _COUNTED
    if isinstance(value, (list, set, tuple)):
        # containers a module may rebuild on every call (nn.LSTM's _flat_weights, rebuilt whenever
        # functional_call swaps a parameter): tracked by identity they would force a retrace per call
        return _UNTRACKED
    return _IDENTITY


def setting_by_value(value: Any) -> bool:
    """Whether :class:`ModuleState` compares a module attribute holding ``value`` by value (plain values and
    short tuples of them), so that nothing else need watch it."""
    return _kind(value) == _PLAIN


def _settings(module: nn.Module) -> tuple:
    """(name, kind, value) of each attribute of ``module`` that can change what its forward does.

    Plain values (``training``, ``p``, ``eps``, dtypes, tuples of them) by type and value (floats by bits: NOTE
    [Plain values by type]), dicts (the hook registries) by length, lists and sets not at all (modules rebuild
    some per call), anything else by identity (``id``, kept alive by the snapshot). Objects, lists and hook
    registries changed in place are seen by the program guards (NOTE [Program guards] in
    aotcache/autograd_cache/program_guards.py), not here.
    """
    settings = []
    memos = generate_memos(type(module))  # NOTE [Generate memos]
    for name, value in module.__dict__.items():
        kind = (_UNTRACKED if name in _SETTINGS_IGNORED or name in memos or is_method_router(name, value)
                else _kind(value))
        if kind != _UNTRACKED:
            settings.append((name, kind, exact_value(value) if kind == _PLAIN  # NOTE [Plain values by type]
                             else len(value) if kind == _COUNTED else id(value)))
    return tuple(settings)


def _config_like(value: Any) -> bool:
    """A plain data object a module reads settings from (transformers' ``config``): not a module, tensor,
    class or callable, with its own ``__dict__``."""
    return (hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor, type))
            and not callable(value))


def _watched_objects(modules: Sequence[tuple[str, nn.Module]], settings: tuple) -> list[Any]:
    """NOTE [Config objects are settings]
    Submodules often read their behaviour from a shared config object (``self.config.use_cache``), held by
    identity in the settings, so ``model.config.use_cache = False`` between calls changed nothing they saw and
    the graph traced with the old value ran. The distinct config-like objects the tree holds are watched one
    level deep: their plain attributes join the settings by value, all their attributes the change check by
    identity (~1-2 us per call for a transformers config). Nested objects, lists and dicts mutated in place are
    the program guards' part (NOTE [Program guards] in aotcache/autograd_cache/program_guards.py)."""
    found: dict[int, Any] = {}
    for (_, submodule), (_, _, entries) in zip(modules, settings):
        for name, kind, _ in entries:
            if kind == _IDENTITY:
                value = submodule.__dict__[name]
                if _config_like(value):
                    found.setdefault(id(value), value)
    return list(found.values())


def _object_settings(obj: Any) -> tuple:
    """The plain attributes of a watched object, by type and value (NOTE [Plain values by type])."""
    return tuple((name, exact_value(value)) for name, value in obj.__dict__.items() if _kind(value) == _PLAIN)


class ModuleState:
    """The module's parameters and buffers by name and an id of its settings, cached while the tree is unchanged.

    The snapshot records, per submodule reached, its type, the exact contents (by identity) of its
    ``_parameters``, ``_buffers`` and ``_modules`` dicts (everything ``named_parameters``/``named_buffers``
    read) and its settings (:func:`_settings`: ``training``, hyperparameters, hook counts, other attributes by
    identity). Any change rebuilds it. Settings are interned to small ints (``settings_id``), part of the call
    signature: ``model.eval()`` or ``dropout.p = 0.2`` after a call selects another compiled runtime instead of
    reusing one traced with the old settings. Modules overriding the traversal methods are never cached.
    """

    _TRAVERSAL = ("named_parameters", "named_buffers", "named_modules", "_named_members", "parameters", "buffers")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._snapshot: list[tuple] | None = None
        self._values: tuple[dict, dict, tuple, int] | None = None
        self._settings_ids: dict[tuple, int] = {}
        self._next_settings_id = 0
        self._kept_alive: list[Any] = []  # objects whose id() is in an interned settings tuple
        self._watched: list[tuple[Any, tuple]] = []  # config-like objects and their attribute values
        self._versions: _DictVersions | None = None  # NOTE [Dict versions]

    def current(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], tuple, int]:
        """``(params, buffers, names, settings_id)``; ``names`` is the same object while the names are unchanged."""
        if self._values is not None and self._unchanged():
            return self._values
        params = dict(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())
        names = (tuple(params), tuple(buffers))
        if self._values is not None and self._values[2] == names:
            names = self._values[2]
        modules = list(self.module.named_modules(remove_duplicate=True))
        settings = tuple((path, type(submodule), _settings(submodule)) for path, submodule in modules)
        watched = _watched_objects(modules, settings)
        key = (settings, tuple((id(obj), _object_settings(obj)) for obj in watched))
        settings_id = self._settings_ids.get(key)
        if settings_id is None:
            if len(self._settings_ids) >= MAX_SETTINGS:  # attributes rebound at every call: start over, never
                self._settings_ids.clear()  # reusing a number (graphs keyed by old ones are just not found)
                self._kept_alive.clear()
            settings_id = self._settings_ids[key] = self._next_settings_id
            self._next_settings_id += 1
            self._kept_alive.extend(submodule.__dict__[name] for (_, submodule), (_, _, entries) in
                                    zip(modules, settings) for name, kind, _ in entries if kind == _IDENTITY)
        self._values = (params, buffers, names, settings_id)
        self._snapshot = self._take_snapshot([submodule for _, submodule in modules], settings)
        self._watched = [(obj, tuple(obj.__dict__.values())) for obj in watched]
        self._versions = _DictVersions.of([submodule for _, submodule in modules], watched) \
            if self._snapshot is not None else None
        return self._values

    def _take_snapshot(self, modules: list[nn.Module], settings: tuple) -> list[tuple] | None:
        snapshot = []
        for submodule, (_, _, entries) in zip(modules, settings):
            if _overrides(submodule, self._TRAVERSAL) or not _plain_registries(submodule):
                return None
            # the attributes the settings track (a new or deleted one changes the attribute count)
            getter = operator.itemgetter(*(name for name, _, _ in entries), "_parameters", "_buffers", "_modules")
            snapshot.append((submodule, type(submodule), getter, _observed(submodule, getter)))
        return snapshot

    def _unchanged(self) -> bool:
        """Whether every submodule still has exactly the recorded attributes, entries and hook counts.

        By identity, in bulk (``map(operator.is_, ...)`` runs in C): an attribute set again, even to an equal
        value, counts as a change (the rebuild then finds the same settings id). ~2.3 us per submodule.
        """
        snapshot = self._snapshot
        if snapshot is None:
            return False
        versions = self._versions
        if versions is not None and versions.hold():  # NOTE [Dict versions]: no dict written at all
            return True
        if not self._unchanged_exactly(snapshot):
            return False
        if versions is not None:  # a write that changed nothing here (a router popped and put back): record it
            versions.record()
        return True

    def _unchanged_exactly(self, snapshot: list[tuple]) -> bool:
        for obj, recorded in self._watched:  # configs: an attribute set in place (use_cache = False)
            values = obj.__dict__.values()
            if len(values) != len(recorded) or not all(map(operator.is_, values, recorded)):
                return False
        for submodule, cls, getter, recorded in snapshot:
            if type(submodule) is not cls:
                return False
            try:
                current = _observed(submodule, getter)
            except KeyError:  # a tracked attribute was deleted
                return False
            if len(current) != len(recorded) or not all(map(operator.is_, current, recorded)):
                return False
        return True


def _plain_registries(module: nn.Module) -> bool:
    """Whether the module keeps its parameters, buffers and children in plain dicts. A ``torch.jit.script``-ed
    module has C++-backed wrappers there, which iterate by integer index and fail (``contains(): incompatible
    function arguments``); such a module is compared the slow way, at every call."""
    return all(type(getattr(module, name, None)) in (dict, collections.OrderedDict)
               for name in ("_parameters", "_buffers", "_modules"))


def _observed(module: nn.Module, getter: Any) -> tuple:
    """What :meth:`ModuleState._unchanged` compares by identity: the tracked attributes, the names and values of
    the parameter / buffer / submodule entries, and the counts of attributes and hooks (small ints are
    cached objects, so equal counts are identical)."""
    attributes = module.__dict__
    params, buffers, children = module._parameters, module._buffers, module._modules
    return (*getter(attributes), *params, *params.values(), *buffers, *buffers.values(), *children,
            *children.values(), len(attributes), len(params), len(buffers), len(children),
            len(module._forward_hooks), len(module._forward_pre_hooks), len(module._backward_hooks),
            len(module._backward_pre_hooks))


# NOTE [Dict versions]
# CPython gives every dict a version tag that changes whenever the dict is written (an entry set to another
# object, added or deleted; Dynamo's DICT_VERSION guards read it through ``torch._C._dynamo.guards.dict_version``).
# Everything :meth:`ModuleState._unchanged` compares lives in dicts: each submodule's ``__dict__`` (attributes,
# including ``training`` and the hook registries), its ``_parameters`` / ``_buffers`` / ``_modules`` and hook
# dicts, and the watched config objects' ``__dict__``. So when none of them was written since the snapshot (and
# each object still has the same ``__dict__`` and type), nothing it compares can differ: one ``map`` over ~8
# dicts per submodule (~0.4 us each) instead of ~2 us per submodule. Any write falls through to the exact
# comparison, which decides as before. The tags are used only where a probe at import shows they change on
# each kind of write (this CPython and torch build); otherwise the exact comparison runs on every call.
_HOOK_DICTS = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks")
_DICT_OF = operator.attrgetter("__dict__")


def _probe_dict_version() -> Any:
    """``dict_version`` when it changes on every kind of write the snapshot relies on, else None."""
    try:
        from torch._C._dynamo.guards import dict_version
    except ImportError:
        return None

    class _Probe(nn.Module):
        pass

    try:
        probe = _Probe()
        probe.flag = True
        attributes, plain, handles = probe.__dict__, {"a": 1}, []

        def writes(action: Any, mapping: dict) -> bool:
            before = dict_version(mapping)
            action()
            return dict_version(mapping) != before

        works = (writes(lambda: setattr(probe, "flag", False), attributes)
                 and writes(lambda: setattr(probe, "added", 1), attributes)
                 and writes(lambda: delattr(probe, "added"), attributes)
                 and writes(lambda: probe.register_buffer("b", torch.zeros(1)), probe._buffers)
                 and writes(lambda: probe._buffers.__setitem__("b", torch.zeros(1)), probe._buffers)
                 and writes(lambda: handles.append(probe.register_forward_hook(print)), probe._forward_hooks)
                 and writes(lambda: handles.pop().remove(), probe._forward_hooks)
                 and writes(lambda: plain.__setitem__("a", 2), plain) and writes(lambda: plain.pop("a"), plain)
                 and writes(lambda: plain.update(c=3), plain) and writes(plain.clear, plain))
    except Exception:  # noqa: BLE001 - any surprise: the exact comparison only
        return None
    return dict_version if works else None


_dict_version = _probe_dict_version()
#: ``dict_version`` where it changes on every kind of write (NOTE [Dict versions]), else None; the program guards
#: use it too (NOTE [Program guards of unwritten dicts] in autograd_cache/program_guards.py)
dict_version_tag = _dict_version


class _DictVersions:
    """The version tags of the dicts a :class:`ModuleState` snapshot reads (NOTE [Dict versions])."""

    __slots__ = ("_holders", "_holder_dicts", "_types", "_dicts", "_tags")

    def __init__(self, holders: list, dicts: list) -> None:
        self._holders = holders
        self._holder_dicts = list(map(_DICT_OF, holders))
        self._types = list(map(type, holders))
        self._dicts = dicts
        self._tags = list(map(_dict_version, dicts))

    @classmethod
    def of(cls, modules: list[nn.Module], watched: list[Any]) -> _DictVersions | None:
        if _dict_version is None:
            return None
        try:
            dicts = [d for module in modules for d in (module.__dict__, *map(module.__dict__.__getitem__, _HOOK_DICTS))]
            dicts.extend(obj.__dict__ for obj in watched)
        except KeyError:  # a module without one of the registries (unpickled from an old torch)
            return None
        if any(type(d) is not dict and type(d) is not collections.OrderedDict for d in dicts):
            return None
        return cls([*modules, *watched], dicts)

    def hold(self) -> bool:
        """Whether no recorded dict was written and every object has the same ``__dict__`` and type."""
        return (list(map(_dict_version, self._dicts)) == self._tags
                and all(map(operator.is_, map(_DICT_OF, self._holders), self._holder_dicts))
                and list(map(type, self._holders)) == self._types)

    def record(self) -> None:
        self._tags = list(map(_dict_version, self._dicts))
