"""TorchScript (torchbind) objects in a capture: refused as inputs, their methods refused while tracing.

NOTE [TorchScript objects as inputs]
A torchbind object (``torch.ScriptObject``: a C++ class registered with TorchScript, e.g. a tensor queue) reaches a
capture as a graph input when Dynamo lifts one (an argument, a global or a module attribute whose methods the code
calls: ``call_torchbind`` nodes). The capture passed it on as it is, so its trace ran the object's methods on the
real object with fake tensors: a ``push`` left a fake tensor in the caller's queue and a ``pop`` took a real one
out during the trace, and a later compiled call popped that fake tensor and returned it (found with PyTorch's
test/export/test_torchbind.py, session 24: eager and ``aot_eager`` return real tensors). torch's own AOT Autograd
traces a fake copy of such an object (its registered fake class). aotcache refuses them instead (a CaptureError
before anything is traced: the backend runs the Dynamo graph as Python, ``aot_function`` falls back), so no trace
touches the object.
A program that reads such an object itself (a global queue, ``aotcache.compile``'s whole-call capture, where no Dynamo
lifts it) called its methods the same way; while a capture traces, a method call on a torchbind object from the
tracing thread raises a CaptureError instead (:func:`refusing_script_object_calls`; other threads' calls run as
they are).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from aotcache.aot.errors import CaptureError

__all__ = ["refuse_script_object_inputs", "refusing_script_object_calls"]

_tracing = threading.local()


def refuse_script_object_inputs(flat_args: Sequence[Any]) -> None:
    """Refuse TorchScript (torchbind) objects among a capture's inputs (NOTE [TorchScript objects as inputs]).

    :raises CaptureError: naming the argument position and the object's class.
    """
    from torch._library.fake_class_registry import FakeScriptObject

    for position, arg in enumerate(flat_args):
        if isinstance(arg, (torch.ScriptObject, FakeScriptObject)):
            qualified = arg._type().qualified_name() if isinstance(arg, torch.ScriptObject) else arg.script_class_name
            raise CaptureError(f"aotcache: flat argument {position} is a TorchScript object ({qualified}); a capture "
                               f"would run its methods on the object itself while tracing, so it is not captured",
                               reason="unsupported_construct")


# NOTE [One refusing ScriptMethod call for every capture]: captures run in several threads at once and nest (a
# capture inside a compiled call's capture), so the class attribute is replaced once, when the first capture of
# the process starts, and put back when the last one ends (and only if it is still ours); each thread counts its own
# depth, so one thread's capture never refuses another thread's calls, nor leaves the replacement behind.
_install_lock = threading.Lock()
_captures_running = 0
_installed: tuple[Any, Any] | None = None  # (the replacement, what it replaced)


def _script_object_call_refusal(previous: Any) -> Any:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(self, "raw_owner", None)
        if getattr(_tracing, "depth", 0) and isinstance(owner, torch.ScriptObject):
            raise CaptureError(f"aotcache: the function calls {self.name}() of a TorchScript object "
                               f"({owner._type().qualified_name()}); a capture would run it on the object itself "
                               f"while tracing, so it is not captured", reason="unsupported_construct")
        return previous(self, *args, **kwargs)

    return call


@contextlib.contextmanager
def refusing_script_object_calls() -> Iterator[None]:
    """While a capture traces in this thread, a torchbind method call raises a CaptureError (NOTE [TorchScript
    objects as inputs]); ``torch.ScriptMethod.__call__`` is put back when no capture runs."""
    global _captures_running, _installed
    with _install_lock:
        if _captures_running == 0:
            previous = torch.ScriptMethod.__call__
            replacement = _script_object_call_refusal(previous)
            torch.ScriptMethod.__call__ = replacement  # type: ignore[method-assign]
            _installed = (replacement, previous)
        _captures_running += 1
    _tracing.depth = getattr(_tracing, "depth", 0) + 1
    try:
        yield
    finally:
        _tracing.depth -= 1
        with _install_lock:
            _captures_running -= 1
            if _captures_running == 0 and _installed is not None:
                replacement, previous = _installed
                if torch.ScriptMethod.__call__ is replacement:  # someone else's later patch is left alone
                    torch.ScriptMethod.__call__ = previous  # type: ignore[method-assign]
                _installed = None
