"""Double backward through a compiled function: an eager recompute of the call, differentiated in the backward.

NOTE [Double backward by recompute]
The compiled backward is a graph run without recording, so differentiating through it (a gradient penalty:
``torch.autograd.grad(out, x, create_graph=True)`` then a backward of the penalty; ``backward(create_graph=True)``
for Hessian-vector products) raised ``DoubleBackwardError`` where eager trains (WGAN-GP, R1 regularization).
Each training call now remembers its function and arguments (the references only, see :func:`eager_call`), and
a backward that runs with grad mode on runs the function again eagerly on them and returns
``torch.autograd.grad`` of that recompute with ``create_graph=True``: eager's gradients, differentiable as in
eager. Checks keep it honest: the recompute's gradients must equal the compiled backward's (a function drawing
random numbers, dropout, recomputes other values: then the error as before, naming the cause); inputs the call
updates in place outside autograd (running statistics) are put back after the recompute; a call whose input
mutations autograd records, or that ran under autocast, keeps the error. A plain backward is unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["DoubleBackwardError", "eager_call", "enter_eager_call", "leave_eager_call", "recompute_gradients"]


class DoubleBackwardError(RuntimeError):
    """Raised when differentiating through the compiled backward (create_graph=True / double backward) cannot be
    done by an eager recompute (NOTE [Double backward by recompute])."""


_CALL = threading.local()  # .value: (fn, args, kwargs) of the compiled call running in this thread, or None


def enter_eager_call(fn: Callable, args: Any, kwargs: Any) -> Any:
    """Mark ``fn(*args, **kwargs)`` as the call whose compiled runtime runs next in this thread; returns the
    previous mark for :func:`leave_eager_call` (calls nest: a compiled function run by another's fallback).

    ``kwargs`` may be a pytree spec instead, with ``args`` the flat arguments: the user's containers (a dict, a
    KV-cache object) are then not kept, since one that later holds an output of the call would make a reference
    cycle through the autograd graph that Python cannot collect (the hot path passes plain tensors only)."""
    previous = getattr(_CALL, "value", None)
    _CALL.value = (fn, args, kwargs)
    return previous


def leave_eager_call(previous: Any) -> None:
    _CALL.value = previous


def eager_call() -> tuple | None:
    """The marked call, for a training forward to keep (NOTE [Double backward by recompute]), or None."""
    return getattr(_CALL, "value", None)


def _error(why: str) -> DoubleBackwardError:
    return DoubleBackwardError(
        f"aotcache: differentiating through the compiled backward (create_graph=True, double backward, or "
        f"torch.autograd.grad of a gradient) needs an eager recompute of the call, which {why}. Call the original "
        f"function eagerly for higher-order gradients.")


def recompute_gradients(call: tuple, runtime: Any, graph_args: Sequence[Any], grad_outputs: Sequence[Any],
                        compiled_grads: Sequence[Any]) -> list:
    """The gradients of ``graph_args`` (None where not needed), differentiable: ``torch.autograd.grad`` with
    ``create_graph=True`` of an eager recompute of ``call``, checked against ``compiled_grads``.

    :raises DoubleBackwardError: the recompute does not apply or differs from the compiled backward.
    """
    fn, args, kwargs, autocast = call
    if isinstance(kwargs, pytree.TreeSpec):
        args, kwargs = pytree.tree_unflatten(list(args), kwargs)
    meta = runtime.metadata
    if autocast:
        raise _error("ran under autocast")
    if any(runtime._mutation_recordable):
        raise _error("updates an input in place in a way autograd records")
    mutated = [graph_args[index] for index in runtime._mutated]
    kept = [value.detach().clone() if isinstance(value, torch.Tensor) else None for value in mutated]
    try:
        with torch.enable_grad():
            outs = fn(*args, **kwargs)
    finally:
        with torch.no_grad():
            for value, before in zip(mutated, kept):
                if before is not None:
                    value.data.copy_(before)  # .data: no version bump (the recompute graph saved them)
    flat_outs = pytree.tree_leaves(outs)
    if len(flat_outs) != len(meta.outputs):
        raise _error("returns outputs of another structure")
    by_graph_index = {info.index: k for k, info in enumerate(meta.outputs) if info.kind == "graph"}
    first_user = runtime._num_mutation_outputs
    pairs = []
    for index in runtime._tangent_indices:
        grad = grad_outputs[index]
        if grad is None:
            continue
        k = by_graph_index.get(index - first_user)
        if k is None:
            raise _error("has a gradient for an updated input")
        out = flat_outs[k]
        if isinstance(out, torch.Tensor) and out.requires_grad:
            pairs.append((out, grad))
    wanted = [i for i, needed in enumerate(meta.grad_inputs)
              if needed and isinstance(graph_args[i], torch.Tensor) and graph_args[i].requires_grad]
    grads: list = [None] * len(graph_args)
    if pairs and wanted:
        computed = torch.autograd.grad([out for out, _ in pairs], [graph_args[i] for i in wanted],
                                       [grad for _, grad in pairs], create_graph=True, allow_unused=True)
        for i, grad in zip(wanted, computed):
            grads[i] = grad
    for i in wanted:
        if not _same(grads[i], compiled_grads[i]):
            raise _error("computes other gradients than the compiled backward (random ops such as dropout draw "
                         "other numbers when run again)")
    return grads


def _same(recomputed: Any, compiled: Any) -> bool:
    """Whether two gradients agree (None counts as zeros): a tolerance for compilers that reorder arithmetic."""
    if recomputed is None and compiled is None:
        return True
    reference = recomputed if recomputed is not None else compiled
    a = recomputed.detach() if recomputed is not None else torch.zeros_like(reference)
    b = compiled if compiled is not None else torch.zeros_like(reference)
    if a.shape != b.shape:
        return False
    tolerance = 1e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-4
    return bool(torch.allclose(a, b.to(a.dtype), rtol=tolerance, atol=tolerance * (1 + b.abs().max().item())))
