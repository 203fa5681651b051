"""The compile options of one ``aot_function`` (:class:`AOTOptions`, checked by :func:`checked_options`) and the
step they configure: capture -> partition (training) -> compile -> :class:`~aotcache.aot.runtime.CompiledRuntime`.

:func:`compile_function` is that whole step in one call, the seam where the compiled-graph cache looks up and
stores entries (``autograd_cache/pipeline.py``); :class:`~aotcache.aot.api.AOTFunction` decides when to take it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from aotcache.aot.capture import capture
from aotcache.aot.dynamic_dims import check_dynamic
from aotcache.aot.layouts import backward_examples, mark_layout_free_outputs
from aotcache.aot.partition import (align_saved_to_backward, hold_constant_objects_as_attributes, is_own_partitioner,
                                    mark_constant_objects_for_recompute, resolve_partition)
from aotcache.aot.boxed_compilers import torch_nop_by_name, unboxed
from aotcache.aot.double_backward import CUSTOM_BACKWARD_REFUSAL
from aotcache.aot.runtime import CompiledRuntime, DisableAutocast
from aotcache.progress import stage
from aotcache.torch_modes import torch_modes_kept

__all__ = ["AOTOptions", "checked_options", "compile_function", "compile_captured", "keep_joint_for_double_backward"]


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


# compilers given by name that cannot take a SymFloat graph input (Inductor takes it as a 0-d tensor: NOTE [Float
# inputs for Inductor] in compilers/float_inputs.py; AOTInductor's runtime takes tensors and ints only)
_NO_FLOAT_SYMBOLS = ("aoti",)


def _takes_float_symbols(compiler: Callable | str | None) -> bool:
    if compiler is None or isinstance(compiler, str):
        return compiler not in _NO_FLOAT_SYMBOLS
    while isinstance(compiler, functools.partial):
        compiler = compiler.func
    module = str(getattr(compiler, "__module__", None) or "")
    return not (module.startswith("torch._inductor") or module.startswith("torch._export")
                or (module.startswith("aotcache.compilers.")
                    and module not in ("aotcache.compilers.nop", "aotcache.compilers.inductor")))


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

    def float_symbols(self) -> bool:
        """Whether every compiler of these options takes a float graph input (a ``SymFloat`` placeholder): the
        nop compiler and users' callables do, Inductor as a 0-d tensor (NOTE [Float inputs for Inductor]);
        AOTInductor does not, so its graphs keep floats as constants (NOTE [Float arguments] in
        dynamic_dims.py)."""
        return all(map(_takes_float_symbols, (self.fw_compiler, self.bw_compiler, self.inference_compiler)))

    def decomposition_table(self) -> Mapping | None:
        """The user's decompositions if given, else the forward compiler's ``decompositions()`` (if any)."""
        if self.decompositions is not None:
            return self.decompositions
        compiler = self.forward_compiler()
        while isinstance(compiler, functools.partial) and not hasattr(compiler, "decompositions"):
            compiler = compiler.func  # partial(inductor_compiler, options=...) traces with Inductor's table
        provider = getattr(compiler, "decompositions", None)
        return provider() if callable(provider) else None


def checked_options(api: str, *, fw_compiler: Callable | str | None = None,
                    bw_compiler: Callable | str | None = None, partition_fn: Callable | str | None = None,
                    decompositions: Mapping | None = None, inference_compiler: Callable | str | None = None,
                    dynamic: bool | None = None, num_params_buffers: int = 0,
                    keep_inference_input_mutations: bool = False,
                    compiler_options: Mapping | None = None, enable_log: bool = True,
                    disable_functionalization: bool = False) -> AOTOptions:
    """The :class:`AOTOptions` of one entry point's arguments, checked (``api`` names the entry point in errors).

    NOTE [PyTorch-compatible arguments]
    ``num_params_buffers`` tells PyTorch how many leading inputs are parameters or buffers (it keeps their sizes
    static and uses the number for CUDA graphs); ``aot_function`` keeps them static too (NOTE [Weights named by
    num_params_buffers] in dynamic_dims.py); ``aot_module`` reads its parameters and buffers from the module
    itself, so there the number changes nothing.
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
    # NOTE [PyTorch's nop compiler by name]
    fw_compiler, bw_compiler, inference_compiler = map(torch_nop_by_name, (fw_compiler, bw_compiler, inference_compiler))
    return AOTOptions(fw_compiler=fw_compiler, bw_compiler=bw_compiler,
                      partition_fn=resolve_partition(partition_fn, api), decompositions=decompositions,
                      inference_compiler=inference_compiler, dynamic=dynamic, compiler_options=compiler_options)


def _graph_output_values(gm: torch.fx.GraphModule) -> list:
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    values = output.args[0]
    values = values if isinstance(values, (tuple, list)) else (values,)
    return [value.meta.get("val") if isinstance(value, torch.fx.Node) else value for value in values]


def compile_function(flat_fn: Callable, flat_args: Sequence[Any], options: AOTOptions, *,
                     input_is_leaf: Sequence[bool] | None = None,
                     captured_check: Callable | None = None) -> CompiledRuntime:
    """Capture, partition and compile ``flat_fn`` for the signature of ``flat_args``; ``captured_check(captured)``
    runs between the capture and the compile and may raise to abandon it (NOTE [Dynamo's float inputs kept as graph
    inputs] in dynamo_floats.py).

    This is the single step a compiled-graph cache wraps: its result depends only on ``flat_fn``, the
    signature of ``flat_args`` (see NOTE [Signature]) and ``options``.

    :raises CaptureError: the function cannot be captured (the message names the construct).
    """
    options.warm_up_compilers(flat_args)
    with stage("capture"):
        captured = capture(flat_fn, flat_args, decompositions=options.decomposition_table(),
                           dynamic=options.dynamic, input_is_leaf=input_is_leaf)
    if captured_check is not None:
        captured_check(captured)
    return compile_captured(captured, options)


def compile_captured(captured: Any, options: AOTOptions) -> CompiledRuntime:
    """Partition (training) and compile an already captured graph (:class:`~aotcache.aot.capture.CapturedGraph`).

    Compilers run without autocast: the graph holds autocast's casts already, and a compiler that traces it
    again (AOTInductor's export) would apply them twice (NOTE [Compiled graphs run without autocast]).
    An interrupt inside a partitioner's or compiler's trace leaves no torch mode pushed (NOTE [Modes left by an
    interrupted capture]).
    """
    with torch_modes_kept(), DisableAutocast():
        return _compile_captured(captured, options)


def _graph_generators(gm: torch.fx.GraphModule) -> tuple:
    """The ``torch.Generator`` objects ``gm`` holds (NOTE [Generator arguments] in generator_args.py)."""
    held = [getattr(gm, str(node.target), None) for node in gm.graph.nodes if node.op == "get_attr"]
    return tuple(value for value in held if isinstance(value, torch.Generator))


def _compile_captured(captured: Any, options: AOTOptions) -> CompiledRuntime:
    runtime = _compile_captured_graph(captured, options)
    runtime.graph_generators = _graph_generators(captured.graph)
    return runtime


def _tracing_context_of(captured: Any) -> Any:
    """NOTE [Partitioners that look for the fake mode]
    PyTorch's ``min_cut_rematerialization_partition`` (accepted as ``partition_fn``, NOTE [Foreign partitioners])
    asks ``detect_fake_mode()`` for the fake mode when it moves a checkpointed region's random ops into the
    backward (selective checkpointing around dropout), and torch's AOT Autograd partitions inside Dynamo's
    ``TracingContext``. aotcache compiles outside it (NOTE in aot/dynamo_graph.py), so the partitioner raised
    "fake_mode must not be None" where torch's pipeline runs (found by PyTorch's test_activation_checkpointing.py,
    test_compile_selective_checkpoint_random_op). The partition runs in a ``TracingContext`` of the capture's own
    fake mode."""
    from torch._guards import TracingContext, tracing

    fake_mode = getattr(captured, "fake_mode", None)
    return contextlib.nullcontext() if fake_mode is None else tracing(TracingContext(fake_mode))


def _compile_captured_graph(captured: Any, options: AOTOptions) -> CompiledRuntime:
    metadata = captured.metadata
    if metadata.is_inference:
        with stage("compile forward"):
            forward = unboxed(options.inference_compiler_fn()(captured.graph, captured.primals))
        return CompiledRuntime(metadata, forward)
    partition = _resolve_partition(options.partition_fn)
    if not is_own_partitioner(partition):
        mark_constant_objects_for_recompute(captured.graph)  # NOTE [Constant objects in the joint graph]
        hold_constant_objects_as_attributes(captured.graph)  # NOTE [Constant objects held as attributes]
    with stage("partition"), _tracing_context_of(captured):
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
    runtime = CompiledRuntime(metadata, forward, backward)
    keep_joint_for_double_backward(runtime, captured)
    return runtime


def keep_joint_for_double_backward(runtime: CompiledRuntime, captured: Any) -> None:
    """Give a training ``runtime`` the joint graph of ``captured`` (the same call's capture) when that graph is a
    pure function of its inputs and of the generators' states (NOTE [Double backward through the joint graph], NOTE
    [Double backward through random ops] in double_backward.py)."""
    metadata = captured.metadata
    if getattr(captured, "custom_backward", False):
        runtime.joint_refusal = CUSTOM_BACKWARD_REFUSAL  # NOTE [Custom backwards and double backward]
        return
    if metadata.is_inference or runtime.metadata.is_inference or any(
            getattr(info, "metadata_mutation", None) is not None for info in metadata.inputs):
        return
    if metadata.mutated_inputs and _differentiable_outputs_read(captured.graph.graph, metadata.mutated_inputs,
                                                                 runtime._tangent_indices):
        return
    random = False
    for node in captured.graph.graph.nodes:
        if node.op != "call_function":
            continue
        if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
            random = True  # replayed from the forward's generator states (NOTE [Double backward through random ops])
            continue
        if getattr(node.target, "__name__", "") == "with_effects":
            return
        if not isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and \
                getattr(node.target, "__module__", "") not in ("_operator", "operator", "math", "builtins"):
            return  # (higher-order ops, Python callables: not plain ATen ops with derivative formulas)
    runtime.joint_random = random
    runtime.joint = captured.graph  # called with the flat inputs, returns the flat (forward, gradient) outputs


# NOTE [Replaying a graph that updated its inputs]
# A double backward runs the joint graph's forward part again, on the call's inputs as they are *then*: an input
# the graph updated (BatchNorm's running statistics, a step counter) already holds its new value. That replay is
# still the call's own forward where no differentiable output reads an updated input's value: the updates are
# computed again and dropped, and the gradients come out as eager's. A training-mode batch norm reads its running
# statistics only for their update (its output, mean and inverse std come from the batch), so its outputs 0-2 do
# not count as reading them. Any other read (an input scaled in place and then used) keeps the graph out.
_BATCH_NORM_TRAINING = "_native_batch_norm_legit_functional"


def _differentiable_outputs_read(graph: torch.fx.Graph, mutated: Sequence[int], output_indices: Sequence[int]
                                 ) -> bool:
    """Whether a forward output at ``output_indices`` depends on the value of a mutated input (placeholder
    positions ``mutated``): NOTE [Replaying a graph that updated its inputs]."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    updated = {placeholders[index] for index in mutated if index < len(placeholders)}
    outputs = next(node for node in reversed(graph.nodes) if node.op == "output").args[0]
    pending = [outputs[index] for index in output_indices if isinstance(outputs[index], torch.fx.Node)]
    seen: set = set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in updated:
            return True
        sources = node.all_input_nodes
        if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
            producer = node.args[0]
            if getattr(producer.target, "__name__", "").startswith(_BATCH_NORM_TRAINING) and \
                    len(producer.args) > 5 and producer.args[5] is True and node.args[1] in (0, 1, 2):
                # running statistics (arguments 3 and 4) feed only outputs 3 and 4
                sources = [arg for arg in producer.args[:3] if isinstance(arg, torch.fx.Node)]
        pending.extend(sources)
    return False
