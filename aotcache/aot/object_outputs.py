"""Outputs that are arbitrary Python objects holding tensors (e.g. transformers' ``DynamicCache``).

NOTE [Object outputs]
pytree only sees inside the containers it knows. A model may return any other object: a decoder's key/value
cache, a user's result class. Capture splits such an object into a *template*, the object pickled with every
tensor and SymInt it reaches replaced by a numbered slot (``persistent_id``), and those tensors, which become
ordinary flat outputs (graph outputs, inputs, views of either). The runtime rebuilds a fresh object per call
by unpickling the template with the real tensors in the slots, so eager's structure, object identities
inside it (one tensor held twice stays one tensor) and non-tensor state come back. Pickling reaches exactly
what ``copy.deepcopy`` would, so no tensor can hide in a part a hand-written walker skipped.

Templates live in this process only (a registry keyed by a token): they name classes to import, which the
compiled-graph cache never does when loading, so an entry whose outputs hold one is not stored (the cache
bypasses it with a reason) and in-process reuse works as usual. An object that references an ``nn.Module``
is refused (the template would copy the model), as is one that cannot be pickled, and a ``torch.Generator``
(the template would give back a copy at the capture's state where eager returns the generator, advanced).
"""

from __future__ import annotations

import io
import itertools
import pickle
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["ObjectOutput", "ObjectOutputError", "lift_object_outputs", "object_output_leaves", "rebuild_object",
           "template_type_name"]

_PLAIN_LEAVES = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, bool, int, float, str, type(None))
_SLOT_TYPES = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)

_templates: dict[str, tuple[bytes, str]] = {}  # token -> (pickled template, the object's type name)
_templates_lock = threading.Lock()
_tokens = itertools.count()


class ObjectOutputError(TypeError):
    """An output object that cannot be split into a template and tensors; the message names it and the fix."""


class ObjectOutput:
    """A pytree node standing for one user output object: its template token and the values in its slots."""

    __slots__ = ("token", "leaves")

    def __init__(self, token: str, leaves: list) -> None:
        self.token = token
        self.leaves = leaves


pytree.register_pytree_node(ObjectOutput, lambda node: (list(node.leaves), node.token),
                            lambda leaves, token: ObjectOutput(token, list(leaves)))


class _SlotPickler(pickle.Pickler):
    """Pickles an object with its tensors and SymInts replaced by slot numbers (one slot per distinct object)."""

    def __init__(self, file: io.BytesIO, where: str) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.where = where
        self.leaves: list = []
        self._slot_of: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _SLOT_TYPES):
            slot = self._slot_of.get(id(obj))
            if slot is None:
                slot = self._slot_of[id(obj)] = len(self.leaves)
                self.leaves.append(obj)
            return slot
        if isinstance(obj, torch.nn.Module):
            raise ObjectOutputError(f"aotcache: {self.where} references an nn.Module ({type(obj).__name__}); an "
                                    f"output object must not hold a module: return its tensors instead")
        if isinstance(obj, torch.Generator):  # a template would return a copy at the capture's state, not the
            raise ObjectOutputError(  # caller's generator (NOTE [Generator arguments] in generator_args.py)
                f"aotcache: {self.where} is or holds a torch.Generator; a compiled graph would return a copy of it "
                f"as it was when captured, not the generator itself: return it from outside the compiled function")
        return None


class _SlotUnpickler(pickle.Unpickler):
    def __init__(self, blob: bytes, leaves: Sequence[Any]) -> None:
        super().__init__(io.BytesIO(blob))
        self._leaves = leaves

    def persistent_load(self, pid: Any) -> Any:
        return self._leaves[pid]


def _split(value: Any, where: str) -> tuple[bytes, list]:
    """The template bytes of ``value`` and the tensors / SymInts it holds, in slot order."""
    buffer = io.BytesIO()
    pickler = _SlotPickler(buffer, where)
    try:
        pickler.dump(value)
    except ObjectOutputError:
        raise
    except Exception as exc:  # pickling user objects can fail in any way (lambdas, locks, local classes)
        raise ObjectOutputError(
            f"aotcache: {where} is a {type(value).__module__}.{type(value).__qualname__}, which is neither a "
            f"container pytree knows nor picklable ({type(exc).__name__}: {exc}); register its type with "
            f"torch.utils._pytree.register_pytree_node, or return its tensors in a tuple or dict") from exc
    return buffer.getvalue(), pickler.leaves


def _is_object_leaf(value: Any) -> bool:
    return not isinstance(value, _PLAIN_LEAVES)


def lift_object_outputs(result: Any) -> Any:
    """``result`` with each object pytree does not know replaced by an :class:`ObjectOutput` (template kept)."""

    def lift(value: Any) -> Any:
        if not _is_object_leaf(value):
            return value
        blob, leaves = _split(value, f"an output of type {type(value).__qualname__}")
        token = f"object-{next(_tokens)}"
        with _templates_lock:
            _templates[token] = (blob, f"{type(value).__module__}.{type(value).__qualname__}")
        return ObjectOutput(token, leaves)

    leaves, spec = pytree.tree_flatten(result)
    if not any(_is_object_leaf(value) for value in leaves):
        return result  # the usual case: untouched (rebuilding would turn a torch.Size into a tuple)
    return pytree.tree_unflatten([lift(value) for value in leaves], spec)


def object_output_leaves(result: Any) -> list:
    """The flat outputs of ``result`` in the order :func:`lift_object_outputs` gives them (no template kept)."""
    flat: list = []
    for value in pytree.tree_leaves(result):
        if _is_object_leaf(value):
            flat.extend(_split(value, f"an output of type {type(value).__qualname__}")[1])
        else:
            flat.append(value)
    return flat


def rebuild_object(token: str, leaves: Sequence[Any]) -> Any:
    """A fresh output object from the template ``token`` with ``leaves`` in its slots.

    :raises KeyError: no such template in this process (an entry from elsewhere: treated as unloadable).
    """
    with _templates_lock:
        blob, _ = _templates[token]
    return _SlotUnpickler(blob, leaves).load()


def template_type_name(token: str) -> str | None:
    """The type name of the object behind ``token``, or None when this process has no such template."""
    with _templates_lock:
        found = _templates.get(token)
    return None if found is None else found[1]
