"""The public AOT Autograd entry points, with the compiled-graph cache: ``aot_function``, ``aot_module``,
``aot_module_simplified`` (and the two exports, which need no cache).

This module sits above ``aot/`` (capture, partition, compile, run) and ``autograd_cache/`` (keys, entries,
fingerprints, program guards) and joins them through :class:`CachedCompileServices` (NOTE [Compile
services] in ``aot/services.py``); neither package imports it.

NOTE [Compiled-graph cache]
``aot_function`` / ``aot_module`` / ``aot_module_simplified`` take ``cache=True`` (default: the configured
tiers, see :func:`aotcache.autograd_cache.cache.default_cache`), ``False`` (off) or an
:class:`~aotcache.autograd_cache.cache.AOTAutogradCache`. With a cache, a new signature first computes its
call fingerprint (no tracing; a trusted one finds the entry through its alias record, NOTE [Warm start]);
otherwise it captures, the key is computed from the captured graph, and partition and compile are replaced
by a load when an entry exists (:mod:`aotcache.autograd_cache.pipeline`, docs/cache.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from aotcache.aot.api import AOTFunction
from aotcache.aot.compile_step import AOTOptions, checked_options, compile_function
from aotcache.aot.dynamo_graph import compile_dynamo_graph
from aotcache.aot.export import ExportSignature, aot_export_joint_simple, aot_export_module
from aotcache.aot.errors import CaptureError, is_trace_failure
from aotcache.aot.fallback import check_on_capture_error, eager_module_simplified, trace_failure_error
from aotcache.aot.module import AOTModule
from aotcache.aot.runtime import CompiledRuntime
from aotcache.aot.services import CompileServices

__all__ = ["CachedCompileServices", "SERVICES", "aot_function", "aot_module", "aot_module_simplified",
           "aot_export_module", "aot_export_joint_simple", "ExportSignature", "reset"]


class CachedCompileServices(CompileServices):
    """The :class:`~aotcache.aot.services.CompileServices` of the public entry points: program guards from the
    fingerprint's walker, the restricted guard evaluator, and compiles through the fingerprint and the cache.

    Stateless apart from a lazily made ShapeEnv, so one instance (:data:`SERVICES`) serves every function.
    """

    def __init__(self) -> None:
        self._guard_env: Any = None

    def __reduce__(self) -> Any:  # in a pickled wrapper: a fresh instance (the ShapeEnv is made again on use)
        return (type(self), ())

    def watch_program(self, target: Callable, module: Any) -> Any:
        from aotcache.autograd_cache.program_guards import watch_program

        return watch_program(target, module)

    def guards_hold(self, runtime: CompiledRuntime, graph_args: Sequence[Any]) -> bool:
        # NOTE [Guards are never eval'ed when they may come from a store]: the restricted evaluator of
        # aotcache.autograd_cache.guards handles the guard expressions the ShapeEnv prints; only guards this
        # process produced itself fall back to torch's evaluator (which evals) if that grammar does not cover them.
        from aotcache.autograd_cache.guards import GuardExpressionError, evaluate_guards

        try:
            return evaluate_guards(runtime.metadata.guards, graph_args)
        except GuardExpressionError:
            if getattr(runtime, "from_cache", False):
                return False
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        if self._guard_env is None:
            self._guard_env = ShapeEnv()
        return bool(self._guard_env.evaluate_guards_expression(runtime.metadata.guards, list(graph_args)))

    def pinned_guards(self, runtime: CompiledRuntime, pinned: frozenset[int]) -> Callable[[Sequence[Any]], bool] | None:
        # NOTE [Guards left to check when inputs are pinned]: the conjuncts that read an input not pinned
        from aotcache.autograd_cache.guards import GuardExpressionError, compile_guards, residual_guards_expression

        try:
            residual = residual_guards_expression(runtime.metadata.guards, pinned)
            compiled = compile_guards(residual) if residual else None
        except GuardExpressionError:
            return None  # outside the restricted grammar: guards_hold decides, as on the full path

        def check(graph_args: Sequence[Any]) -> bool:
            if compiled is None:
                return True
            try:
                return compiled(graph_args)
            except GuardExpressionError:  # inputs the expression does not fit: the full check decides
                return self.guards_hold(runtime, graph_args)

        return check

    def compile_call(self, function: AOTFunction, flat_fn: Callable, flat_args: list, in_spec: Any,
                     options: AOTOptions) -> CompiledRuntime:
        from aotcache.autograd_cache.cache import resolve_cache

        cache = resolve_cache(function.cache)
        if cache is None:
            function.begin_trace()  # NOTE [Recompile limit]: a trace, not a load
            return compile_function(flat_fn, flat_args, options)
        from aotcache.autograd_cache.fingerprint_cache import compile_with_fingerprint, fingerprint_of
        from aotcache.autograd_cache.pipeline import compile_function_cached

        # NOTE [Warm start]: a trusted call fingerprint finds the entry without capturing (fingerprint_cache)
        fingerprint = fingerprint_of(function, flat_args, in_spec, options)

        def full_path(target_cache: Any, on_key: Callable | None = None) -> CompiledRuntime:
            self.before_capture(function, target_cache, fingerprint)
            function.begin_trace()  # NOTE [Recompile limit]: no entry loaded through the fingerprint
            return compile_function_cached(target_cache, flat_fn, flat_args, options, name=function.name,
                                           memo=function.key_memo, on_key=on_key)

        # NOTE [Replaying a call's state change] (autograd_cache/state_delta.py): a static module call only
        replay_root = getattr(function, "fingerprint_module", None) if not options.dynamic else None
        return compile_with_fingerprint(cache, fingerprint, flat_args, full_path,
                                        lambda: fingerprint_of(function, flat_args, in_spec, options), replay_root)

    def before_capture(self, function: AOTFunction, cache: Any, fingerprint: Any) -> None:
        """Called when a call of ``function`` must be captured (no entry found through ``fingerprint``)."""

    def compile_graph(self, cache: Any, gm: nn.Module, example_inputs: Sequence[Any], flat_fn: Callable,
                      flat_example: Sequence[Any], options: AOTOptions,
                      lifted_attributes: Sequence[str], *,
                      captured_check: Callable | None = None) -> CompiledRuntime:
        from aotcache.autograd_cache.cache import resolve_cache

        resolved = resolve_cache(cache)
        if resolved is None:
            return compile_function(flat_fn, flat_example, options, captured_check=captured_check)
        from aotcache.autograd_cache.pipeline import compile_graph_module_cached

        return compile_graph_module_cached(resolved, gm, example_inputs, flat_fn, flat_example, options,
                                           lifted_attributes=lifted_attributes, captured_check=captured_check)


SERVICES = CachedCompileServices()


def reset() -> None:
    """Make every compiled function of this process (``aot_function``, ``aot_module``, ``aotcache.compile``)
    forget its in-process graphs and start its recompile limit over, as ``torch.compiler.reset()`` does for
    torch.compile; the store is untouched, so the next calls load their entries (NOTE [Resetting compiled
    functions] in ``aot/recompile_limit.py``)."""
    from aotcache.aot.recompile_limit import reset_all

    reset_all()


def aot_function(fn: Callable, fw_compiler: Callable | str | None = None, bw_compiler: Callable | str | None = None,
                 partition_fn: Callable | str | None = None, decompositions: Mapping | None = None,
                 num_params_buffers: int = 0, keep_inference_input_mutations: bool = False,
                 inference_compiler: Callable | str | None = None, *, dynamic: bool | None = None,
                 cache: Any = True, on_capture_error: str = "fallback", enable_log: bool = True,
                 disable_functionalization: bool = False, _disable_torch_fn_metadata_mode: bool = False) -> AOTFunction:
    """Compile ``fn`` ahead of time with AOT Autograd: forward and backward are traced as ATen graphs.

    ``fw_compiler``/``bw_compiler``/``inference_compiler`` are ``compiler(gm, example_inputs)`` callables or
    compiler names (default: the nop compiler; backward and inference default to the forward compiler);
    ``partition_fn`` splits the joint graph (default: ``aotcache.aot.partition.default_partition``; also
    ``"default"`` / ``"min_cut"``); ``decompositions`` is an op -> function table (default: the compiler's).
    ``dynamic=True`` traces with symbolic sizes and reuses the graph across sizes that satisfy its guards;
    ``None`` (default) is automatic: static first, a dimension that changes size becomes dynamic at the next
    compile; ``False`` compiles once per shape (NOTE [Dynamic dimensions]). ``cache``: True (the configured
    compiled-graph cache), False (off) or an ``AOTAutogradCache`` (see NOTE [Compiled-graph cache]).
    ``on_capture_error``: ``"fallback"`` (default) runs a call signature that cannot be captured through
    torch.compile's graph breaks, or eagerly; ``"eager"`` runs it eagerly; ``"raise"`` raises its
    ``CaptureError`` (as does ``AOTCACHE_STRICT=1``); see NOTE [Capture fallback] in ``aotcache/aot/fallback.py``.

    The argument order is that of PyTorch's ``aot_function``, so code written for it runs unchanged;
    ``num_params_buffers`` leading flat arguments (weights) keep static sizes as in PyTorch (NOTE [Weights named
    by num_params_buffers]); ``keep_inference_input_mutations``, ``enable_log``, ``disable_functionalization``
    and the private ``_disable_torch_fn_metadata_mode`` are accepted for that reason (NOTE [PyTorch-compatible
    arguments]).
    """
    options = checked_options("aot_function", fw_compiler=fw_compiler, bw_compiler=bw_compiler,
                              partition_fn=partition_fn, decompositions=decompositions,
                              inference_compiler=inference_compiler, dynamic=dynamic,
                              num_params_buffers=num_params_buffers,
                              keep_inference_input_mutations=keep_inference_input_mutations,
                              enable_log=enable_log, disable_functionalization=disable_functionalization)
    compiled = AOTFunction(fn, options, services=SERVICES, cache=cache, on_capture_error=on_capture_error)
    compiled.num_weight_args = num_params_buffers  # NOTE [Weights named by num_params_buffers]
    try:
        compiled.__wrapped__ = fn  # type: ignore[attr-defined]
        compiled.__doc__ = getattr(fn, "__doc__", None)
    except AttributeError:
        pass
    return compiled


def aot_module(mod: nn.Module, fw_compiler: Callable | str | None = None,
               bw_compiler: Callable | str | None = None, partition_fn: Callable | str | None = None,
               decompositions: Mapping | None = None, num_params_buffers: int = 0,
               keep_inference_input_mutations: bool = False, inference_compiler: Callable | str | None = None, *,
               dynamic: bool | None = None, cache: Any = True, on_capture_error: str = "fallback",
               enable_log: bool = True, disable_functionalization: bool = False,
               _disable_torch_fn_metadata_mode: bool = False) -> AOTModule:
    """Compile ``mod`` with AOT Autograd into a drop-in wrapper (:class:`~aotcache.aot.module.AOTModule`);
    same options (``cache``, ``on_capture_error``, PyTorch's keywords) as :func:`aot_function`."""
    if not isinstance(mod, nn.Module):
        raise TypeError(f"aotcache.aot_module expects an nn.Module, got {type(mod).__name__}; "
                        f"use aot_function for plain functions")
    options = checked_options("aot_module", fw_compiler=fw_compiler, bw_compiler=bw_compiler,
                              partition_fn=partition_fn, decompositions=decompositions,
                              inference_compiler=inference_compiler, dynamic=dynamic,
                              num_params_buffers=num_params_buffers,
                              keep_inference_input_mutations=keep_inference_input_mutations,
                              enable_log=enable_log, disable_functionalization=disable_functionalization)
    check_on_capture_error(on_capture_error, "aot_module")
    return AOTModule(mod, options, services=SERVICES, cache=cache, on_capture_error=on_capture_error)


def aot_module_simplified(mod: nn.Module, args: Sequence[Any], fw_compiler: Callable | str | None = None,
                          bw_compiler: Callable | str | None = None, partition_fn: Callable | str | None = None,
                          decompositions: Mapping | None = None, keep_inference_input_mutations: bool = False,
                          inference_compiler: Callable | str | None = None, compiler_config_extra: Any = None,
                          ignore_shape_env: bool = False, disable_functionalization: bool = False,
                          pre_grad_passes: Callable | None = None, compile_region_name: str | None = None, *,
                          dynamic: bool = False, cache: Any = True,
                          compiler_options: Mapping | None = None, cudagraphs: Any = None,
                          boxed_forward_device_index: Any = None, on_capture_error: str = "fallback") -> Callable:
    """The ``torch.compile`` backend form: compile Dynamo's graph ``mod`` now for its (possibly fake,
    symbolic) example inputs ``args`` and return ``run(*flat_args)``.

    Parameters and buffers still on ``mod`` are lifted to graph inputs and read at every call. Reuse across
    signatures is Dynamo's job (its guards), so exactly one graph is compiled. With ``cache`` (see NOTE
    [Compiled-graph cache]) the key is ``mod`` itself: on a hit nothing is captured or compiled.
    ``compiler_options`` are passed to compilers given by name (``options=``). The positional order is
    PyTorch's (NOTE [PyTorch-compatible arguments]): ``pre_grad_passes(mod, args) -> mod`` rewrites a
    GraphModule before anything is keyed or traced (as PyTorch runs it); ``compiler_config_extra``,
    ``ignore_shape_env``, ``disable_functionalization`` and ``compile_region_name`` are accepted and change nothing;
    so are torch 2.11's ``cudagraphs`` and ``boxed_forward_device_index`` (Inductor's CUDA-graph plumbing, gone by
    2.13; keyword-only here, as Dynamo's backends pass them). ``on_capture_error``: with ``"fallback"`` (default)
    or ``"eager"`` a module that cannot be captured runs as Python, counted and logged once (NOTE [Modules
    aot_module_simplified cannot capture] in ``aot/fallback.py``); ``"raise"`` raises the ``CaptureError``.
    """
    check_on_capture_error(on_capture_error, "aot_module_simplified")
    options = checked_options("aot_module_simplified", fw_compiler=fw_compiler, bw_compiler=bw_compiler,
                              partition_fn=partition_fn, decompositions=decompositions,
                              inference_compiler=inference_compiler, dynamic=dynamic,
                              keep_inference_input_mutations=keep_inference_input_mutations,
                              compiler_options=compiler_options, disable_functionalization=disable_functionalization)
    if not isinstance(ignore_shape_env, bool):
        raise TypeError(f"aotcache.aot_module_simplified: ignore_shape_env must be a bool, got {ignore_shape_env!r}")
    if compile_region_name is not None and not isinstance(compile_region_name, str):
        raise TypeError(f"aotcache.aot_module_simplified: compile_region_name must be a str or None, got "
                        f"{compile_region_name!r}")
    if pre_grad_passes is not None:
        if not callable(pre_grad_passes):
            raise TypeError(f"aotcache.aot_module_simplified: pre_grad_passes must be callable as "
                            f"pre_grad_passes(gm, example_inputs) -> gm, got {type(pre_grad_passes).__name__}")
        if isinstance(mod, torch.fx.GraphModule):
            mod = pre_grad_passes(mod, args)
    try:
        return compile_dynamo_graph(mod, args, options, services=SERVICES, cache=cache)
    except Exception as exc:  # NOTE [Modules aot_module_simplified cannot capture] in aot/fallback.py
        if on_capture_error == "raise" or not (isinstance(exc, CaptureError) or is_trace_failure(exc)):
            raise
        return eager_module_simplified(mod, exc if isinstance(exc, CaptureError) else trace_failure_error(exc))
