"""Library pytree nodes that are ordered dicts (transformers' ``ModelOutput``), rebuilt in their own key order.

NOTE [Keyed pytree nodes in their own key order]
transformers registers every ``ModelOutput`` (an ``OrderedDict`` subclass and a dataclass) as a pytree node: it is
flattened to its values with its keys, in the order they were set, as context, but rebuilt by calling the class
with those keys as keyword arguments, so the rebuilt value holds its keys in the class's field order, and a key
that is not a field makes the constructor raise. A ``ModelOutput``'s order is visible: ``out[0]`` and
``out.to_tuple()`` follow it. Found with PyTorch's test_model_output.py (session 24): an output whose ``loss`` was
set after construction (``out = CausalLMOutputWithPast(logits=...); out.loss = ...``, keys ``[logits, loss]``) came
back from ``aotcache.compile`` / ``aot_function`` as ``[loss, logits]`` (``out[0]`` the loss where eager gives the
logits), and an argument whose keys were set in another order than the fields' was traced with the fields' order
(a graph of ``o[0]`` read another field than eager's); ``torch.compile`` keeps eager's order both ways. Such a node
(:func:`keyed_node`: an ``OrderedDict`` subclass registered with its key list as context) is now rebuilt in the
recorded key order (:func:`in_recorded_key_order`, on the output path one key-list comparison per node and call);
one whose rebuilt keys are not the recorded ones, or whose constructor raises (a key that is not a field:
``out["extra"] = ...``), is refused by the capture (a ``CaptureError``: ``aotcache.compile`` takes the Dynamo way,
whose reconstruction is its own). The in-process signature already tells orders apart: the key list is part of
the argument's pytree context.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from torch.utils import _pytree as pytree

from aotcache.aot.errors import CaptureError

__all__ = ["KeyOrderError", "has_keyed_nodes", "in_recorded_key_order", "keyed_node", "refuse_outputs_rebuilt_otherwise",
           "unflatten_arguments",
           "unflatten_in_recorded_order"]


class KeyOrderError(ValueError):
    """A keyed node (NOTE [Keyed pytree nodes in their own key order]) that does not rebuild as itself."""


def keyed_node(node_type: type, context: Any) -> bool:
    """Whether ``node_type`` is a registered ``OrderedDict`` subclass whose pytree context is its key list."""
    return (isinstance(context, list) and isinstance(node_type, type)
            and issubclass(node_type, collections.OrderedDict) and node_type is not collections.OrderedDict)


def in_recorded_key_order(value: Any, keys: list) -> Any:
    """``value`` (a rebuilt keyed node) with its keys moved into the recorded order ``keys``.

    :raises KeyOrderError: the rebuilt value holds other keys than the recorded ones.
    """
    held = list(value.keys())
    if held == keys:
        return value
    if len(held) != len(keys) or set(held) != set(keys):
        raise KeyOrderError(f"aotcache: a {type(value).__qualname__} holding the keys {keys} rebuilds from its "
                            f"pytree form holding {held}")
    for key in keys:
        value.move_to_end(key)
    return value


def _children(spec: Any) -> list:
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)


def has_keyed_nodes(spec: Any) -> bool:
    """Whether the pytree ``spec`` holds a keyed node anywhere."""
    if spec.is_leaf():
        return False
    return keyed_node(spec.type, spec.context) or any(has_keyed_nodes(child) for child in _children(spec))


def unflatten_in_recorded_order(leaves: Sequence[Any], spec: Any) -> Any:
    """``pytree.tree_unflatten(leaves, spec)``, keyed nodes in their recorded key order.

    :raises KeyOrderError: a keyed node's constructor raised, or it rebuilt other keys.
    """
    if not has_keyed_nodes(spec):
        return pytree.tree_unflatten(list(leaves), spec)
    remaining = iter(leaves)

    def build(node: Any) -> Any:
        if node.is_leaf():
            return next(remaining)
        children = [build(child) for child in _children(node)]
        unflatten = pytree.SUPPORTED_NODES[node.type].unflatten_fn
        if not keyed_node(node.type, node.context):
            return unflatten(children, node.context)
        try:
            value = unflatten(children, node.context)
        except Exception as exc:  # noqa: BLE001 - the library's constructor: any error means "does not rebuild"
            raise KeyOrderError(f"aotcache: a {node.type.__qualname__} holding the keys {node.context} does not "
                                f"rebuild from its pytree form ({type(exc).__name__}: {exc})") from exc
        return in_recorded_key_order(value, node.context)

    return build(spec)


def unflatten_arguments(flat_args: Sequence[Any], in_spec: Any) -> Any:
    """A traced call's ``(args, kwargs)`` from its flat arguments, keyed nodes in the caller's key order.

    :raises CaptureError: an argument that does not rebuild as itself (NOTE [Keyed pytree nodes in their own key
        order]).
    """
    try:
        return unflatten_in_recorded_order(flat_args, in_spec)
    except KeyOrderError as exc:
        raise CaptureError(f"{exc}: an argument the capture cannot pass on as the caller gave it",
                           reason="refused_argument") from None


def refuse_outputs_rebuilt_otherwise(flat_outs: Sequence[Any], out_spec: Any) -> None:
    """Refuse an output whose keyed nodes the runtime could not rebuild as the function returned them.

    :raises CaptureError: a keyed node's constructor raised on its recorded keys, or it rebuilt other keys.
    """
    if not has_keyed_nodes(out_spec):
        return
    try:
        unflatten_in_recorded_order(flat_outs, out_spec)
    except KeyOrderError as exc:
        raise CaptureError(f"{exc}: an output a compiled call cannot give back as the function returned it") from None
