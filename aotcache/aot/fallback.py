"""Never fail where eager runs: what ``aot_function`` / ``aot_module`` do with a call they cannot capture whole.

NOTE [Capture fallback]
A :class:`~aotcache.aot.errors.CaptureError` names a construct that a fake-tensor trace cannot express (a
data-dependent op, a sparse tensor, ...), not a bug of the user's program: eager runs it. So, unless the
caller asked for the error (``on_capture_error="raise"`` or ``AOTCACHE_STRICT=1``), the signature that failed
gets a fallback runtime, remembered under that signature like a compiled one (later calls do not trace again):

1. *Partial compilation* (:class:`PartialRuntime`): the function runs through ``torch.compile`` with a backend
   that compiles each region with aotcache's own pipeline and options (``aot_module_simplified``). Dynamo
   breaks the graph at the data-dependent op (``.item()`` / ``bool(tensor)`` in a condition, ``nonzero``,
   ``masked_select``, boolean indexing), which then runs eagerly between two compiled regions. A region
   that aotcache cannot capture either runs eagerly (its Dynamo graph as Python).
2. *Eager* (:class:`EagerRuntime`): with ``on_capture_error="eager"``, or where Dynamo is unavailable or
   fails, the function runs as written.

A signature refused because mutated inputs share memory (reason ``aliased_mutation``) is first compiled
over synthetic bases (NOTE [Synthetic bases] in ``synthetic_base.py``): that is support, not a fallback, so
it happens in every mode and is not counted.

An error that eager raises too (wrong shapes, the user's own exceptions) is not a ``CaptureError``: capture
raises it as it is. Under partial compilation Dynamo may report it wrapped; the call then runs eagerly, which
raises the user's error itself. Each fallback decision is counted per reason (:func:`fallback_counts`, and
the stats journal section ``fallback`` shown by ``aotcache stats``) and logged once per function and reason.

NOTE [Captures that fail where eager may run]
A capture runs the user's Python on fake tensors through torch's tracing machinery, which fails on some code
eager runs (a dynamically quantized ``Linear``: the fake-tensor cache cannot compare its packed weights, a
``NotImplementedError``). Such an error is no ``CaptureError``, and it cannot be told apart from an error of the
user's code that eager raises too (an ``assert`` on a shape) without running the call. So, unless the caller
asked for errors, the signature gets a fallback (reason ``trace_failed``) whose first call runs eagerly: an
error is then eager's own, raised as eager raises it; if it runs, the fallback is warned about, and the later
calls go through ``torch.compile`` (their own error, if any, also raised as eager's by :class:`PartialRuntime`).
Only errors raised while tracing count (``capture`` marks them: :func:`~aotcache.aot.errors.is_trace_failure`);
a bad option or a compiler's failure is not the call's. With ``on_capture_error="raise"`` the error is raised as
it is, still marked, so that ``aotcache.compile``'s router decides the same way.
"""

from __future__ import annotations

import functools
import logging
import threading
import types
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from aotcache import config
from aotcache.aot.capture_threads import TraceBusy, swap_gate
from aotcache.aot.dynamo_compile import torch_compile
from aotcache.aot.dynamo_progress import DynamoProgress, dynamo_failed, marks_region_calls
from aotcache.aot.errors import CaptureError, is_trace_failure
from aotcache.aot.generator_args import untraceable_generator_failure
from aotcache.aot.keyed_nodes import has_keyed_nodes, unflatten_in_recorded_order
from aotcache.aot.dynamo_way import dynamo_as_eager
from aotcache.aot.module_state import dynamo_safe_module
from aotcache.aot.recompile_limit import RecompileLimitReached
from aotcache.aot.unsupported_tensors import nested_tensor_error, raised_in_nested_tensor_code
from aotcache.logs import log_once, logger

__all__ = ["ON_CAPTURE_ERROR", "JOURNAL_SECTION", "check_on_capture_error", "fallback_counts", "EagerRuntime",
           "is_trace_failure", "trace_failure_error",
           "count_fallback", "raised_by_region", "refused_argument_call", "eager_for_busy_swap",
           "PartialRuntime", "compile_or_fall_back", "eager_for_unkeyable_call", "eager_after_state_changes",
           "eager_past_recompile_limit", "eager_dynamo_graph", "eager_module_simplified", "eager_dynamo_graph_after_trace_failure",
           "graph_as_eager", "dynamo_as_eager", "has_uninitialized_parameters"]

ON_CAPTURE_ERROR = ("fallback", "eager", "raise")
JOURNAL_SECTION = "fallback"

_counts: Counter[str] = Counter()  # this process's fallback decisions per reason (see fallback_counts)
_counts_lock = threading.Lock()


def check_on_capture_error(value: Any, api: str) -> str:
    """Validate the ``on_capture_error`` argument of ``api``.

    :raises ValueError: not one of :data:`ON_CAPTURE_ERROR`.
    """
    if not isinstance(value, str) or value not in ON_CAPTURE_ERROR:
        raise ValueError(f"aotcache.{api}: on_capture_error must be 'fallback' (run what cannot be captured "
                         f"through torch.compile's graph breaks, or eagerly), 'eager' (run it eagerly) or 'raise' "
                         f"(raise the CaptureError); got {value!r}")
    return value


def fallback_counts() -> dict[str, int]:
    """This process's fallback decisions by reason (``partial:<reason>``, ``eager:<reason>``, ``region``)."""
    with _counts_lock:
        return dict(_counts)


def count_fallback(kind: str) -> None:
    """Count one fallback decision of ``kind`` (``eager:<reason>``...) in :func:`fallback_counts` and the journal."""
    with _counts_lock:
        _counts[kind] += 1
    try:
        from aotcache.store.journal import default_journal

        default_journal().add(JOURNAL_SECTION, {kind: 1})
    except (OSError, ValueError) as exc:  # the journal is a report: its faults never fail the user's call
        logger.debug("aotcache: fallback counter not journaled (%s)", exc)


class _NoGuards:
    """Runtime metadata of a fallback: no symbolic-shape guards (the signature alone selects it)."""

    __slots__ = ()
    guards = None


_NO_GUARDS = _NoGuards()


class EagerRuntime:
    """Runs the function as written, for one call signature (NOTE [Capture fallback])."""

    metadata = _NO_GUARDS
    kind = "eager"

    def __init__(self, fn: Callable, in_spec: Any, reason: str, skip: int = 0) -> None:
        self.fn = fn
        self.in_spec = in_spec
        self._keyed = has_keyed_nodes(in_spec)  # looked for once, not at every eager call
        self.reason = reason
        self.skip = skip  # leading arguments ``fn`` does not take (an aot_module's parameters and buffers)
        # a module's Python runs beside other threads' captures of it: NOTE [Eager runs beside a capture]
        self.gate = swap_gate(fn) if isinstance(fn, torch.nn.Module) else None

    def arguments(self, flat_args: Sequence[Any]) -> tuple[tuple, dict]:
        if self._keyed:  # NOTE [Keyed pytree nodes in their own key order]
            args, kwargs = unflatten_in_recorded_order(flat_args, self.in_spec)
        else:
            args, kwargs = pytree.tree_unflatten(list(flat_args), self.in_spec)
        return tuple(args[self.skip:]), kwargs

    # NOTE [Captures that fail where eager may run]: said once the first (eager) call has run
    pending_warning: Callable[[], None] | None = None

    def __call__(self, *flat_args: Any) -> Any:
        return self.run(*self.arguments(flat_args))

    def run_call(self, args: tuple, kwargs: dict) -> Any:
        """Run with the caller's own ``(args, kwargs)`` (NOTE [Argument containers changed in place] in
        refusals.py: a list the function appends to is the caller's, not a copy rebuilt from the flat
        arguments)."""
        return self.run(tuple(args[self.skip:]), kwargs)

    def run(self, args: tuple, kwargs: dict) -> Any:
        pending, self.pending_warning = self.pending_warning, None
        if self.gate is None:
            result = self.fn(*args, **kwargs)
        else:
            with self.gate.running():
                result = self.fn(*args, **kwargs)
        if pending is not None:
            pending()
        return result


class PartialRuntime:
    """Runs the function through ``torch.compile`` with aotcache compiling each region (NOTE [Capture fallback]).

    The Dynamo-compiled callable is shared by all signatures of one ``AOTFunction`` (Dynamo guards select
    among its compiled frames). If Dynamo fails before any of the call ran, this signature switches to eager for
    good; after, Dynamo's error is raised (NOTE [Dynamo failures after part of the call ran]).
    """

    metadata = _NO_GUARDS

    def __init__(self, dynamo_fn: Callable, eager: EagerRuntime, owner: Any, progress: DynamoProgress) -> None:
        self.dynamo_fn = dynamo_fn
        self.progress = progress  # shared by the owner's signatures, as dynamo_fn's frames are
        self.eager = eager
        self.owner = owner
        self.broken = False

    @property
    def kind(self) -> str:
        return "eager" if self.broken else "partial"

    def __call__(self, *flat_args: Any) -> Any:
        return self.run(*self.eager.arguments(flat_args))

    def run_call(self, args: tuple, kwargs: dict) -> Any:
        """Run with the caller's own ``(args, kwargs)`` (see :meth:`EagerRuntime.run_call`)."""
        return self.run(tuple(args[self.eager.skip:]), kwargs)

    def run(self, args: tuple, kwargs: dict) -> Any:
        if self.broken or self.eager.pending_warning is not None:  # NOTE [Captures that fail where eager may run]
            return self.eager.run(args, kwargs)
        progress = self.progress
        mark = None if progress.settled else progress.mark()
        try:
            if self.eager.gate is None:
                result = self.dynamo_fn(args, kwargs)
            else:
                with self.eager.gate.running():  # NOTE [Eager runs beside a capture]: Dynamo reads the module too
                    result = self.dynamo_fn(args, kwargs)
        except Exception as exc:
            if not dynamo_failed(exc):  # NOTE [Dynamo errors that are not TorchDynamoException]
                raise
            region_error = raised_by_region(exc)
            if region_error is not None:  # NOTE [Regions that cannot be captured under raise or strict]
                raise region_error  # its cause: the capture's own error
            # NOTE: Dynamo failed (or wrapped an error of the user's code): where nothing of the call can have run
            # yet, run eagerly, which either works (Dynamo's limitation) or raises the user's own error; else raise
            # Dynamo's error, as an eager rerun would apply what ran a second time (NOTE [Dynamo failures after
            # part of the call ran])
            if mark is None or not progress.nothing_ran_since(mark):
                exc.add_note(f"aotcache: {self.owner.name}: not rerun eagerly: part of the call may have run before "
                             f"torch.compile failed (NOTE [Dynamo failures after part of the call ran])")
                raise
            self.broken = True
            count_fallback(f"eager:{self.eager.reason}")
            _warn_once(self.owner, f"dynamo:{self.eager.reason}",
                       "aotcache: %s: torch.compile could not run the call either (%s: %s); it runs eagerly",
                       self.owner.name, type(exc).__name__, _first_line(exc))
            return self.eager.run(args, kwargs)
        if mark is not None:
            progress.settled = True
        return result


def _warn_once(owner: Any, topic: str, message: str, *args: Any) -> None:
    """Log ``message`` once per ``owner`` (an AOTFunction) and ``topic``; the memo lives on the owner, so a new
    function warns again (process-wide keys by ``id()`` could be reused by a later object)."""
    warned = owner.__dict__.setdefault("_fallback_warned", set())
    if topic not in warned:
        warned.add(topic)
        logger.warning(message, *args)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _raises(on_capture_error: str) -> bool:
    return on_capture_error == "raise" or bool(config.get("strict"))


@marks_region_calls  # NOTE [Dynamo failures after part of the call ran]
def _region_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, owner: Any) -> Callable:
    """A Dynamo backend compiling one region with ``owner``'s (an AOTFunction) options, services and cache.

    NOTE [Regions that cannot be captured under raise or strict]
    A region that aotcache cannot capture runs as Python (counted ``region``, logged once per function and
    reason), unless the owner asks for errors (``on_capture_error="raise"``, ``AOTCACHE_STRICT=1``): then its
    capture error is raised, as for the whole function. Such an owner normally never reaches this backend (its own
    capture raises first), but Dynamo compiles regions lazily, at the first call that reaches them: a branch not
    taken before, a recompile, with strict mode turned on after the signature got its fallback. That region ran
    as Python, silently in strict mode (found in session 15's review). Dynamo wraps a backend's error in
    ``BackendCompilerFailed``, which :class:`PartialRuntime` turns into an eager run; an error raised here is
    marked (:func:`_region_error`) and re-raised there as it is.
    """
    from aotcache.aot.dynamo_graph import compile_dynamo_graph

    try:
        return compile_dynamo_graph(gm, example_inputs, owner.options, services=owner.services, cache=owner.cache)
    except Exception as exc:  # NOTE [Dynamo graphs whose capture fails]: a marked trace failure as a CaptureError
        if not isinstance(exc, CaptureError) and not is_trace_failure(exc):
            raise  # a compiler's or an option's failure: PartialRuntime runs the call eagerly
        failure = exc if isinstance(exc, CaptureError) else trace_failure_error(exc)
        if _raises(owner.on_capture_error):
            raise _region_error(owner, failure) from exc
        count_fallback("region")
        _warn_once(owner, f"region:{failure.reason}",
                   "aotcache: %s: a region between graph breaks cannot be captured either (%s); it runs eagerly",
                   owner.name, _first_line(failure))
        return graph_as_eager(gm)


_RAISED_BY_REGION = "_aotcache_region_error"


def _region_error(owner: Any, failure: CaptureError) -> CaptureError:
    """The error a region that cannot be captured raises where ``owner`` asks for errors (NOTE [Regions that cannot
    be captured under raise or strict]), marked for :func:`raised_by_region`."""
    asked = ("on_capture_error='raise'" if owner.on_capture_error == "raise"
             else "strict mode (AOTCACHE_STRICT=1)")
    error = CaptureError(f"aotcache: {owner.name}: a region between torch.compile's graph breaks cannot be captured, "
                         f"and {asked} asks for the error instead of running it eagerly: {failure}",
                         reason=failure.reason, dynamo_safe=failure.dynamo_safe)
    setattr(error, _RAISED_BY_REGION, True)
    return error


def raised_by_region(exc: BaseException) -> CaptureError | None:
    """The error of :func:`_region_error` inside ``exc`` (Dynamo's wrapper of a backend's error), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if getattr(current, _RAISED_BY_REGION, False):
            return current  # type: ignore[return-value]
        todo += [getattr(current, "inner_exception", None), current.__cause__, current.__context__]
    return None


def eager_dynamo_graph(gm: torch.fx.GraphModule, exc: CaptureError) -> Callable:
    """What the ``torch.compile`` backend returns for a Dynamo graph it cannot capture: the graph as Python
    (eager's results), counted as ``region`` and logged once per reason. NOTE [Dynamo graphs aotcache cannot
    capture]: Dynamo keeps ops such as ``index_put`` with a boolean mask inside its graph (Wav2Vec2's time
    masking failed so before NOTE [Masked assignment as where]; a value with a row per selected element still
    does in training), which the capture refuses as data-dependent; failing the user's ``torch.compile`` there
    would fail a call eager runs.

    :raises CaptureError: ``exc`` itself in strict mode (``AOTCACHE_STRICT=1``).
    """
    if config.get("strict"):
        raise exc
    count_fallback("region")
    log_once(logging.WARNING, f"backend-region:{exc.reason}",
             "aotcache backend: a torch.compile graph cannot be captured (%s); it runs eagerly (eager's results)",
             _first_line(exc))
    return graph_as_eager(gm)


def eager_module_simplified(mod: torch.nn.Module, exc: CaptureError) -> Callable:
    """What ``aotcache.aot_module_simplified`` returns for a module it cannot capture: the module as Python,
    counted as ``eager:<reason>`` and logged once per reason.

    NOTE [Modules aot_module_simplified cannot capture]
    ``aot_module_simplified`` is torch's drop-in, which a user's own backend calls with Dynamo's graph (or a
    module); torch's traces some modules that aotcache refuses by design (a ``Tensor.register_hook`` inside the
    module, which torch bakes into the backward graph and aotcache would run only while capturing, NOTE [Module
    backward hooks] in docs/limitations.md), so raising the ``CaptureError`` failed a backend that eager and torch's own
    run (PyTorch's test_hooks.py, session 25). As the ``torch.compile`` backend does with a Dynamo graph (NOTE
    [Dynamo graphs aotcache cannot capture]), the module now runs as Python: eager's results, and its hooks run
    at every backward. ``on_capture_error="raise"`` (the backend's own call) and strict mode raise instead.

    :raises CaptureError: ``exc`` itself in strict mode (``AOTCACHE_STRICT=1``).
    """
    if config.get("strict"):
        raise exc
    count_fallback(f"eager:{exc.reason}")
    log_once(logging.WARNING, f"module-simplified:{exc.reason}",
             "aotcache.aot_module_simplified: the module cannot be captured (%s); it runs eagerly (eager's results)",
             _first_line(exc))
    return graph_as_eager(mod)


def eager_dynamo_graph_after_trace_failure(gm: torch.fx.GraphModule, exc: Exception) -> Callable:
    """What the ``torch.compile`` backend returns when the capture of a Dynamo graph fails with an error that is no
    ``CaptureError`` (marked by ``capture``): the graph as Python, counted as ``region`` (reason ``trace_failed``).

    NOTE [Dynamo graphs whose capture fails]
    Dynamo has traced the graph already, on its own fake tensors, so an error that aotcache's capture of it meets is
    torch's tracing machinery failing in aotcache's setting, not the user's code: ``torch.while_loop`` needs a
    ShapeEnv that a static capture does not have ("'NoneType' object has no attribute
    'ignore_fresh_unbacked_symbols'"), and with a stacked output its iteration count is an unbacked size the
    symbolic capture does not return (``PendingUnbackedSymbolNotFound``). Both were ``BackendCompilerFailed``
    where eager and ``aot_eager`` run (PyTorch's hop_db samples). Such a graph now runs as Python, as a graph the
    capture refuses does (NOTE [Dynamo graphs aotcache cannot capture]); an error of the graph itself is then
    raised as eager raises it.

    :raises Exception: ``exc`` as it is when it is not a marked trace failure (a compiler's or an option's), or in
        strict mode (``AOTCACHE_STRICT=1``).
    """
    if not is_trace_failure(exc) or config.get("strict"):
        raise exc
    return eager_dynamo_graph(gm, trace_failure_error(exc))


def _checkpoint_as_eager(body: Callable, *args: Any, **kwargs: Any) -> Any:
    """A checkpointed region of a Dynamo graph run as eager's ``torch.utils.checkpoint`` runs it (NOTE
    [Checkpointed regions run eagerly])."""
    from torch.utils.checkpoint import checkpoint

    options = {"preserve_rng_state": True, **kwargs, "use_reentrant": False}
    context_fn = getattr(body, "meta", {}).get("_checkpoint_context_fn")
    if context_fn is not None:
        options["context_fn"] = context_fn
    mutated = _inputs_written_in_place(body)
    if not mutated:
        return checkpoint(body, *args, **options)
    kept = [index for index in range(len(args)) if index not in mutated]

    def region(*kept_args: Any) -> Any:  # the written inputs reached as eager's module attributes are
        full = list(args)
        for index, value in zip(kept, kept_args):
            full[index] = value
        return body(*full)

    return checkpoint(region, *(args[index] for index in kept), **options)


def _inputs_written_in_place(body: Any) -> frozenset[int]:
    """The positions of ``body``'s inputs that it writes in place (a BatchNorm's ``num_batches_tracked.add_(1)``).

    NOTE [Buffers written in a checkpointed region]
    Dynamo lifts a region's module attributes into its inputs; eager's checkpoint saves its inputs with their
    versions, so a buffer the region bumps in place failed the version check when the backward recomputed
    (RuntimeError where eager trains: eager's region reads the buffer as an attribute, not an input). Such inputs
    reach the region by closure, as attributes do in eager (the recomputation writes them again, as eager's does).
    """
    cached = getattr(body, "_aotcache_written_inputs", None)
    if cached is not None:
        return cached
    written: set[int] = set()
    graph = getattr(body, "graph", None)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"] if graph is not None else []
    for index, placeholder in enumerate(placeholders):
        for user in placeholder.users:
            name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
            if (user.op in ("call_method", "call_function") and isinstance(name, str) and name.endswith("_")
                    and not name.startswith("_") and user.args and user.args[0] is placeholder):
                written.add(index)
    result = frozenset(written)
    try:
        body._aotcache_written_inputs = result
    except AttributeError:
        pass
    return result


def graph_as_eager(gm: torch.fx.GraphModule) -> Callable:
    """``gm``'s forward, to run a Dynamo graph as Python with eager's results.

    NOTE [Checkpointed regions run eagerly]
    Dynamo hands a ``torch.utils.checkpoint`` region over as a ``tag_activation_checkpoint`` call, whose own eager
    implementation checkpoints with ``preserve_rng_state=False`` (it expects a compiler to replay random ops), so
    run as Python a region with dropout drew another mask when the backward recomputed it: other gradients than
    eager's, silently (``torch.compile(backend="eager")`` does the same). Where aotcache runs such a graph as Python
    (a graph it cannot capture: dropout inside a selective-checkpoint region is one, NOTE [In-place ops in a
    checkpointed region]), each region calls ``torch.utils.checkpoint`` as eager does: non-reentrant, the RNG state
    preserved unless the model asked otherwise, a selective-checkpoint policy kept. Nested regions are rewritten too.
    """
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    if hop is None:
        return gm.forward
    changed = False
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        found = False
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target is hop:
                node.target = _checkpoint_as_eager
                found = True
        if found:
            module.recompile()
            changed = True
    if changed:
        logger.debug("aotcache: checkpointed regions of a Dynamo graph run through torch.utils.checkpoint")
    return gm.forward


def _target(owner: Any) -> tuple[Callable, int]:
    """What a fallback runs, and how many leading arguments it drops: an ``aot_module``'s module itself (its
    function is ``functional_call(module, params, buffers, ...)`` of the module's own current parameters, see
    ``AOTModule``; Dynamo handles module attributes better than dicts of tensors), else the function."""
    module = getattr(owner, "fingerprint_module", None)  # set by AOTModule on its AOTFunction
    return (module, 2) if module is not None else (owner.fn, 0)


def _dynamo_entry(owner: Any) -> tuple[Callable, types.CodeType]:
    """``torch.compile`` of the fallback target (:func:`_target`) with the region backend, once per AOTFunction,
    and the entry's own code (a trampoline: NOTE [Dynamo failures after part of the call ran]).

    NOTE [A code object per fallback]: Dynamo keeps its compiled frames (and its recompile limit) per code
    object, so each AOTFunction gets its own copy of the entry's code: functions that share source (a closure
    made in a loop) do not evict each other's frames.
    """
    fn, _ = _target(owner)

    def aotcache_partial(args: tuple, kwargs: dict) -> Any:
        return fn(*args, **kwargs)

    entry = types.FunctionType(aotcache_partial.__code__.replace(), aotcache_partial.__globals__,
                               "aotcache_partial", None, aotcache_partial.__closure__)
    backend = functools.partial(_region_backend, owner=owner)
    # NOTE [A redirected torch.compile]: torch's own, also where a program sent torch.compile to aotcache
    return dynamo_as_eager(torch_compile(entry, backend=backend, dynamic=bool(owner.options.dynamic))), entry.__code__


def _dynamo_usable() -> bool:
    try:
        import torch._dynamo
    except ImportError:
        return False
    from aotcache.aot.capture_threads import tracing_in_this_thread

    return bool(torch._dynamo.is_dynamo_supported()) and not tracing_in_this_thread()


def _fallback_runtime(owner: Any, in_spec: Any, exc: CaptureError) -> EagerRuntime | PartialRuntime:
    target, skip = _target(owner)
    eager = EagerRuntime(target, in_spec, exc.reason, skip=skip)
    # NOTE [Constructs Dynamo gets wrong] (module_state.py): the refusal, or the module tree itself
    if (owner.on_capture_error == "eager" or not exc.dynamo_safe or not dynamo_safe_module(target)
            or not _dynamo_usable()):
        count_fallback(f"eager:{exc.reason}")
        return eager
    count_fallback(f"partial:{exc.reason}")
    return _partial_runtime(owner, eager)  # the caller holds owner's lock


def _partial_runtime(owner: Any, eager: EagerRuntime) -> PartialRuntime:
    """A PartialRuntime over ``owner``'s Dynamo entry, made at the first (the caller holds ``owner``'s lock)."""
    entry = owner.__dict__.get("_partial_entry")
    if entry is None:  # the entry and whether its frames may have run (NOTE [Dynamo failures after part of the
        # call ran]), shared by the owner's signatures
        dynamo_fn, trampoline = _dynamo_entry(owner)
        entry = owner.__dict__["_partial_entry"] = (dynamo_fn, DynamoProgress(trampoline))
    return PartialRuntime(entry[0], eager, owner, entry[1])


def _synthetic_base_runtime(owner: Any, flat_args: list, in_spec: Any, dynamic: Any) -> Any:
    """A runtime over synthetic bases (NOTE [Synthetic bases]), or None where they do not apply or fail;
    ``dynamic`` the call's resolved flag or spec (not the owner's: ``dynamic=None`` resolves per call)."""
    from aotcache.aot.api import AOTFunction
    from aotcache.aot.synthetic_base import SyntheticBaseRuntime, plan_synthetic_bases, synthetic_base_function

    plan = plan_synthetic_bases(flat_args, dynamic)
    if plan is None:
        return None
    inner = AOTFunction(synthetic_base_function(owner.fn, plan, in_spec), owner.options, services=owner.services,
                        cache=owner.cache, on_capture_error="raise")
    inner.name = owner.name
    inner.raise_at_recompile_limit = owner.raise_at_recompile_limit
    inner_args = plan.inner_arguments(flat_args)
    try:
        compiled = inner._runtime_for(inner_args, pytree.tree_flatten((tuple(inner_args), {}))[1])
    except CaptureError as exc:
        logger.debug("aotcache: %s: synthetic bases do not help (%s)", owner.name, _first_line(exc))
        return None
    owner.num_compiles += inner.num_compiles
    del compiled  # kept by ``inner`` under its own signature; the outer signature needs no guards (static)
    return SyntheticBaseRuntime(plan, inner, _NO_GUARDS)


def _warn(owner: Any, exc: CaptureError, runtime: Any) -> None:
    how = ("runs through torch.compile: the regions around the graph breaks are compiled by aotcache, the rest "
           "runs eagerly" if runtime.kind == "partial" else "runs eagerly")
    _warn_once(owner, f"{runtime.kind}:{exc.reason}",
               "aotcache: %s cannot be captured whole (%s): %s. This call signature %s (remembered; no retrace). "
               "Pass on_capture_error='raise' or set AOTCACHE_STRICT=1 to raise instead.",
               owner.name, exc.reason, _first_line(exc), how)


def trace_failure_error(exc: BaseException) -> CaptureError:
    """The CaptureError (reason ``trace_failed``) that stands for ``exc`` in warnings, counters and routes."""
    if untraceable_generator_failure(exc):  # NOTE [Generators in a traced graph, torch 2.11]
        return CaptureError(f"aotcache: torch {torch.__version__} cannot put a torch.Generator into a traced graph "
                            f"(torch 2.12 and later can), so a call passing generator= or drawing from a "
                            f"generator it holds is not captured ({type(exc).__name__}: {_first_line(exc)}). "
                            f"Upgrade torch, or draw without generator= inside the compiled function",
                            reason="trace_failed")
    return CaptureError(f"aotcache: the capture failed with {type(exc).__name__}: {_first_line(exc)}",
                        reason="trace_failed")


def compile_or_fall_back(owner: Any, flat_args: list, in_spec: Any, options: Any = None) -> Any:
    """``owner._compile(flat_args, in_spec, options)``, or a fallback runtime when capture fails (NOTE [Capture
    fallback], NOTE [Captures that fail where eager may run]); ``options``: the call's options with ``dynamic``
    resolved (default: the owner's).

    Called with ``owner``'s lock held. :raises CaptureError: in strict mode or with
    ``on_capture_error="raise"``; another error of the capture: likewise, or where an automatic dynamic compile
    failed (the caller compiles the call statically).
    """
    options = owner.options if options is None else options
    try:
        try:
            return owner._compile(flat_args, in_spec, options)
        except Exception as exc:
            if not isinstance(exc, CaptureError) and raised_in_nested_tensor_code(exc):
                raise nested_tensor_error("a tensor the function builds") from exc
            raise
    except CaptureError as exc:
        if exc.reason == "aliased_mutation":  # not a limitation to fall back from: NOTE [Synthetic bases]
            runtime = _synthetic_base_runtime(owner, flat_args, in_spec, options.dynamic)
            if runtime is not None:
                return runtime
        if _raises(owner.on_capture_error):
            raise
        runtime = _fallback_runtime(owner, in_spec, exc)
        runtime.any_settings = exc.any_settings  # NOTE [Refusals that hold for any settings] in api.py
        _warn(owner, exc, runtime)
        return runtime
    except Exception as exc:  # noqa: BLE001 - NOTE [Captures that fail where eager may run]
        dims = getattr(owner, "_dims", None)
        if not is_trace_failure(exc) or _raises(owner.on_capture_error) or (
                dims is not None and dims.automatic(options.dynamic)):
            raise  # (an automatic dynamic compile is retried statically by the caller)
        failure = trace_failure_error(exc)
        runtime = _fallback_runtime(owner, in_spec, failure)
        eager = runtime if isinstance(runtime, EagerRuntime) else runtime.eager
        eager.pending_warning = functools.partial(_warn, owner, failure, runtime)
        runtime.trace_failed = True  # type: ignore[union-attr]  # automatic dynamic shapes are kept (api.py)
        return runtime


def eager_after_state_changes(owner: Any, in_spec: Any, limit: int) -> EagerRuntime | None:
    """An eager runtime for a function whose last ``limit`` captures each changed the state it reads (NOTE [State
    changed by a capture] in call_state.py), or None with ``on_capture_error="raise"`` / strict mode, which keep
    tracing every call (eager's results either way, only slower).

    A graph runs no Python, so such a function is traced at every call to keep eager's state; past ``limit``
    (Dynamo's own recompile limit is 8) it runs as written, as torch.compile does after its limit. Counted as
    ``eager:changes_own_state`` and warned about once.
    """
    if _raises(owner.on_capture_error):
        return None
    target, skip = _target(owner)
    runtime = EagerRuntime(target, in_spec, "changes_own_state", skip=skip)
    count_fallback("eager:changes_own_state")
    _warn_once(owner, "eager:changes_own_state",
               "aotcache: %s changed Python state it reads in each of its last %d compiled calls, so each was "
               "traced again (a graph runs no Python); this call signature now runs eagerly (remembered). Keep "
               "that state (a counter or a flag in forward) outside the compiled function to reuse one graph.",
               owner.name, limit)
    return runtime


def _single_use_eager(owner: Any, in_spec: Any, reason: str) -> EagerRuntime:
    """An eager runtime for this call only (``single_use``: not remembered), counted as ``eager:<reason>``."""
    target, skip = _target(owner)
    runtime = EagerRuntime(target, in_spec, reason, skip=skip)
    runtime.single_use = True  # type: ignore[attr-defined]
    count_fallback(f"eager:{reason}")
    return runtime


def eager_past_recompile_limit(owner: Any, in_spec: Any, exc: BaseException, changed: str) -> EagerRuntime:
    """An eager runtime for one call that would trace past ``owner``'s recompile limit (NOTE [Recompile limit] in
    recompile_limit.py): marked ``single_use`` (not remembered), counted as ``eager:recompile_limit`` per call,
    warned about once per function with ``changed`` (what changed at its last re-trace) and the fixes.

    :raises RecompileLimitReached: in strict mode (``AOTCACHE_STRICT=1``), and where ``owner`` asked for errors
        (``raise_at_recompile_limit``: ``on_capture_error="raise"``, ``aotcache.compile(fullgraph=True)``).
    """
    if config.get("strict") or getattr(owner, "raise_at_recompile_limit", False):
        if isinstance(exc, RecompileLimitReached) and not exc.changed and changed:
            raise RecompileLimitReached(exc.name, exc.limit, changed) from None
        raise exc
    runtime = _single_use_eager(owner, in_spec, "recompile_limit")
    _warn_once(owner, "eager:recompile_limit",
               "aotcache: %s was traced %d times in this process (the recompile limit, AOTCACHE_RECOMPILE_LIMIT) "
               "and a new call would trace again; calls matching the graphs compiled so far keep using them, the "
               "others run eagerly. The last new trace differed from the closest call already compiled in: %s. "
               "Where a value changes every call, pass it as a tensor (or, for a size, use dynamic=True), keep a "
               "module attribute that a schedule changes out of forward, or call aotcache.reset() to start the "
               "count over. Where each trace is a distinct call form that repeats (one model serving several "
               "generate modes: greedy, beam search, a padded batch, a static cache), the traces add up and are "
               "needed: raise AOTCACHE_RECOMPILE_LIMIT above their number (0: no limit).",
               owner.name, getattr(exc, "limit", 0), changed or "a new call signature")
    return runtime


def eager_for_unkeyable_call(owner: Any, exc: CaptureError, args: tuple, kwargs: dict, in_spec: Any) -> Any:
    """Run a call whose signature cannot even be built (a sparse argument) eagerly; nothing is remembered,
    so each such call is counted.

    :raises CaptureError: in strict mode or with ``on_capture_error="raise"``.
    """
    if _raises(owner.on_capture_error):
        raise exc
    target, skip = _target(owner)
    runtime = EagerRuntime(target, in_spec, exc.reason, skip=skip)
    count_fallback(f"eager:{exc.reason}")
    _warn(owner, exc, runtime)
    return runtime.run_call(args, kwargs)  # the caller's own containers (NOTE [Argument containers changed in place])


def refused_argument_call(owner: Any, exc: Exception, args: tuple, kwargs: dict, in_spec: Any) -> Any:
    """Run a call with an argument the AOT way refuses (``RefusedArgumentError``: an object compared by identity,
    a plain mutable object holding tensors) through ``torch.compile``, whose guards check such objects, or eagerly
    where Dynamo is unavailable or fails; eager's results. Nothing is remembered (the call has no signature), so
    each such call takes this way; counted and warned once per function.

    NOTE [Refused arguments take the fallback]
    Such an argument is no construct the capture cannot express but one the signature cannot compare; raising
    the TypeError failed a call eager runs (``aot_function(f)(batch)`` with a dataclass batch). With
    ``on_capture_error="raise"`` (and ``aotcache.compile``, whose router takes the call to Dynamo itself) it is
    still raised.

    :raises RefusedArgumentError: in strict mode or with ``on_capture_error="raise"``.
    """
    if _raises(owner.on_capture_error):
        raise exc
    target, skip = _target(owner)
    eager = EagerRuntime(target, in_spec, "refused_argument", skip=skip)
    runtime: EagerRuntime | PartialRuntime = eager
    # NOTE [Arguments Dynamo guards without their order] in signature.py: such an argument runs eagerly
    if owner.on_capture_error != "eager" and getattr(exc, "dynamo_safe", True) and _dynamo_usable():
        with owner._lock:
            runtime = _partial_runtime(owner, eager)
    warned = owner.__dict__.setdefault("_fallback_warned", set())
    if f"{runtime.kind}:refused_argument" not in warned:
        count_fallback(f"{runtime.kind}:refused_argument")
        _warn(owner, CaptureError(str(exc), reason="refused_argument"), runtime)
    return runtime.run_call(args, kwargs)


def eager_for_busy_swap(owner: Any, in_spec: Any, exc: BaseException) -> EagerRuntime:
    """An eager runtime for one call whose capture could not swap the module's tensors in time, because another
    thread's eager run held the module (NOTE [A swap waits a bounded time] in capture_threads.py), or another
    thread's trace held the trace lock (TraceBusy: NOTE [One trace at a time]): marked
    ``single_use`` (this call only; a later call captures), counted as ``eager:swap_busy`` and logged once.
    In every ``on_capture_error`` mode: the call itself is capturable, and waiting longer could hang for good."""
    runtime = _single_use_eager(owner, in_spec, "swap_busy")
    services = getattr(owner, "services", None)
    if services is not None:  # aotcache.compile's route stays undecided (NOTE [Routes a busy capture leaves open])
        services.ran_eagerly_for_busy_capture(owner)
    hint = ("a large model's capture in another thread? AOTCACHE_TRACE_WAIT_S sets this wait"
            if isinstance(exc, TraceBusy) else "a method waiting for worker threads that call the module?")
    _warn_once(owner, "eager:swap_busy",
               "aotcache: %s: %s (%s); this call runs eagerly, and a later call captures once the module is free",
               owner.name, _first_line(exc), hint)
    return runtime


def has_uninitialized_parameters(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds a lazy parameter or buffer not materialized yet (NOTE [Lazy modules] in api.py)."""
    from torch.nn.parameter import is_lazy

    return any(is_lazy(value) for value in (*module.parameters(), *module.buffers()))
