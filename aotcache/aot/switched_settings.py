"""The thread's autograd, autocast and torch.func settings a function can leave changed: read before a capture
runs the function, put back after it, and compared, so that a function leaving one switched is refused
(NOTE [Settings left switched by the function])."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.autograd import forward_ad

from aotcache.aot.errors import CaptureError

__all__ = ["ThreadSettings", "settings_kept", "thread_settings", "restore_thread_settings", "refuse_switched_settings",
           "refuse_active_transform"]

_AUTOCAST_DEVICES = ("cpu", "cuda")


class ThreadSettings(NamedTuple):
    """What :func:`thread_settings` reads; fields compare by value."""

    autocast: tuple  # per device type: (enabled, dtype), or None where this build does not know the device
    autocast_cache: bool
    autocast_nesting: int
    functorch_depth: int
    inplace_requires_grad_allowed: bool
    forward_grad: bool
    dual_level: int  # forward-mode AD's level entered, or -1 (torch nests none: at most level 0)


def _autocast_nesting() -> int:
    # torch exposes the nesting count only through its counter: one step up and back down reads it.
    nesting = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return nesting


@contextlib.contextmanager
def settings_kept() -> Iterator[None]:
    """The thread's settings as they were on entry, put back on exit, whether the body raised or not (NOTE
    [Settings left switched by the function]).

    NOTE [torch.func levels of a failed capture]
    A Dynamo graph of ``torch.func.grad`` / ``vmap`` inside a forward holds the transform's entry and exit as
    separate calls (``_grad_increment_nesting`` ... ``_grad_decrement_nesting``), not a ``with`` block. A capture
    that stopped between them (a refusal) left torch.func's level pushed: Dynamo's guards on the functorch state
    then failed on the frame just compiled ("Guard failed on the same frame it was created", an AssertionError
    where eager runs). The levels are popped back to the depth the capture started at, here with the rest."""
    saved = thread_settings()
    try:
        yield
    finally:
        restore_thread_settings(saved)


def _dual_level() -> int:
    # torch has no getter for forward-mode AD's current level, and nests none: entering one raises while one is
    # entered. One entry and exit reads it.
    try:
        level = torch._C._enter_dual_level()
    except RuntimeError:
        return max(forward_ad._current_level, 0)
    torch._C._exit_dual_level(level=level)
    return -1


def thread_settings() -> ThreadSettings:
    """The calling thread's settings that a function can switch without a ``with`` block (grad mode aside:
    NOTE [Grad mode left switched by the function] has its own message)."""
    autocast = []
    for device_type in _AUTOCAST_DEVICES:
        try:
            autocast.append((torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)))
        except (RuntimeError, TypeError, AttributeError):  # device type unknown to this build
            autocast.append(None)
    functorch = torch._C._functorch
    return ThreadSettings(tuple(autocast), torch.is_autocast_cache_enabled(), _autocast_nesting(),
                        functorch.get_dynamic_layer_stack_depth(), functorch.get_inplace_requires_grad_allowed(),
                        torch._C._is_fwd_grad_enabled(), _dual_level())


def restore_thread_settings(saved: ThreadSettings) -> None:
    """Put ``saved`` back where the function changed it. torch.func levels the function pushed are popped;
    levels it popped cannot be pushed back (NOTE [Settings left switched by the function])."""
    now = thread_settings()
    if now == saved:
        return
    for device_type, was, is_now in zip(_AUTOCAST_DEVICES, saved.autocast, now.autocast):
        if was is not None and was != is_now:
            torch.set_autocast_enabled(device_type, was[0])
            torch.set_autocast_dtype(device_type, was[1])
    if now.autocast_cache != saved.autocast_cache:
        torch.set_autocast_cache_enabled(saved.autocast_cache)
    for _ in range(now.autocast_nesting, saved.autocast_nesting):
        torch.autocast_increment_nesting()
    for _ in range(saved.autocast_nesting, now.autocast_nesting):
        torch.autocast_decrement_nesting()
    functorch = torch._C._functorch
    if now.functorch_depth > saved.functorch_depth:  # NOTE [torch.func levels of a failed capture]
        try:
            functorch.pop_dynamic_layer_stack_and_undo_to_depth(saved.functorch_depth)
        except RuntimeError:  # torch 2.11 pops every level, then asserts on reaching an empty stack
            if functorch.get_dynamic_layer_stack_depth() != saved.functorch_depth:
                raise
    if functorch.get_inplace_requires_grad_allowed() != saved.inplace_requires_grad_allowed:
        functorch.set_inplace_requires_grad_allowed(saved.inplace_requires_grad_allowed)
    if now.dual_level > saved.dual_level:
        torch._C._exit_dual_level(level=now.dual_level)
        forward_ad._current_level = saved.dual_level
    if torch._C._is_fwd_grad_enabled() != saved.forward_grad:
        torch._C._set_fwd_grad_enabled(saved.forward_grad)


_NAMES = {"autocast": "autocast (enabled / dtype)", "autocast_cache": "autocast's weight cache",
          "autocast_nesting": "autocast's nesting count", "functorch_depth": "torch.func's transform levels",
          "inplace_requires_grad_allowed": "torch.func's in-place requires_grad flag",
          "forward_grad": "forward-mode AD", "dual_level": "forward-mode AD's dual level"}


def refuse_switched_settings(before: ThreadSettings, after: ThreadSettings) -> None:
    """NOTE [Settings left switched by the function]
    A Dynamo graph cut by a graph break inside ``torch.autocast`` entered by hand
    (``torch.amp.autocast_mode._enter_autocast``), inside ``torch.func`` internals (``_grad_increment_nesting``,
    ``_jvp_increment_nesting``, ``set_inplace_requires_grad_allowed``) or between ``torch.set_autocast_enabled``
    calls ends with the setting still switched: Dynamo keeps those calls in its graph and eager runs them, so the
    code after the graph (the next graph, or Python) runs under the new setting. A capture runs them at trace time
    only and records no op, so the compiled function left the caller's settings as they were. Worse, the capture
    itself left them switched: the analysis and the trace each ran the calls (two torch.func levels pushed), so
    Dynamo's guard on the functorch state failed on the frame just compiled ("Guard failed on the same frame it
    was created"); and a refused capture of ``torch.func.hessian`` left forward-mode AD's dual level entered, so
    every later ``jvp`` / ``jacfwd`` of the process raised "Nested forward mode AD is not supported" (PyTorch's
    test_ctx_manager.py). Each capture now puts these settings back when it ends, refused or not
    (:func:`settings_kept`), and the analysis refuses a function that leaves one changed: the graph runs as Python,
    with eager's settings after it, as for grad mode (NOTE [Grad mode left switched by the function]). A torch.func
    level the function pops cannot be pushed back; captures under one are refused before anything runs (NOTE
    [Captures inside a torch.func level]).
    """
    changed = [_NAMES[field] for field in ThreadSettings._fields if getattr(before, field) != getattr(after, field)]
    if changed:
        raise CaptureError(
            f"aotcache: the function leaves {', '.join(changed)} switched (a setting changed outside a with block, "
            f"e.g. an autocast or torch.func level entered before a graph break and left after it); a compiled "
            f"graph cannot replay that change of the caller's state, so this call runs as written. Enter and leave "
            f"the setting inside the function (a with block), or around the call.", reason="unsupported_construct")


def refuse_active_transform() -> None:
    """NOTE [Captures inside a torch.func level]
    A Dynamo graph can start while a torch.func level is pushed and its arguments are still plain tensors: the
    code after a graph break that followed ``_grad_increment_nesting`` (PyTorch's test_ctx_manager.py,
    test_functorch_low_level). A capture there ran the graph's ops under the transform (its trace tensors wrapped
    by the level: "Cannot access data pointer of Tensor that doesn't have storage") and the graph's own
    ``_grad_decrement_nesting`` popped the caller's level, which cannot be pushed back, so Dynamo's guard on the
    functorch state failed on the frame just compiled. Such a call is refused before anything runs: the graph runs
    as Python under the caller's level, as eager does; ``first_call_only``, as for arguments of a transform (NOTE
    [Transforms are the call's, not the function's])."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise CaptureError("aotcache: the call runs inside a torch.func transform level (vmap, grad, jvp or their "
                           "low-level nesting calls), which a compiled graph cannot run under. Apply the transform "
                           "inside the compiled function instead.", reason="unsupported_construct",
                           first_call_only=True)
