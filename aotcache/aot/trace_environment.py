"""Process state a capture sets aside or restores while it runs the user's function on fake tensors:
anomaly mode's NaN checks, the caller's saved-tensor hooks, parametrization caching, torch.fx's tracing flag,
the symbolic fake-tensor cache and the fake-tensor mode's failure logs, and torch's mode stacks after an
interrupted capture."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from aotcache.torch_modes import torch_modes_kept

__all__ = ["no_nan_checks", "callers_saved_tensor_hooks_off", "parametrization_cache_off", "fx_tracing_flag_off",
           "symbolic_fake_cache_off", "is_fake", "compiled_autograd_off", "torch_modes_kept",
           "quiet_fake_tensor_failures"]


# NOTE [Anomaly mode during a capture]
# Under ``torch.autograd.set_detect_anomaly(True)`` the engine checks every backward node's outputs for NaN
# (``isnan().any()``, read on the host); in the traced backward of fake tensors that read is data-dependent, so the
# capture failed. Found (bench/odd_inputs.py): aotcache.compile then took the Dynamo way for good and recorded it
# in the store, so one debugging run under anomaly mode sent later runs without it to Dynamo; aot_module fell
# back for the signature. The traced backward runs with the NaN checks off (anomaly mode itself stays on, as torch's
# AOT Autograd does for its joint trace); the compiled backward is one node, whose outputs the engine still checks
# for NaN at run time under anomaly mode, as it checks eager's nodes.
@contextlib.contextmanager
def no_nan_checks() -> Iterator[None]:
    if not torch.is_anomaly_enabled() or not torch.is_anomaly_check_nan_enabled():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Anomaly Detection has been enabled")
        with torch.autograd.set_detect_anomaly(True, check_nan=False):
            yield


# NOTE [Saved-tensor hooks during a capture]
# A capture runs the function on fake tensors, under whatever saved-tensor hooks the caller has pushed
# (``torch.autograd.graph.saved_tensors_hooks``, ``save_on_cpu``, and non-reentrant activation checkpointing,
# which counts the tensors packed in the forward and in its recomputation during backward). The traced ops
# packed their fake tensors through those hooks. Found (bench/odd_inputs.py): ``checkpoint(compiled, x,
# use_reentrant=False)`` failed at backward on the first call ("A different number of tensors was saved during
# the original forward and recomputation": 15 against 9) in all three entry points, where eager runs: the
# forward's count included the capture's packs, the recomputation (a graph hit) had the compiled graph's own.
# The caller's hooks are popped for the capture and pushed back after it (the compiled graph's saved tensors go
# through them as eager's do). Not torch's tracing flag for the hooks, as Dynamo sets it: that also ignores hooks
# pushed inside the function, so a forward with non-reentrant checkpointing in it (transformers'
# gradient_checkpointing_enable) was captured without its recomputation, silently losing the memory saving it
# exists for, instead of being refused (test_activation_checkpointing_is_refused_with_a_message_that_names_it).
@contextlib.contextmanager
def callers_saved_tensor_hooks_off() -> Iterator[None]:
    autograd = torch._C._autograd
    top, pop, push = (getattr(autograd, name, None) for name in (
        "_top_saved_tensors_default_hooks", "_pop_saved_tensors_default_hooks", "_push_saved_tensors_default_hooks"))
    if top is None or pop is None or push is None:
        yield
        return
    stack = []
    while (hooks := top(True)) is not None:
        stack.append(hooks)
        pop()
    try:
        yield
    finally:
        while top(True) is not None:  # left by a function that raised inside its own hooks context
            pop()
        for pack, unpack in reversed(stack):
            push(pack, unpack)


# NOTE [is_fx_tracing during a capture]
# make_fx records the capture through an fx ``Tracer``, whose ``trace`` sets torch.fx's process-wide
# ``_is_fx_tracing_flag`` while the user's function runs, so ``torch.fx._symbolic_trace.is_fx_tracing()`` answered
# True inside a capture, where eager answers False (found with PyTorch's test_functions.py ``test_is_fx_tracing``:
# ``aotcache.compile`` and ``aot_function`` of ``if is_fx_tracing(): return x - 1`` took that branch, a wrong value;
# ``torch.compile`` answers False, Dynamo folds the call to eager's constant). The analysis pass runs under no fx
# tracer and saw False, so the two passes disagreed too; library code asks it (``nested_tensor_from_jagged`` raises
# under it). The flag is set aside while the traced function runs (forward and backward, custom backwards included),
# as torch's own higher-order-op compiles do (``_set_compilation_env``), and put back before make_fx's tracer ends.
# ``is_fx_symbolic_tracing()`` already answered False (it also asks ``is_compiling()``, True in a capture).
@contextlib.contextmanager
def fx_tracing_flag_off() -> Iterator[None]:
    from torch.fx import _symbolic_trace

    if not hasattr(_symbolic_trace, "_is_fx_tracing_flag"):  # a torch keeping it elsewhere: nothing to set aside
        yield
        return
    before = _symbolic_trace._is_fx_tracing_flag
    _symbolic_trace._is_fx_tracing_flag = False
    try:
        yield
    finally:
        _symbolic_trace._is_fx_tracing_flag = before


def compiled_autograd_off() -> contextlib.AbstractContextManager:
    """NOTE [Compiled autograd during a capture]
    Under compiled autograd (``compiled_autograd._enable(...)``, ``torch._dynamo.config.compiled_autograd``) every
    run of the autograd engine in this thread goes to compiled autograd, the capture's own ``torch.autograd.grad``
    of the joint trace included: each forward compiled by ``backend="aotcache"`` made compiled autograd trace the
    capture's fake backward as one more backward graph, handed to its compiler inside the capture. The capture
    traces the backward ATen op by ATen op, so compiled autograd is off while it runs, as in torch's AOT Autograd;
    the captured backward runs under the caller's compiled autograd at ``backward()`` time. torch keeps compiled
    autograd's compiler for the whole process, not per thread: switching it off (and back on after) while another
    thread enters or leaves ``_enable`` could undo that thread's change, so a capture touches it only where compiled
    autograd is on when the capture begins."""
    from torch._dynamo import compiled_autograd

    return compiled_autograd._disable() if compiled_autograd.compiled_autograd_enabled else contextlib.nullcontext()


@contextlib.contextmanager
def parametrization_cache_off() -> Iterator[None]:
    """NOTE [parametrize.cached() during a capture]
    Inside ``torch.nn.utils.parametrize.cached()`` a parametrized tensor is computed once and kept in that
    module's process-wide ``_cache`` dict until the context exits. A capture inside it (an evaluation under
    ``cached()``, as its docs suggest) stored the weight computed from the analysis pass's fake tensors there;
    the trace pass then read it back as a constant, and the compiled graph returned fake tensors (or, after the
    context, the eager model read them). The capture runs with the caching off, so each pass computes the
    parametrization from its own inputs; the context's value is put back afterwards and the cache is untouched
    (``cached()`` only saves work: the values are the same)."""
    parametrize = sys.modules.get("torch.nn.utils.parametrize")
    enabled = getattr(parametrize, "_cache_enabled", 0) if parametrize is not None else 0
    if not enabled:
        yield
        return
    parametrize._cache_enabled = 0
    try:
        yield
    finally:
        parametrize._cache_enabled = enabled


# NOTE [Symbolic fake-tensor cache]
# FakeTensorMode caches op outputs by argument metadata. With symbolic sizes the cache lives on the ShapeEnv,
# which is new for every capture, so it starts empty: about half the ops of a 2-layer BERT training trace are
# misses, and a miss costs the op's fake kernel plus a second fake output synthesized from the new entry to
# check it (each new fake tensor redoes the symbolic contiguity arithmetic), a hit a synthesized output. The
# symbolic trace therefore runs with the cache off (torch's ``disable_fake_tensor_cache``): every op runs its
# fake kernel once. First dynamic training captures went from 4.0x to 3.2x (BERT) and 4.7x to 3.6x (GPT-2) a
# static one, inference from 3.3x to 2.9x and 3.7x to 3.4x (bench/dynamic.py's models, side by side, CPU time).
# Static captures keep the cache, which is process-wide for them, and so does a caller's ShapeEnv (Dynamo's,
# which holds the ops Dynamo traced).
def symbolic_fake_cache_off(fake_mode: Any, callers_mode: bool) -> contextlib.AbstractContextManager:
    """NOTE [Symbolic fake-tensor cache]: the fake-tensor cache off while ``fake_mode``, made by this capture,
    traces with symbols (a caller's mode keeps it: its ShapeEnv's cache holds the ops the caller traced)."""
    if fake_mode.shape_env is None or callers_mode:
        return contextlib.nullcontext()
    try:
        from torch._subclasses.fake_tensor import disable_fake_tensor_cache
    except ImportError:  # a torch without it (private API): the cache stays on, as before
        return contextlib.nullcontext()
    return disable_fake_tensor_cache(fake_mode)


def is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


class _DropFakeMetaFailures(logging.Filter):
    """Drops the fake-tensor mode's own log of an op that failed (the same error is raised to the caller)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed while attempting to run meta")


_FAKE_TENSOR_LOGGER = logging.getLogger("torch._subclasses.fake_tensor")
_DROP_FAKE_META_FAILURES = _DropFakeMetaFailures()
_quiet_lock = threading.Lock()
_quiet_depth = 0


@contextlib.contextmanager
def quiet_fake_tensor_failures() -> Iterator[None]:
    """NOTE [fake-tensor failure logs]: when an op fails on fake tensors during capture (a wrong input shape,
    say), torch's fake-tensor mode logs the whole traceback at ERROR (~20 lines) before raising it; the error
    itself still reaches the caller, so those lines only bury it. They are filtered out while capturing."""
    global _quiet_depth
    counted = False
    try:  # the count is raised inside the try, with the local saying so (NOTE [Interrupted captures])
        with _quiet_lock:
            _quiet_depth, counted = _quiet_depth + 1, True
            _FAKE_TENSOR_LOGGER.addFilter(_DROP_FAKE_META_FAILURES)  # once: a filter already there is not added
        yield
    finally:
        if counted:
            with _quiet_lock:
                _quiet_depth -= 1
                if not _quiet_depth:  # the last capture of any thread (captures nest, e.g. a recapture)
                    _FAKE_TENSOR_LOGGER.removeFilter(_DROP_FAKE_META_FAILURES)
