"""Capture: trace a function into a functionalized ATen graph (joint forward+backward, or forward only).

Two passes over the user function, both on fake tensors (no real compute or memory):

1. *Analysis* (:func:`~aotcache.aot.capture_analysis.analyze`): run the function eagerly on fresh fake "probe"
   inputs and observe which inputs it mutates (version counter) or restrides (metadata mutation, unsupported),
   which outputs are inputs or views of inputs / of other outputs, which are Python constants, and which require
   grad.
2. *Trace* (:func:`trace`): run it again under ``make_fx`` with a :class:`FunctionalTensorMode`, so every
   in-place or view-mutating op is replaced by its functional form. For training, the backward is traced in the
   same pass with ``torch.autograd.grad`` (the joint graph of the contract); for inference, the forward only.

The result is a :class:`CapturedGraph`: the graph, its fake example inputs and the JSON-serializable
:class:`~aotcache.aot.metadata.RuntimeMetadata` the runtime needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from aotcache.aot.aliased_writes import RefuseAliasedWrites, in_custom_backwards
from aotcache.aot.autograd_nodes import autograd_nodes, is_custom_function_node
from aotcache.aot.capture_threads import SwapBusy, compiling, one_trace_at_a_time
from aotcache.aot.capture_analysis import Analysis, analyze, is_graph_input
from aotcache.aot.nested_torch_compile import torch_compiled_callables_as_python
from aotcache.aot.scalar_type_checks import kinds_type_checked, watch_code
from aotcache.aot.script_objects import refusing_script_object_calls
from aotcache.aot.errors import CaptureError, mark_trace_failure
from aotcache.config import ConfigError
from aotcache.aot.fake_inputs import make_fake_inputs
from aotcache.aot.output_checks import (
    check_traced_outputs_require_grad,
    classify_output,
    mutation_counts,
    refuse_backward_mutations,
    refuse_tangent_mutations,
)
from aotcache.aot.functional_trace import (
    all_effect_types,
    final_effect_tokens,
    from_functional_tensor,
    functionalized,
    identity,
    refuse_backward_effects,
    seed_effect_tokens,
    to_functional_tensor,
    unfunctionalized,
)
from aotcache.aot.trace_environment import (
    callers_saved_tensor_hooks_off,
    compiled_autograd_off,
    fx_tracing_flag_off,
    is_fake,
    no_nan_checks,
    parametrization_cache_off,
    quiet_fake_tensor_failures,
    symbolic_fake_cache_off,
    torch_modes_kept,
)
from aotcache.aot.host_random import refuse_host_random, refuse_replayed_checkpoint_draws
from aotcache.aot.masked_assign import MaskedAssignAsWhere
from aotcache.aot.mutated_input_views import view_in_mutated_input
from aotcache.aot.plain_trace import (
    StopAtUnfunctionalizableOps,
    argument_states,
    can_trace_without_functionalization,
    check_graph,
    plain_trace_applies,
)
from aotcache.aot.symbolic_draws import GeneratorDrawsWithSymbolicSizes, keep_generator_draws
from aotcache.aot.symbolic_scalars import SymbolicScalarTensors
from aotcache.aot.checkpoint_refusals import refuse_reentrant_checkpoint, refuse_reentrant_checkpoint_nodes
from aotcache.aot.refusals import refuse_constants_requiring_grad
from aotcache.aot.unsupported_ops import explain_data_dependent_ops
from aotcache.aot.input_mutations import refuse_value_of_another_shape, storage_of
from aotcache.aot.metadata import RuntimeMetadata
from aotcache.aot.object_outputs import object_output_leaves
from aotcache.aot.source_locations import hand_on_source_locations
from aotcache.aot.switched_settings import refuse_active_transform, settings_kept
from aotcache.aot.tangents import (
    grad_tangent_dependencies,
    inputs_without_gradient,
    is_differentiable,
    make_tangents,
    tangent_placeholders,
    tangents_in_trace,
)
from aotcache.aot.tensor_checks import checking_tensors, tensor_checks_in_backward, tensor_checks_in_graph
from aotcache.logs import logger

__all__ = ["CaptureError", "CapturedGraph", "Analysis", "make_fake_inputs", "analyze", "trace", "capture",
           "is_graph_input", "mutating_nodes"]


@dataclasses.dataclass
class CapturedGraph:
    """A traced graph plus what is needed to partition, compile and run it."""

    graph: fx.GraphModule  # joint graph (training) or forward graph (inference), see aot_contract
    metadata: RuntimeMetadata
    primals: list  # fake (possibly symbolic) example graph inputs
    tangents: list  # fake example tangents (training only)
    fake_mode: Any
    # the traced backward ran a custom autograd.Function's backward (NOTE [Custom backwards and double backward])
    custom_backward: bool = False

    @property
    def num_fwd_outputs(self) -> int:
        return self.metadata.num_fwd_outputs

    @property
    def joint_inputs(self) -> list:
        return [*self.primals, *self.tangents]


def mutating_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes of ``gm`` calling an op whose schema mutates an argument (empty for a functionalized graph)."""
    found = []
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:
            found.append(node)
    return found


def _tag_traced_nodes(tag: str) -> None:
    """NOTE [Forward and backward tags of the joint graph]
    PyTorch's AOT Autograd marks every node of its joint graph ``meta["partitioner_tag"]`` ``"is_forward"`` (traced
    before the backward began; tangent placeholders ``"is_backward"``) or ``"is_backward"``, and its
    ``default_partition`` places nodes by that mark: without it (aotcache's joint graphs until 2026-12-05) only the
    primal placeholders counted as forward, so torch's ``default_partition`` passed as ``partition_fn`` saved the
    inputs alone and recomputed the whole forward in the backward (PyTorch's test_activation_checkpointing.py:
    a selective checkpoint's MUST_SAVE matmuls recomputed). The joint trace marks its nodes the same way: the
    nodes traced so far that have no mark get ``tag`` (aotcache's own partitioners do not read it)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    proxy_mode = get_proxy_mode()
    if proxy_mode is None:
        return
    for node in proxy_mode.tracer.graph.nodes:
        if "partitioner_tag" not in node.meta:
            is_tangent = node.op == "placeholder" and "tangents" in str(node.target)
            node.meta["partitioner_tag"] = "is_backward" if is_tangent else tag


# ----------------------------------------------------------------------------------------------------------
# Pass 2: functionalized trace
# ----------------------------------------------------------------------------------------------------------


class _ForwardBody:
    """Calls the user function on functional primals and returns the forward outputs of NOTE [Forward output
    layout]; records view sizes of outputs that alias inputs into the analysis while tracing."""

    def __init__(self, flat_fn: Callable, fake_args: Sequence[Any], analysis: Analysis, clone_mutated: bool,
                 verify: bool = False, symbolic: bool = False, functional: bool = True):
        self.flat_fn = flat_fn
        self.functional = functional
        self.symbolic = symbolic
        self.constants = list(fake_args)
        self.analysis = analysis
        self.clone_mutated = clone_mutated
        self.verify = verify  # the analysis ran without symbols: check it (NOTE [Analysis without symbols])
        self.num_extra_outputs = 0

    def __call__(self, functional_primals: list) -> list:
        analysis = self.analysis
        call_args = list(self.constants)
        for index, (pos, primal) in enumerate(zip(analysis.positions, functional_primals)):
            # autograd refuses in-place ops on leaves that require grad; a mutated input that requires grad is
            # not a leaf in eager (capture rejects leaves), so give the function a non-leaf copy to mutate
            if self.clone_mutated and analysis.inputs[index].mutates_data and primal.requires_grad:
                primal = primal.clone()
            call_args[pos] = primal
        # NOTE [Masked assignment as where]; NOTE [Tensors made from symbolic scalars] and NOTE [Generator draws
        # with symbolic sizes] (symbolic traces only)
        scalars = SymbolicScalarTensors() if self.symbolic else contextlib.nullcontext()
        draws = GeneratorDrawsWithSymbolicSizes() if self.symbolic else contextlib.nullcontext()
        with MaskedAssignAsWhere(), scalars, draws:
            flat_outs = object_output_leaves(self.flat_fn(*call_args))
        if self.verify:
            _verify_analysis(analysis, [call_args[pos] for pos in analysis.positions], flat_outs,
                             functional=self.functional)
        mutation_values = [call_args[analysis.positions[i]] for i, info in enumerate(analysis.inputs)
                           if info.mutates_data]
        graph_outs = [out for out, info in zip(flat_outs, analysis.outputs)
                      if info.kind in ("graph", "alias_of_output")]
        extras: list = []

        def entry(value: Any) -> Any:
            if isinstance(value, torch.SymInt):
                extras.append(value)
                return {"extra": len(extras) - 1}
            return int(value)

        for k, (out, info) in enumerate(zip(flat_outs, analysis.outputs)):
            if info.kind == "alias_of_input":
                if self.functional and analysis.inputs[info.input_index].mutates_data:  # NOTE [Views of mutated
                    out = view_in_mutated_input(k, out, self.constants[analysis.positions[info.input_index]])  # inputs]
                info.size = [entry(s) for s in out.shape]
                info.stride = [entry(s) for s in out.stride()]
                info.storage_offset = entry(out.storage_offset())
        self.num_extra_outputs = len(extras)
        return [*mutation_values, *graph_outs, *extras]


class _AnalysisMismatch(Exception):
    """The traced function behaved otherwise than on the static probes (NOTE [Analysis without symbols])."""


def _verify_analysis(analysis: Analysis, primals: list, flat_outs: list, *, functional: bool = True) -> None:
    """:raises _AnalysisMismatch: an input's mutations or an output's kind differ from what the analysis saw.

    Without functionalization no op mutated anything (it would have stopped the trace); what changes an input
    outside the dispatcher (``x.data = y``) is caught by :func:`trace` (``argument_states``).
    """
    if len(flat_outs) != len(analysis.outputs):
        raise _AnalysisMismatch("number of outputs")
    storages = [storage_of(p) for p in primals]
    for index, (primal, info) in enumerate(zip(primals, analysis.inputs)):
        if not isinstance(primal, torch.Tensor) or not functional:
            continue
        torch._sync(primal)
        if (bool(torch._functionalize_has_data_mutation(primal.elem)) != info.mutates_data
                or torch._functionalize_has_metadata_mutation(primal.elem)):
            raise _AnalysisMismatch(f"mutation of input {index}")
        if info.mutates_data:  # the probes' sizes were equal; with symbols, guard that they stay so (NOTE [out=
            refuse_value_of_another_shape(index, analysis.positions[index], primal)  # arguments an op resizes])
    for k, (out, info) in enumerate(zip(flat_outs, analysis.outputs)):
        if info.kind == "constant":
            if type(out) is not type(info.value) or out != info.value:  # a SymInt where the probes gave an int
                raise _AnalysisMismatch(f"output {k}")
            continue
        again = classify_output(k, out, flat_outs, primals, storages, static_views=False)
        if (again.kind, again.input_index) != (info.kind, info.input_index):
            raise _AnalysisMismatch(f"output {k}")


def _finish_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Flat calling convention (no pytree codegen), flat tuple output, dead code removed."""
    gm.graph._codegen = fx.graph.CodeGen()
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    flat, _ = pytree.tree_flatten(output.args[0])
    output.args = (tuple(flat),)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


# NOTE [Lazy symbolic arithmetic]
# With symbolic sizes, every size computation made while tracing (contiguity checks when a functional or fake
# tensor is made, decompositions, autograd formulas: ~5,700 for a 2-layer BERT training step) was recorded as a
# graph node, and all but a few were then removed as dead code. The trace runs under torch's
# ``maybe_enable_thunkify`` (as torch's own AOT Autograd does): a size computation enters the graph only when
# a traced op uses its result. (-10% of a dynamic capture.)


def trace(flat_fn: Callable, fake_args: Sequence[Any], analysis: Analysis, *, fake_mode: Any,
          decompositions: Mapping | None = None, joint: bool, verify: bool = False) -> CapturedGraph:
    """Pass 2: trace the functionalized forward (``joint=False``) or joint forward+backward graph.

    ``verify``: the analysis ran on static probes; :raises _AnalysisMismatch: if the trace disagrees with it.
    """
    if verify and plain_trace_applies(analysis, fake_args, fake_mode):
        before = argument_states(fake_args)
        try:
            captured = _trace(flat_fn, fake_args, analysis, fake_mode=fake_mode, decompositions=decompositions,
                              joint=joint, verify=verify, functional=False)
        except SwapBusy:
            raise
        except Exception as exc:  # noqa: BLE001 - NeedsFunctionalization, or a failure the functional trace decides
            if argument_states(fake_args) != before:  # a retrace (also after a mismatch) needs them unchanged
                if isinstance(exc, _AnalysisMismatch):
                    raise _changed_arguments() from exc
                raise
            if isinstance(exc, _AnalysisMismatch):
                raise
            logger.debug("aotcache: tracing again with functionalization (%s: %s)", type(exc).__name__, exc)
        else:
            if argument_states(fake_args) != before:
                raise _changed_arguments()
            return captured
    return _trace(flat_fn, fake_args, analysis, fake_mode=fake_mode, decompositions=decompositions, joint=joint,
                  verify=verify)


def _subgraph_dedupe_context(fake_mode: Any) -> contextlib.AbstractContextManager:
    """A fresh ``TracingContext`` of the capture's own fake mode for one trace, so that each region of
    ``torch.compiler.nested_compile_region`` is traced once and its calls share it.

    NOTE [Nested compile regions traced once]
    ``invoke_subgraph`` (the op of ``nested_compile_region``) traces its region's forward and backward
    once per identifier and reuses them for every further call, through a cache that lives on the ambient
    ``TracingContext``. aotcache traces outside Dynamo's context (NOTE [Dynamo's tracing context and our
    compilers]), so without one of its own every call was traced again into its own copy of the subgraph:
    N calls of a layer gave N subgraphs in each graph (torch's ``test_dedupe``), the compile time and graph
    size nested_compile_region exists to save. The context is the capture's (its fake mode, never Dynamo's),
    made fresh for each trace, so nothing the analysis or an earlier trace cached is reused; an ambient
    context (a caller already inside one) is left as it is.
    """
    from torch._guards import TracingContext, tracing

    if TracingContext.try_get() is not None:
        return contextlib.nullcontext()
    return tracing(TracingContext(fake_mode))


def _changed_arguments() -> CaptureError:
    return CaptureError("aotcache: the function changed an argument's autograd status or storage outside torch's "
                        "operators (requires_grad_(), x.data = y) only where it runs with symbolic sizes; this is "
                        "not supported. Make that change before the compiled call.")


def _trace(flat_fn: Callable, fake_args: Sequence[Any], analysis: Analysis, *, fake_mode: Any,
           decompositions: Mapping | None, joint: bool, verify: bool, functional: bool = True) -> CapturedGraph:
    from torch.fx.experimental.proxy_tensor import make_fx

    primals = [fake_args[pos] for pos in analysis.positions]
    body = _ForwardBody(flat_fn, fake_args, analysis, clone_mutated=joint, verify=verify,
                        symbolic=fake_mode.shape_env is not None, functional=functional)
    plain_mode = None if functional else StopAtUnfunctionalizableOps()
    functionalization = functionalized if functional else functools.partial(unfunctionalized,
                                                                              plain_mode)
    to_functional = to_functional_tensor if functional else identity
    from_functional = from_functional_tensor if functional else identity
    own_tangents = joint and verify  # the analysis's outputs are static: NOTE [Tangents made in the trace]
    if own_tangents:
        tangent_indices = [i for i, example in enumerate(analysis.graph_output_examples)
                           if is_differentiable(example)]
        tangents, tangent_layouts, tangent_nodes = [], [], []
    else:
        tangent_indices, tangents, tangent_layouts = (
            make_tangents(analysis.graph_output_examples, fake_mode) if joint else ([], [], []))
    grad_inputs = [joint and isinstance(p, torch.Tensor) and p.requires_grad
                   and (p.is_floating_point() or p.is_complex()) for p in primals]
    custom_backward = [False]  # set by the joint trace (NOTE [Custom backwards and double backward])

    try:
        from torch.fx.experimental.proxy_tensor import maybe_enable_thunkify
    except ImportError:  # a torch without it (private API): size arithmetic is recorded eagerly, as before
        maybe_enable_thunkify = contextlib.nullcontext

    # NOTE [In-place ops reading their target] in aliased_writes.py: only where the analysis saw a call that
    # looks in place (or did not look): an active torch-function mode made a dynamic BERT training capture ~8%
    # slower even where it checked nothing (bench/dynamic.py, 2026-12-05)
    refuse_aliased_writes = (RefuseAliasedWrites if analysis.needs_functionalization is not None
                             else contextlib.nullcontext)

    def inference_graph(primals: list) -> tuple:
        # NOTE [Lazy symbolic arithmetic]
        # NOTE [is_fx_tracing during a capture]
        with maybe_enable_thunkify(), functionalization() as mode, refuse_aliased_writes(), fx_tracing_flag_off():
            seed_effect_tokens(mode, analysis.effects)
            outs = body([to_functional(p) for p in primals])
            outs += final_effect_tokens(mode, analysis.effects)
        return tuple(from_functional(out) for out in outs)

    def joint_graph(primals: list, tangents: list | None) -> tuple:
        with (maybe_enable_thunkify(), torch.enable_grad(), functionalization() as mode, refuse_aliased_writes(),
              fx_tracing_flag_off()):  # NOTE [is_fx_tracing during a capture]
            seed_effect_tokens(mode, analysis.effects)
            functional_primals = [to_functional(p) for p in primals]
            functional_tangents = [to_functional(t) for t in tangents] if tangents is not None else []
            fw_outs = body(functional_primals)
            fw_outs += final_effect_tokens(mode, analysis.effects)
            check_traced_outputs_require_grad(fw_outs, tangent_indices)
            _tag_traced_nodes("is_forward")  # NOTE [Forward and backward tags of the joint graph]
            if tangents is None:
                functional_tangents = tangents_in_trace(fw_outs, tangent_indices, tangent_layouts, tangent_nodes)
                if len(tangent_nodes) != len(tangent_indices):
                    raise _AnalysisMismatch("tangents")
            pairs = [(fw_outs[i], t) for i, t in zip(tangent_indices, functional_tangents)]
            seed_effect_tokens(mode, all_effect_types())  # for the backward; unused ones are dead code
            wrt = [functional_primals[i] for i, needed in enumerate(grad_inputs) if needed]
            grads: list = [None] * len(primals)
            if pairs and wrt:
                nodes = autograd_nodes([out for out, _ in pairs])  # one walk for the uses below
                custom_backward[0] = any(is_custom_function_node(node) for node in nodes)
                hand_on_source_locations(nodes)
                refuse_reentrant_checkpoint_nodes(nodes)
                before = mutation_counts(functional_primals)
                tangents_before = mutation_counts([t for _, t in pairs])
                if plain_mode is not None:
                    plain_mode.backward_begins()
                try:
                    # NOTE [Anomaly mode during a capture]; NOTE [Checks inside custom backwards]
                    with no_nan_checks(), in_custom_backwards(nodes), tensor_checks_in_backward(nodes):
                        computed = torch.autograd.grad([out for out, _ in pairs], wrt, [t for _, t in pairs],
                                                       allow_unused=True)
                except RuntimeError as exc:
                    refuse_reentrant_checkpoint(exc)
                    raise
                refuse_backward_mutations(functional_primals, before, analysis.positions)
                refuse_tangent_mutations([t for _, t in pairs], tangents_before)
                for i, grad in zip([i for i, needed in enumerate(grad_inputs) if needed], computed):
                    grads[i] = grad
            outs = tuple(from_functional(v) for v in (*fw_outs, *grads))
            _tag_traced_nodes("is_backward")
        return outs

    def joint_graph_own_tangents(primals: list) -> tuple:
        return joint_graph(primals, None)

    traced = (joint_graph_own_tangents if own_tangents else joint_graph) if joint else inference_graph
    tracing_mode = "symbolic" if fake_mode.shape_env is not None else "fake"
    if fake_mode.shape_env is not None:  # NOTE [Generator draws with symbolic sizes]
        decompositions = keep_generator_draws(decompositions)
    tracer = make_fx(traced, decomposition_table=decompositions, tracing_mode=tracing_mode)
    with explain_data_dependent_ops(), _subgraph_dedupe_context(fake_mode):
        gm = tracer(primals) if own_tangents or not joint else tracer(primals, tangents)
    if not functional:
        check_graph(gm)
    elif joint:
        refuse_backward_effects(gm)  # NOTE [Effectful ops in the backward]
    if own_tangents:
        tangents = tangent_placeholders(gm, tangent_nodes)
    gm = _finish_graph(gm)

    metadata = RuntimeMetadata(
        is_inference=not joint,
        graph_input_positions=list(analysis.positions),
        inputs=analysis.inputs,
        outputs=analysis.outputs,
        out_spec=analysis.out_structure,
        num_graph_user_outputs=sum(info.kind in ("graph", "alias_of_output") for info in analysis.outputs),
        num_extra_outputs=body.num_extra_outputs + len(analysis.effects),
        tangent_indices=tangent_indices,
        tangent_layouts=tangent_layouts,
        grad_inputs=grad_inputs,
        grad_tangents=grad_tangent_dependencies(gm, len(primals)) if joint else [],
        inputs_without_gradient=inputs_without_gradient(gm, grad_inputs) if joint else [],
        offsets_matter=_offsets_matter(analysis, gm),
    )
    return CapturedGraph(graph=gm, metadata=metadata, primals=primals, tangents=tangents, fake_mode=fake_mode,
                         custom_backward=custom_backward[0])


_OFFSET_OPS = frozenset({"as_strided", "as_strided_", "as_strided_scatter", "as_strided_copy", "set_",
                         "sym_storage_offset"})


def _offsets_matter(analysis: Analysis, gm: torch.fx.GraphModule) -> bool:
    """Whether the compiled graph may depend on its inputs' storage offsets (NOTE [Storage offsets are not part of
    the signature] in signature.py): an output regenerated as a view of an input or a replayed metadata mutation
    (both absolute geometry), an offset read in Python, or an as_strided-like op in the graph."""
    if analysis.reads_offsets or any(info.kind == "alias_of_input" for info in analysis.outputs):
        return True
    if any(getattr(info, "metadata_mutation", None) is not None for info in analysis.inputs):
        return True
    for node in gm.graph.nodes:
        if node.op == "call_function":
            packet = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", "")
            if packet.split(".")[0] in _OFFSET_OPS:
                return True
    return False


def capture(flat_fn: Callable, flat_args: Sequence[Any], *, decompositions: Mapping | None = None,
            dynamic: bool | tuple = False, trace_joint: bool | None = None,
            input_is_leaf: Sequence[bool] | None = None, regenerate_aliases: bool = True) -> CapturedGraph:
    """Trace ``flat_fn(*flat_args)`` into a functionalized joint (training) or forward (inference) graph.

    ``trace_joint=None`` decides from grad mode and requires_grad (training iff grad mode is on, some graph
    input requires grad and some forward output is differentiable); True/False forces it. With ``dynamic``,
    sizes are symbolic and ``metadata.guards`` holds the expression that later inputs must satisfy.
    ``regenerate_aliases=False`` (export) makes every tensor output a graph output, views included.

    :raises CaptureError: an unsupported construct (see the message); any other error of the traced code or of
        torch's tracing machinery is raised marked (NOTE [Captures that fail where eager may run] in fallback.py).
    """
    try:
        with one_trace_at_a_time(), torch_modes_kept():  # NOTE [One trace at a time], NOTE [Modes left by an
            # interrupted capture]
            return _capture(flat_fn, flat_args, decompositions=decompositions, dynamic=dynamic,
                            trace_joint=trace_joint, input_is_leaf=input_is_leaf,
                            regenerate_aliases=regenerate_aliases)
    except (CaptureError, SwapBusy, ConfigError):  # SwapBusy: not the code's failure (NOTE [A swap waits a bounded
        raise  # time]); ConfigError: AOTCACHE_TRACE_WAIT_S (NOTE [How long a call waits for another thread's trace])
    except Exception as exc:
        mark_trace_failure(exc)
        raise


def _capture(flat_fn: Callable, flat_args: Sequence[Any], *, decompositions: Mapping | None,
             dynamic: bool | tuple, trace_joint: bool | None, input_is_leaf: Sequence[bool] | None,
             regenerate_aliases: bool) -> CapturedGraph:
    refuse_active_transform()  # NOTE [Captures inside a torch.func level]
    if input_is_leaf is None:
        input_is_leaf = [not isinstance(a, torch.Tensor) or a.is_leaf for a in flat_args]
    flat_fn = checking_tensors(flat_fn)  # NOTE [Cost of the tensor-check mode]
    fake_mode, fake_args = make_fake_inputs(flat_args, dynamic=dynamic)
    static_views = fake_mode.shape_env is None
    callers_mode = any(isinstance(a, torch.Tensor) and is_fake(a) for a in flat_args)  # Dynamo's
    from torch._dispatch.python import enable_python_dispatcher

    def symbolic_analysis() -> Analysis:
        return analyze(flat_fn, fake_args, fake_mode=fake_mode, input_is_leaf=input_is_leaf,
                       static_views=static_views, force_autograd=bool(trace_joint),
                       regenerate_aliases=regenerate_aliases)

    dispatcher = enable_python_dispatcher() if not static_views else contextlib.nullcontext()
    # NOTE [Type checks on scalar symbols]: which code runs, where an int or float argument is a symbol
    scalar_kinds = frozenset(type(arg).__name__ for arg, fake in zip(flat_args, fake_args)
                             if type(arg) in (int, float) and isinstance(fake, (torch.SymInt, torch.SymFloat)))
    codes_run: set = set()
    watch = watch_code(codes_run) if scalar_kinds else contextlib.nullcontext()
    # NOTE [Host random numbers], NOTE [Symbolic fake-tensor cache]
    generators = [arg for arg in flat_args if isinstance(arg, torch.Generator)]  # NOTE [Generator arguments]
    # NOTE [torch.compile-d callables inside a capture]; a Dynamo graph (callers_mode) runs no Python of its own
    nested_compiles = torch_compiled_callables_as_python() if not callers_mode else contextlib.nullcontext()
    with compiling(), nested_compiles, tensor_checks_in_graph(), quiet_fake_tensor_failures(), \
            refuse_host_random(generators) as rng_watch, \
            settings_kept(), compiled_autograd_off(), \
            symbolic_fake_cache_off(fake_mode, callers_mode), parametrization_cache_off(), \
            callers_saved_tensor_hooks_off(), watch, refusing_script_object_calls():  # NOTE [TorchScript objects as
        # inputs]
        analysis = None
        if not static_views:  # NOTE [Analysis without symbols]
            analysis = _analyze_without_symbols(flat_fn, flat_args, fake_args, input_is_leaf=input_is_leaf,
                                                force_autograd=bool(trace_joint),
                                                regenerate_aliases=regenerate_aliases)
        with dispatcher:
            verify = analysis is not None
            if analysis is None:
                analysis = symbolic_analysis()
            joint = analysis.needs_autograd if trace_joint is None else trace_joint
            try:
                captured = trace(flat_fn, fake_args, analysis, fake_mode=fake_mode, decompositions=decompositions,
                                 joint=joint, verify=verify)
            except _AnalysisMismatch as exc:
                logger.debug("aotcache: the analysis on static probes does not hold for symbolic sizes (%s); "
                             "analyzing again with symbols", exc)
                analysis = symbolic_analysis()
                captured = trace(flat_fn, fake_args, analysis, fake_mode=fake_mode, decompositions=decompositions,
                                 joint=joint)
    if scalar_kinds and (checked := kinds_type_checked(codes_run, scalar_kinds)) is not None:
        raise checked
    refuse_replayed_checkpoint_draws(rng_watch, captured.graph)
    if torch.is_grad_enabled():
        refuse_constants_requiring_grad(captured.graph)
    if dynamic and fake_mode.shape_env is not None and not callers_mode:
        captured.metadata.guards = fake_mode.shape_env.produce_guards_expression(captured.primals,
                                                                                 ignore_static=False)
    return captured


# NOTE [Analysis without symbols]
# With symbolic sizes every tensor op also does symbolic arithmetic (sizes, strides, contiguity), so an
# analysis pass on symbolic probes cost as much as the trace itself (a third of a dynamic inference capture,
# a fifth of a training one). Nothing the trace takes from the analysis needs symbols (input mutations, output
# kinds, requires_grad, effects, the output structure; view sizes are read in the trace, and a training trace
# makes its tangents itself: NOTE [Tangents made in the trace]), so a capture of real inputs with symbolic
# sizes analyzes on static probes of those inputs, whose sizes are the symbols' hints, so that size-dependent
# branches go the same way. The trace checks what it relies on -- each input's mutations, each output's kind
# (input, view of an input, graph output, constant) -- and on a mismatch (a size returned as an output is a
# constant on static probes, an op may make a view on static sizes but a copy on symbolic ones) it analyzes
# again with symbols and traces again, as before. So does anything whose handling depends on symbols: a
# resize_, an input's metadata mutation, a failure of the static analysis, inputs that carry a caller's symbols
# (Dynamo). A training capture that mutates an input (BatchNorm's running stats, a non-leaf input changed in
# place) analyzed with symbols too until session 11, without a recorded reason; on static probes it gives the
# same results, buffers and gradients (tests/aot/test_dynamic.py, the dynamic routes of bench/odd_forwards.py and
# bench/odd_inputs.py) and a conv+BatchNorm training capture 16% sooner.


def _analyze_without_symbols(flat_fn: Callable, flat_args: Sequence[Any], fake_args: Sequence[Any], *,
                             input_is_leaf: Sequence[bool], force_autograd: bool,
                             regenerate_aliases: bool) -> Analysis | None:
    """The analysis on static probes of the real ``flat_args``, or None where it must run with symbols
    (NOTE [Analysis without symbols])."""
    if any(isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)) or (isinstance(a, torch.Tensor) and is_fake(a))
           for a in flat_args):  # symbols of a caller's ShapeEnv (Dynamo): analyzed with them
        return None
    if any(isinstance(a, (torch.SymInt, torch.SymFloat)) for a in fake_args):  # scalar inputs traced as symbols
        return None
    static_mode, static_args = make_fake_inputs(flat_args, dynamic=False)
    try:
        analysis = analyze(flat_fn, static_args, fake_mode=static_mode, input_is_leaf=input_is_leaf,
                           static_views=False, force_autograd=force_autograd,
                           regenerate_aliases=regenerate_aliases, traced_args=fake_args,
                           spot_functionalization=can_trace_without_functionalization())
    except SwapBusy:  # no analysis with symbols would swap sooner: NOTE [A swap waits a bounded time]
        raise
    except Exception as exc:  # noqa: BLE001 - the analysis with symbols raises the error meant for this capture
        logger.debug("aotcache: analysis on static probes failed (%s: %s); analyzing with symbols",
                     type(exc).__name__, exc)
        return None
    if analysis.shape_sensitive:
        return None
    return analysis


