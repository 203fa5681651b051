"""``aotcache.compile``: one entry point shaped like ``torch.compile``, choosing the fastest way that works.

A call is captured whole by AOT Autograd (:func:`~aotcache.api.aot_module` / ``aot_function``: no
Dynamo, fingerprint warm starts that skip tracing) when it captures; when the capture fails (a graph break:
``.item()`` in a condition, data-dependent shapes, ...) the model goes to ``torch.compile(backend="aotcache")``
instead, whose graphs between the breaks are compiled and cached by aotcache too. The choice is recorded in
the store under the call's fingerprint (NOTE [Route records] in :mod:`aotcache.compile_route`), so a later
process takes the right way first, without a capture attempt.

This module sits above ``aotcache.api`` (and so above ``aot/`` and ``autograd_cache/``); none imports it. The
route is chosen inside the first call's compile (:class:`_RoutedServices`), with the fingerprint that compile
computes anyway: a warm start of a model without graph breaks costs what ``aot_module``'s does.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from aotcache import config
from aotcache.aot.api import AOTFunction
from aotcache.aot.compile_step import AOTOptions
from aotcache.aot.cache_objects import register_transformers_caches
from aotcache.aot.capture_threads import swap_gate
from aotcache.aot.dynamo_compile import stance_forces_eager
from aotcache.aot.dynamo_progress import DynamoProgress, dynamo_failed
from aotcache.aot.errors import CaptureError, RefusedArgumentError
from aotcache.aot.fallback import count_fallback, is_trace_failure, raised_by_region, trace_failure_error
from aotcache.aot.module_state import dynamo_safe_module
from aotcache.aot.module import AOTModule
from aotcache.aot.module_refusals import data_parallel_wrapper, refuse_data_parallel_wrappers
from aotcache.aot.signature import holds_order_free_argument
from aotcache.api import CachedCompileServices
from aotcache.compile_route import AOT, DYNAMO, EAGER, read_route, record_route
from aotcache.compilers.base import options_with_mode
from aotcache.logs import log_once, logger

__all__ = ["compile", "CompiledModule", "CompiledFunction", "CompiledMethod"]


def _check_options(compiler: Any, dynamic: Any, partition_fn: Any, fullgraph: Any, options: Any) -> None:
    if dynamic is not None and not isinstance(dynamic, bool):
        raise TypeError(f"aotcache.compile: dynamic must be True, False or None (automatic), got {dynamic!r}")
    if not isinstance(fullgraph, bool):
        raise TypeError(f"aotcache.compile: fullgraph must be a bool, got {fullgraph!r}")
    if isinstance(compiler, str):
        from aotcache.compilers.base import COMPILER_NAMES

        if compiler not in COMPILER_NAMES:
            raise ValueError(f"aotcache.compile: unknown compiler {compiler!r}; use one of "
                             f"{', '.join(COMPILER_NAMES)} or a callable compiler(gm, example_inputs)")
    elif compiler is not None and not callable(compiler):
        raise TypeError(f"aotcache.compile: compiler must be a name or a callable, got {type(compiler).__name__}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"aotcache.compile: options must be a dict of the named compiler's settings, "
                        f"got {type(options).__name__}")


class _RecordedRoute(Exception):
    """Raised inside the first call's compile when a route record sends the model to Dynamo or eager (no
    capture)."""

    def __init__(self, route: str, reason: str) -> None:
        super().__init__(reason)
        self.route = route
        self.reason = reason


class _RoutedServices(CachedCompileServices):
    """The cached compile services of one :class:`_Router`: before its AOT function captures a call, the route
    record of the call's fingerprint is read (NOTE [Route records]), and the fingerprint is kept for a record
    written if the capture fails. The call's fingerprint is computed once, by the compile itself."""

    def __init__(self) -> None:
        super().__init__()
        self.router: _Router | None = None

    def before_capture(self, function: AOTFunction, cache: Any, fingerprint: Any) -> None:
        router = self.router
        if router is None or function is not router.aot:  # e.g. the inner function of synthetic bases
            return
        digest = fingerprint.digest if fingerprint.trusted and cache.enabled else None
        router.capturing.digest = digest
        # fullgraph=True never follows a record: a capture that failed before must raise again, as it does on an
        # empty cache (an earlier run without fullgraph recorded the Dynamo way)
        if router.route is None and digest is not None and not router.fullgraph:
            recorded = read_route(cache, digest)
            if recorded is not None and recorded[0] in (DYNAMO, EAGER):
                cache.count(**{f"route_recorded_{recorded[0]}": 1})
                raise _RecordedRoute(*recorded)

    def ran_eagerly_for_busy_capture(self, function: AOTFunction) -> None:
        router = self.router
        if router is not None and function is router.aot:  # NOTE [Routes a busy capture leaves open]
            router.capturing.busy = True


class _Router:
    """The per-model choice between the AOT way and the Dynamo way (shared by module and function forms)."""

    def __init__(self, aot: AOTFunction, services: _RoutedServices, fullgraph: bool,
                 make_dynamo: Callable[[], Callable], module: nn.Module | None = None,
                 function: Callable | None = None) -> None:
        self.aot = aot
        self.module = module  # checked for data-parallel wrappers before the first call (NOTE [Wrappers refused up
        # front])
        self.function = function  # checked for an optimizer's or scheduler's own method (NOTE [Optimizer steps])
        self.fullgraph = fullgraph
        self.make_dynamo = make_dynamo
        self.route: str | None = None  # None until the first call decides
        self.reason = ""
        self.capturing = threading.local()  # .digest: the fingerprint of the call this thread last captured
        self._dynamo: Callable | None = None
        self.dynamo_progress = DynamoProgress()  # NOTE [Dynamo failures after part of the call ran]
        self._lock = threading.Lock()
        services.router = self

    def dynamo(self) -> Callable:
        if self._dynamo is None:
            with self._lock:
                if self._dynamo is None:
                    self._dynamo = self.make_dynamo()
        return self._dynamo

    def call(self, aot_call: Callable[[], Any], dynamo_call: Callable[[], Any], eager_call: Callable[[], Any],
             args: tuple = (), kwargs: dict | None = None) -> Any:
        """Run the call the chosen way; the first call (and a later capture failure) chooses. ``eager_call`` runs
        the call as written (the route "eager", NOTE [Captures that fail where eager may run]); ``args`` and
        ``kwargs`` are the call's, looked at only on the Dynamo way (NOTE [One call's set argument])."""
        if stance_forces_eager():  # NOTE [torch.compiler.set_stance]
            return eager_call()
        if torch._C._get_tracing_state() is not None:  # NOTE [Calls under torch.jit.trace] (aot/module.py)
            return eager_call()
        route = self.route
        if route == DYNAMO:
            return self._dynamo_way(args, kwargs, dynamo_call, eager_call)
        if route == EAGER:
            return eager_call()
        if route is None and self.module is not None and self._wrapper_refused():
            return self._dynamo_way(args, kwargs, dynamo_call, eager_call)
        if route is None and self.function is not None and self._optimizer_method_refused():
            return self._dynamo_way(args, kwargs, dynamo_call, eager_call)
        self.capturing.digest = None
        if route is None:  # (read only then: the warm call of the AOT way pays nothing)
            self.capturing.busy = False
        try:
            result = aot_call()
        except _RecordedRoute as recorded:
            self.aot.num_compiles -= 1  # the compile step stopped before tracing anything
            with self._lock:
                self.route, self.reason = recorded.route, recorded.reason
            logger.info("aotcache.compile: %s: %s as recorded (%s); no capture tried", self.aot.name,
                        "torch.compile(backend='aotcache')" if recorded.route == DYNAMO else "eager",
                        recorded.reason)
            return (self._dynamo_way(args, kwargs, dynamo_call, eager_call) if recorded.route == DYNAMO
                    else eager_call())
        except (CaptureError, RefusedArgumentError) as exc:  # NOTE [Arguments Dynamo guards]
            if self.fullgraph:
                raise
            if getattr(exc, "first_call_only", False):  # NOTE [Kernels that resize their arguments]
                log_once(logging.INFO, f"compile-first-call:{id(self)}",
                         "aotcache.compile: %s: this call runs eagerly (%s); the next call is captured",
                         self.aot.name, str(exc).removeprefix("aotcache: ").split("\n")[0])
                return eager_call()
            if isinstance(exc, RefusedArgumentError) and not exc.dynamo_safe:  # NOTE [One call's set argument]
                return self._eager_for_this_call(exc, eager_call)
            self._choose_dynamo(exc, self.capturing.digest)
            return self._dynamo_way(args, kwargs, dynamo_call, eager_call) if self.route == DYNAMO else eager_call()
        except Exception as exc:
            # NOTE [Captures that fail where eager may run] in aot/fallback.py: this call runs eagerly (an error is
            # then eager's own, nothing decided); if it runs, the later calls take the Dynamo way
            if self.fullgraph or not is_trace_failure(exc):
                raise
            result = eager_call()
            self._choose_dynamo(trace_failure_error(exc), self.capturing.digest)
            return result
        # NOTE [Routes a busy capture leaves open]
        # A first call that ran eagerly because another thread held the trace lock or the module (TraceBusy,
        # SwapBusy: ``eager:swap_busy``) captured nothing: the route stays undecided, so that the next call still
        # checks the up-front refusals and reads the route record before it captures. It was set to "aot" ("the
        # whole call captured") by that call. Nothing is recorded in the store either way.
        if route is None and not self.capturing.busy:
            self.route, self.reason = AOT, "the whole call captured"
            logger.info("aotcache.compile: %s: whole call captured by AOT Autograd", self.aot.name)
        return result

    # NOTE [Dynamo failing where eager runs]
    # The Dynamo way is torch.compile, whose own tracer fails on some code eager runs: writing a tensor's
    # ``__dict__`` (``x.__dict__["tag"] = 1``, ``y.__dict__.update(...)``) raised Dynamo's internal error
    # "'dict' object has no attribute 'node'" under torch 2.13, after the capture had refused the same code
    # (an attribute given to a tensor argument or to a returned tensor: NOTE [Python attributes a function sets on
    # tensors] in aot/refusals.py), so ``aotcache.compile`` failed where eager runs. A Dynamo error on the Dynamo
    # way (a ``TorchDynamoException``: Dynamo's own failure, or a user's error it wrapped) runs the call eagerly
    # where nothing of the call can have run yet (NOTE [Dynamo failures after part of the call ran] in
    # aot/dynamo_progress.py): if that runs, the route becomes "eager" for the later calls (counted
    # ``eager:dynamo_failed``, warned once); if it raises, that is eager's own error, raised as eager raises it, and
    # nothing is decided. Where part of the call may have run (a graph before a graph break wrote an input, Python
    # side effects were replayed, or an earlier call of this way compiled frames), Dynamo's error is raised as it
    # is, as torch.compile raises it: an eager rerun would apply those effects twice. Strict mode
    # (``AOTCACHE_STRICT=1``) and ``fullgraph=True`` raise a CaptureError naming both failures instead. The hot path
    # of the Dynamo way gains a ``try`` and one attribute read (and each region call one thread-local add).
    def _dynamo_or_eager(self, dynamo_call: Callable[[], Any], eager_call: Callable[[], Any]) -> Any:
        """The Dynamo way's call, or eager's where torch.compile fails before any of the call ran (NOTE [Dynamo
        failing where eager runs])."""
        progress = self.dynamo_progress
        mark = None if progress.settled else progress.mark()
        try:
            result = dynamo_call()
        except Exception as exc:
            # NOTE [Dynamo errors that are not TorchDynamoException] in aot/dynamo_progress.py
            if not dynamo_failed(exc) or raised_by_region(exc) is not None:
                raise  # the user's own error, or a region's capture error asked for (raise / strict)
            failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if self.fullgraph or config.get("strict"):
                asked = "fullgraph=True" if self.fullgraph else "strict mode (AOTCACHE_STRICT=1)"
                raise CaptureError(
                    f"aotcache.compile: {self.aot.name}: torch.compile could not run the call ({failure}) after the "
                    f"whole-call capture was refused ({self.reason or 'no capture tried'}); {asked} asks for this "
                    f"error instead of running the call eagerly", reason="dynamo_failed", dynamo_safe=False) from exc
            if mark is None or not progress.nothing_ran_since(mark):
                exc.add_note(f"aotcache.compile: {self.aot.name}: not rerun eagerly: part of the call may have run "
                             f"before torch.compile failed (NOTE [Dynamo failures after part of the call ran])")
                raise
        else:
            if mark is not None:
                progress.settled = True
            return result
        result = eager_call()  # eager's own error, if any, is raised as it is and decides nothing
        with self._lock:
            first = self.route != EAGER
            self.route, self.reason = EAGER, f"torch.compile failed: {failure}"
        if first:
            count_fallback("eager:dynamo_failed")
            log_once(logging.WARNING, f"compile-dynamo-failed:{id(self)}",
                     "aotcache.compile: %s: torch.compile could not run the call either (%s); it runs eagerly, "
                     "uncompiled, from now on", self.aot.name, failure)
        return result

    # NOTE [One call's set argument]
    # A call with a plain ``set`` or ``dict_keys`` argument runs eagerly (NOTE [Arguments Dynamo guards without their
    # order] in aot/signature.py: Dynamo would reuse a graph across iteration orders). The refusal is about the call's
    # values, not the program: choosing the route "eager" for it made every later call of the function run uncompiled
    # (and recorded that route for later processes), though a call without such an argument is captured as any other.
    # So such a call runs eagerly by itself (counted ``eager:refused_argument`` and logged once); the route stays as
    # it was, and nothing is recorded.
    #
    # On the Dynamo way (a route chosen for another reason: a graph break, a refused module, a recorded route) such
    # an argument reached torch.compile, whose graph for ``{0, 8}`` answered the same set filled in the other order
    # (a wrong value): there the call's arguments are looked at first (a tensor costs one type check).
    def _eager_for_this_call(self, exc: RefusedArgumentError | str, eager_call: Callable[[], Any]) -> Any:
        """Run one call eagerly, the route left as it is (NOTE [One call's set argument])."""
        if log_once(logging.WARNING, f"compile-set-argument:{id(self)}",
                    "aotcache.compile: %s: a call with this argument runs eagerly (%s); calls without one are "
                    "compiled", self.aot.name, str(exc).removeprefix("aotcache: ").split(". ")[0]):
            count_fallback("eager:refused_argument")
        return eager_call()

    def _dynamo_way(self, args: tuple, kwargs: dict | None, dynamo_call: Callable[[], Any],
                    eager_call: Callable[[], Any]) -> Any:
        """The Dynamo way's call, or eager's for a call with a set / dict_keys argument (NOTE [One call's set
        argument])."""
        if holds_order_free_argument(args, kwargs or {}):
            return self._eager_for_this_call("a set or dict_keys argument, whose order Dynamo does not guard",
                                             eager_call)
        return self._dynamo_or_eager(dynamo_call, eager_call)

    # NOTE [Arguments Dynamo guards]
    # An argument the AOT way cannot compare by value (an nn.Module, an optimizer: a train-step function
    # ``step(model, opt, x)``) is refused there, since a changed object would reuse a stale graph. Dynamo
    # guards such objects (identity and the attributes the code reads) and graph-breaks around the backward
    # and the optimizer step, so aotcache.compile takes such a call there, as it does a capture failure.
    def _choose_dynamo(self, exc: CaptureError | RefusedArgumentError, digest: str | None) -> None:
        reason = str(exc).removeprefix("aotcache: ").split("\n")[0]
        # NOTE [Constructs Dynamo gets wrong]: the refusal may name another construct than the one Dynamo gets wrong
        route = DYNAMO if getattr(exc, "dynamo_safe", True) and dynamo_safe_module(self.module) else EAGER
        with self._lock:
            self.route, self.reason = route, reason
        recorded = False
        if digest is not None:
            from aotcache.autograd_cache.cache import resolve_cache

            cache = resolve_cache(self.aot.cache)
            recorded = cache is not None and record_route(cache, digest, route, reason)
        instead = ("compiling it with torch.compile(backend='aotcache') instead, with graph breaks" if route == DYNAMO
                   else "it runs eagerly, uncompiled (torch.compile is known to give other results than eager for it)")
        log_once(logging.WARNING, f"compile-route:{id(self)}",
                 "aotcache.compile: %s cannot be captured whole (%s); %s%s. To get the faster AOT way, remove the "
                 "graph break; fullgraph=True makes it an error.", self.aot.name, reason, instead,
                 "; recorded, so later runs go there directly" if recorded else "")


    # NOTE [Wrappers refused up front]
    # A data-parallel wrapper (DDP(model): NOTE [Data-parallel wrappers] in aot/module_refusals.py) is refused for the
    # AOT way by what it is, not by what a capture finds. Found: aotcache.compile(DDP(model)) first computed the call
    # fingerprint, which cannot see inside DDP's C++ logger, and warned that the fingerprint "cannot be trusted"
    # (with advice about config objects that does not apply); then the capture was refused, and the route
    # warning said "with graph breaks ... remove the graph break", which does not apply either. So the module
    # tree is checked before the first call's fingerprint: one warning naming the wrapper and the fix, no
    # fingerprint, no capture attempt (fullgraph=True: the refusal is raised).
    def _wrapper_refused(self) -> bool:
        """True (route set to Dynamo, warned once) when the module tree holds a data-parallel wrapper."""
        found = data_parallel_wrapper(self.module)  # type: ignore[arg-type]
        if found is None:
            return False
        if self.fullgraph:
            refuse_data_parallel_wrappers(self.module)  # type: ignore[arg-type]
        name, kind = found
        with self._lock:
            self.route, self.reason = DYNAMO, f"{name} is a {kind}"
        log_once(logging.WARNING, f"compile-route:{id(self)}",
                 "aotcache.compile: %s is a %s, whose forward runs Python at every call (buffer broadcast, gradient "
                 "all-reduce setup) that a captured graph would run only once; compiling it with "
                 "torch.compile(backend='aotcache'), which runs that Python at every call. For the faster AOT way "
                 "(no Dynamo, warm starts without tracing), wrap the other way round: %s(aotcache.compile(model)).",
                 name, kind, kind)
        return True


    # NOTE [Optimizer steps]
    # ``aotcache.compile(opt.step)`` (or a scheduler's ``step``): the AOT way always refuses it (it writes the
    # parameters and its state in place, tensors that are not its arguments), but only after the capture ran the
    # step's Python on trace tensors, and the optimizer's lazily created state (``state[p]["step"]``,
    # ``exp_avg``...) stayed behind holding them: the optimizer is an opaque object, outside what a capture puts
    # back (NOTE [State changed by a capture] in aot/call_state.py). The Dynamo way then failed on the first call
    # ("'NoneType' object has no attribute 'export'": a functional tensor in the state) where eager steps. So such
    # a method goes the Dynamo way by what it is, before any capture (no fingerprint, no route record), as
    # ``torch.compile(opt.step, backend="aotcache")`` would.
    def _optimizer_method_refused(self) -> bool:
        """True (route set to Dynamo, logged once) when the function is a method of an optimizer or LR scheduler."""
        import torch.optim.lr_scheduler

        owner = getattr(self.function, "__self__", None)
        kinds = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
                 torch.optim.lr_scheduler.ReduceLROnPlateau)
        # an LR scheduler replaces ``opt.step`` by a plain function that calls it (marked ``_wrapped_by_lr_sched``)
        wrapped_by_scheduler = getattr(self.function, "_wrapped_by_lr_sched", False) is True
        if not isinstance(owner, kinds) and not wrapped_by_scheduler:
            return False
        name = (f"{type(owner).__name__}.{getattr(self.function, '__name__', 'step')}" if owner is not None
                else getattr(self.function, "__qualname__", "step"))
        if self.fullgraph:
            raise CaptureError(f"aotcache: {name} is a method of an optimizer or LR scheduler, which updates tensors "
                               "that are not its arguments in place and cannot be captured whole; compile it without "
                               "fullgraph=True (it then goes through torch.compile(backend='aotcache')), or with "
                               "torch.compile(..., backend='aotcache') directly.")
        with self._lock:
            self.route, self.reason = DYNAMO, f"{name} is an optimizer's or LR scheduler's method"
        log_once(logging.INFO, f"compile-route:{id(self)}",
                 "aotcache.compile: %s is an optimizer's or LR scheduler's method, which updates its state in place: "
                 "compiling it with torch.compile(backend='aotcache') (no whole-call capture)", name)
        return True


class CompiledModule(AOTModule):
    """What :func:`compile` returns for an ``nn.Module``: the drop-in :class:`~aotcache.aot.module.AOTModule`
    whose forward takes the route its :class:`_Router` chose (``route``: ``"aot"`` / ``"dynamo"`` / None)."""

    # own attributes as class defaults, so AOTModule.__setattr__ keeps them on the wrapper
    router: _Router | None = None
    _backend: Callable | None = None

    def __init__(self, module: nn.Module, options: AOTOptions, cache: Any, fullgraph: bool,
                 backend: Callable) -> None:
        # the router handles a failed capture itself (and records the route): NOTE [Route records]
        services = _RoutedServices()
        super().__init__(module, options, services=services, cache=cache, on_capture_error="raise")
        self.compiled.raise_at_recompile_limit = fullgraph  # NOTE [Recompile limit]: as torch.compile's fullgraph
        self._backend = backend
        self.router = _Router(self.compiled, services, fullgraph, lambda: _torch_compile(module, backend, options),
                              module)

    def _wrapper_arguments(self) -> dict[str, Any]:
        return {"options": self.compiled.options, "cache": self.compiled.cache, "fullgraph": self.router.fullgraph,
                "backend": self._backend}

    @property
    def route(self) -> str | None:
        """``"aot"`` (whole call captured), ``"dynamo"`` (graph breaks), ``"eager"`` (NOTE [Constructs Dynamo gets
        wrong]) or None (not called yet)."""
        return self.router.route

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        router = self.router
        return router.call(lambda: AOTModule.forward(self, *args, **kwargs),
                           lambda: self._dynamo_call(args, kwargs), lambda: self._eager_call(args, kwargs),
                           args, kwargs)

    def _dynamo_call(self, args: tuple, kwargs: dict) -> Any:
        """The Dynamo way's call, beside other threads' captures of the module (NOTE [The Dynamo way beside a
        capture])."""
        with swap_gate(self.orig_module).running():
            return self.router.dynamo()(*args, **kwargs)

    # NOTE [The Dynamo way beside a capture]
    # Dynamo reads the module's parameters and buffers at every call (its guards check their types; its graphs
    # take them as inputs), so its way is one of the eager runs of NOTE [Eager runs beside a capture]: while one
    # thread's first call went the Dynamo way after its capture was refused, another thread's first call of the
    # same model captured again (the refusal was not remembered yet) and swapped trace tensors into the module, and
    # the Dynamo call failed ("Guard failed on the same frame it was created ... expected type of
    # 'self._modules['l']._parameters['bias']' to be a tensor type"). The call holds the module's gate shared, as
    # the capture fallback's ``PartialRuntime`` does: a condition lock per call on the Dynamo way.

    def _eager_call(self, args: tuple, kwargs: dict) -> Any:
        """The wrapped module called as written (its hooks included), beside other threads' captures of it."""
        module = self.orig_module
        with swap_gate(module).running():  # NOTE [Eager runs beside a capture]
            return module(*args, **kwargs)


class CompiledFunction:
    """What :func:`compile` returns for a function: calls it the route its router chose (``route``)."""

    def __init__(self, fn: Callable, options: AOTOptions, cache: Any, fullgraph: bool, backend: Callable) -> None:
        self.fn = fn
        register_transformers_caches()  # NOTE [Cache objects as pytree nodes]: caches as arguments / outputs
        services = _RoutedServices()
        self.compiled = AOTFunction(fn, options, services=services, cache=cache,
                                    on_capture_error="raise")  # the router falls back
        self.compiled.raise_at_recompile_limit = fullgraph  # NOTE [Recompile limit]: as torch.compile's fullgraph
        self.router = _Router(self.compiled, services, fullgraph, lambda: _torch_compile(fn, backend, options),
                              function=fn)
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    @property
    def route(self) -> str | None:
        return self.router.route

    def fingerprint_program(self) -> Callable:
        """The function, as an enclosing capture runs it (NOTE [Compiled wrappers in a walked program])."""
        return self.fn

    # NOTE [Compiled functions as methods]
    # ``@aotcache.compile`` on a method in a class body (PyTorch's test_functions.py ``test_list_slice``) left a
    # class attribute that was no descriptor: ``obj.run(x)`` called the function without ``obj`` (TypeError where
    # eager and torch.compile, whose result is a plain function, run). Looked up on an instance, the wrapper binds
    # as a function does; the instance is then the call's first argument, as under torch.compile (an object the
    # AOT way refuses sends the call the Dynamo way; an nn.Module's parameters are read from it there).
    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else types.MethodType(self, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        router = self.router
        return router.call(lambda: self.compiled(*args, **kwargs), lambda: router.dynamo()(*args, **kwargs),
                           lambda: self.fn(*args, **kwargs), args, kwargs)


# NOTE [Bound methods of modules]
# ``model.forward = aotcache.compile(model.forward)`` (transformers' docs and integration tests compile so) handed
# the bound method to the function form, where the module's parameters are tensors the function closes over:
# graph constants. In grad mode no output could require grad, so the capture was refused (fullgraph=True raised
# where torch.compile works; otherwise every call went the Dynamo way); under no_grad each new set of weights was
# another graph (NOTE [Closed-over parameters in the key]). A bound method of an nn.Module is compiled as a module
# instead (:class:`_MethodModule`: its forward calls the method's function on the module), so its parameters and
# buffers are graph inputs read at every call, gradients reach them, and one graph serves every weight update.
# The result stays a plain callable (not an nn.Module): assigned to ``model.forward`` it registers no submodule.
class _MethodModule(nn.Module):
    """The module of a compiled bound method, whose forward is that method (NOTE [Bound methods of modules])."""

    def __init__(self, method: Any) -> None:
        super().__init__()
        self.owner = method.__self__
        self.method_function = method.__func__
        self.training = self.owner.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.method_function(self.owner, *args, **kwargs)


# builds a deep-copied CompiledMethod's module once (NOTE [Deep copies of compiled methods])
_COPY_BUILD_LOCK = threading.Lock()


class CompiledMethod:
    """What :func:`compile` returns for a bound method of an ``nn.Module`` (NOTE [Bound methods of modules]): a
    callable with the method's name, signature and ``route``, running the method compiled as a module's forward."""

    def __init__(self, method: Any, options: AOTOptions, cache: Any, fullgraph: bool, backend: Callable) -> None:
        self.method = method
        self._wrapper_arguments = (options, cache, fullgraph, backend)
        self._compiled_module: CompiledModule | None = self._build()
        functools.update_wrapper(self, method)  # type: ignore[arg-type]

    @property
    def compiled_module(self) -> CompiledModule:
        """The method compiled as its module's forward; a deep copy builds its own at first use (NOTE [Deep
        copies of compiled methods])."""
        compiled_module = self._compiled_module
        if compiled_module is None:
            with _COPY_BUILD_LOCK:
                if self._compiled_module is None:
                    self._compiled_module = self._build()
                compiled_module = self._compiled_module
        return compiled_module

    def __reduce__(self) -> tuple:
        """Refused with a message: pickling a model whose forward this is (``torch.save(model)``) failed with an
        AttributeError from inside the half-rebuilt model (torch.compile's compiled forward does not pickle either).

        :raises TypeError: always.
        """
        raise TypeError(f"aotcache.compile({self.method.__qualname__}) (a compiled bound method) cannot be pickled: "
                        f"save the model's state_dict(), or pickle the model before compiling its method")

    def _build(self) -> CompiledModule:
        """The method compiled as its module's forward, named as the method in messages and ``aotcache ls``."""
        compiled_module = CompiledModule(_MethodModule(self.method), *self._wrapper_arguments)
        compiled_module.compiled.name = self.method.__qualname__  # not "_MethodModule"; never part of a key
        return compiled_module

    # NOTE [Deep copies of compiled methods]
    # ``copy.deepcopy(model)`` after ``model.forward = aotcache.compile(model.forward)`` (an EMA or a frozen
    # reference model) reaches this wrapper while the model's copy is still being filled in: building the copy's
    # compiled module then read the copy's parameters before they existed (AttributeError where eager copies). As
    # Python deep-copies a bound method, the copy runs the method on the model's copy (its own weights); its
    # compiled module is built at its first call, with the same options and cache (its graphs are cache hits).
    def __copy__(self) -> CompiledMethod:
        """A shallow copy shares the method and its compiled module (as ``copy.copy`` of a bound method)."""
        clone = object.__new__(type(self))  # not the default: __reduce__ refuses
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> CompiledMethod:
        clone = copy.copy(self)
        clone.method = types.MethodType(self.method.__func__, copy.deepcopy(self.method.__self__, memo))
        clone.__wrapped__ = clone.method
        clone._compiled_module = None
        memo[id(self)] = clone
        return clone

    @property
    def route(self) -> str | None:
        return self.compiled_module.route

    @property
    def compiled(self) -> AOTFunction:
        """The AOT function of the method's module (as ``CompiledFunction.compiled``)."""
        return self.compiled_module.compiled

    def fingerprint_program(self) -> Callable:
        """The method, as an enclosing capture runs it (NOTE [Compiled wrappers in a walked program])."""
        return self.method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled_module(*args, **kwargs)


def _torch_compile(target: Callable, backend: Callable, options: AOTOptions) -> Callable:
    """``torch.compile(target, backend=<aotcache backend with these options>)`` (imports Dynamo: only here), with
    numpy's random numbers as eager draws them and guards on module hooks (``dynamo_as_eager``, aot/fallback.py);
    torch's own torch.compile, also where a program redirected it here (NOTE [A redirected torch.compile])."""
    from aotcache.aot.dynamo_compile import torch_compile
    from aotcache.aot.fallback import dynamo_as_eager

    compiled = torch_compile(target, backend=backend, dynamic=options.dynamic)
    if isinstance(compiled, nn.Module):  # NOTE [Global module hooks and the wrapper]: the OptimizedModule is ours
        compiled = compiled.forward  # Dynamo's entry into target's own call, without another round of global hooks
    return dynamo_as_eager(compiled)


# NOTE [torch.compile's backend names]
# Code written for torch.compile passes ``backend=``, often without choosing it: transformers' ``generate`` compiles
# the forward with ``torch.compile(model.__call__, **CompileConfig().to_dict())``, which always says
# ``backend="inductor"``. Refusing the keyword broke such code redirected to aotcache.compile, where torch.compile
# works. The names that have an aotcache counterpart choose that compiler; ``compiler=``, aotcache's own and more
# specific choice, wins when both are given. Others (a backend callable, "cudagraphs", "tvm", ...) are refused with
# a message naming ``compiler=``: aotcache cannot run another backend's compiler on its graphs.
_BACKEND_COMPILERS: dict[str, str | None] = {"inductor": "inductor", "aot_eager": "nop", "eager": "nop",
                                             "aotcache": None}


def _compiler_for_backend(backend: Any, compiler: str | Callable | None) -> str | Callable | None:
    """The compiler that torch.compile's ``backend`` name stands for, unless ``compiler`` is given (NOTE
    [torch.compile's backend names]).

    :raises TypeError: a backend aotcache has no counterpart for.
    """
    if not isinstance(backend, str) or backend not in _BACKEND_COMPILERS:
        raise TypeError(f"aotcache.compile: backend={backend!r} has no aotcache counterpart (accepted: "
                        f"{', '.join(repr(name) for name in _BACKEND_COMPILERS)}); choose the compiler with "
                        f"compiler='inductor', 'aoti' or 'nop', or use torch.compile(model, backend='aotcache')")
    return compiler if compiler is not None else _BACKEND_COMPILERS[backend]


def compile(model: Any = None, *, compiler: str | Callable | None = None, dynamic: bool | None = None,
            partition_fn: str | Callable = "default", cache: Any = True, fullgraph: bool = False,
            mode: str | None = None, options: Mapping[str, Any] | None = None, disable: bool = False,
            backend: Any = None) -> Any:
    """Compile ``model`` (an ``nn.Module`` or a function) with aotcache, as ``torch.compile`` would.

    The whole call is captured by AOT Autograd when it can be (the fastest warm start: no Dynamo, no trace);
    otherwise ``torch.compile(model, backend="aotcache")`` with graph breaks. The choice is recorded in the
    store (NOTE [Route records]) and visible as ``.route``. A module comes back as a drop-in wrapper
    (attributes, methods such as ``generate``, ``state_dict`` names: the module's own).

    ``compiler``: ``"nop"``, ``"inductor"``, ``"aoti"`` or a ``compiler(gm, example_inputs)`` callable (default:
    Inductor when a C++ compiler is on PATH, else nop); ``dynamic``: True, False or None (automatic);
    ``partition_fn``: ``"default"``, ``"min_cut"`` or a partition function; ``cache``: True (the configured
    tiers), False, or an ``AOTAutogradCache``; ``fullgraph=True``: a capture failure is an error instead of
    a fallback; ``mode``: torch.compile's mode names (``"max-autotune"``, ...), as Inductor settings (NOTE
    [torch.compile modes]); ``options``: settings of the named compiler (e.g. Inductor config, over the mode's);
    ``disable=True`` returns ``model`` unchanged. With ``model`` omitted, returns a decorator. ``backend``:
    torch.compile's names ``"inductor"``, ``"aot_eager"`` / ``"eager"`` (the nop compiler) and ``"aotcache"`` choose
    the compiler when ``compiler`` is not given (NOTE [torch.compile's backend names]); others are refused.

    :raises TypeError, ValueError: a bad option (the message names it and the accepted values).
    """
    if backend is not None:
        compiler = _compiler_for_backend(backend, compiler)
    _check_options(compiler, dynamic, partition_fn, fullgraph, options)
    if model is None:
        return functools.partial(compile, compiler=compiler, dynamic=dynamic, partition_fn=partition_fn,
                                 cache=cache, fullgraph=fullgraph, mode=mode, options=options, disable=disable)
    if disable:
        return model
    from aotcache.aot.partition import resolve_partition
    from aotcache.backend import aotcache_backend, default_compiler_name

    chosen = compiler if compiler is not None else default_compiler_name()
    compiler_options = options_with_mode(chosen, mode, options, "aotcache.compile")
    partition = resolve_partition("default" if partition_fn is None else partition_fn, "compile")
    aot_options = AOTOptions(fw_compiler=chosen, partition_fn=partition, dynamic=dynamic,  # type: ignore[arg-type]
                             compiler_options=compiler_options)
    backend = functools.partial(aotcache_backend, compiler=chosen, dynamic=dynamic, cache=cache,
                                partition=partition, compiler_options=compiler_options)
    if isinstance(model, nn.Module):
        return CompiledModule(model, aot_options, cache, fullgraph, backend)
    if isinstance(model, types.MethodType) and isinstance(model.__self__, nn.Module):
        return CompiledMethod(model, aot_options, cache, fullgraph, backend)
    if callable(model):
        return CompiledFunction(model, aot_options, cache, fullgraph, backend)
    raise TypeError(f"aotcache.compile expects an nn.Module or a function, got {type(model).__name__}")
