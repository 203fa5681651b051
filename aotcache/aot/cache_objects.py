"""transformers' KV-cache objects (``DynamicCache``, ``EncoderDecoderCache``, ...) as pytree nodes.

NOTE [Cache objects as pytree nodes]
A decoder takes its key/value cache as an argument and returns it updated. Unregistered, such an object is
refused as an argument (NOTE [Constant arguments] in ``signature.py``) and, as an output, kept as an in-process
template that the compiled-graph cache bypasses (NOTE [Object outputs]). Registered as a pytree node, its
tensors become ordinary graph inputs and outputs and everything else goes into the node's *context*, which
is part of the signature (compared by value) and of the stored output structure:

* the object is walked through its ``__dict__``: tensors (and SymInts) are children; nested cache and layer
  objects (classes of ``transformers.cache_utils``), lists, tuples and dicts (str/int keys) are recorded with
  their structure; ``None``, bools, ints, floats, strings, dtypes, devices and classes by value;
* so the layer structure is in the spec: the number of layers, each layer's class, whether it is
  initialized, its sliding window, ... A call with another structure is another signature;
* anything else (an offloading stream, an unknown object) is refused with an error naming the attribute,
  rather than dropped: an unseen attribute could change what the model computes.

Integers (a sliding-window layer's ``cumulative_length_int``, which grows by one at every decoding step) are
children too, as :class:`CacheInt`, so that they can become symbols (NOTE [Cache integers]).

Unflattening builds fresh objects (``cls.__new__`` and the recorded ``__dict__``), never running
constructors, and resolves classes only from modules that are already imported. The JSON form of the
context (for the stored output structure and the call fingerprint) names classes as ``module:qualname``.

NOTE [Cache arguments are updated in place]
Eagerly, ``model(ids, cache=c)`` updates ``c`` in place and returns it. A compiled call returns the
updated cache as a new object built from the graph's outputs. :func:`write_back_caches` restores eager's
behaviour: each cache object passed in takes the state of the returned cache of the same type (in order),
and the output holds the object that was passed in, so ``out.cache is c`` and a loop that keeps reusing
``c`` sees every update. transformers' models return the cache they were given; a model returning a
different cache object of the same type would see its argument updated too (documented limit).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["CacheInt", "register_transformers_caches", "register_caches_for", "is_cache_object", "find_cache_arguments",
           "write_back_caches", "structure_step", "steps_hold", "flattened_here"]

_CACHE_MODULE = "transformers.cache_utils"
_registered: set[type] = set()
_lock = threading.Lock()


class CacheObjectError(TypeError):
    """A cache object holding something that cannot be part of a signature; the message names it."""


def _object_class(cls: type) -> bool:
    """Classes whose instances are recorded structurally: those of transformers' cache module."""
    return getattr(cls, "__module__", "") == _CACHE_MODULE


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(name: str) -> type:
    """The class ``module:qualname`` from an already imported module (never imports)."""
    module_name, _, qualname = name.partition(":")
    owner: Any = sys.modules.get(module_name)
    if owner is None or module_name != _CACHE_MODULE:
        raise ValueError(f"aotcache: cache class {name} is not from an imported {_CACHE_MODULE}")
    for part in qualname.split("."):
        owner = vars(owner).get(part)
        if owner is None:
            raise ValueError(f"aotcache: no cache class {name}")
    if not isinstance(owner, type):
        raise ValueError(f"aotcache: {name} is not a class")
    return owner


_VALUE_TYPES = (type(None), bool, int, float, str)


# NOTE [Cache integers]
# A sliding-window cache layer counts the tokens it has seen in a Python int that the model branches on
# (is the window full? where does it start?), so each decoding step changed the cache's context, and so the
# signature: one graph per generated token (Mistral, Gemma 2/3: 12 captures for 12 tokens, torch.compile 3).
# Integers of cache objects are therefore flattened as leaves, marked as ``CacheInt`` so that they take part in
# dynamic shapes: compared by value like any constant while static; under automatic dynamic shapes
# (``dynamic=None``) one that changed is marked dynamic like a tensor dimension and traced as a symbol (a graph
# input), its branches becoming guards; with ``dynamic=True`` from the start. (A user's plain int argument
# takes part under automatic dynamic shapes only: NOTE [Integer arguments] in dynamic_dims.py.) Values 0 and 1
# stay in the signature (torch specializes them).
# Unflattening hands the function plain ints (or the symbols), never ``CacheInt``.
class CacheInt(int):
    """An int leaf of a flattened cache object (NOTE [Cache integers])."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"CacheInt({int(self)})"


def _encode(value: Any, leaves: list, where: str) -> tuple:
    """The hashable context node of ``value``; tensors and SymInts are appended to ``leaves``."""
    if isinstance(value, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)):
        leaves.append(value)
        return ("leaf",)
    if type(value) is int or type(value) is CacheInt:  # NOTE [Cache integers]
        leaves.append(CacheInt(value))
        return ("leaf",)
    if type(value) in _VALUE_TYPES:
        return ("value", value)
    if isinstance(value, torch.dtype):
        return ("dtype", str(value).removeprefix("torch."))
    if isinstance(value, torch.device):
        return ("device", str(value))
    if isinstance(value, type) and _object_class(value):
        return ("class", value)
    if type(value) in (list, tuple):
        return (type(value).__name__, tuple(_encode(item, leaves, f"{where}[{i}]") for i, item in enumerate(value)))
    if type(value) is dict and all(type(key) in (str, int, bool) for key in value):
        return ("dict", tuple((key, _encode(item, leaves, f"{where}[{key!r}]")) for key, item in value.items()))
    if _object_class(type(value)) and hasattr(value, "__dict__"):
        return ("object", type(value), tuple((name, _encode(item, leaves, f"{where}.{name}"))
                                              for name, item in vars(value).items()))
    raise CacheObjectError(f"aotcache: {where} is a {type(value).__module__}.{type(value).__qualname__}, which a "
                           f"compiled call cannot take as part of a cache object (only tensors, plain values, "
                           f"dtypes, devices and transformers cache/layer objects); turn the option that adds "
                           f"it off (e.g. offloading=False) or call the model eagerly")


def _decode(node: tuple, leaves: Any) -> Any:
    kind = node[0]
    if kind == "leaf":
        value = next(leaves)
        return int(value) if type(value) is CacheInt else value
    if kind == "value":
        return node[1]
    if kind == "dtype":
        return getattr(torch, node[1])
    if kind == "device":
        return torch.device(node[1])
    if kind == "class":
        return node[1]
    if kind in ("list", "tuple"):
        items = [_decode(item, leaves) for item in node[1]]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {key: _decode(item, leaves) for key, item in node[1]}
    if kind == "object":
        obj = node[1].__new__(node[1])
        obj.__dict__.update({name: _decode(item, leaves) for name, item in node[2]})
        return obj
    raise ValueError(f"aotcache: malformed cache context node {node!r}")


def _flatten(obj: Any) -> tuple[list, tuple]:
    leaves: list = []
    context = _encode(obj, leaves, type(obj).__name__)
    return leaves, context


def _flatten_with_keys(obj: Any) -> tuple[list, tuple]:
    leaves, context = _flatten(obj)
    return [(pytree.SequenceKey(i), leaf) for i, leaf in enumerate(leaves)], context


def _unflatten(values: Any, context: tuple) -> Any:
    iterator = iter(values)
    obj = _decode(context, iterator)
    if next(iterator, iterator) is not iterator:
        raise ValueError("aotcache: more values than the cache object's structure holds")
    return obj


def steps_hold(steps: Sequence[Any], items: Any, out: list) -> bool:
    """Whether each of ``items`` passes its step of ``steps`` (each step appends the item's leaves to ``out``)."""
    for step, item in zip(steps, items):
        if not step(item, out):
            return False
    return True


# NOTE [Checking a cache object against a recorded structure]
# The call hot path (NOTE [Call hot path] in call_hot_path.py) must know that a cache argument has the structure
# recorded (its context) and must collect its leaves. Flattening it builds the whole context (a tuple per node,
# a CacheInt per integer) to compare it with ``==``: ~10 us per decoding step for two layers. A step built from the
# recorded context walks the object along it instead and stops at the first difference. It accepts exactly the
# objects whose context equals the recorded one (a plain value compared with its type too: stricter than the
# context's ``==``, which finds ``True`` equal to ``1.0``), and collects the leaves :func:`_flatten` gives.
def structure_step(context: tuple) -> Callable[[Any, list], bool]:
    """``step(value, out) -> bool``: whether ``value`` flattens to ``context``; appends its leaves to ``out``."""
    kind = context[0]
    if kind == "leaf":
        return _leaf_step
    if kind == "value":
        expected, expected_type = context[1], type(context[1])
        return lambda value, out: type(value) is expected_type and value == expected
    if kind == "dtype":
        dtype = getattr(torch, context[1])
        return lambda value, out: value is dtype
    if kind == "device":
        device = context[1]
        return lambda value, out: type(value) is torch.device and str(value) == device
    if kind == "class":
        cls = context[1]
        return lambda value, out: value is cls
    if kind in ("list", "tuple"):
        sequence_type, items = (list if kind == "list" else tuple), [structure_step(item) for item in context[1]]
        count = len(items)

        def sequence(value: Any, out: list) -> bool:
            if type(value) is not sequence_type or len(value) != count:
                return False
            return steps_hold(items, value, out)
        return sequence
    if kind == "dict":
        keys = [key for key, _ in context[1]]
        key_types = list(map(type, keys))
        entries = [structure_step(item) for _, item in context[1]]

        def mapping(value: Any, out: list) -> bool:
            if type(value) is not dict or list(value) != keys or list(map(type, value)) != key_types:
                return False
            return steps_hold(entries, value.values(), out)
        return mapping
    if kind == "object":
        cls, names = context[1], [name for name, _ in context[2]]
        fields = [structure_step(item) for _, item in context[2]]

        def obj(value: Any, out: list) -> bool:
            if type(value) is not cls:
                return False
            attributes = getattr(value, "__dict__", None)
            if attributes is None or list(attributes) != names:
                return False
            return steps_hold(fields, attributes.values(), out)
        return obj
    raise ValueError(f"aotcache: malformed cache context node {context!r}")


def _leaf_step(value: Any, out: list) -> bool:
    """A leaf of :func:`_encode`: a tensor or symbol as is, an int as a :class:`CacheInt`."""
    if type(value) is int or type(value) is CacheInt:
        out.append(CacheInt(value))
        return True
    if isinstance(value, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)):
        out.append(value)
        return True
    return False


def flattened_here(cls: type) -> bool:
    """Whether ``cls``'s pytree node is this module's (so :func:`structure_step` checks its contexts)."""
    node = pytree.SUPPORTED_NODES.get(cls)
    return node is not None and node.flatten_fn is _flatten


def _to_dumpable(node: Any) -> Any:
    """The JSON form of a context node: tuples as lists, classes as ``module:qualname``."""
    if isinstance(node, type):
        return {"class": _class_name(node)}
    if isinstance(node, tuple):
        return [_to_dumpable(item) for item in node]
    return node


def _from_dumpable(node: Any) -> Any:
    if isinstance(node, dict):
        return _resolve_class(node["class"])
    if isinstance(node, list):
        return tuple(_from_dumpable(item) for item in node)
    return node


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def register_transformers_caches() -> list[type]:
    """Register transformers' ``Cache`` classes as pytree nodes (NOTE [Cache objects as pytree nodes]), if
    transformers' cache module is imported already (this never imports transformers). Classes that some
    other code registered first are left as they are. Returns the classes registered now."""
    module = sys.modules.get(_CACHE_MODULE)
    base = getattr(module, "Cache", None) if module is not None else None
    if not isinstance(base, type):
        return []
    done = []
    with _lock:
        for cls in [base, *_subclasses(base)]:
            if cls in _registered or cls in pytree.SUPPORTED_NODES or not _object_class(cls):
                continue
            pytree.register_pytree_node(cls, _flatten, _unflatten, serialized_type_name=_class_name(cls),
                                        to_dumpable_context=_to_dumpable, from_dumpable_context=_from_dumpable,
                                        flatten_with_keys_fn=_flatten_with_keys)
            _registered.add(cls)
            done.append(cls)
    return done


def register_caches_for(args: tuple, kwargs: Mapping) -> None:
    """:func:`register_transformers_caches` where it may register something: none registered yet, or an argument of
    a transformers cache class not registered (its walk of the cache classes took ~3 us of every decoding step)."""
    if not _registered or any(type(value) not in _registered and _object_class(type(value))
                              for value in (*args, *kwargs.values())):
        register_transformers_caches()


def is_cache_object(value: Any) -> bool:
    """Whether ``value`` is an instance of a cache class registered here."""
    return type(value) in _registered


def find_cache_arguments(args: tuple, kwargs: Mapping) -> list:
    """The cache objects passed directly as positional or keyword arguments (not nested), in order."""
    if not _registered:
        return []
    return [value for value in (*args, *kwargs.values()) if type(value) in _registered]


def write_back_caches(passed: list, result: Any) -> Any:
    """NOTE [Cache arguments are updated in place]: each cache object in ``passed`` takes the state of the
    first not yet used cache of its type among ``result``'s top-level values, and replaces it there."""
    if isinstance(result, Mapping):
        slots = list(result.items())
    elif isinstance(result, (tuple, list)):
        slots = list(enumerate(result))
    else:
        slots = [(None, result)]
    replaced: dict[Any, Any] = {}
    used: set[int] = set()
    for cache in passed:
        for key, value in slots:
            if type(value) is type(cache) and id(value) not in used and value is not cache:
                used.add(id(value))
                cache.__dict__.clear()
                cache.__dict__.update(vars(value))
                replaced[key] = cache
                break
    if not replaced:
        return result
    if isinstance(result, Mapping):
        for key, cache in replaced.items():
            result[key] = cache  # ModelOutput.__setitem__ updates the attribute too
        return result
    if isinstance(result, (tuple, list)):
        items = [replaced.get(index, value) for index, value in enumerate(result)]
        return type(result)(items) if type(result) in (tuple, list) else result
    return replaced[None]
