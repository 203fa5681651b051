"""The AOT Autograd core: :class:`AOTFunction` (trace and compile per signature, then reuse), the Dynamo-graph
form, and the compile step.

Pipeline per input signature: :func:`~aotcache.aot.capture.capture` (functionalized joint or inference graph)
-> ``partition_fn`` (training) -> compilers -> :class:`~aotcache.aot.runtime.CompiledRuntime`.
:func:`compile_function` is that whole step in one call, the seam where the compiled-graph cache looks up
and stores entries. The public entry points (``aot_function``, ``aot_module``, ``aot_module_simplified``)
live in :mod:`aotcache.api`, above both this package and the cache: they hand an :class:`AOTFunction` the
services that watch the program and use the cache (NOTE [Compile services] in ``aot/services.py``).

NOTE [Signature]
An ``aot_function`` traces once per *signature* of its flat arguments and reuses the compiled result:
per tensor its dtype, device, layout, requires_grad, leafness (when it requires grad), and its sizes,
strides and whether its storage offset is 16-byte aligned (only the rank with ``dynamic=True``, where
symbolic-shape guards decide reuse; NOTE [Storage offsets are not part of the signature]); per non-tensor
argument its type and value (constants are baked into the graph); which tensor arguments share memory; plus
grad mode and autocast state. The pytree structure of (args, kwargs) is part of it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import logging
import struct
import threading
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from aotcache.aot.ambient import numerics_signature
from aotcache.aot.cache_objects import CacheInt
from aotcache.aot.call_state import SavedCallState
from aotcache.aot.capture import capture
from aotcache.aot.capture_threads import swap_gate, tracing_in_this_thread
from aotcache.aot.double_backward import enter_eager_call, leave_eager_call
from aotcache.aot.dynamic_dims import DimSpec, DynamicDims, check_dynamic, masked_shape
from aotcache.aot.errors import CaptureError, RefusedArgumentError
from aotcache.aot.fallback import (
    EagerRuntime,
    PartialRuntime,
    check_on_capture_error,
    compile_or_fall_back,
    eager_after_state_changes,
    eager_for_unkeyable_call,
)
from aotcache.aot.hot_path import (
    HotSignature,
    HotSignatures,
    ModuleState,
    autocast_state,
    simple_structure,
    storage_object,
    storage_sharing,
)
from aotcache.aot.layouts import backward_examples, mark_layout_free_outputs
from aotcache.aot.module_state import refuse_tensors_stored_on_modules
from aotcache.aot.partition import align_saved_to_backward, resolve_partition
from aotcache.aot.refusals import (
    functorch_transform_error,
    refuse_data_parallel_wrappers,
    refuse_module_backward_hooks,
    unsupported_layout_error,
)
from aotcache.aot.retrace import describe_new_signature
from aotcache.aot.runtime import CompiledRuntime, DisableAutocast, unboxed
from aotcache.aot.services import CompileServices, WatchedProgram
from aotcache.aot.source_locations import capturing_source_locations, keeps_source_locations, run_graph
from aotcache.logs import CacheFault, event, log_once, logger
from aotcache.progress import compile_progress, stage

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


def _graph_module_compiler(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Fallback compiler when ``aotcache.compilers.nop`` is not available: the GraphModule runs as Python."""
    return gm


def _default_compiler() -> Callable:
    try:
        from aotcache.compilers.nop import nop_compiler
    except ImportError:
        return _graph_module_compiler
    return nop_compiler


def _resolve_compiler(compiler: Callable | str | None, options: Mapping | None = None) -> Callable:
    if compiler is None:
        return _default_compiler()
    if isinstance(compiler, str):
        # a failing named compiler falls back to the next one (NOTE [compiler fallback] in compilers/fallback.py)
        from aotcache.compilers.fallback import FallbackCompiler

        return FallbackCompiler(compiler, options)
    if not callable(compiler):
        raise TypeError(f"aotcache: a compiler must be callable as compiler(gm, example_inputs) or a name "
                        f"such as 'nop' or 'inductor'; got {type(compiler).__name__}")
    return compiler


def _resolve_partition(partition_fn: Callable | None) -> Callable:
    if partition_fn is not None:
        return partition_fn
    from aotcache.aot.partition import default_partition

    return default_partition


@dataclasses.dataclass(frozen=True)
class AOTOptions:
    """The compile options of one ``aot_function``; ``None`` compilers/partition mean the defaults."""

    fw_compiler: Callable | str | None = None
    bw_compiler: Callable | str | None = None
    partition_fn: Callable | None = None
    decompositions: Mapping | None = None
    inference_compiler: Callable | str | None = None
    dynamic: bool | None | tuple = False  # a DimSpec once resolved per call (NOTE [Dynamic dimensions])
    # options of the compilers given by name (e.g. torch._inductor.config overrides for "inductor")
    compiler_options: Mapping | None = None

    def forward_compiler(self) -> Callable:
        return _resolve_compiler(self.fw_compiler, self.compiler_options)

    def backward_compiler(self) -> Callable:
        return _resolve_compiler(self.bw_compiler if self.bw_compiler is not None else self.fw_compiler,
                                 self.compiler_options)

    def inference_compiler_fn(self) -> Callable:
        chosen = self.inference_compiler if self.inference_compiler is not None else self.fw_compiler
        return _resolve_compiler(chosen, self.compiler_options)

    def warm_up_compilers(self, example_inputs: Sequence[Any]) -> None:
        """Before a compile: let the compilers that have a ``warm_up`` start their background work (Inductor's
        worker pool for GPU graphs, NOTE [warming the compile workers] in compilers/inductor.py)."""
        for compiler in (self.forward_compiler(), self.backward_compiler(), self.inference_compiler_fn()):
            hook = getattr(compiler, "warm_up", None)  # aotcache's compilers only: a user's may mean else
            if callable(hook) and str(getattr(compiler, "__module__", "")).startswith("aotcache.compilers."):
                hook(example_inputs)

    def decomposition_table(self) -> Mapping | None:
        """The user's decompositions if given, else the forward compiler's ``decompositions()`` (if any)."""
        if self.decompositions is not None:
            return self.decompositions
        compiler = self.forward_compiler()
        while isinstance(compiler, functools.partial) and not hasattr(compiler, "decompositions"):
            compiler = compiler.func  # partial(inductor_compiler, options=...) traces with Inductor's table
        provider = getattr(compiler, "decompositions", None)
        return provider() if callable(provider) else None


def _graph_output_values(gm: torch.fx.GraphModule) -> list:
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    values = output.args[0]
    values = values if isinstance(values, (tuple, list)) else (values,)
    return [value.meta.get("val") if isinstance(value, torch.fx.Node) else value for value in values]


def compile_function(flat_fn: Callable, flat_args: Sequence[Any], options: AOTOptions, *,
                     input_is_leaf: Sequence[bool] | None = None) -> CompiledRuntime:
    """Capture, partition and compile ``flat_fn`` for the signature of ``flat_args``.

    This is the single step a compiled-graph cache wraps: its result depends only on ``flat_fn``, the
    signature of ``flat_args`` (see NOTE [Signature]) and ``options``.

    :raises CaptureError: the function cannot be captured (the message names the construct).
    """
    options.warm_up_compilers(flat_args)
    with stage("capture"):
        captured = capture(flat_fn, flat_args, decompositions=options.decomposition_table(),
                           dynamic=options.dynamic, input_is_leaf=input_is_leaf)
    return compile_captured(captured, options)


def compile_captured(captured: Any, options: AOTOptions) -> CompiledRuntime:
    """Partition (training) and compile an already captured graph (:class:`~aotcache.aot.capture.CapturedGraph`).

    Compilers run without autocast: the graph holds autocast's casts already, and a compiler that traces it
    again (AOTInductor's export) would apply them twice (NOTE [Compiled graphs run without autocast]).
    """
    with DisableAutocast():
        return _compile_captured(captured, options)


def _compile_captured(captured: Any, options: AOTOptions) -> CompiledRuntime:
    metadata = captured.metadata
    if metadata.is_inference:
        with stage("compile forward"):
            forward = unboxed(options.inference_compiler_fn()(captured.graph, captured.primals))
        return CompiledRuntime(metadata, forward)
    partition = _resolve_partition(options.partition_fn)
    with stage("partition"):
        fw_gm, bw_gm = partition(captured.graph, captured.joint_inputs, num_fwd_outputs=captured.num_fwd_outputs)
        align_saved_to_backward(fw_gm, bw_gm, captured.num_fwd_outputs)  # NOTE [Foreign partitioners]
    saved = _graph_output_values(fw_gm)[captured.num_fwd_outputs:]
    metadata.num_saved = len(saved)
    mark_layout_free_outputs(fw_gm, captured.primals, saved, captured.num_fwd_outputs)
    with stage("compile forward"):
        forward = unboxed(options.forward_compiler()(fw_gm, captured.primals))
    examples = backward_examples(fw_gm, bw_gm, forward, saved, captured.tangents, captured.num_fwd_outputs)
    with stage("compile backward"):
        backward = unboxed(options.backward_compiler()(bw_gm, examples))
    return CompiledRuntime(metadata, forward, backward)


# ----------------------------------------------------------------------------------------------------------
# aot_function
# ----------------------------------------------------------------------------------------------------------


# NOTE [Constant arguments]
# A non-tensor argument is baked into the graph, and the reuse key holds it, so it must be compared by value:
# an object compared by identity (a config object, an nn.Module, transformers' DynamicCache) can change
# between calls without the key seeing it, and a stale graph would run. Such arguments are refused, except
# types that cannot change: immutable singletons, enum members and code (functions, classes, operators).
_IMMUTABLE_IDENTITY_TYPES = (type(None), type(...), type(NotImplemented), enum.Enum, torch.dtype, torch.layout,
                             torch.memory_format, torch.qscheme, torch.Generator, type, types.FunctionType,
                             types.BuiltinFunctionType, functools.partial, torch._ops.OpOverload,
                             torch._ops.OpOverloadPacket)


# NOTE [Floats by bits]
# ``0.0 == -0.0`` and ``nan != nan``: compared by value, a graph traced with ``0.0`` baked in would be reused for
# ``-0.0`` (``1 / x`` gives +inf where eager gives -inf), and a NaN argument would never match its own signature
# (a re-trace on every call). Float and complex constants are compared by their IEEE-754 bits instead.
def float_bits(value: float | complex) -> bytes:
    """The IEEE-754 bits of a float or complex (sign of zero and NaN payloads included)."""
    if isinstance(value, complex):
        return struct.pack("<dd", value.real, value.imag)
    return struct.pack("<d", value)


class _RefusedConstant(TypeError):
    """A non-tensor argument that cannot be part of the reuse key; see NOTE [Constant arguments]."""


# NOTE [Storage offsets are not part of the signature]
# A training loop that slices its batches from one tensor (``X[i:i + batch]``) calls with the same sizes and
# strides at a new storage offset every step. A compiled graph reads its inputs through their data pointers, so
# the offset changes nothing, and keying on it traced (and stored) a new graph at every step, where
# torch.compile compiles once. The static signature therefore keeps only whether the offset is 16-byte aligned
# (compiled kernels may assume aligned inputs), and a graph that may depend on the offset itself
# (``RuntimeMetadata.offsets_matter``: an output that is a view of an input, a replayed metadata mutation, an
# as_strided-like op, an offset read in Python) is reused only at the offsets it was traced with
# (``CompiledRuntime.input_offsets``, checked with its guards). Arguments that share memory keep their offsets
# in the signature (synthetic bases, NOTE [Synthetic bases], depend on them).
def offset_aligned(tensor: torch.Tensor) -> bool:
    """Whether the storage offset is a multiple of 16 bytes (what the static signature keeps of the offset)."""
    return tensor.storage_offset() * tensor.element_size() % 16 == 0


def input_offsets(flat_args: Sequence[Any], dynamic: bool | DimSpec) -> tuple:
    """Per flat argument, its storage offset; None for a non-tensor and for a tensor with dynamic dimensions
    (its guards check its offset)."""
    spec = dynamic if isinstance(dynamic, tuple) else (dynamic,) * len(flat_args)
    return tuple(arg.storage_offset() if isinstance(arg, torch.Tensor) and not dims else None
                 for arg, dims in zip(flat_args, spec))


def offsets_hold(expected: tuple, flat_args: Sequence[Any]) -> bool:
    """Whether the arguments have the storage offsets ``expected`` holds (None: any)."""
    return all(offset is None or arg.storage_offset() == offset for offset, arg in zip(expected, flat_args))


def _argument_signature(arg: Any, dynamic: bool | tuple[int, ...], exact_offset: bool = False) -> tuple:
    if isinstance(arg, torch.Tensor):
        geometry = ((arg.dim(),) if dynamic is True else (masked_shape(arg, dynamic),) if dynamic
                    else (tuple(arg.shape), arg.stride(), arg.storage_offset() if exact_offset
                          else ("aligned", offset_aligned(arg))))  # NOTE [Dynamic dimensions]
        return ("tensor", arg.dtype, arg.device, arg.layout, arg.requires_grad,
                arg.requires_grad and arg.is_leaf, geometry)
    if isinstance(arg, torch.SymInt):
        return ("symint",)
    if dynamic and type(arg) is CacheInt:  # NOTE [Cache integers]: a symbol; 0 and 1 are specialized
        return ("cacheint", arg if arg in (0, 1) else None)
    if dynamic and type(arg) is int:  # NOTE [Integer arguments]: the rank key (True) or marked in a spec
        return ("int",)
    try:
        hash(arg)
    except TypeError:
        raise _RefusedConstant("is neither a tensor nor a hashable constant") from None
    if type(arg).__eq__ is object.__eq__ and not isinstance(arg, _IMMUTABLE_IDENTITY_TYPES):
        raise _RefusedConstant("is compared by identity, so changes to it between calls would not be seen")
    if isinstance(arg, (float, complex)):
        return ("constant", type(arg), float_bits(arg))  # NOTE [Floats by bits]
    return ("constant", type(arg), arg)


def _refused_argument_error(flat_args: Sequence[Any], in_spec: Any, index: int, why: str) -> RefusedArgumentError:
    arg = flat_args[index]
    where = f"flat argument {index}"
    with contextlib.suppress(Exception):  # a path such as args[1] or kwargs['past_key_values']
        (args, kwargs) = pytree.tree_unflatten(list(flat_args), in_spec)
        path = [key for key, _ in pytree.tree_flatten_with_path((args, kwargs))[0]][index]
        where = "argument " + ("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:])
    return RefusedArgumentError(
        f"aotcache: {where} is a {type(arg).__module__}.{type(arg).__qualname__} object, which {why}. A compiled "
        f"function takes tensors, values compared by value (int, float, str, enums, frozen dataclasses, ...) "
        f"and pytree containers of them. Pass the tensors and values it holds as arguments, make its type "
        f"compare by value, or register it with torch.utils._pytree.register_pytree_node.")


def _memory_sharing(flat_args: Sequence[Any]) -> tuple:
    """Which tensor arguments share storage (:func:`~aotcache.aot.hot_path.storage_sharing` of the tensors).

    :raises CaptureError: a sparse or mkldnn argument (no storage to compare), or a tensor of a torch.func
        transform (vmap, grad, jvp) the compiled function is called under.
    """
    tensors = []
    for index, arg in enumerate(flat_args):
        if isinstance(arg, torch.Tensor):
            if arg.layout != torch.strided or arg.is_nested or arg.is_quantized:
                kind = "nested" if arg.is_nested else "quantized" if arg.is_quantized else arg.layout
                raise unsupported_layout_error(f"flat argument {index}", kind)
            if torch._C._functorch.is_functorch_wrapped_tensor(arg):
                raise functorch_transform_error(f"flat argument {index}")
            if not arg.is_meta:
                tensors.append(arg)
    return storage_sharing(tensors)


def signature_of(flat_args: Sequence[Any], in_spec: Any, dynamic: bool | DimSpec) -> tuple:
    """The reuse key of NOTE [Signature] (in-memory only; never persisted); ``dynamic`` a flag or a spec."""
    sharing = _memory_sharing(flat_args)  # first: it names unsupported layouts (sparse) clearly
    exact_offsets = sharing != tuple(range(len(sharing)))  # NOTE [Storage offsets are not part of the signature]
    arguments = []
    for index, arg in enumerate(flat_args):
        try:
            arguments.append(_argument_signature(arg, dynamic[index] if isinstance(dynamic, tuple) else dynamic,
                                                 exact_offsets))
        except _RefusedConstant as exc:
            raise _refused_argument_error(flat_args, in_spec, index, str(exc)) from None
    return (in_spec, torch.is_grad_enabled(), autocast_state(), numerics_signature(), sharing, tuple(arguments))


def rank_signature_of(flat_args: Sequence[Any], in_spec: Any) -> tuple:
    """The signature up to sizes that automatic dynamic shapes key their first sizes by (NOTE [Dynamic
    dimensions]): tensors by rank, and cache integers without their value, not even 0 or 1.

    NOTE [Cache integers compared like sizes]
    ``signature_of(..., True)`` keeps a cache integer's 0 or 1 (torch specializes them, so they are separate
    graphs). As the key of the sizes first seen, that made a batch of 1 (a static cache's ``batch_size`` 1) and
    a batch of 2 two unrelated calls: the second call compiled statically, as a first call, and only the third
    batch size became dynamic (static-cache ``generate`` with batches 1, 2, 3: one graph more than
    torch.compile, which compares the integer like a size). A tensor dimension of size 1 never was in that key.
    """
    signature = signature_of(flat_args, in_spec, True)
    return (*signature[:5], tuple(("cacheint",) if argument[0] == "cacheint" else argument
                                  for argument in signature[5]))


_SINGLE_USE_WARNING = 3  # single-use graphs (NOTE [State changed by a capture]) before a warning, once per function
_SINGLE_USE_LIMIT = 8  # ... in a row before the signature runs eagerly (as torch.compile after its recompile limit)
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
        self.num_program_walks = 0  # walks of the program (first call, failed guards; tests, diagnostics)
        self._lock = threading.Lock()
        self.key_memo: dict[str, Any] = {}  # per-function memo the cache keeps (its key's option identities)
        self.name = _function_name(fn)  # shown by `aotcache ls`; never part of a key
        self._dims = DynamicDims(options.dynamic)  # NOTE [Dynamic dimensions]
        self.num_state = 0  # leading flat arguments that are a module's parameters and buffers (kept static)
        self.num_compiles = 0  # how many times this function was traced and compiled (tests, diagnostics)
        self._saved_state: SavedCallState | None = None  # of the call being compiled (under the lock)
        self.num_single_use = 0  # graphs used for their call only (NOTE [State changed by a capture]; tests)
        self._single_use_streak = 0  # single-use graphs in a row, since the last graph kept (_SINGLE_USE_LIMIT)

    def fingerprint_program(self) -> Callable:
        """What runs when this function is called inside an enclosing capture (inlined): its function (NOTE
        [Compiled wrappers in a walked program] in the fingerprint's walker)."""
        return self.fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() and tracing_in_this_thread():  # NOTE [Nested compiled functions] (module.py)
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
        if structure is not None:
            hot = hot_signatures.find(structure, flat_if_simple)
            if hot is not None and (hot.runtime.metadata.guards is None or
                                    self._guards_hold(hot.runtime, flat_if_simple)):
                previous = enter_eager_call(self.fn, args, kwargs)  # NOTE [Double backward by recompute]
                try:
                    return hot.runtime(*flat_if_simple)
                finally:
                    leave_eager_call(previous)
        flat_args, in_spec = pytree.tree_flatten((args, kwargs))
        try:
            runtime = self._runtime_for(flat_args, in_spec, extra, program.digest)
        except CaptureError as exc:  # no signature (a sparse argument): NOTE [Capture fallback] in fallback.py
            return eager_for_unkeyable_call(self, exc, flat_args, in_spec)
        if (structure is not None and len(flat_args) == len(flat_if_simple)
                and all(a is b for a, b in zip(flat_args, flat_if_simple)) and HotSignature.eligible(flat_args)
                and not getattr(runtime, "single_use", False)):  # NOTE [State changed by a capture]
            hot_signatures.remember(structure, flat_args, getattr(runtime, "dynamic_spec", False), runtime)
        previous = enter_eager_call(self.fn, flat_args, in_spec)  # NOTE [Double backward by recompute]
        try:
            return runtime(*flat_args)
        finally:
            leave_eager_call(previous)

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
            if len(self._programs) >= 64:
                self._programs.clear()
            watched = self._programs[extra] = (program, hot_signatures)
            self._hot = hot_signatures
        return watched

    def _runtime_for(self, flat_args: list, in_spec: Any, extra: Any = None, program: str = "") -> CompiledRuntime:
        """The runtime of this signature and program digest: reused, or traced and compiled now (once, under the
        lock)."""
        options = self._resolve_dynamic(flat_args, in_spec, extra)
        try:
            return self._runtime_with(flat_args, in_spec, extra, program, options)
        except CacheFault:
            raise  # strict mode's cache fault is not a failure of dynamic shapes
        except Exception as exc:  # noqa: BLE001 - only an automatic dynamic compile is retried, then re-raised
            if not self._dims.automatic(options.dynamic):
                raise
            failure = exc
        # NOTE [Dynamic dimensions]: the same call compiled statically decides. If it fails too, the error is the
        # call's own (BatchNorm's "Expected more than 1 value per channel" for a last batch of one, a wrong
        # shape): raised as eager raises it, and automatic dynamic shapes stay on for the next sizes
        runtime = self._runtime_with(flat_args, in_spec, extra, program, self._dims.options_for(self.options, False))
        self._dims.abandon(options.dynamic, failure, self.name)
        return runtime

    def _runtime_with(self, flat_args: list, in_spec: Any, extra: Any, program: str,
                      options: AOTOptions) -> CompiledRuntime:
        key = (extra, program, signature_of(flat_args, in_spec, options.dynamic))
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
                        event(logging.INFO, "aotcache: re-tracing %s: %s", self.name,
                              describe_new_signature(list(self._entries), key))
                    # NOTE [State changed by a capture]: each run of the Python starts from the call's state
                    saved = self._saved_state = self._save_call_state(extra)
                    try:
                        with compile_progress(self.name):  # NOTE [Compile progress]
                            runtime = compile_or_fall_back(self, flat_args, in_spec, options)  # NOTE [Capture fallback]
                    finally:
                        self._saved_state = None
                    runtime.dynamic_spec = options.dynamic  # type: ignore[attr-defined]  # the hot path's geometry
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

    def _save_call_state(self, extra: Any) -> SavedCallState:
        """The state this call's Python may change, before its capture (NOTE [State changed by a capture])."""
        watched = self._programs.get(extra)
        return SavedCallState(getattr(self, "fingerprint_module", None), watched[0] if watched else None)

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

    def _resolve_dynamic(self, flat_args: list, in_spec: Any, extra: Any) -> AOTOptions:
        """The options of this call with ``dynamic`` resolved to a spec (NOTE [Dynamic dimensions])."""
        if self.options.dynamic is False:
            return self.options
        rank_key = (extra, rank_signature_of(flat_args, in_spec)) if self.options.dynamic is None else None
        spec = self._dims.spec(flat_args, rank_key, self.num_state, self.name)
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
            if runs and saved is not None:  # NOTE [State changed by a capture]
                saved.restore()
            runs += 1
            call_args, call_kwargs = pytree.tree_unflatten(list(flat), in_spec)
            return self.fn(*call_args, **call_kwargs)

        self.num_compiles += 1
        try:
            return self.services.compile_call(self, flat_fn, flat_args, in_spec, options)
        except BaseException:
            if runs and saved is not None:  # the retry, the fallback or the error starts from the call's state
                try:
                    saved.restore()
                except CaptureError as exc:
                    logger.debug("aotcache: %s: %s", self.name, exc)
            raise


def checked_options(api: str, *, fw_compiler: Callable | str | None = None,
                    bw_compiler: Callable | str | None = None, partition_fn: Callable | str | None = None,
                    decompositions: Mapping | None = None, inference_compiler: Callable | str | None = None,
                    dynamic: bool | None = None, num_params_buffers: int = 0,
                    keep_inference_input_mutations: bool = False,
                    compiler_options: Mapping | None = None, enable_log: bool = True,
                    disable_functionalization: bool = False) -> AOTOptions:
    """The :class:`AOTOptions` of one entry point's arguments, checked (``api`` names the entry point in errors).

    NOTE [PyTorch-compatible arguments]
    ``num_params_buffers`` tells PyTorch how many leading inputs are parameters or buffers (it uses that for
    CUDA graphs); aotcache reads parameters and buffers from the module itself, so the number changes nothing.
    ``keep_inference_input_mutations=True`` asks PyTorch to leave input mutations inside the inference graph;
    aotcache always applies them after the compiled graph runs (NOTE [Mutation epilogue] in the runtime), which
    gives the caller the same result, so the flag changes nothing either. ``enable_log`` (PyTorch's own logging)
    and ``disable_functionalization`` are accepted for the same reason: aotcache logs through its own logger
    (docs/logging.md) and always hands the compilers a functionalized graph; the input mutations such a graph
    leaves out are applied by the runtime, so the caller sees eager's results either way.

    :raises TypeError, ValueError: a bad argument (the message names it and what is accepted).
    """
    if isinstance(num_params_buffers, bool) or not isinstance(num_params_buffers, int) or num_params_buffers < 0:
        raise TypeError(f"aotcache.{api}: num_params_buffers must be an int >= 0, got {num_params_buffers!r}")
    for name, flag in (("keep_inference_input_mutations", keep_inference_input_mutations),
                       ("enable_log", enable_log), ("disable_functionalization", disable_functionalization)):
        if not isinstance(flag, bool):
            raise TypeError(f"aotcache.{api}: {name} must be a bool, got {flag!r}")
    check_dynamic(dynamic, api)
    return AOTOptions(fw_compiler=fw_compiler, bw_compiler=bw_compiler,
                      partition_fn=resolve_partition(partition_fn, api), decompositions=decompositions,
                      inference_compiler=inference_compiler, dynamic=dynamic, compiler_options=compiler_options)


def _function_name(fn: Any) -> str:
    """A readable name for listings (``aotcache ls``); never part of a key."""
    fn = getattr(fn, "__wrapped__", fn)
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


def _functional_module_call(module: nn.Module) -> Callable:
    """``call(params, buffers, *args, **kwargs)``: the module run with the given tensors swapped in."""
    paths: dict[tuple, dict[str, str] | None] = {}
    gate = swap_gate(module)

    def call(params: dict, buffers: dict, *args: Any, **kwargs: Any) -> Any:
        tensors = {**params, **buffers}
        names = tuple(tensors)
        if names not in paths:
            paths[names] = _paths_through_wrappers(module, names)
        renamed = paths[names]
        if renamed is not None:  # NOTE [Wrappers inside a captured module]
            tensors = {renamed[name]: value for name, value in tensors.items()}
        refuse_module_backward_hooks(module)
        refuse_data_parallel_wrappers(module)  # NOTE [Data-parallel wrappers]
        # NOTE [Calls during a capture's swap]: other threads wait while the module holds trace tensors
        with gate.swapping(), refuse_tensors_stored_on_modules(module), _rnn_weight_lists_kept(module):
            return torch.func.functional_call(module, tensors, args, kwargs, tie_weights=True, strict=False)

    return call


def _paths_through_wrappers(module: nn.Module, names: Sequence[str]) -> dict[str, str] | None:
    """NOTE [Wrappers inside a captured module]
    A compiled wrapper (``AOTModule``: ``aot_module`` / ``aotcache.compile``) used as a submodule names its
    tensors as the wrapped module does (``inner.weight``, no ``orig_module.``), but ``functional_call`` swaps
    tensors on the module it reaches by that path: the wrapper, which holds no ``weight`` of its own. The swap
    then failed, or wrote beside the real parameter. So each name is mapped to the path that reaches the tensor's
    owner (``inner.orig_module.weight``); None when no name passes through a wrapper (the usual case).
    """
    renamed: dict[str, str] = {}
    changed = False
    for name in names:
        parts, owner, real = name.split("."), module, []
        for part in parts[:-1]:
            owner = getattr(owner, part, None)
            real.append(part)
            while getattr(type(owner), "wraps_orig_module", False):
                owner = owner.orig_module
                real.append("orig_module")
                changed = True
        renamed[name] = ".".join([*real, parts[-1]])
    return renamed if changed else None


@contextlib.contextmanager
def _rnn_weight_lists_kept(module: nn.Module) -> Iterator[None]:
    """NOTE [RNN weight lists after a capture] ``nn.RNNBase`` (LSTM, GRU, RNN) keeps its weights in a second
    place, the ``_flat_weights`` list (and weak references to them), which its forward rebuilds from the
    attributes when they changed. Swapping traced tensors in for the capture therefore left the list holding
    the capture's FunctionalTensors after the real parameters came back: dead trace tensors kept alive by the
    user's model, and an untrusted fingerprint for every later call ("tensor constant subclass"). The capture
    leaves the lists as it found them."""
    saved = [(rnn, rnn.__dict__.get("_flat_weights"), rnn.__dict__.get("_flat_weight_refs"))
             for rnn in module.modules() if isinstance(rnn, nn.RNNBase)]
    try:
        yield
    finally:
        for rnn, weights, refs in saved:
            rnn.__dict__["_flat_weights"] = weights
            rnn.__dict__["_flat_weight_refs"] = refs


@contextlib.contextmanager
def _outside_dynamo_tracing_context() -> Iterator[None]:
    """Run the capture and compilers of a Dynamo graph without Dynamo's ambient ``TracingContext``.

    NOTE [Dynamo's tracing context and our compilers]
    Dynamo calls its backend inside a ``TracingContext`` holding Dynamo's fake mode, and
    ``torch._guards.detect_fake_mode`` prefers that mode over anything else. Our compilers run their own
    fake-tensor passes (e.g. the ``aoti`` compiler's static build hands Inductor real example tensors), which
    then meet Dynamo's fake mode and fail with "Please convert all Tensors to FakeTensors". The capture does
    not need the context: Dynamo's fake example inputs carry their mode (and its ShapeEnv) themselves.
    """
    from torch._guards import tracing

    with tracing(None):
        yield


def _is_symbolic(value: Any) -> bool:
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(v, torch.SymInt) for v in (*value.shape, *value.stride()))


def _symbolic_example_inputs(gm: nn.Module, example_inputs: Sequence[Any]) -> list:
    """Dynamo's example inputs, as the fake tensors of its fake mode when its graph has symbolic shapes.

    NOTE [Dynamo's symbolic example inputs]
    Dynamo hands a backend *real* example tensors; when it compiles a graph with dynamic dimensions (``dynamic=True``
    or automatic dynamic after a size changed) the symbolic sizes live only in its fake mode (the ambient
    ``TracingContext``) and in the placeholders' ``example_value``, plus size symbols passed as SymInt inputs.
    Tracing the real tensors would specialize the graph to their sizes while Dynamo's guards admit every size:
    a later call with another size would run a graph traced for the first (a wrong result or a shape error).
    So when anything is symbolic, the real tensors are swapped for Dynamo's own fakes (``from_tensor`` of its
    mode returns the fake it made for that tensor, symbols included). Static graphs keep the real inputs.
    """
    placeholders = [node for node in getattr(getattr(gm, "graph", None), "nodes", []) if node.op == "placeholder"]
    symbolic = any(_is_symbolic(value) for value in example_inputs) or any(
        _is_symbolic(node.meta.get("example_value", node.meta.get("val"))) for node in placeholders)
    if not symbolic:
        return list(example_inputs)
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(list(example_inputs))
    if fake_mode is None:
        return list(example_inputs)
    from torch._subclasses.fake_tensor import FakeTensor

    return [fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor)
            else value for value in example_inputs]


def _specialize_unspecialized_floats(gm: nn.Module) -> None:
    """Have Dynamo specialize the Python floats it passed as 0-d tensor inputs (NOTE [Dynamo's float inputs]).

    NOTE [Dynamo's float inputs]
    With ``dynamic=True`` Dynamo does not specialize float attributes (a BatchNorm's ``eps`` and ``momentum``): each
    is a 0-d float64 tensor input that the graph reads with ``.item()``, and Dynamo does not guard its value. Our
    capture cannot keep such a value symbolic (ATen's ``float`` arguments would bake it in, and nothing would
    re-check it: a changed ``eps`` would reuse the graph), and without Dynamo's symbol ``.item()`` is data-dependent.
    So, as torch's own pipeline does for a float it cannot turn into tensor ops, the floats are marked for
    specialization and Dynamo restarts its analysis: the restarted graph holds them as constants, guarded by value.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    names = []
    for node in getattr(getattr(gm, "graph", None), "nodes", []):
        value = node.meta.get("example_value") if node.op == "placeholder" else None
        memo = value.item_memo if isinstance(value, FakeTensor) else None
        name = getattr(getattr(getattr(memo, "node", None), "_expr", None), "name", None)
        if isinstance(memo, torch.SymFloat) and name is not None:
            names.append(name)
    if not names:
        return
    try:
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis
        from torch._dynamo.symbolic_convert import TensorifyState
    except ImportError:  # a torch without them (private API): the capture refuses the .item() (a fallback)
        return
    if all(TensorifyState.should_specialize(name) for name in names):
        return  # already asked once: the capture below refuses the .item() clearly rather than loop
    for name in names:
        TensorifyState.specialize(name)
    raise TensorifyScalarRestartAnalysis


def compile_dynamo_graph(gm: nn.Module, example_inputs: Sequence[Any], options: AOTOptions, *,
                         services: CompileServices, cache: Any = True) -> Callable:
    """Compile Dynamo's graph ``gm`` now for its (possibly fake, symbolic) ``example_inputs`` and return
    ``run(*flat_args)`` (the body of ``aotcache.aot_module_simplified``, the ``torch.compile`` backend form).

    Parameters and buffers still on ``gm`` are lifted to graph inputs and read at every call. Reuse across
    signatures is Dynamo's job (its guards), so exactly one graph is compiled; ``services.compile_graph`` may
    load it from ``cache`` instead (NOTE [Compile services]).
    """
    param_names = [name for name, _ in gm.named_parameters()]
    buffer_names = [name for name, _ in gm.named_buffers()]
    num_lifted = len(param_names) + len(buffer_names)

    state = ModuleState(gm)  # NOTE [Hot path]

    def lifted() -> list:
        if not num_lifted:
            return []
        params, buffers, _, _ = state.current()
        return [*params.values(), *buffers.values()]

    keep_lines = keeps_source_locations(gm)  # NOTE [Source stack traces]

    def flat_fn(*flat: Any) -> Any:
        if not num_lifted:
            return run_graph(gm, flat, keep_lines)
        params = dict(zip(param_names, flat[:len(param_names)]))
        buffers = dict(zip(buffer_names, flat[len(param_names):num_lifted]))
        if not keep_lines:
            return torch.func.functional_call(gm, {**params, **buffers}, tuple(flat[num_lifted:]), strict=False)
        with torch.nn.utils.stateless._reparametrize_module(gm, {**params, **buffers}):
            return run_graph(gm, flat[num_lifted:], keep_lines)

    _specialize_unspecialized_floats(gm)
    example_inputs = _symbolic_example_inputs(gm, example_inputs)
    example = [*lifted(), *example_inputs]
    with _outside_dynamo_tracing_context(), compile_progress(f"{type(gm).__qualname__} (torch.compile graph)"), \
            capturing_source_locations(keep_lines):
        runtime = services.compile_graph(cache, gm, example_inputs, flat_fn, example, options,
                                         [*param_names, *buffer_names])

    # NOTE [Call contract of aot_module_simplified]
    # The graph was captured for the example inputs' requires_grad (of every input, lifted parameters
    # included) and for their aliasing (a duplicated input is one value in the graph). Dynamo guards on both,
    # but a direct caller may break either: a call that does is compiled again for its own contract (from
    # its real tensors, so statically), instead of dropping a gradient or reading one input for two.
    compiled_for = {_call_contract([*example[:num_lifted], *example_inputs], num_lifted): runtime}
    lock = threading.Lock()

    def run(*args: Any) -> Any:
        flat = [*lifted(), *args]
        contract = _call_contract(flat, num_lifted)
        chosen = compiled_for.get(contract)
        if chosen is None:
            with lock:
                chosen = compiled_for.get(contract)
                if chosen is None:
                    log_once(logging.INFO, f"aot-simplified-contract:{id(compiled_for)}",
                             "aot_module_simplified: a call broke the compiled graph's requires_grad or "
                             "aliasing assumptions; compiling it again for this call's inputs")
                    chosen = compiled_for[contract] = compile_function(flat_fn, flat, options)
        return chosen(*flat)

    run.runtime = runtime  # type: ignore[attr-defined]
    return run


def _call_contract(flat: Sequence[Any], num_lifted: int) -> tuple:
    """requires_grad of every tensor, and which user inputs share a storage (NOTE [Call contract of ...]).

    Storages are compared as objects (``_cdata``), which works alike for Dynamo's fake example inputs (whose
    data pointers are all 0) and for the real tensors of a call."""
    requires_grad = tuple(value.requires_grad for value in flat if isinstance(value, torch.Tensor))
    user_tensors = [value for value in flat[num_lifted:] if isinstance(value, torch.Tensor)]
    return requires_grad, storage_sharing(user_tensors, storage_object) if len(user_tensors) > 1 else ()


# the export functions and the module wrapper live in their own modules; re-exported here as public API
from aotcache.aot.export import ExportSignature, aot_export_joint_simple, aot_export_module  # noqa: E402
from aotcache.aot.module import AOTModule  # noqa: E402
