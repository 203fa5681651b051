"""A user's ``torch.compile``-d callable called inside a capture runs its Python on the capture's thread, so the
capture traces its ops (NOTE [torch.compile-d callables inside a capture])."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["torch_compiled_callables_as_python"]


# NOTE [torch.compile-d callables inside a capture]
# A forward may call a torch.compile-d callable, even one compiled where it is called: transformers' flex_attention
# masks call torch.compile(create_block_mask)(...) inside the model's forward. torch's own tracers run such a
# callable's Python (Dynamo's wrapper returns fn(*args) when FX symbolic tracing or exporting), but a capture cannot
# be recognised so: it sets torch.compiler.is_compiling() (NOTE [is_compiling during capture]), which turns
# is_fx_symbolic_tracing() off, and is_exporting() is one flag for the whole process. So Dynamo compiled the callable
# on the capture's fake tensors (tensors from a closure, not arguments) and ran the compiled code on them:
# Inductor's kernels read the fake tensors' memory, and Llama with attn_implementation="flex_attention" under
# aotcache.compile ended the process with a segmentation fault in its first generate.
#
# Session 25 set Dynamo's stance "force_eager" during captures; the stance is one for the process, so it changed
# other threads' torch.compile, and it also held for torch's higher-order ops, which run their eager path by
# compiling their branches with Dynamo (torch.cond inside a capture failed). Now the choice is made per thread, at
# the one place Dynamo's wrapper (and its context manager) turn a callback into the one installed for the thread:
# eval_frame._callback_from_stance. aotcache wraps it once (at the first capture; Dynamo is imported by then): on a
# thread that is capturing a function's Python (not a Dynamo graph: callers_mode), it gives "no callback", so the
# callable runs its Python with Dynamo off and make_fx traces its ops into the capture's graph, as eager computes
# them; anywhere else, and while torch compiles a higher-order op's body (torch._higher_order_ops.utils'
# _in_hop_compile: cond, while_loop, flex_attention, invoke_subgraph), it answers what Dynamo would. A callback
# installed before the capture began is left as it was (only the one a call installs is chosen here), and code
# Dynamo compiled for the callable before the capture is not run on its fake tensors (no callback: no cache lookup).
# Cost outside captures: one thread-local read per torch.compile-d call, once a capture has run in the process.
# Dynamo's wrapper with fullgraph=True (torch 2.13) raises when a call compiled no frame under the default stance
# (any other stance excuses it); on the capturing thread one frame is counted instead (feature-detected).
# Where a torch lacks either name (feature-detected), captures go on as before.
# A thread the forward starts is not the capturing thread (checked in session 27): there Dynamo compiles the callable
# as usual. Handed the capture's tensors, it fails as plain Python on them fails in that thread (a FunctionalTensor
# outside its mode; with Inductor, Dynamo compiles a kernel for them and the kernel's data_ptr raises), so the capture
# falls back with eager's values (aotcache.compile: the Dynamo way); handed a real tensor (a global), it is compiled
# on it and the call is captured whole. Nothing of a capture reaches such a thread, so no kernel reads fake memory.


class _ThreadCaptures(threading.local):
    """How many captures this thread is inside (a class default: reading it costs no failed lookup)."""

    captures = 0


_this_thread = _ThreadCaptures()
_install_lock = threading.Lock()
_installed: list[Callable[..., Any]] = []


def _eval_frame_module() -> Any:
    """Dynamo's eval_frame module, imported (a capture imports Dynamo anyway), or None where it cannot be."""
    try:
        import torch._dynamo.eval_frame as eval_frame
    except Exception:  # a torch without Dynamo: nothing to wrap
        return None
    return eval_frame


def _hop_compile_probe() -> Callable[[], bool] | None:
    """torch's test of whether it is compiling a higher-order op's body on this thread, or None where absent."""
    try:
        import torch._higher_order_ops.utils as hop_utils
    except Exception:
        return None
    probe = getattr(hop_utils, "_in_hop_compile", None)
    return probe if callable(probe) else None


def _excuse_fullgraph_without_frames(eval_frame: Any) -> None:
    """Count one frame for an active ``fullgraph=True`` wrapper on this thread, as the force_eager stance excuses
    a call that compiled none (NOTE [torch.compile-d callables inside a capture])."""
    set_count = getattr(eval_frame, "set_fullgraph_compiled_frame_count", None)
    if set_count is None:
        return
    count = set_count(-1)  # reads and deactivates: an active counter keeps its value when set to 0 or more
    set_count(count + 1 if count >= 0 else count)


def _wrap(eval_frame: Any, decide: Callable[[Any], Any], in_hop_compile: Callable[[], bool]
          ) -> Callable[[Any], Any]:
    def callback_for_this_thread(callback: Any) -> Any:
        if _this_thread.captures and not in_hop_compile():
            if callback not in (None, False):
                _excuse_fullgraph_without_frames(eval_frame)
            return None
        return decide(callback)

    callback_for_this_thread.__wrapped__ = decide  # type: ignore[attr-defined]
    callback_for_this_thread.__name__ = getattr(decide, "__name__", "callback_for_this_thread")
    callback_for_this_thread.__doc__ = decide.__doc__
    return callback_for_this_thread


def _install() -> bool:
    """Wrap Dynamo's callback choice once per process; whether it is wrapped."""
    if _installed:
        return True
    with _install_lock:
        if _installed:
            return True
        eval_frame = _eval_frame_module()
        decide = getattr(eval_frame, "_callback_from_stance", None)
        in_hop_compile = _hop_compile_probe()
        if decide is None or not callable(decide) or in_hop_compile is None:
            return False  # without either, torch.compile inside a capture stays as it was
        wrapped = _wrap(eval_frame, decide, in_hop_compile)
        eval_frame._callback_from_stance = wrapped
        _installed.append(wrapped)
        return True


@contextlib.contextmanager
def torch_compiled_callables_as_python() -> Iterator[None]:
    """On this thread, run torch.compile-d callables as their Python while a capture traces (NOTE
    [torch.compile-d callables inside a capture])."""
    if not _install():
        yield
        return
    counted = False
    try:
        _this_thread.captures, counted = _this_thread.captures + 1, True
        yield
    finally:
        if counted:
            _this_thread.captures -= 1

