"""Source lines of a Dynamo graph carried into the captured forward and backward graphs.

NOTE [Source stack traces]
The nodes of a GraphModule that Dynamo (or an ``fx.Tracer`` with ``record_stack_traces``) made carry the user's
source line as ``stack_trace``; compilers show it (Inductor's generated code, error messages, profiles). While
such a graph is captured (:func:`capturing_source_locations`), it runs node by node (``fx.Interpreter``) under
``preserve_node_meta``, so every ATen node traced from one inherits its ``stack_trace``; anomaly mode records
each forward op's line on its autograd node, and :func:`hand_on_source_locations` makes the backward's nodes
inherit the line of the forward op they differentiate. A GraphModule whose call adds to its graph (a forward
hook or pre-hook, its own or global, a replaced ``forward``) is run through its call instead: ``fx.Interpreter``
would skip what the call adds. Source lines are node metadata, never part of a cache key.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["capturing_source_locations", "hand_on_source_locations", "keeps_source_locations", "run_graph",
           "runs_its_graph_only"]

_CALL_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")


def keeps_source_locations(gm: nn.Module) -> bool:
    """Whether ``gm`` is captured node by node: a GraphModule with source lines whose call runs its graph and
    nothing else."""
    if not (isinstance(gm, torch.fx.GraphModule) and type(gm.graph._codegen) is torch.fx.graph.CodeGen
            and any(node.stack_trace for node in gm.graph.nodes)):
        return False
    return runs_its_graph_only(gm)


def runs_its_graph_only(gm: nn.Module) -> bool:
    """Whether calling ``gm`` runs its graph and nothing else (no hooks, its own or global; no replaced
    ``forward``), so that running it node by node (``fx.Interpreter``) computes what its call does."""
    if "forward" in gm.__dict__ or any(getattr(gm, name, None) for name in _CALL_HOOK_DICTS):
        return False
    hooks = torch.nn.modules.module
    return not any(getattr(hooks, name, None) for name in _GLOBAL_HOOK_DICTS)


def _capturing() -> bool:
    from torch.fx import traceback as fx_traceback

    return fx_traceback.has_preserved_node_meta()


def run_graph(gm: nn.Module, args: Sequence[Any], keep: bool, regions: bool = False, *,
              dynamo_graph: bool = False) -> Any:
    """``gm(*args)``; node by node while ``keep`` (:func:`keeps_source_locations`) and a capture preserves node
    metadata, so each node's ``stack_trace`` is current while its ops are traced. ``regions``: ``gm`` has
    activation-checkpointed regions, traced in line while this thread captures (NOTE [Checkpointed regions
    traced in line] in checkpoint_regions.py). ``dynamo_graph``: ``gm`` is Dynamo's, which holds the global module
    hooks already (NOTE [Dynamo's graph runs without global module hooks])."""
    if regions:
        from aotcache.aot.capture_threads import capturing_in_this_thread

        if capturing_in_this_thread():
            from aotcache.aot.checkpoint_regions import run_with_regions_in_line

            return run_with_regions_in_line(gm, args)
    if keep and _capturing():
        return torch.fx.Interpreter(gm).run(*args)
    if dynamo_graph and isinstance(gm, torch.fx.GraphModule) and not _own_hooks(gm):
        # NOTE [Dynamo's graph runs without global module hooks]: ``forward``, not the call; a lazy graph module's
        # first ``forward`` compiles its code and calls the module, so its code is compiled first
        needs_recompile = getattr(gm, "_needs_recompile", None)
        if needs_recompile is not None and needs_recompile():
            gm.real_recompile()
        return gm.forward(*args)
    return gm(*args)


# NOTE [Dynamo's graph runs without global module hooks]
# Dynamo traces the global module hooks (``register_module_forward_hook``) into its graph where the user's modules
# are called. Called as a module, the graph module ran them once more around itself: an unconditional ``o * 3``
# tripled the graph's output tuple, the capture failed and the graph ran eagerly (found in session 20's review).
# Its ``forward`` runs the graph alone, as torch's own backends do (NOTE [Compiled graphs run without module hooks]
# in compilers/nop.py). A graph module a user hands ``aot_module_simplified`` outside Dynamo is called as a module:
# eager's ``gm(x)`` runs the global hooks around it.
def _own_hooks(gm: nn.Module) -> bool:
    return "forward" in gm.__dict__ or any(getattr(gm, name, None) for name in _CALL_HOOK_DICTS)


@contextlib.contextmanager
def capturing_source_locations(keep: bool) -> Iterator[None]:
    """Around a capture of a graph for which ``keep`` holds: node metadata preserved, forward lines recorded."""
    if not keep:
        yield
        return
    from torch.fx import traceback as fx_traceback

    with fx_traceback.preserve_node_meta(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Anomaly Detection has been enabled.")
        with torch.autograd.detect_anomaly(check_nan=False):
            yield


def hand_on_source_locations(nodes: Sequence[Any]) -> None:
    """Before the joint trace's backward: each of the outputs' autograd ``nodes`` (:func:`autograd_nodes`) sets,
    while it runs, the source line anomaly mode recorded for it, and puts back the line in effect before."""
    if not _capturing():
        return
    from torch.fx import traceback as fx_traceback

    before = fx_traceback.format_stack()
    for node in nodes:
        forward_line = node.metadata.get("traceback_", [])
        node.register_prehook(lambda grad_outputs, line=forward_line: fx_traceback.set_stack_trace(line))
        node.register_hook(lambda grad_inputs, grad_outputs: fx_traceback.set_stack_trace(before))
