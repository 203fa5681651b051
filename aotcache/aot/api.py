"""The AOT Autograd core's per-call logic: :class:`AOTFunction` traces and compiles per signature, then reuses.

Per call it finds the program's hot signatures (NOTE [Hot path]), else the runtime of the call's signature
(NOTE [Signature] in ``signature.py``), else compiles through its services (``compile_function`` of
``compile_step.py``, possibly loaded from the cache) or falls back (NOTE [Capture fallback]). The public entry
points (``aot_function``, ``aot_module``, ``aot_module_simplified``) live in :mod:`aotcache.api`, above both
this package and the cache: they hand an :class:`AOTFunction` the services that watch the program and use the
cache (NOTE [Compile services] in ``aot/services.py``).

The options and the compile step are in ``compile_step.py``, the reuse key in ``signature.py``, the Dynamo-graph
form in ``dynamo_graph.py``; their public names stay importable from here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from aotcache.aot.call_state import SavedCallState
from aotcache.aot.capture_threads import ForkSafeLock, SwapBusy, tracing_in_this_thread
from aotcache.aot.capture import capture, is_graph_input
from aotcache.aot.compile_step import (
    AOTOptions,
    checked_options,
    compile_captured,
    compile_function,
    keep_joint_for_double_backward,
)
from aotcache.aot.dynamic_dims import DynamicDims
from aotcache.aot.dynamo_graph import compile_dynamo_graph
from aotcache.aot.errors import CaptureError, RefusedArgumentError
from aotcache.aot.fallback import (
    EagerRuntime,
    PartialRuntime,
    check_on_capture_error,
    compile_or_fall_back,
    eager_after_state_changes,
    eager_for_busy_swap,
    eager_for_unkeyable_call,
    eager_past_recompile_limit,
    refused_argument_call,
)
from aotcache.aot.call_hot_path import CallSignatures, call_key
from aotcache.aot.hot_path import HotSignature, HotSignatures, simple_structure
from aotcache.aot.keyed_nodes import unflatten_arguments
from aotcache.aot.generator_args import GeneratorSlots
from aotcache.aot.recompile_limit import LIVE_FUNCTIONS, RecompileLimitReached, TraceBudget
from aotcache.aot.rebuilt_caches import rebuilt_caches_kept
from aotcache.aot.refusals import (argument_containers, refuse_changed_argument_containers,
                                    refuse_tensor_attribute_changes, tensor_attribute_state)
from aotcache.aot.retrace import describe_new_signature
from aotcache.aot.runtime import CompiledRuntime
from aotcache.aot.scalar_type_checks import ScalarTypeChecked
from aotcache.aot.services import CompileServices, WatchedProgram
from aotcache.aot.signature import (call_context, carry_tensor_attributes, input_offsets, offsets_hold, rank_signature_of,
                                    self_holding_argument_error, signature_of, user_arguments_carry_attributes)
from aotcache.compilers.float_inputs import FloatInputsUnsupported, caller_retries
from aotcache.logs import CacheFault, event, log_once, logger
from aotcache.progress import compile_progress

__all__ = [
    "AOTOptions",
    "AOTFunction",
    "AOTModule",
    "checked_options",
    "compile_function",
    "compile_captured",
    "compile_dynamo_graph",
    "aot_export_module",
    "aot_export_joint_simple",
    "ExportSignature",
]


_SINGLE_USE_WARNING = 3  # single-use graphs (NOTE [State changed by a capture]) before a warning, once per function
_SINGLE_USE_LIMIT = 8  # ... in a row before the signature runs eagerly (as torch.compile after its recompile limit)
_NO_ARGUMENTS = pytree.tree_flatten(((), {}))[1]  # a call refused before it is flattened runs with its own arguments
_ANY_SETTINGS = object()  # in a fallback's key: the signature runs eagerly whatever an aot_module's settings


class AOTFunction:
    """The callable returned by :func:`aot_function`: traces and compiles per signature, then reuses."""

    def __init__(self, fn: Callable, options: AOTOptions, *, services: CompileServices, cache: Any = True,
                 on_capture_error: str = "fallback") -> None:
        self.fn = fn
        self.options = options
        self.services = services  # NOTE [Compile services]: program watching, guard checks, cached compiles
        self.cache = cache  # the user's cache= argument, passed to the services as is
        self.on_capture_error = check_on_capture_error(on_capture_error, "aot_function")  # NOTE [Capture fallback]
        self._entries: dict[tuple, list[CompiledRuntime]] = {}
        self._fallbacks: dict[tuple, Any] = {}  # NOTE [Fallbacks outlive program changes]: (extra, signature)
        # NOTE [Program guards] (the services' watch_program): per ``extra``, the program last watched and the
        # hot signatures (NOTE [Hot path]) of its digest; the digest is part of every entry's key
        self._programs: dict[Any, tuple[WatchedProgram, HotSignatures]] = {}
        self._hot_by_digest: dict[str, HotSignatures] = {}
        self._hot = HotSignatures()  # those of the program watched last (tests, diagnostics)
        self._calls_by_digest: dict[str, CallSignatures] = {}  # NOTE [Call hot path] in call_hot_path.py
        self.num_program_walks = 0  # walks of the program (first call, failed guards; tests, diagnostics)
        self._lock = ForkSafeLock()  # NOTE [A child forked while another thread captures the same model]
        self.key_memo: dict[str, Any] = {}  # per-function memo the cache keeps (its key's option identities)
        self.name = _function_name(fn)  # shown by `aotcache ls`; never part of a key
        self._dims = DynamicDims(options.dynamic, options.float_symbols())  # NOTE [Dynamic dimensions]
        self.num_state = 0  # leading flat arguments that are a module's parameters and buffers
        self.num_params = 0  # ... of which the first are parameters (kept static: NOTE [Buffers that change size])
        # aot_function's num_params_buffers: leading flat arguments the caller names as weights, kept static as
        # PyTorch's aot_function keeps them (NOTE [Weights named by num_params_buffers] in dynamic_dims.py)
        self.num_weight_args = 0
        self.buffer_names: tuple[str, ...] = ()  # the buffers' names (the log of automatic dynamic shapes)
        self.num_compiles = 0  # how many times this function was traced and compiled (tests, diagnostics)
        self._saved_state: SavedCallState | None = None  # of the call being compiled (under the lock)
        self.num_single_use = 0  # graphs used for their call only (NOTE [State changed by a capture]; tests)
        self._single_use_streak = 0  # single-use graphs in a row, since the last graph kept (_SINGLE_USE_LIMIT)
        self.traces = TraceBudget()  # NOTE [Recompile limit]
        self._last_change = ""  # what changed at the last re-trace (for the recompile-limit warning)
        # NOTE [Recompile limit]: past the limit, raise instead of running eagerly (aotcache.compile: fullgraph)
        self.raise_at_recompile_limit = self.on_capture_error == "raise"
        LIVE_FUNCTIONS.add(self)  # NOTE [Resetting compiled functions] in recompile_limit.py
        self._generator_slots = GeneratorSlots()  # NOTE [Generator arguments]

    def reset(self) -> None:
        """Forget this function's in-process graphs, fallbacks, automatic dynamic dimensions and recompile budget,
        as if the process had just started (NOTE [Resetting compiled functions] in recompile_limit.py); the
        store is untouched, so the next call of a signature loads its entry or traces."""
        with self._lock:
            self._entries = {}
            self._fallbacks = {}
            self._programs = {}
            self._hot_by_digest = {}
            self._hot = HotSignatures()
            self._calls_by_digest = {}
            self._dims = DynamicDims(self.options.dynamic, self.options.float_symbols())
            self.traces = TraceBudget()
            self._last_change = ""
            self._single_use_streak = 0

    def begin_trace(self) -> None:
        """Called by the compile services when a call is about to be traced (not loaded from the cache).

        :raises RecompileLimitReached: this function made ``AOTCACHE_RECOMPILE_LIMIT`` traces in this mode
            (NOTE [Recompile limit] in recompile_limit.py).
        """
        self.traces.take(self.name, getattr(self, "fingerprint_module", None))

    def fingerprint_program(self) -> Callable:
        """What runs when this function is called inside an enclosing capture (inlined): its function (NOTE
        [Compiled wrappers in a walked program] in the fingerprint's walker)."""
        return self.fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() and tracing_in_this_thread():  # NOTE [Nested compiled functions] (module.py)
            return self.fn(*args, **kwargs)
        if torch._C._get_tracing_state() is not None:  # NOTE [Calls under torch.jit.trace] (module.py)
            return self.fn(*args, **kwargs)
        return self.call_structured(simple_structure(args, kwargs), args, args, kwargs)

    def call_structured(self, structure: Any, flat_if_simple: Sequence[Any], args: tuple, kwargs: dict,
                        extra: Any = None) -> Any:
        """Call with ``(args, kwargs)``; ``structure`` (hashable, or None) names calls whose flat arguments are
        exactly ``flat_if_simple``, which then may take the hot path (NOTE [Hot path] in ``hot_path.py``);
        ``extra`` (hashable) is part of the signature too (``aot_module``: the module's settings); a
        ``structure`` must determine it."""
        watched = self._programs.get(extra)
        if watched is None or not watched[0].holds():
            watched = self._watch(extra)
        program, hot_signatures = watched
        attributes = structure is not None and user_arguments_carry_attributes(flat_if_simple, self.num_state)
        if structure is not None and not attributes:  # NOTE [Python attributes of tensor arguments]
            hot = hot_signatures.find(structure, flat_if_simple)
            if hot is not None and (hot.runtime.metadata.guards is None or
                                    self._guards_hold(hot.runtime, flat_if_simple)):
                return hot.runtime(*flat_if_simple)
        calls = self._calls_by_digest.get(program.digest) if structure is None else None
        if calls is not None:  # NOTE [Call hot path] in call_hot_path.py: keyword arguments, containers
            found = calls.find(call_key(extra, args, kwargs), (args, kwargs), self._guards_hold)
            if found is not None:
                record, flat = found
                return record.runtime(*flat)
        try:
            flat_args, in_spec = pytree.tree_flatten((args, kwargs))
        except RecursionError:  # NOTE [Arguments that hold themselves] in signature.py
            return refused_argument_call(self, self_holding_argument_error(), args, kwargs, _NO_ARGUMENTS)
        slotted = self._generator_slots.substitute(flat_args)  # NOTE [Generator arguments]
        if slotted is not None:
            return self._call_with_slots(structure, flat_if_simple, args, kwargs, extra, slotted, in_spec,
                                         program.digest)
        try:
            runtime = self._runtime_for(flat_args, in_spec, extra, program.digest)
        except CaptureError as exc:  # no signature (a sparse argument): NOTE [Capture fallback] in fallback.py
            return eager_for_unkeyable_call(self, exc, args, kwargs, in_spec)
        except RefusedArgumentError as exc:  # NOTE [Refused arguments take the fallback] in fallback.py
            return refused_argument_call(self, exc, args, kwargs, in_spec)
        if (structure is not None and not attributes and len(flat_args) == len(flat_if_simple)
                and all(a is b for a, b in zip(flat_args, flat_if_simple)) and HotSignature.eligible(flat_args)
                and not getattr(runtime, "single_use", False)):  # NOTE [State changed by a capture]
            hot_signatures.remember(structure, flat_args, getattr(runtime, "dynamic_spec", False), runtime)
        elif calls is not None and not user_arguments_carry_attributes(flat_args, self.num_state):
            calls.remember(call_key(extra, args, kwargs), in_spec, flat_args, runtime, self.num_state, self.services)
        run_call = getattr(runtime, "run_call", None)  # a fallback: the caller's own containers (NOTE [Argument
        if run_call is not None:  # containers changed in place] in refusals.py)
            return run_call(args, kwargs)
        return runtime(*flat_args)

    def _call_with_slots(self, structure: Any, flat_if_simple: Sequence[Any], args: tuple, kwargs: dict, extra: Any,
                         slotted: tuple, in_spec: Any, program: str) -> Any:
        """A call with ``torch.Generator`` arguments: its graph takes this function's slots in their place, and
        runs at the callers' generators' states (NOTE [Generator arguments] in generator_args.py)."""
        flat_args, swapped = slotted
        traces = self.num_compiles
        try:
            runtime = self._runtime_for(flat_args, in_spec, extra, program)
        except CaptureError as exc:  # as in call_structured: the caller's own generators
            return eager_for_unkeyable_call(self, exc, args, kwargs, in_spec)
        except RefusedArgumentError as exc:
            return refused_argument_call(self, exc, args, kwargs, in_spec)
        run_call = getattr(runtime, "run_call", None)  # a fallback runs the Python: the caller's own generators
        if run_call is not None:
            return run_call(args, kwargs)
        slots = self._generator_slots
        if slots.draws_elsewhere(runtime, swapped) or (  # slots off from now on: keyed by identity
                self.num_compiles != traces and slots.kept_by_module(getattr(self, "fingerprint_module", None),
                                                                     swapped)):
            log_once(logging.INFO, f"generator-slots:{id(self)}",
                     "aotcache: %s draws from a generator it is passed another way too, or keeps it; such "
                     "generators are part of its graphs' signature (one graph per generator)", self.name)
            return self.call_structured(structure, flat_if_simple, args, kwargs, extra)
        return self._generator_slots.run(lambda: runtime(*flat_args), swapped)

    def _watch(self, extra: Any) -> tuple[WatchedProgram, HotSignatures]:
        """Walk the program again (first call, or a program guard failed) and select its hot signatures."""
        with self._lock:
            module = getattr(self, "fingerprint_module", None)
            program = self.services.watch_program(self.fn if module is None else module, module)
            self.num_program_walks += 1
            if program.untrusted is not None:
                log_once(logging.DEBUG, f"program-guards:{id(self)}:{program.untrusted}",
                         "aotcache: %s: in-process guards cannot see inside part of the program (%s); it is "
                         "guarded by identity there", self.name, program.untrusted)
            if len(self._hot_by_digest) >= 64:
                self._hot_by_digest.clear()
            hot_signatures = self._hot_by_digest.setdefault(program.digest, HotSignatures())
            if len(self._calls_by_digest) >= 64:
                self._calls_by_digest.clear()
            self._calls_by_digest.setdefault(program.digest, CallSignatures())
            if len(self._programs) >= 64:
                self._programs.clear()
            watched = self._programs[extra] = (program, hot_signatures)
            self._hot = hot_signatures
        return watched

    def _runtime_for(self, flat_args: list, in_spec: Any, extra: Any = None, program: str = "") -> CompiledRuntime:
        """The runtime of this signature and program digest: reused, or traced and compiled now (once, under the
        lock)."""
        # NOTE [One context per call]
        # Under automatic dynamic shapes a call builds two signatures: the rank signature that keys its first
        # sizes, and the signature that selects its runtime. Both hold the same grad mode, autocast state,
        # numerics flags and map of which arguments share memory (about a third of their cost); they are read
        # once here (a KV-cache decoding step passes 30-60 tensors, and pays this at every generated token).
        context = call_context(flat_args)  # raises CaptureError for an unsupported layout (sparse), naming it
        options = self._resolve_dynamic(flat_args, in_spec, extra, context)
        try:
            with caller_retries():  # NOTE [Float inputs for Inductor]: handled below
                return self._runtime_with(flat_args, in_spec, extra, program, options, context)
        except (CacheFault, RecompileLimitReached):
            raise  # strict mode's cache fault or recompile limit is not a failure of dynamic shapes
        except FloatInputsUnsupported as exc:  # NOTE [Float inputs for Inductor]: floats become constants again
            if self._dims.drop_float_symbols(exc, self.name):
                return self._runtime_for(flat_args, in_spec, extra, program)
            # NOTE [Floats made from sizes]: no float argument to make a constant (a float computed from symbolic
            # sizes and saved for the backward: cross_entropy's label smoothing divides by the class count). Found
            # (session-11 review): the error reached the user where eager runs. The compiler chain now falls back
            # for that graph as for any compiler failure (counted, logged once; strict mode raises).
            return self._runtime_with(flat_args, in_spec, extra, program, options, context)
        except ScalarTypeChecked as exc:  # NOTE [Type checks on scalar symbols]: that kind becomes constants
            if not self._dims.drop_scalar_symbols(exc, self.name):
                raise
            return self._runtime_for(flat_args, in_spec, extra, program)
        except Exception as exc:  # noqa: BLE001 - only an automatic dynamic compile is retried, then re-raised
            if not self._dims.automatic(options.dynamic):
                raise
            failure = exc
        # NOTE [Dynamic dimensions]: the same call compiled statically decides. If it fails too, the error is the
        # call's own (BatchNorm's "Expected more than 1 value per channel" for a last batch of one, a wrong
        # shape): raised as eager raises it, and automatic dynamic shapes stay on for the next sizes
        retry = self._dims.retry_spec(options.dynamic)  # static; dynamic=True: with static buffers
        runtime = self._runtime_with(flat_args, in_spec, extra, program, self._dims.options_for(self.options, retry),
                                     context)
        if not getattr(runtime, "trace_failed", False):  # NOTE [Captures that fail where eager may run]: the
            self._dims.abandon(options.dynamic, failure, self.name)  # call's own error, if eager raises it too
        return runtime

    def _runtime_with(self, flat_args: list, in_spec: Any, extra: Any, program: str,
                      options: AOTOptions, context: tuple | None = None) -> CompiledRuntime:
        key = (extra, program, signature_of(flat_args, in_spec, options.dynamic, context))
        runtime = self._lookup(key, flat_args)
        if runtime is None:
            with self._lock:
                runtime = self._lookup(key, flat_args)
                if runtime is None:  # NOTE [Fallbacks outlive program changes]; past _SINGLE_USE_LIMIT, any settings
                    runtime = self._fallbacks.get((extra, key[2])) or self._fallbacks.get((_ANY_SETTINGS, key[2]))
                    if runtime is not None:
                        self._entries.setdefault(key, []).append(runtime)
                if runtime is None:
                    if self._entries:  # NOTE [Events at INFO]: a re-trace, with what changed
                        self._last_change = describe_new_signature(list(self._entries), key)
                        if not self.traces.spent(getattr(self, "fingerprint_module", None)):  # (else no trace:
                            event(logging.INFO, "aotcache: re-tracing %s: %s", self.name, self._last_change)  # eager)
                    past_limit = self.traces.exhausted(self.name, getattr(self, "fingerprint_module", None))
                    if past_limit is not None:  # NOTE [Recompile limit]: no lookup either
                        return eager_past_recompile_limit(self, in_spec, past_limit, self._last_change)
                    stale = self._key_is_stale(extra, program)  # NOTE [A key read before another thread's change]
                    # NOTE [State changed by a capture]: each run of the Python starts from the call's state
                    saved = self._saved_state = self._save_call_state(extra)
                    try:
                        with compile_progress(self.name):  # NOTE [Compile progress]
                            runtime = compile_or_fall_back(self, flat_args, in_spec, options)  # NOTE [Capture fallback]
                    except SwapBusy as exc:  # NOTE [A swap waits a bounded time]: eager for this call only
                        return eager_for_busy_swap(self, in_spec, exc)
                    except RecompileLimitReached as exc:  # NOTE [Recompile limit]: eager for this call only
                        return eager_past_recompile_limit(self, in_spec, exc, self._last_change)
                    finally:
                        self._saved_state = None
                    # NOTE [Values an lru_cache holds] in autograd_cache/lru_cache_values.py
                    self._refresh_caches(extra)
                    runtime.dynamic_spec = options.dynamic  # type: ignore[attr-defined]  # the hot path's geometry
                    if isinstance(runtime, CompiledRuntime) and runtime.joint is None and \
                            runtime.joint_factory is None and not runtime.metadata.is_inference:
                        runtime.joint_factory = self._joint_factory(runtime, flat_args, in_spec, options)
                    # NOTE [Storage offsets are not part of the signature]
                    runtime.input_offsets = (input_offsets(flat_args, options.dynamic)  # type: ignore[attr-defined]
                                             if getattr(getattr(runtime, "metadata", None), "offsets_matter", True)
                                             else None)
                    if isinstance(runtime, (EagerRuntime, PartialRuntime)):
                        # NOTE [Fallbacks outlive program changes]
                        # A fallback runs the function's current Python (eagerly, or through Dynamo with its own
                        # guards), so it stays right when the program digest changes. A function closing over
                        # tensors that change every step (a model whose parameters the optimizer updates, a
                        # training step with backward inside) had its program guards fail at every call, and
                        # tried the capture again each time before falling back (one trace per step).
                        if len(self._fallbacks) >= 64:
                            self._fallbacks.clear()
                        # NOTE [Refusals that hold for any settings]
                        # A refusal of what the code does (it keeps a tensor it computed on the module: NOTE
                        # [Tensors stored on modules]) holds whatever the module's settings. Its own attribute
                        # changes the settings at every call, so a fallback kept under the call's settings was
                        # never found again, and every call tried the capture once more before falling back.
                        settings = _ANY_SETTINGS if getattr(runtime, "any_settings", False) else extra
                        self._fallbacks[(settings, key[2])] = runtime
                    elif stale:  # traced from the state as it is now, which this call's key does not name
                        runtime.single_use = True  # type: ignore[attr-defined]
                        return runtime
                    elif self._changed_by_call(saved, extra):  # NOTE [State changed by a capture]: this call only
                        runtime.single_use = True  # type: ignore[attr-defined]
                        self.num_single_use += 1
                        if self.num_single_use == _SINGLE_USE_WARNING:
                            log_once(logging.WARNING, f"single-use:{id(self)}",
                                     "aotcache: %s changed Python state it reads in each of its last %d compiled "
                                     "calls (a counter or a flag in forward?); a graph runs no Python, so each such "
                                     "call is traced again to keep eager's results and state (NOTE [State changed "
                                     "by a capture]). Keep that state outside the compiled function to reuse "
                                     "its graph.", self.name, _SINGLE_USE_WARNING)
                        self._single_use_streak += 1
                        if self._single_use_streak >= _SINGLE_USE_LIMIT:
                            eager = eager_after_state_changes(self, in_spec, _SINGLE_USE_LIMIT)
                            if eager is not None:  # the next calls of this signature run the Python as written,
                                self._fallbacks[(_ANY_SETTINGS, key[2])] = eager  # whatever the settings it changes
                        return runtime
                    self._single_use_streak = 0  # a graph to keep: the state changes only now and then
                    self._entries.setdefault(key, []).append(runtime)
        return runtime

    def _joint_factory(self, runtime: CompiledRuntime, flat_args: list, in_spec: Any,
                       options: AOTOptions) -> Callable[[Sequence[Any]], None]:
        """For a training runtime without a joint graph (loaded by a fingerprint warm start: no capture here): a
        capture of the call again at its first double backward, on that call's graph inputs (NOTE [Double
        backward through the joint graph] in double_backward.py). Keeps the call's constants, not its tensors."""
        template = [None if is_graph_input(arg) else arg for arg in flat_args]
        positions = list(runtime.metadata.graph_input_positions)
        fn = self.fn

        def make_joint(graph_args: Sequence[Any]) -> None:
            flat = list(template)
            for position, value in zip(positions, graph_args):
                flat[position] = value
            # a call whose state change a warm start replayed: each run of the Python starts from the call's
            # state, and the state is left as found (NOTE [Replaying a call's state change] in the cache)
            before_call = getattr(runtime, "before_call_state", None)

            def flat_fn(*values: Any) -> Any:
                if reset is not None:
                    reset()
                call_args, call_kwargs = unflatten_arguments(values, in_spec)
                return fn(*call_args, **call_kwargs)

            try:  # (an RNN's weight list: NOTE [Caches a module rebuilds from its weights])
                with torch.enable_grad(), (before_call() if before_call is not None
                                           else contextlib.nullcontext()) as reset, \
                        rebuilt_caches_kept(self._program_modules()):
                    captured = capture(flat_fn, flat, decompositions=options.decomposition_table(),
                                       dynamic=options.dynamic, trace_joint=True)
            except Exception as exc:  # noqa: BLE001 - no joint graph: the double backward raises its own error
                logger.debug("aotcache: %s: no joint graph for a double backward (%s)", self.name, exc)
                return
            keep_joint_for_double_backward(runtime, captured)

        return make_joint

    def _program_modules(self) -> list:
        """The modules the watched programs of this function reach, whose rebuilt caches a run of its Python
        outside ``_compile`` leaves as found (NOTE [Caches a module rebuilds from its weights])."""
        found = []
        for watched, _ in list(self._programs.values()):
            saved = getattr(watched, "saved_state", None)
            reached = getattr(saved(), "modules", None) if saved is not None else None
            found.extend(reached() if reached is not None else ())
        return found

    # NOTE [A key read before another thread's change]
    # A call reads its key (an aot_module's settings id, the program digest) before it takes the compile lock. A
    # call of another thread may change the state in between (its first call sets ``self.mode``); this call then
    # traces from the changed state, right for this call, but its key names the state before: kept under it, the
    # graph served a later call from that state, which skipped the change and took the other branch (found while
    # reviewing the replay of state changes). So under the lock the key is checked against the state as it is;
    # a stale one keeps the graph for this call only.
    def _key_is_stale(self, extra: Any, program: str) -> bool:
        """Whether the module's settings or the program changed since this call read ``extra`` and ``program``."""
        settings = getattr(self, "current_settings", None)
        if settings is not None and settings()[3] != extra:
            return True
        watched = self._programs.get(extra)
        return watched is not None and (watched[0].digest != program or not watched[0].holds())

    def _save_call_state(self, extra: Any) -> SavedCallState:
        """The state this call's Python may change, before its capture (NOTE [State changed by a capture])."""
        watched = self._programs.get(extra)
        return SavedCallState(getattr(self, "fingerprint_module", None), watched[0] if watched else None)

    def _refresh_caches(self, extra: Any) -> None:
        """The lru_caches the program calls, taken as the capture's runs of the function filled them."""
        watched = self._programs.get(extra)
        refresh = getattr(getattr(watched[0], "guards", None), "refresh_caches", None) if watched else None
        if refresh is not None:
            refresh(captured=True)  # NOTE [Cached values the capture made] in autograd_cache/program_guards.py

    def _changed_by_call(self, saved: SavedCallState, extra: Any) -> bool:
        """Whether the capture just made changed what selects this function's graphs: the module's settings, or
        the program (its guards fail and a new walk finds another digest)."""
        if saved.settings_changed():
            return True
        watched = self._programs.get(extra)
        if watched is None or watched[0].holds():
            return False
        module = getattr(self, "fingerprint_module", None)
        return self.services.watch_program(self.fn if module is None else module, module).digest != watched[0].digest

    def _resolve_dynamic(self, flat_args: list, in_spec: Any, extra: Any, context: tuple | None = None
                         ) -> AOTOptions:
        """The options of this call with ``dynamic`` resolved to a spec (NOTE [Dynamic dimensions])."""
        if self.options.dynamic is False:
            return self.options
        num_state, num_params = self.num_state, min(self.num_params, self.num_state)
        if not num_state and self.num_weight_args:  # NOTE [Weights named by num_params_buffers]
            num_state = num_params = min(self.num_weight_args, len(flat_args))
        if self.options.dynamic is None:
            rank_key = (extra, rank_signature_of(flat_args, in_spec, context))
        elif num_params < num_state:  # dynamic=True: only buffers are automatic (NOTE [Buffers that change size])
            rank_key = (extra, num_params, tuple((arg.dtype, arg.dim()) if isinstance(arg, torch.Tensor) else None
                                                 for arg in flat_args[num_params:num_state]))
        else:
            rank_key = None
        spec = self._dims.spec(flat_args, rank_key, num_state, self.name, num_params, self.buffer_names)
        return self._dims.options_for(self.options, spec)

    def _lookup(self, key: tuple, flat_args: list) -> CompiledRuntime | None:
        for runtime in self._entries.get(key, ()):
            offsets = getattr(runtime, "input_offsets", None)  # NOTE [Storage offsets are not part of the signature]
            if offsets is not None and not offsets_hold(offsets, flat_args):
                continue
            if runtime.metadata.guards is None or self._guards_hold(runtime, flat_args):
                return runtime
        return None

    def _guards_hold(self, runtime: CompiledRuntime, flat_args: list) -> bool:
        graph_args = [flat_args[pos] for pos in runtime.metadata.graph_input_positions]
        return self.services.guards_hold(runtime, graph_args)

    def _compile(self, flat_args: list, in_spec: Any, options: AOTOptions | None = None) -> CompiledRuntime:
        options = self.options if options is None else options
        saved = self._saved_state
        runs = 0

        def flat_fn(*flat: Any) -> Any:
            nonlocal runs
            if saved is not None:  # NOTE [Iterators a program advances] in autograd_cache/reachable.py
                saved.refuse_advancing_iterators()
            if runs and saved is not None:  # NOTE [State changed by a capture]
                saved.restore()
            runs += 1
            carry_tensor_attributes(flat, flat_args, self.num_state)  # NOTE [Python attributes of tensor arguments]
            call_args, call_kwargs = unflatten_arguments(flat, in_spec)  # NOTE [Keyed pytree nodes in their own key
            # order]
            containers = argument_containers((call_args, call_kwargs))
            attribute_state = tensor_attribute_state(flat, flat_args)
            result = self.fn(*call_args, **call_kwargs)
            refuse_changed_argument_containers(containers)  # NOTE [Argument containers changed in place]
            refuse_tensor_attribute_changes(attribute_state, result)  # NOTE [Python attributes a function sets
            # on tensors]
            if saved is not None:  # NOTE [Tensors stored in program state]
                saved.refuse_trace_tensors()
            return result

        self.num_compiles += 1
        try:
            return self.services.compile_call(self, flat_fn, flat_args, in_spec, options)
        except RecompileLimitReached:
            self.num_compiles -= 1  # nothing traced (NOTE [Recompile limit])
            raise
        except BaseException:
            if runs and saved is not None:  # the retry, the fallback or the error starts from the call's state
                try:
                    saved.restore()
                except CaptureError as exc:
                    logger.debug("aotcache: %s: %s", self.name, exc)
            raise


def _function_name(fn: Any) -> str:
    """A readable name for listings (``aotcache ls``); never part of a key."""
    fn = getattr(fn, "__wrapped__", fn)
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


# the export functions and the module wrapper live in their own modules; re-exported here as public API
from aotcache.aot.export import ExportSignature, aot_export_joint_simple, aot_export_module  # noqa: E402
from aotcache.aot.module import AOTModule  # noqa: E402
