"""Reads of a tensor argument's autograd state that a graph cannot hold, refused while the capture's analysis runs the
function (``.grad``, ``._version``, ``.is_inference()``, and the leafness of an argument that requires grad).

NOTE [Autograd state read by the function]
A function that branches on an argument's (or a parameter's / buffer's) autograd state, ``if x.grad is None``,
``x._version``, ``x.is_inference()``, ``x.is_leaf`` / ``x.grad_fn is None``, read it from the capture's trace
tensor, not from the caller's: a trace tensor has no ``.grad``, its own version counter, is never an inference
tensor, and one that requires grad is a non-leaf with a ``grad_fn`` even where the caller's is a leaf. The graph
kept the branch the trace took at every later call, and none of these is in the call's signature, the call
fingerprint or the cache key: ``p.grad`` set by a backward, a buffer bumped by an in-place update or made in
``inference_mode`` gave the old branch's result (found in session 21; an ``is_leaf`` read was wrong from the
first call). Such a read is refused before it returns (the analysis pass's torch-function mode sees every
tensor getter). ``.grad``, ``._version`` and ``.is_inference()`` go to the fallback's Dynamo way, which guards
them; the leafness of an argument that requires grad runs eagerly (``dynamo_safe=False``: torch.compile reuses a
leaf's graph for a non-leaf too). The leafness of an argument that does not require grad is always a leaf's, in
the trace as in eager, and is not refused; neither are reads of tensors the function computes, nor torch's own
reads (``torch.utils.checkpoint`` checks its saved tensors' versions).

NOTE [Version counters in a Dynamo graph]
Dynamo records ``x._version`` as a ``prims._tensor_version`` call in its graph (and guards nothing on it: the graph
returns the value, the branch runs after a graph break). Captured, that op read the trace tensor's counter, and the
graph returned the same number at every call (torch's ``aot_eager`` does the same; ``backend="eager"`` runs it): a
buffer bumped in place took the old branch. A Dynamo graph with such a call is refused before the capture and runs
as Python, the op reading the real counter at every call.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Container, Iterable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from aotcache.aot.error_sites import site_of
from aotcache.aot.errors import CaptureError

__all__ = ["STATE_READERS", "input_storages", "refuse_autograd_state_read", "refuse_version_reads_in_graph"]

_OWN_DIRECTORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH_DIRECTORY = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _read_by_torch() -> bool:
    """Whether the read comes from torch's own code (the checks of ``torch.utils.checkpoint`` read saved tensors'
    versions): torch's machinery, not a branch of the program (NOTE [Autograd state read by the function])."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_DIRECTORY):
        frame = frame.f_back  # the capture's torch-function modes
    return frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIRECTORY)


# what each getter reads, for the message; the first group goes through Dynamo, the second runs eagerly
_GUARDED_BY_DYNAMO = {
    torch.Tensor.grad.__get__: ".grad",
    torch.Tensor._grad.__get__: "._grad",
    torch.Tensor._version.__get__: "._version",
    torch.Tensor.is_inference: ".is_inference()",
    torch.is_inference: "torch.is_inference()",
}
_LEAFNESS = {
    torch.Tensor.is_leaf.__get__: ".is_leaf",
    torch.Tensor.grad_fn.__get__: ".grad_fn",
    torch.Tensor._base.__get__: "._base",
    torch.Tensor.retains_grad.__get__: ".retains_grad",
}
#: every getter :func:`refuse_autograd_state_read` looks at (one set test per torch function call)
STATE_READERS = frozenset(_GUARDED_BY_DYNAMO) | frozenset(_LEAFNESS)


def refuse_autograd_state_read(func: Any, args: tuple, inputs: Iterable[int], storages: Container[Any] = ()) -> None:
    """Raise a :class:`CaptureError` when ``func`` (one of :data:`STATE_READERS`) reads the autograd state of a
    tensor standing for an argument (``inputs``: the ids of the analysis's probes; ``storages``: their storages, the
    aliases' too), or the ``.grad`` / version / inference-ness of a real tensor the program holds (NOTE [Autograd
    state read by the function])."""
    if not args or not isinstance(args[0], torch.Tensor) or _read_by_torch():
        return
    tensor = args[0]
    name = _GUARDED_BY_DYNAMO.get(func)
    if name is not None and (id(tensor) in inputs or _is_real(tensor) or _storage_of(tensor) in storages):
        site = site_of(traceback.extract_stack()[:-1])
        raise CaptureError(f"aotcache: the function reads {name} of a tensor argument, parameter or buffer"
                           f"{site}: a graph would keep what the trace read at every call (a capture's "
                           f"tensor has no .grad, a version counter of its own and is never an inference tensor); "
                           f"the call runs through the fallback, which checks it at every call.",
                           reason="unsupported_construct")
    if id(tensor) in inputs and name is None and tensor.requires_grad:
        site = site_of(traceback.extract_stack()[:-1])
        raise CaptureError(f"aotcache: the function reads {_LEAFNESS[func]} of a tensor argument or parameter that "
                           f"requires grad{site}: a capture's tensor is never the caller's leaf, so the graph "
                           f"would take the other branch; the call runs eagerly.",
                           reason="unsupported_construct", dynamo_safe=False)


def _is_real(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a real tensor the program holds, not one the trace made (fake or functional)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return not isinstance(tensor, (FakeTensor, FunctionalTensor)) and not torch._is_functional_tensor(tensor)


def _storage_of(tensor: torch.Tensor) -> Any:
    """The weak reference to ``tensor``'s storage (an alias has its base's), None where it has none."""
    try:
        return StorageWeakRef(tensor.untyped_storage())
    except (RuntimeError, NotImplementedError):  # a sparse or nested tensor: no storage to compare
        return None


def input_storages(inputs: Iterable[Any]) -> list[Any]:
    """The storages of the tensors among ``inputs``, for :func:`refuse_autograd_state_read`."""
    return [storage for storage in map(_storage_of, (t for t in inputs if isinstance(t, torch.Tensor)))
            if storage is not None]


def refuse_version_reads_in_graph(gm: torch.nn.Module) -> None:
    """Refuse a Dynamo graph that reads a version counter (NOTE [Version counters in a Dynamo graph]).

    :raises CaptureError: naming the first such call.
    """
    version = getattr(getattr(torch.ops.prims, "_tensor_version", None), "default", None)
    if version is None:
        return
    for module in gm.modules():  # nested regions' bodies too
        graph = getattr(module, "graph", None)
        for node in (graph.nodes if isinstance(graph, torch.fx.Graph) else ()):
            if node.op == "call_function" and node.target is version:
                raise CaptureError(f"aotcache: the torch.compile graph reads a tensor's version counter "
                                   f"({node.name}: x._version in the model), which a compiled graph would keep at "
                                   f"every call; the graph runs as Python.", reason="unsupported_construct")
