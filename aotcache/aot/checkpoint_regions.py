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

A selective-checkpoint region (``context_fn=create_selective_checkpoint_contexts(policy)``) runs in line too, under
a dispatch mode in the place of torch's caching one (above the functionalization, so that the policy sees the ops
the model calls, in-place ones included) that asks the policy about each op and tags that op's nodes with its
answer, caching nothing; the partitioners save what it saves (MUST_SAVE / PREFER_SAVE) and recompute the rest of
the region. A ``context_fn`` making other dispatch modes (or a body taking keyword arguments) still goes through
torch's implementation: captured where it writes nothing in place, else refused (its graph runs eagerly, each
region as eager's checkpoint, NOTE [Checkpointed regions run eagerly]).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

from aotcache.aot.checkpoint_refusals import checkpoint_input_write_error

__all__ = ["has_checkpoint_regions", "run_with_regions_in_line"]

_own_region_ids = itertools.count(1)  # used where torch's counter is missing


def _new_region_id() -> int:
    """A fresh ``ac_graph_id`` (only compared for equality), from the counter torch's own implementation of
    ``tag_activation_checkpoint`` draws from: a graph mixing regions traced in line with regions that go through
    torch's implementation (a ``context_fn`` with its own modes) must not give two regions one id, or the
    partitioners would take them for one region (found in review: both counters started at 0 / 1)."""
    from torch._higher_order_ops import wrap

    shared = getattr(wrap, "uid", None)
    return next(shared if isinstance(shared, itertools.count) else _own_region_ids)


_open = threading.local()  # .region_id: the ac_graph_id of the region this thread traces in line, if any

# NOTE [Nested regions traced in line]
# Eager's checkpoint nested in another keeps only the outer region's inputs: the inner one's inputs and outputs
# are values of the outer region, recomputed with it. Tagged with an ac_graph_id of its own, an inner region's
# boundary values were not internal to either region (their users belong to the other), so the partitioners saved
# them: the memory of the inner checkpoints alone (found in review: three dropout blocks of 256 x 16 checkpointed
# inside an outer checkpoint saved 80 KiB, as without the outer one; 48 KiB now). A plain region traced inside
# another one takes the enclosing region's ac_graph_id, so the whole outer region is recomputed; a
# selective-checkpoint region keeps its own (its policy decides what it saves).


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
    """Runs a graph; a ``tag_activation_checkpoint`` call runs its body in line, unless its ``context_fn`` is not
    torch's selective-checkpoint contexts."""

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target is _hop() and args and isinstance(args[0], fx.GraphModule) and hasattr(target, "divide_kwargs"):
            _, body_kwargs = target.divide_kwargs(kwargs)  # a torch without it: torch's own implementation
            context_fn = args[0].meta.get("_checkpoint_context_fn")
            policy = _selective_policy(context_fn) if context_fn is not None else None
            if not body_kwargs and (context_fn is None or policy is not None):  # Dynamo passes them positionally
                return _region_in_line(args[0], args[1:], policy)
        return super().call_function(target, args, kwargs)


def _selective_policy(context_fn: Callable) -> Callable | None:
    """The policy of ``create_selective_checkpoint_contexts(policy)``'s contexts; None for other contexts (their
    own dispatch modes may do more than choose what to save: torch's implementation runs them)."""
    from torch.utils import checkpoint

    caching_mode = getattr(checkpoint, "_CachingTorchDispatchMode", None)  # private: a torch without it (or
    if caching_mode is None or not hasattr(checkpoint, "SelectiveCheckpointContext"):  # renamed) -> torch's own
        return None
    contexts = context_fn()
    forward = contexts[0] if isinstance(contexts, tuple) and len(contexts) == 2 else None
    return getattr(forward, "policy_fn", None) if type(forward) is caching_mode else None


def _versions_of(args: Sequence[Any]) -> list[int | None]:
    """The version counters of the tensors among ``args``: aotcache's own read, not the function's (NOTE [Autograd
    state read by the function] in tensor_state_reads.py refuses the function's)."""
    with torch._C.DisableTorchFunction():
        return [arg._version if isinstance(arg, torch.Tensor) else None for arg in args]


def _region_in_line(body: fx.GraphModule, args: Sequence[Any], policy: Callable | None) -> Any:
    """``body(*args)`` traced as part of the enclosing graph, its new nodes tagged to be recomputed (or as
    ``policy``, a selective-checkpoint policy, says per op).

    :raises CaptureError: the body wrote into one of its inputs (NOTE [Buffers written in a checkpointed region]).
    """
    from torch.fx.experimental.proxy_tensor import get_proxy_mode
    from torch.utils.checkpoint import CheckpointPolicy

    proxy_mode = get_proxy_mode()
    graph = proxy_mode.tracer.graph if proxy_mode is not None else None  # None: the analysis pass traces nothing
    nodes_before = len(graph.nodes) if graph is not None else 0
    enclosing = getattr(_open, "region_id", None)
    region_id = enclosing if enclosing is not None and policy is None else _new_region_id()  # NOTE [Nested
    versions = _versions_of(args)  # regions traced in line]
    tags = _PolicyTags(policy, graph, region_id) if policy is not None and graph is not None \
        else contextlib.nullcontext()
    _open.region_id = region_id
    try:
        with tags:
            out = _RegionsInLine(body).run(*args)
    finally:
        _open.region_id = enclosing
    for index, (arg, version, now) in enumerate(zip(args, versions, _versions_of(args))):
        if version is not None and now != version:
            raise checkpoint_input_write_error(f"the region's input {index} of shape {tuple(arg.shape)}")
    if graph is None:
        return out
    for node in itertools.islice(reversed(graph.nodes), len(graph.nodes) - nodes_before):  # the trace appends
        if node.op == "call_function" and "recompute" not in node.meta:  # a nested region tagged its own
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            node.meta["ac_graph_id"] = region_id
    return out


class _PolicyTags(TorchDispatchMode):
    """Above the capture's functionalization, as torch's selective-checkpoint mode: asks ``policy`` about each op
    and tags the nodes it traced with the answer; caches nothing (NOTE [Checkpointed regions traced in line])."""

    def __init__(self, policy: Callable, graph: fx.Graph, region_id: int) -> None:
        super().__init__()
        self.policy = policy
        self.graph = graph
        self.region_id = region_id

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext

        kwargs = kwargs or {}
        before = len(self.graph.nodes)
        out = func(*args, **kwargs)
        if func in _ignored_ops():
            return out
        choice = self.policy(SelectiveCheckpointContext(is_recompute=False), func, *args, **kwargs)
        if isinstance(choice, bool):
            choice = CheckpointPolicy.MUST_SAVE if choice else CheckpointPolicy.PREFER_RECOMPUTE
        for node in itertools.islice(reversed(self.graph.nodes), len(self.graph.nodes) - before):
            if node.op == "call_function" and "recompute" not in node.meta:
                node.meta["recompute"] = choice
                node.meta["ac_graph_id"] = self.region_id
        return out


def _ignored_ops() -> Any:
    """The ops torch's selective checkpointing asks no policy about (detach, tensor metadata)."""
    from torch.utils import checkpoint

    return getattr(checkpoint, "SAC_IGNORED_OPS", ())
