"""What a capture refuses of activation checkpointing (``torch.utils.checkpoint``), and torch's errors in a
checkpointed region turned into ``CaptureError``s that name the fix: reentrant checkpoints (in the joint trace's
backward, or among the traced outputs' autograd nodes), regions that write in place into their inputs or into values
torch's checkpoint cached, regions that draw random numbers without preserving the RNG state; and a tensor saved for
the backward that is then modified in place, which autograd reports with the same error as a region's write.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from aotcache.aot.error_sites import call_site, first_line
from aotcache.aot.errors import CaptureError

__all__ = ["refuse_reentrant_checkpoint_nodes", "refuse_reentrant_checkpoint", "saved_tensor_modified_error",
           "checkpoint_input_write_error", "checkpoint_mutation_error", "CHECKPOINT_MUTATION_ERROR",
           "refuse_unpreserved_random_regions"]


_REENTRANT_MESSAGE = (
    "aotcache: reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True) runs its backward "
    "with .backward(), which cannot be traced into a compiled backward. Pass use_reentrant=False (transformers: "
    "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})); the call runs through "
    "the fallback meanwhile.")


def refuse_reentrant_checkpoint_nodes(nodes: Sequence[Any]) -> None:
    """Raise a CaptureError if the traced outputs' autograd ``nodes`` (:func:`autograd_nodes`) hold a reentrant
    checkpoint.

    NOTE [Reentrant checkpoints the traced backward skips]
    The joint trace differentiates the outputs with ``torch.autograd.grad`` *with respect to the graph's inputs*;
    autograd then runs only the nodes on a path to them. A reentrant checkpoint's parameters are not inputs of its
    node (its backward recomputes the region and accumulates their ``.grad`` with ``.backward()``), so when no graph
    input flows into the region -- transformers' ``enable_input_require_grads()`` hook makes the frozen embeddings'
    output require grad, peft's LoRA recipe with gradient checkpointing -- the traced backward skipped the node:
    no error, and the compiled backward left the adapters' ``.grad`` None where eager trains them (a LoRA model
    trained nothing, silently). Any ``CheckpointFunctionBackward`` in the traced graph is refused, whether or not
    the backward would reach it. Without an input requiring grad a reentrant checkpoint adds no node, and eager
    leaves its parameters' gradients None too.
    """
    if any(type(node).__name__ == "CheckpointFunctionBackward" for node in nodes):
        raise CaptureError(_REENTRANT_MESSAGE)


def refuse_reentrant_checkpoint(exc: RuntimeError) -> None:
    """Raise a CaptureError for the error reentrant activation checkpointing raises in the traced backward.

    NOTE [Reentrant checkpoints in the joint trace]
    ``torch.utils.checkpoint(..., use_reentrant=True)`` recomputes its forward in its backward with
    ``.backward()``, which refuses to run under ``torch.autograd.grad`` (the joint trace's backward): with an
    input requiring grad, ``aot_module`` of such a model raised that RuntimeError where eager trains. It is a
    construct the capture cannot express, so the call falls back (NOTE [Capture fallback]); without an input
    requiring grad the checkpoint has no backward node and the capture goes on (and is refused later).
    """
    if CHECKPOINT_MUTATION_ERROR in str(exc):  # not reentrant: an in-place op in a non-reentrant region
        raise checkpoint_mutation_error(exc) from exc
    frames = traceback.extract_tb(exc.__traceback__)
    in_checkpoint = any(_is_checkpoint_file(frame.filename) for frame in frames)
    if _CHECKPOINT_INPUT_VERSION_ERROR in str(exc) and not in_checkpoint:
        raise saved_tensor_modified_error(exc) from exc  # NOTE [Saved tensors modified in place]
    if _CHECKPOINT_INPUT_VERSION_ERROR in str(exc):  # not reentrant: a region writes one of its inputs (a
        raise checkpoint_input_write_error(str(exc)) from exc  # BatchNorm's num_batches_tracked)
    from_checkpoint = bool(frames) and _is_checkpoint_file(frames[-1].filename)
    if from_checkpoint or "use_reentrant=True" in str(exc):
        raise CaptureError(_REENTRANT_MESSAGE) from exc


def _is_checkpoint_file(filename: str) -> bool:
    return filename.replace("\\", "/").endswith("torch/utils/checkpoint.py")


def saved_tensor_modified_error(exc: RuntimeError) -> CaptureError:
    """NOTE [Saved tensors modified in place]
    A tensor autograd saved for the backward, written in place afterwards (a custom autograd.Function that saves
    its output with ``ctx.save_for_backward(out)``, then ``out.add_(1)`` by the caller; ``y = x.exp();
    y.add_(1)``), makes eager's backward raise autograd's version-counter error: a user error, raised when
    ``backward()`` runs. The joint trace meets it while tracing the backward. It was taken for an
    activation-checkpointed region's write (that message, and the fallback through torch.compile), whose Dynamo
    graph then computed gradients silently. It is a refusal now that is not Dynamo-safe (the fallback runs the
    call eagerly, so eager's own error comes at ``backward()``); a checkpointed region's writes keep their own
    refusal (torch.utils.checkpoint's frames in the error's traceback)."""
    return CaptureError(f"aotcache: a tensor saved for the backward is modified in place after it was saved "
                        f"(e.g. the output of a custom autograd.Function that saves it with "
                        f"ctx.save_for_backward(out), then written with out.add_(...)); eager's backward raises "
                        f"for it too ({first_line(exc)}). The call runs eagerly, so backward() raises eager's "
                        f"error. Fix: write out of place (out = out + 1), or save a clone.",
                        reason="unsupported_construct", dynamo_safe=False)


def checkpoint_input_write_error(detail: str) -> CaptureError:
    """The CaptureError for a checkpointed region that writes in place into one of its inputs (NOTE [Buffers
    written in a checkpointed region]): eager's recomputation writes it a second time, which a compiled backward
    does not."""
    return CaptureError(
        f"aotcache: an activation-checkpointed region (torch.utils.checkpoint) writes in place into one of its "
        f"inputs (a BatchNorm's num_batches_tracked, a buffer updated in forward), which its recomputation "
        f"cannot replay in a compiled backward ({detail}); the graph runs eagerly, each region as eager's "
        f"torch.utils.checkpoint. Fix: move the BatchNorm (or the buffer update) out of the checkpointed "
        f"region.", reason="unsupported_construct")


def checkpoint_mutation_error(exc: RuntimeError) -> CaptureError:
    """The CaptureError for torch's refusal of an in-place op in a checkpointed region that its own implementation
    runs (NOTE [In-place ops in a checkpointed region]); raised by the joint trace's forward or, for the
    recomputation, its backward."""
    return CaptureError(f"aotcache: an activation-checkpointed region with its own context_fn (dispatch modes "
                        f"other than torch.utils.checkpoint.create_selective_checkpoint_contexts') of a "
                        f"torch.compile graph writes in place into a tensor it computed{call_site(exc)} (dropout "
                        f"does, drawing its mask in place), which aotcache cannot capture there: the graph runs "
                        f"eagerly, each region as eager's torch.utils.checkpoint (NOTE [Checkpointed regions run "
                        f"eagerly]). Fix: write that line out of place (x = x + y rather than x += y), move dropout "
                        f"out of the region, or use create_selective_checkpoint_contexts (or no context_fn): "
                        f"such regions are captured.", reason="unsupported_construct")


# NOTE [In-place ops in a checkpointed region]
# Dynamo hands a checkpointed region over as a tag_activation_checkpoint call; under a tracer, torch's checkpoint
# caches every op's output of the forward for the backward's recomputation and refuses a cached tensor whose version
# changed. aotcache's functionalization sits below that caching, so an in-place op on a value of the region (T5's
# relative-position buckets, `buckets += ...`; dropout's mask, drawn with bernoulli_ then scaled with div_) bumped
# the cached tensor's version and the trace raised this RuntimeError, failing the job where eager runs. Regions
# without a context_fn or with torch's selective-checkpoint contexts are traced in line now, functionalized before
# anything caches (NOTE [Checkpointed regions traced in line] in checkpoint_regions.py). A region with other
# contexts (its own dispatch modes) still goes through torch's implementation: there the error is a CaptureError,
# and the Dynamo graph runs eagerly (counted as a capture fallback).
CHECKPOINT_MUTATION_ERROR = "Tensor cached during selective activation checkpoint has been mutated"
_CHECKPOINT_INPUT_VERSION_ERROR = "has been modified by an inplace operation"


# NOTE [Checkpointed regions without the RNG state]
# ``torch.utils.checkpoint(..., preserve_rng_state=False)`` recomputes a region in the backward without putting
# the generators back: eager's recomputation draws new numbers there (the gradients follow the new draws, and the
# global generator moves in the backward). The partitioners save a region's random draws (NOTE [Activation
# checkpoint regions] in partition.py), so a compiled graph gave the forward's draws' gradients and left the
# generator where the forward did: other gradients and state than eager's. Such a graph is refused; its fallback
# runs each region as eager's checkpoint with the model's own setting (NOTE [Checkpointed regions run eagerly]).
_RANDOM_NAME = re.compile(r"(^|_)(rand\w*|dropout\w*|bernoulli_?|normal_?|multinomial|rrelu\w*|uniform_|"
                          r"exponential_|geometric_|cauchy_|fractional_max_pool\w*|native_dropout)$")


def refuse_unpreserved_random_regions(gm: torch.nn.Module) -> None:
    """Refuse a Dynamo graph with a checkpointed region that draws random numbers and does not preserve the RNG
    state (NOTE [Checkpointed regions without the RNG state])."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    if hop is None:
        return
    for module in gm.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op != "call_function" or node.target is not hop or node.kwargs.get("preserve_rng_state", True):
                continue
            body = getattr(module, node.args[0].target, None) if node.args and hasattr(node.args[0], "target") \
                else None
            if body is None or _draws_random(body):
                raise CaptureError("aotcache: an activation-checkpointed region with preserve_rng_state=False draws "
                                   "random numbers (dropout): eager's backward recomputes it with new draws, which "
                                   "a compiled backward does not repeat; the graph runs eagerly, each region as "
                                   "eager's torch.utils.checkpoint. Fix: leave preserve_rng_state at True (the "
                                   "compiled graph then saves the draws).", reason="unsupported_construct")


def _draws_random(body: torch.nn.Module) -> bool:
    for submodule in body.modules():
        graph = getattr(submodule, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            if node.op in ("call_function", "call_method"):
                name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
                if _RANDOM_NAME.search(str(name).split(".")[-1]):
                    return True
    return False
