"""The cached compile pipelines: ``aot_function`` (key from the captured graph) and the Dynamo-graph form.

``compile_function_cached``: capture -> key -> load, or (single-flight) partition + compile + save.
``compile_graph_module_cached``: key from Dynamo's graph -> load, or capture + partition + compile + save;
on a hit nothing is captured.

NOTE [decompositions and the warm path]
With a compiler given by name (``"inductor"``, ``"aoti"``), its decomposition table is Inductor's, and
building it imports ``torch._inductor`` (over a second). The key therefore uses the graph captured *without*
decompositions plus the decomposition identity ``compiler:<name>`` (the table is fixed by the torch version,
which is in the key); only a miss captures again with the table and compiles. Two functions whose
undecomposed graphs are equal decompose equally, op by op. A user-given table (``decompositions=`` or a
custom compiler's ``decompositions()``) is used for the key capture directly and identified by a digest of
its operators and functions' code (computed once per ``aot_function``).

NOTE [what the aot_function key holds beyond the graph]
The runtime metadata of the capture (output structure, constant outputs, aliasing, mutations, which outputs
get gradients) is not all visible in the graph; it enters the key as the config part ``runtime_metadata``.
Compilers and partitioners that are not aotcache's named ones enter by code-and-state digest
(``callable_digest``: the closure of a compiler wrapper, the object it wraps, ``functools.partial``
arguments): a changed body or wrapped compiler is a miss, never a false hit. What cannot be written down
makes the key step raise ``BypassAOTAutogradCache("unhashable compiler: ...")``: compiled, not cached.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from aotcache.aot.compile_step import AOTOptions, compile_captured, compile_function, keep_joint_for_double_backward
from aotcache.aot.capture import capture
from aotcache.aot.capture_analysis import is_graph_input
from aotcache.aot.runtime import CompiledRuntime
from aotcache.autograd_cache.cache import AOTAutogradCache, CompileResult
from aotcache.autograd_cache.guards import (GuardExpressionError, dynamo_guards_expression, evaluate_guards,
                                            hinted_inputs, input_symbols, symbolic_inputs)
from aotcache.autograd_cache.key import CacheKey, callable_digest, compute_key
from aotcache.autograd_cache.safety import BypassAOTAutogradCache, qualified_name
from aotcache.logs import logger
from aotcache.progress import stage

__all__ = ["compile_function_cached", "compile_graph_module_cached", "compiler_identity", "partitioner_identity",
           "decomposition_identity"]

_COMPILER_MODULE_PREFIX = "aotcache.compilers."
_MAX_SUMMARY_OPS = 40


def _named_compiler(compiler: Any) -> str | None:
    """The name of one of aotcache's named compilers given as a name or as its function, else None."""
    from aotcache.compilers.base import COMPILER_NAMES

    if compiler is None:
        return "nop"
    if isinstance(compiler, str):
        if compiler not in COMPILER_NAMES:
            raise ValueError(f"unknown compiler {compiler!r}; choose one of {', '.join(COMPILER_NAMES)}")
        return compiler
    for name in COMPILER_NAMES:
        module = sys.modules.get(_COMPILER_MODULE_PREFIX + name)  # the function exists only if it was imported
        if module is not None and getattr(module, f"{name}_compiler", None) is compiler:
            return name
    return None


def compiler_identity(compiler: Any) -> str | dict[str, str]:
    """What a compiler contributes to the key: its name, or its qualified name and code-and-state digest.

    :raises BypassAOTAutogradCache: ``"unhashable compiler: ..."`` (its code or state cannot be written down).
    """
    name = _named_compiler(compiler)
    if name is not None:
        return name
    return {"callable": qualified_name(compiler), "code": callable_digest(compiler, "compiler")}


def partitioner_identity(partition_fn: Callable | None) -> str:
    """``default_partition`` / ``min_cut_rematerialization_partition`` by name, anything else by code digest.

    :raises BypassAOTAutogradCache: ``"unhashable partitioner: ..."``.
    """
    if partition_fn is None:
        return "default_partition"
    from aotcache.aot import partition

    for name in ("default_partition", "min_cut_rematerialization_partition"):
        if getattr(partition, name) is partition_fn:
            return name
    return f"custom:{getattr(partition_fn, '__qualname__', type(partition_fn).__qualname__)}:" \
           f"{callable_digest(partition_fn, 'partitioner')}"


def _table_identity(table: Mapping) -> str | BypassAOTAutogradCache:
    """``table:<digest>`` over operator names and their functions (one walk), or the bypass that says why not."""
    items = sorted(((str(op), fn) for op, fn in table.items()), key=lambda item: item[0])
    try:
        return "table:" + callable_digest(dict(items), "decompositions")
    except BypassAOTAutogradCache as bypass:
        return bypass


def decomposition_identity(options: AOTOptions,
                           memo: dict[str, Any]) -> tuple[str | BypassAOTAutogradCache, Mapping | None, bool]:
    """``(identity, table for the key capture, whether a miss must capture again with the full table)``.

    See NOTE [decompositions and the warm path]. A table whose functions cannot be written down has a
    :class:`BypassAOTAutogradCache` as its identity (never raised here: the caller may not be in its key
    step yet); ``compute_key`` raises it, so the call compiles uncached and the reason is counted.
    """
    if options.decompositions is not None:
        if "decompositions" not in memo:
            memo["decompositions"] = _table_identity(options.decompositions)
        return memo["decompositions"], options.decompositions, False
    name = _named_compiler(options.fw_compiler)
    if name is not None:
        return f"compiler:{name}", None, name != "nop"
    table = options.decomposition_table()  # a custom compiler's table (partials unwrapped), if it has one
    if not table:
        return "none", None, False
    if "decompositions" not in memo:
        memo["decompositions"] = _table_identity(table)
    return memo["decompositions"], table, False


def _compiler_parts(options: AOTOptions) -> tuple[str, dict[str, Any]]:
    forward = compiler_identity(options.fw_compiler)
    backward = compiler_identity(options.bw_compiler) if options.bw_compiler is not None else forward
    inference = compiler_identity(options.inference_compiler) if options.inference_compiler is not None else forward
    name = forward if isinstance(forward, str) else "custom"
    return name, {"forward": forward, "backward": backward, "inference": inference,
                  "options": dict(options.compiler_options or {})}


def _summary(key: CacheKey, *, name: str, source: str, kind: str, num_inputs: int, dynamic: bool) -> dict[str, Any]:
    detail = key.part("graph").detail or {}
    ops = sorted(dict(detail.get("ops", {})).items(), key=lambda item: (-item[1], item[0]))[:_MAX_SUMMARY_OPS]
    return {"name": name, "source": source, "kind": kind, "nodes": detail.get("nodes"), "ops": dict(ops),
            "inputs": num_inputs, "dynamic": dynamic}


def _entry_guards(captured: Any) -> str | None:
    """Guards over the graph inputs after compiling (compilers may add some), in the ShapeEnv's printing."""
    shape_env = getattr(captured.fake_mode, "shape_env", None)
    if shape_env is None or captured.metadata.guards is None:
        return None
    return shape_env.produce_guards_expression(captured.primals, ignore_static=False)


# NOTE [Closed-over parameters in the key]
# aot_function's captured graph takes every tensor it is given as a placeholder; a tensor it reads otherwise (a
# closure, a global, the parameters of a module it closes over: ``aotcache.compile(lambda x: model(x))``,
# ``aotcache.compile(model.forward)``) is a get_attr constant that the compiled artifact carries. The key took
# get_attr *parameters* for lifted runtime inputs (true of Dynamo's graphs only) and left their values out: the
# same function over a model with other weights (another checkpoint, another seed, a weight changed in place)
# found the first model's entry and computed with its weights, across processes and in-process after the program
# guards saw the change. Nothing is lifted here: every get_attr tensor is keyed by content.


def compile_function_cached(cache: AOTAutogradCache, flat_fn: Callable, flat_args: Sequence[Any],
                            options: AOTOptions, *, input_is_leaf: Sequence[bool] | None = None,
                            name: str = "function", memo: dict[str, Any] | None = None,
                            on_key: Callable[[CacheKey], None] | None = None) -> CompiledRuntime:
    """:func:`~aotcache.aot.compile_step.compile_function` through ``cache`` (see the module NOTEs).

    ``on_key(key)`` receives the full key once computed (see :meth:`AOTAutogradCache.load_or_compile`).

    :raises CaptureError: the function cannot be captured.
    """
    memo = {} if memo is None else memo
    if not cache.enabled:
        return compile_function(flat_fn, flat_args, options, input_is_leaf=input_is_leaf)
    decomposition_id, key_table, recapture = decomposition_identity(options, memo)
    with stage("capture"):
        key_capture = capture(flat_fn, flat_args, decompositions=key_table, dynamic=options.dynamic,
                              input_is_leaf=input_is_leaf)
    state: dict[str, Any] = {}

    def make_key() -> CacheKey:
        compiler_name, compiler_options = _compiler_parts(options)
        metadata = key_capture.metadata.to_json()
        metadata["guards"] = None
        key = compute_key(key_capture.graph, key_capture.joint_inputs, compiler_name=compiler_name,
                          partitioner_name=partitioner_identity(options.partition_fn),
                          decomposition_id=decomposition_id, compiler_options=compiler_options,
                          config_parts={"pipeline": "aot_function", "dynamic": bool(options.dynamic),
                                        "runtime_metadata": metadata},
                          lifted_attributes=())  # NOTE [Closed-over parameters in the key]
        state["key"] = key
        return key

    def compile_fn() -> CompileResult:
        captured = key_capture
        options.warm_up_compilers(flat_args)  # a miss: compiling starts now (NOTE [warming the compile workers])
        if recapture:
            with stage("decomposed capture"):
                captured = capture(flat_fn, flat_args, decompositions=options.decomposition_table(),
                                   dynamic=options.dynamic, input_is_leaf=input_is_leaf)
        runtime = compile_captured(captured, options)
        guards = _entry_guards(captured)
        runtime.metadata.guards = guards if guards is not None else runtime.metadata.guards
        kind = "inference" if runtime.metadata.is_inference else "training"
        summary = (_summary(state["key"], name=name, source="aot_function", kind=kind,
                            num_inputs=len(captured.primals), dynamic=bool(options.dynamic))
                   if "key" in state else {})
        return CompileResult(runtime, guards=runtime.metadata.guards, summary=summary)

    runtime = cache.load_or_compile(make_key, compile_fn, flat_args, on_key=on_key, name=name)
    if getattr(runtime, "joint", False) is None:  # a loaded entry: this call's capture gives it its joint graph
        keep_joint_for_double_backward(runtime, key_capture)  # (NOTE [Double backward through the joint graph])
    return runtime


def compile_graph_module_cached(cache: AOTAutogradCache, gm: torch.nn.Module, example_inputs: Sequence[Any],
                                flat_fn: Callable, flat_example: Sequence[Any], options: AOTOptions, *,
                                lifted_attributes: Sequence[str],
                                captured_check: Callable | None = None) -> CompiledRuntime:
    """The ``aot_module_simplified`` step through ``cache``: the key is ``gm`` (Dynamo's graph) and its
    example inputs; ``flat_example`` (lifted parameters and buffers, then the inputs) is what a miss compiles.
    Entries carry the shape guards their compile added and those it ran under (NOTE [Guards added while compiling
    a Dynamo graph], NOTE [Prior guards of a Dynamo entry]). ``captured_check`` runs after a miss's capture
    (:func:`~aotcache.aot.compile_step.compile_function`).
    """
    state: dict[str, Any] = {}
    shape_env = _shape_env_of(example_inputs)
    symbolic = _graph_inputs(gm, example_inputs) if shape_env is not None else None
    specialization = _specialize_on_compile(gm)
    hints = _hints_or_none(symbolic)

    def make_key() -> CacheKey:
        if not isinstance(gm, torch.fx.GraphModule):
            raise BypassAOTAutogradCache(f"not a GraphModule: {type(gm).__name__}")
        decomposition_id, _, _ = decomposition_identity(options, state)
        compiler_name, compiler_options = _compiler_parts(options)
        key = compute_key(gm, list(example_inputs), compiler_name=compiler_name,
                          partitioner_name=partitioner_identity(options.partition_fn),
                          decomposition_id=decomposition_id, compiler_options=compiler_options,
                          config_parts={"pipeline": "aot_module_simplified", "dynamic": bool(options.dynamic),
                                        "lifted": len(lifted_attributes)},
                          lifted_attributes=list(lifted_attributes))
        state["key"] = key
        return key

    def compile_fn() -> CompileResult:
        guards_before = len(shape_env.guards) if shape_env is not None else 0
        symbols = input_symbols(symbolic) if symbolic is not None else set()  # before specializations replace them
        runtime = compile_function(flat_fn, flat_example, options, captured_check=captured_check)
        runtime.metadata.guards = None  # Dynamo checks the frame's guards; the entry records its own (the NOTE)
        kind = "inference" if runtime.metadata.is_inference else "training"
        summary = (_summary(state["key"], name=type(gm).__qualname__, source="torch.compile", kind=kind,
                            num_inputs=len(flat_example), dynamic=bool(options.dynamic)) if "key" in state else {})
        guards, uncacheable = _dynamo_entry_guards(shape_env, guards_before, symbolic, symbols,
                                                   checkable=hints is not None)
        if specialization is not None:  # NOTE [Compiles for a specialize_on specialization]
            uncacheable = "compiled for a mark_dynamic(..., specialize_on=...) specialization"
        return CompileResult(runtime, guards=guards, summary=summary, uncacheable=uncacheable)

    runtime = cache.load_or_compile(make_key, compile_fn, None, guard_inputs=hints,
                                    name=type(gm).__qualname__)
    if getattr(runtime, "from_cache", False) and runtime.metadata.guards:
        if not _install_guards(runtime.metadata.guards, symbolic):
            cache.count_bypass("shape guards not installable")
            runtime = compile_fn().runtime
        else:
            runtime.metadata.guards = None
    if getattr(runtime, "joint", False) is None and not runtime.metadata.is_inference:
        # NOTE [Double backward through the joint graph]; NOTE [A loaded region keeps no tensor of the call that
        # loaded it]: the factory keeps the region's constants, never Dynamo's example tensors
        constants = [None if is_graph_input(value) else value for value in flat_example]
        runtime.joint_factory = functools.partial(_joint_captured_again, runtime, flat_fn, constants, options)
    return runtime


def _specialize_on_compile(gm: torch.nn.Module) -> Any:
    """NOTE [Compiles for a specialize_on specialization]
    For ``torch._dynamo.mark_dynamic(x, dim, specialize_on=[check, ...])`` Dynamo compiles its graph once for
    any size, then, at the first call whose size passes a ``check``, hands the same graph module to the backend
    again (``gm.meta["specialization"]`` set, the real tensors as example inputs) with its ShapeEnv patched to
    assume the check (``s0 == 8`` as a replacement, not a guard). Such a compile may bake the assumed size in,
    and the key (the graph and its symbolic inputs) and the entry's guards do not see the assumption: stored, it
    would be loaded for the general graph in a later process (a graph for size 8 run at size 5). So such a
    compile is never stored (a bypass counted with its reason); it may still load the general entry, which is
    valid for every size, as it did before. Dynamo keeps the specialized compile for its own process.
    """
    meta = getattr(gm, "meta", None)
    return meta.get("specialization") if isinstance(meta, dict) else None


def _joint_captured_again(runtime: CompiledRuntime, flat_fn: Callable, constants: list, options: AOTOptions,
                          graph_args: Sequence[Any] = ()) -> None:
    """Capture a loaded Dynamo region again, on the differentiated call's graph inputs and the region's constants,
    to give ``runtime`` its joint graph for a double backward.

    NOTE [A loaded region keeps no tensor of the call that loaded it]
    Dynamo hands the backend the first call's real tensors as example inputs (the user's input, the lifted
    parameters and buffers). A runtime loaded from the cache has no joint graph, and its factory for one lives
    as long as the runtime (Dynamo's cache entry); had it kept those tensors for the capture, every warm-loaded
    training region would keep its first call's batch and, after the module was deleted, its weights alive
    (``torch.compile``'s own backends and a cold compile keep neither). So the factory keeps the constants only,
    and captures on the graph inputs of the call whose backward is differentiated (saved on its autograd context,
    alive while that graph is), as ``aot_function``'s warm start does (``_joint_factory`` in ``aot/api.py``).
    """
    positions = list(runtime.metadata.graph_input_positions)
    if len(graph_args) != len(positions):  # no inputs saved for this call: the double backward raises its error
        return
    flat = list(constants)
    for position, value in zip(positions, graph_args):
        flat[position] = value
    try:
        with torch.enable_grad():
            captured = capture(flat_fn, flat, decompositions=options.decomposition_table(),
                               dynamic=options.dynamic, trace_joint=True)
    except Exception as exc:  # noqa: BLE001 - no joint graph: the double backward raises its own error
        logger.debug("aotcache: no joint graph for a double backward of a loaded region (%s)", exc)
        return
    keep_joint_for_double_backward(runtime, captured)


def _shape_env_of(example_inputs: Sequence[Any]) -> Any:
    """The ShapeEnv of Dynamo's symbolic example inputs, or None (static graph)."""
    from torch._guards import detect_fake_mode

    try:
        mode = detect_fake_mode(list(example_inputs))
    except AssertionError:
        return None
    return getattr(mode, "shape_env", None)


def _graph_inputs(gm: torch.nn.Module, example_inputs: Sequence[Any]) -> list[Any] | None:
    """The Dynamo graph's inputs as the key describes them (symbolic where Dynamo traced them so), or None."""
    if not isinstance(gm, torch.fx.GraphModule):
        return None
    try:
        return symbolic_inputs(gm, example_inputs)
    except ValueError:  # placeholders and inputs disagree: make_key bypasses such a graph
        return None


def _hints_or_none(symbolic: Sequence[Any] | None) -> list[Any] | None:
    """The graph inputs at their size hints, what stored guards are checked against; None: not checkable here."""
    if symbolic is None:
        return None
    try:
        return hinted_inputs(symbolic)
    except GuardExpressionError as exc:
        logger.debug("aotcache: the Dynamo graph's guards cannot be checked: %s", exc)
        return None


def _dynamo_entry_guards(shape_env: Any, guards_before: int, symbolic: Sequence[Any] | None,
                         symbols: set[Any], checkable: bool) -> tuple[str | None, str | None]:
    """NOTE [Guards added while compiling a Dynamo graph]
    Capturing or compiling a graph Dynamo traced with symbolic sizes can add guards to Dynamo's ShapeEnv,
    specializations among them (``Eq(s53, 12)``: Inductor lowering a transposed convolution). Dynamo installs
    them for this frame; the compiled code is valid only where they hold. The entry is stored under the
    symbolic graph's key with those guards written over input positions (``L['t3'].size()[0] == 12``, never
    the ShapeEnv's symbol names, which differ between frames and processes: ``dynamo_guards_expression``), and
    the key's slots hold one entry per guard set, as for ``aot_function`` (NOTE [slots] in cache.py). A
    lookup checks each entry's guards against the graph inputs' size hints (``hinted_inputs``: concrete values,
    so the check adds nothing to the ShapeEnv); an entry whose guards fail is never loaded (``guard_miss``:
    compiled and saved in the next slot). On a hit the same guards are added to Dynamo's ShapeEnv by
    evaluating the expression over the symbolic inputs (``_install_guards``), so Dynamo guards the frame
    exactly as after a fresh compile and a later call at other sizes recompiles instead of running code
    specialized to these. Guards that cannot be written by position (over a symbol no input holds, or outside
    the guard grammar) keep the old answer: the compile is used for the frame and not stored.

    NOTE [Prior guards of a Dynamo entry]
    Every entry with a symbolic input, guarded compile or not, also records the guards the ShapeEnv held before
    the compile over its inputs' symbols only (as torch's FX graph cache does), with what the ShapeEnv knows of
    those inputs (ranges, relations, strides): the compile may have relied on them and skipped a guard of its
    own (an Inductor-like compiler reading ``statically_known_*``), so an entry compiled under ``s0 >= 16``
    must not load for another frame of the same graph at 8. A guard over a symbol no input holds is left out:
    it constrains the frame, not this graph's code. What this keeps is what Dynamo derived from the frame's
    code over the same inputs; a frame producing the same graph typically derives the same guards, so warm
    starts load the one entry (measured: the backend's warm tests, a transformers model over several sequence
    lengths, docs/cache.md). Frames whose guards differ get one slot each, up to the key's slots.

    Returns ``(guard expression or None, bypass reason or None)``.
    """
    if shape_env is None or symbolic is None:
        added = shape_env is not None and len(shape_env.guards) > guards_before
        return None, "compile added shape guards" if added else None
    try:
        expression = dynamo_guards_expression(symbolic, shape_env, symbols, guards_before)
    except GuardExpressionError as exc:
        logger.debug("aotcache: the shape guards of a Dynamo graph cannot be stored: %s", exc)
        added = len(shape_env.guards) > guards_before
        return None, "compile added shape guards" if added else "shape guards not expressible"
    if expression is not None and not checkable:
        return None, "shape guards not checkable"  # no hints to check them against: a lookup never loads it
    return expression, None


def _install_guards(expression: str, symbolic: Sequence[Any] | None) -> bool:
    """Add a loaded entry's guards to Dynamo's ShapeEnv: the expression evaluated over the symbolic inputs
    makes each comparison a symbolic bool that the ShapeEnv guards on. False: they could not be added (the
    entry must then not be used)."""
    if symbolic is None:
        return False
    try:
        return evaluate_guards(expression, symbolic)
    except (GuardExpressionError, RuntimeError, TypeError, ValueError) as exc:
        logger.debug("aotcache: could not add a loaded entry's shape guards to Dynamo's ShapeEnv: %s", exc)
        return False
