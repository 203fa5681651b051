"""Activation-checkpointed regions of a Dynamo graph while aotcache captures it: each region's body is traced in
line, under the capture's functionalization, with its nodes tagged for the partitioners to recompute.

NOTE [Checkpointed regions traced in line]
Dynamo hands a ``torch.utils.checkpoint`` region (transformers' ``gradient_checkpointing_enable()``) over as a
``tag_activation_checkpoint`` call. torch's own implementation of that call runs eager's checkpoint with a
selective-checkpoint policy that recomputes everything: its caching dispatch mode, pushed *above* the capture's
``FunctionalTensorMode``, tags each op's nodes ``meta["recompute"]`` and keeps each op's output so that the traced
backward's recomputation hands those outputs back. It sees ops before functionalization does, so a region that
writes in place into a tensor it computed (dropout drawing its mask with ``bernoulli_`` then ``div_``, T5's
``buckets += ...``) changed a kept output's version and torch raised "Tensor cached during selective activation
checkpoint has been mutated": the whole graph ran eagerly.

Nothing in that recomputation reaches the traced graph (the backward reads the kept forward values; the
partitioners do the recomputing, from the tags), so while aotcache captures, a plain region (no ``context_fn``)
runs its body in line instead: ops meet the capture's functionalization as anywhere else (an in-place op becomes
its functional form), autograd saves the forward's values for the backward as without checkpointing, and every
node the body adds to the traced graph is tagged ``PREFER_RECOMPUTE`` with one ``ac_graph_id`` per region, as
torch's mode tags them. The partitioners then recompute the region's internals in the backward and save its
random draws (NOTE [Activation checkpoint regions] in partition.py), which is what eager's checkpoint with
``preserve_rng_state=True`` computes: the same masks, and the generator left where the forward left it.
``preserve_rng_state=False`` with random ops stays refused (NOTE [Checkpointed regions without the RNG state]),
and so does a region that writes into one of its inputs (a BatchNorm's statistics: eager's recomputation writes
them a second time, NOTE [Buffers written in a checkpointed region]).

A selective-checkpoint region (``context_fn=create_selective_checkpoint_contexts(policy)``) still goes through
torch's implementation, whose mode asks the policy per op: captured where it writes nothing in place, else refused
(its graph runs eagerly, each region as eager's checkpoint, NOTE [Checkpointed regions run eagerly]).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from aotcache.aot.refusals import checkpoint_input_write_error

__all__ = ["has_checkpoint_regions", "run_with_regions_in_line"]

_region_ids = itertools.count(1)  # ac_graph_id of each region traced in line (only compared for equality)


def _hop() -> Any:
    return getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)


def has_checkpoint_regions(gm: torch.nn.Module) -> bool:
    """Whether ``gm`` (or a submodule) calls ``tag_activation_checkpoint``."""
    hop = _hop()
    if hop is None:
        return False
    for module in gm.modules():
        graph = getattr(module, "graph", None)
        if isinstance(graph, fx.Graph) and any(node.op == "call_function" and node.target is hop
                                               for node in graph.nodes):
            return True
    return False


def run_with_regions_in_line(gm: torch.nn.Module, args: Sequence[Any]) -> Any:
    """``gm(*args)`` node by node, each plain checkpointed region's body traced in line and tagged (NOTE
    [Checkpointed regions traced in line]); for use while a capture traces ``gm``."""
    return _RegionsInLine(gm).run(*args)


class _RegionsInLine(fx.Interpreter):
    """Runs a graph; a ``tag_activation_checkpoint`` call without a ``context_fn`` runs its body in line."""

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target is _hop() and args and isinstance(args[0], fx.GraphModule) \
                and "_checkpoint_context_fn" not in args[0].meta and hasattr(target, "divide_kwargs"):
            _, body_kwargs = target.divide_kwargs(kwargs)  # a torch without it: torch's own implementation
            if not body_kwargs:  # Dynamo passes the body's arguments positionally
                return _region_in_line(args[0], args[1:])
        return super().call_function(target, args, kwargs)


def _region_in_line(body: fx.GraphModule, args: Sequence[Any]) -> Any:
    """``body(*args)`` traced as part of the enclosing graph, its new nodes tagged to be recomputed.

    :raises CaptureError: the body wrote into one of its inputs (NOTE [Buffers written in a checkpointed region]).
    """
    from torch.fx.experimental.proxy_tensor import get_proxy_mode
    from torch.utils.checkpoint import CheckpointPolicy

    proxy_mode = get_proxy_mode()
    graph = proxy_mode.tracer.graph if proxy_mode is not None else None  # None: the analysis pass traces nothing
    nodes_before = len(graph.nodes) if graph is not None else 0
    versions = [arg._version if isinstance(arg, torch.Tensor) else None for arg in args]
    out = _RegionsInLine(body).run(*args)
    for index, (arg, version) in enumerate(zip(args, versions)):
        if version is not None and arg._version != version:
            raise checkpoint_input_write_error(f"the region's input {index} of shape {tuple(arg.shape)}")
    if graph is None:
        return out
    region_id = next(_region_ids)
    for node in itertools.islice(reversed(graph.nodes), len(graph.nodes) - nodes_before):  # the trace appends
        if node.op == "call_function" and "recompute" not in node.meta:  # a nested region tagged its own
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            node.meta["ac_graph_id"] = region_id
    return out
