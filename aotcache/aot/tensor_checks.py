"""``torch._check_tensor_all`` inside a capture: a runtime check in the graph instead of a data-dependent read.

NOTE [Tensor checks in a capture]
``torch._check_tensor_all(cond)`` reads ``cond.all()`` on the host (``.item()``) and raises when it is False.
Libraries call it where they see tracing, as the trace-friendly form of ``if not cond: raise``: transformers'
``torch_compilable_check`` (131 model files of 5.25.0 call it; the placeholder-count check of its multimodal
models, Gemma3, Llava, Qwen2-VL and others, has a tensor condition) calls it whenever
``torch.compiler.is_compiling()``, which a capture sets (NOTE [is_compiling during capture]). On fake tensors
that read has no value, so the capture failed: such a model took the Dynamo way, and with ``fullgraph=True``
raised where ``torch.compile`` (whose Dynamo puts the check in its graph as a runtime assertion) runs. In a
capture, the check is traced as ``torch._assert_async(cond.all(), message)``: the compiled graph checks the real
values at every call and raises a RuntimeError when the condition is False, as torch.compile's graph does (eager
raises the error type the call names, with the code's own message, which may format tensor values and so cannot
be traced). Nothing uses the assertion's result, so the partitioners keep it
in the training forward as a side effect (NOTE [Random draws nothing uses] in partition.py).

``torch._check_tensor_all`` calls ``torch._check_tensor_all_with``, which is what is replaced, only while some
thread captures (counted, as the is_compiling flag is); the replacement checks as torch does in every thread that
is not capturing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from aotcache.aot.capture_threads import capturing_in_this_thread

__all__ = ["tensor_checks_in_graph"]

_lock = threading.Lock()
_captures = 0
_original: Callable[..., None] | None = None


def _check_tensor_all_with(error_type: Any, cond: Any, message: Any = None) -> None:
    """``torch._check_tensor_all_with`` while captures run: a graph assertion in a capturing thread."""
    original = _original if _original is not None else torch._check_tensor_all_with
    if not capturing_in_this_thread() or not isinstance(cond, torch.Tensor) or cond.dtype != torch.bool:
        return original(error_type, cond, message)  # torch's own check (and its TypeErrors for a bad cond)
    name = getattr(error_type, "__name__", str(error_type))
    torch._assert_async(cond.all(), f"torch._check_tensor_all: a condition of the compiled code was False (eager "
                                    f"raises {name} here, with the code's message)")
    return None


@contextlib.contextmanager
def tensor_checks_in_graph() -> Iterator[None]:
    """Trace ``torch._check_tensor_all`` in this thread's capture as a graph assertion (NOTE [Tensor checks in a
    capture]); torch's function is put back when the last capture ends."""
    global _captures, _original
    with _lock:
        if not _captures:
            _original = torch._check_tensor_all_with
            torch._check_tensor_all_with = _check_tensor_all_with
        _captures += 1
    try:
        yield
    finally:
        with _lock:
            _captures -= 1
            if not _captures:
                if torch._check_tensor_all_with is _check_tensor_all_with:  # not replaced again meanwhile
                    torch._check_tensor_all_with = _original
                _original = None
