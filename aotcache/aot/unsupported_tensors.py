"""Tensors a compiled graph cannot take or make, and the ``CaptureError``s that name them and the fix: non-strided
layouts (sparse, mkldnn, quantized), nested tensors (NOTE [Nested tensors in a capture]), tensor subclasses that wrap
other tensors, tensors of a torch.func transform; and the refusal of a call made under a torch dispatch mode.

Raised where the arguments are read (signature.py, fake_inputs.py), by the capture's function mode
(unsupported_ops.py) and by the fallback (a nested tensor built inside the function).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable
from typing import Any

import torch

from aotcache.aot.errors import CaptureError

__all__ = ["unsupported_layout_error", "nested_tensor_error", "raised_in_nested_tensor_code", "NESTED_CONSTRUCTORS",
           "in_nested_tensor_code", "tensor_subclass_error", "functorch_transform_error", "dispatch_mode_error"]


def unsupported_layout_error(what: str, layout: Any) -> CaptureError:
    """The error for a tensor with a non-strided layout (sparse, mkldnn): fake tensors and functionalization
    have no support for them, and a graph traced without it would silently drop their gradients."""
    return CaptureError(f"aotcache: {what} is a tensor with layout {layout}; only strided (dense) tensors are "
                        f"supported in a compiled function. Convert it to a dense tensor outside the compiled "
                        f"function (.to_dense(), .dequantize(), .to_padded_tensor(0)), or move the computation on "
                        f"it out of the function.", reason="unsupported_layout")


def nested_tensor_error(what: str) -> CaptureError:
    """NOTE [Nested tensors in a capture]
    A nested tensor (``torch.nested``; the jagged layout, NJT, is a tensor subclass whose ragged size is a nested
    int tied to its offsets) has no place in aotcache's graphs: the capture has no subclass desugaring, a static
    capture has no ShapeEnv to make the ragged size a symbol, and the cache key has nothing that stands for a
    ragged structure. Such a call is refused (``unsupported_layout``) and runs as eager does (the fallback: eagerly,
    or torch.compile's Dynamo with the graph run as Python); nothing of it is stored, so no ragged structure can
    reuse another's graph. This covers a nested argument and a nested tensor built inside the function: the
    latter failed with torch's "self.shape_env must not be None" (static) or was refused as a storage read or a
    non-strided result (symbolic), messages that named no nested tensor (session 16).
    """
    return CaptureError(f"aotcache: {what} is a nested tensor (torch.nested), which aotcache does not capture: a "
                        f"jagged tensor's ragged size has no place in a compiled graph or its cache key. The call "
                        f"runs as eager does. To compile the dense part, compute on nt.values() in the compiled "
                        f"function and rebuild outside it (torch.nested.nested_tensor_from_jagged(out, "
                        f"nt.offsets())).", reason="unsupported_layout")


def raised_in_nested_tensor_code(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside torch's nested-tensor package (a constructor run on the capture's fake
    tensors: "self.shape_env must not be None", a strided nested tensor's unsupported fake op), NOTE [Nested
    tensors in a capture]."""
    return in_nested_tensor_code(traceback.extract_tb(exc.__traceback__))


def in_nested_tensor_code(frames: Iterable[traceback.FrameSummary]) -> bool:
    """Whether one of ``frames`` (a traceback's or a stack's) runs in torch's nested-tensor package."""
    return any(frame.filename.startswith(_NESTED_SOURCE) for frame in frames)


# torch functions that build a nested tensor (NOTE [Nested tensors in a capture]); refused before they run
NESTED_CONSTRUCTORS = frozenset(getattr(torch, name) for name in (
    "_nested_view_from_jagged", "_nested_view_from_buffer", "_nested_tensor_from_tensor_list",
    "_nested_from_padded", "_nested_from_padded_and_nested_example", "_nested_tensor_from_mask")
    if hasattr(torch, name))


def tensor_subclass_error(what: str, kind: type) -> CaptureError:
    """NOTE [Tensor subclass arguments]: the error for a tensor subclass that wraps other tensors
    (``__tensor_flatten__``: DTensor, TwoTensor, float8 tensors). Capture has no subclass desugaring: the graph
    would be traced on a plain fake counterpart and return plain gradients where eager returns the subclass. With
    the default fallback such a call runs eagerly."""
    return CaptureError(f"aotcache: {what} is a {kind.__name__}, a tensor subclass that wraps other tensors; a "
                        f"compiled graph takes plain tensors only and would return plain gradients for it. Pass its "
                        f"inner tensors instead, or call the function eagerly.", reason="unsupported_layout")


def functorch_transform_error(what: str) -> CaptureError:
    """The error for a tensor wrapped by a torch.func transform: a compiled function called under ``vmap``,
    ``grad``, ``jacrev`` or ``jvp`` (the transforms wrap its arguments; a compiled graph runs on plain tensors, and
    the transform cannot see through its autograd.Function). The call runs eagerly, as the fallback does.

    NOTE [Transforms are the call's, not the function's]
    Found (bench/odd_inputs.py): one call of an ``aotcache.compile`` function under ``torch.func.vmap`` (or jvp,
    grad) sent it to the Dynamo way for good, recorded in the store, so every later plain call, in this process
    and the next, ran through Dynamo instead of the captured graph. A transform is the context of one call:
    ``first_call_only`` runs that call eagerly and decides nothing (the refusal comes from the signature, before
    any trace, so a later call under a transform costs no capture attempt)."""
    return CaptureError(f"aotcache: {what} is a tensor of a torch.func transform (the compiled function is called "
                        f"under vmap, grad, jacrev or jvp), which a compiled graph cannot take. Apply the transform "
                        f"inside the compiled function instead.", reason="unsupported_construct",
                        first_call_only=True)  # NOTE [Transforms are the call's, not the function's]


def dispatch_mode_error(modes: tuple) -> CaptureError:
    """NOTE [Active torch modes] (ambient.py): a torch dispatch mode the compiled function is called under
    (``FlopCounterMode``, a debugging or op-rewriting mode) sees every ATen op eager runs, which a compiled graph
    does not replay as eager does (its kernels bypass the mode, or a graph traced under the mode runs through it a
    second time). The call runs eagerly, as torch.compile does under a dispatch mode; the next call without one is
    compiled again (``first_call_only``: nothing is decided for later calls)."""
    names = ", ".join(sorted({type(getattr(mode, "mode", mode)).__name__ for mode in modes}))
    return CaptureError(f"aotcache: the call runs under a torch dispatch mode ({names}), which a compiled graph "
                        f"cannot replay as eager does; it runs eagerly, as torch.compile does.",
                        reason="unsupported_construct", first_call_only=True)


_NESTED_SOURCE = os.path.join(os.path.dirname(torch.nested.__file__), "")  # torch's nested-tensor package
