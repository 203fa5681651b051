"""The Dynamo-graph form (``aotcache.aot_module_simplified``, the body of the ``torch.compile`` backend): one
graph Dynamo hands over, compiled now for its (possibly fake, symbolic) example inputs.

Reuse across signatures is Dynamo's job (its guards), so this form needs none of
:class:`~aotcache.aot.api.AOTFunction`'s signatures; what it needs instead is to meet Dynamo's conventions
(its tracing context, symbolic example inputs, unspecialized floats) and to keep the call contract a direct
caller may break (NOTE [Call contract of aot_module_simplified]).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from aotcache.aot.checkpoint_regions import has_checkpoint_regions
from aotcache.aot.compile_step import AOTOptions, compile_function
from aotcache.aot.dynamo_floats import FloatsNotTensorified, KeptFloats, keep_float_inputs
from aotcache.aot.errors import CaptureError
from aotcache.aot.hot_path import ModuleState, storage_object, storage_sharing
from aotcache.aot.input_mutations import mutated_input_overlaps
from aotcache.aot.checkpoint_refusals import refuse_unpreserved_random_regions
from aotcache.aot.refusals import refuse_backward_state_inputs
from aotcache.aot.tensor_state_reads import refuse_version_reads_in_graph
from aotcache.aot.services import CompileServices
from aotcache.aot.signed_zero_guards import exact_float, is_zero_float
from aotcache.aot.tensor_subclasses import refuse_non_strided_graph_values
from aotcache.aot.source_locations import (
    capturing_source_locations,
    keeps_source_locations,
    run_graph,
    runs_its_graph_only,
)
from aotcache.logs import log_once
from aotcache.progress import compile_progress

__all__ = ["compile_dynamo_graph"]


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


def _symbolic_example_inputs(gm: nn.Module, example_inputs: Sequence[Any], static_where_traced: bool = False) -> list:
    """Dynamo's example inputs, as the fake tensors of its fake mode when its graph has symbolic shapes;
    ``static_where_traced``: a tensor whose placeholder Dynamo traced with static sizes gets a static fake.

    NOTE [Dynamo's symbolic example inputs]
    Dynamo hands a backend *real* example tensors; when it compiles a graph with dynamic dimensions (``dynamic=True``
    or automatic dynamic after a size changed) the symbolic sizes live only in its fake mode (the ambient
    ``TracingContext``) and in the placeholders' ``example_value``, plus size symbols passed as SymInt inputs.
    Tracing the real tensors would specialize the graph to their sizes while Dynamo's guards admit every size:
    a later call with another size would run a graph traced for the first (a wrong result or a shape error).
    So when anything is symbolic, the real tensors are swapped for Dynamo's own fakes (``from_tensor`` of its
    mode returns the fake it made for that tensor, symbols included). Static graphs keep the real inputs.
    A graph whose only symbols are the floats it keeps as inputs (NOTE [Dynamo's float inputs kept as graph inputs]
    in dynamo_floats.py) gets static fakes where Dynamo traced static sizes, as do its lifted parameters and
    buffers (:func:`_static_fakes`): the backend's mode made fresh size symbols for them (sources unknown), which
    the capture then specialized, and guards no input holds kept the graph out of the cache.
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

    static = [static_where_traced and isinstance(node.meta.get("example_value"), torch.Tensor)
              and not _is_symbolic(node.meta.get("example_value")) for node in placeholders]
    if len(static) != len(example_inputs):
        static = [False] * len(example_inputs)
    return [(fake_mode.from_tensor(value, static_shapes=True) if is_static else fake_mode.from_tensor(value))
            if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) else value
            for value, is_static in zip(example_inputs, static)]


def _static_fakes(tensors: Sequence[torch.Tensor], example_inputs: Sequence[Any]) -> list:
    """``tensors`` (a graph's lifted parameters and buffers, which Dynamo holds static) as static fakes of the
    example inputs' fake mode (NOTE [Dynamo's symbolic example inputs]); as they are where there is none."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(list(example_inputs)) if tensors else None
    if fake_mode is None:
        return list(tensors)
    return [fake_mode.from_tensor(value, static_shapes=True) for value in tensors]


def _specialize_unspecialized_floats(gm: nn.Module, kept: KeptFloats | None = None) -> None:
    """Have Dynamo specialize the Python floats it passed as 0-d tensor inputs (NOTE [Dynamo's float inputs]),
    but for those ``kept`` as graph inputs (NOTE [Dynamo's float inputs kept as graph inputs] in dynamo_floats.py).

    NOTE [Dynamo's float inputs]
    With ``dynamic=True`` Dynamo does not specialize float attributes (a BatchNorm's ``eps`` and ``momentum``): each
    is a 0-d float64 tensor input that the graph reads with ``.item()``, and Dynamo does not guard its value. Our
    capture cannot keep such a value symbolic (ATen's ``float`` arguments would bake it in, and nothing would
    re-check it: a changed ``eps`` would reuse the graph), and without Dynamo's symbol ``.item()`` is data-dependent.
    So, as torch's own pipeline does for a float it cannot turn into tensor ops, the floats are marked for
    specialization and Dynamo restarts its analysis: the restarted graph holds them as constants, guarded by value.
    Where torch's tensorify pass can turn every use of such a float into tensor arithmetic, it is kept as a graph
    input instead, as torch's own backends keep it (NOTE [Dynamo's float inputs kept as graph inputs]).
    Only floats Dynamo made from a Python number are such inputs: their symbol is backed (it has the number as its
    hint). A tensor argument the function calls ``.item()`` on (``capture_scalar_outputs``) carries an *unbacked*
    symbol in the same place; marking it made Dynamo's restart guard on a value no one knows
    (``GuardOnDataDependentSymNode``, an error where aot_eager runs: PyTorch's test_unspec.py,
    test_symfloat_to_tensor). Such a ``.item()`` is left to the capture, which refuses it as data-dependent.
    """
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental import symbolic_shapes

    guard_scalar = getattr(symbolic_shapes, "guard_scalar", None)  # without it: refused as before (a fallback)
    names = []
    kept_positions = set(kept.positions) if kept is not None else set()
    placeholders = [node for node in getattr(getattr(gm, "graph", None), "nodes", []) if node.op == "placeholder"]
    for position, node in enumerate(placeholders):
        if position in kept_positions:
            continue
        value = node.meta.get("example_value")
        memo = value.item_memo if isinstance(value, FakeTensor) else None
        name = getattr(getattr(getattr(memo, "node", None), "_expr", None), "name", None)
        if isinstance(memo, torch.SymFloat) and name is not None and _backed(memo):
            # NOTE [Float inputs read in a checkpointed region]; NOTE [Zero floats specialized in place]
            if guard_scalar is not None and (_read_in_regions(gm, node) or is_zero_float(memo)):
                _specialize_in_regions(gm, node, exact_float(memo, guard_scalar))
            else:
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


def _backed(value: torch.SymFloat) -> bool:
    """Whether a symbolic float has a hint (Dynamo's float made from a Python number), not an unbacked ``.item()``."""
    has_hint = getattr(value.node, "has_hint", None)
    return has_hint is None or bool(has_hint())


# NOTE [Float inputs read in a checkpointed region]
# Dynamo's restart specializes a float input only where the graph's every use of it is its ``.item()``; a float
# attribute read inside an activation-checkpointed region (a Dropout's ``p`` under ``dynamic=True``) is passed to
# the ``tag_activation_checkpoint`` call and read with ``.item()`` in the region's body, so the restarted graph
# held it as before and the capture refused the ``.item()``: every such graph ran eagerly. Such a float is
# specialized here instead, as Dynamo's restart does: its value guarded in Dynamo's shape environment (a changed
# ``p`` compiles again) and each ``.item()`` of it, in the graph and in the regions' bodies (nested ones too),
# replaced by that constant, which the cache key then sees in the body's graph.
def _read_in_regions(gm: nn.Module, node: torch.fx.Node) -> bool:
    """Whether the float input ``node`` is read only by ``.item()`` and by checkpointed regions, at least one."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    users = list(node.users)
    return hop is not None and any(user.target is hop for user in users) and all(
        user.target == "item" or (user.target is hop and node not in user.args[:1]
                                  and node not in user.kwargs.values() and _region_reads_as_item(gm, user, node))
        for user in users)


def _region_body_inputs(gm: nn.Module, call: torch.fx.Node, node: torch.fx.Node) -> tuple[Any, list]:
    """The body of the region ``call`` and its placeholders that receive ``node``."""
    body = getattr(gm, str(call.args[0].target), None) if isinstance(call.args[0], torch.fx.Node) else None
    if not isinstance(body, torch.fx.GraphModule):
        return None, []
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    return body, [placeholders[index] for index, arg in enumerate(call.args[1:])
                  if arg is node and index < len(placeholders)]


def _region_reads_as_item(gm: nn.Module, call: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Whether the region ``call`` reads ``node`` only with ``.item()`` (in its body or nested regions')."""
    body, inputs = _region_body_inputs(gm, call, node)
    return body is not None and bool(inputs) and all(
        user.target == "item" or (user.target is call.target and _region_reads_as_item(body, user, inner))
        for inner in inputs for user in inner.users)


def _specialize_in_regions(gm: nn.Module, node: torch.fx.Node, value: float) -> None:
    """Replace each ``.item()`` of ``node`` (in ``gm`` and in the bodies of the regions it is passed to) by
    ``value`` (NOTE [Float inputs read in a checkpointed region])."""
    for user in list(node.users):
        if user.target == "item":
            user.replace_all_uses_with(value)
            user.graph.erase_node(user)
        else:
            body, inputs = _region_body_inputs(gm, user, node)
            for inner in inputs:
                _specialize_in_regions(body, inner, value)
    if isinstance(gm, torch.fx.GraphModule):
        gm.recompile()


def compile_dynamo_graph(gm: nn.Module, example_inputs: Sequence[Any], options: AOTOptions, *,
                         services: CompileServices, cache: Any = True) -> Callable:
    """Compile Dynamo's graph ``gm`` now for its (possibly fake, symbolic) ``example_inputs`` and return
    ``run(*flat_args)`` (the body of ``aotcache.aot_module_simplified``, the ``torch.compile`` backend form).

    Parameters and buffers still on ``gm`` are lifted to graph inputs and read at every call. Reuse across
    signatures is Dynamo's job (its guards), so exactly one graph is compiled; ``services.compile_graph`` may
    load it from ``cache`` instead (NOTE [Compile services]).
    """
    refuse_unpreserved_random_regions(gm)  # NOTE [Checkpointed regions without the RNG state]
    refuse_non_strided_graph_values(gm)  # NOTE [Nested tensors built inside a Dynamo graph]
    refuse_backward_state_inputs(example_inputs)  # NOTE [Hooks compiled autograd runs from a forward graph]
    refuse_version_reads_in_graph(gm)  # NOTE [Version counters in a Dynamo graph]
    param_names = [name for name, _ in gm.named_parameters()]
    buffer_names = [name for name, _ in gm.named_buffers()]
    num_lifted = len(param_names) + len(buffer_names)
    # Dynamo compiles inside its TracingContext; a user's own call of aot_module_simplified has none
    from_dynamo = torch._guards.TracingContext.try_get() is not None  # NOTE [Dynamo's graph runs without global
    # module hooks]

    state = ModuleState(gm)  # NOTE [Hot path]

    def lifted() -> list:
        if not num_lifted:
            return []
        params, buffers, _, _ = state.current()
        return [*params.values(), *buffers.values()]

    keep_lines = keeps_source_locations(gm)  # NOTE [Source stack traces]
    # NOTE [Checkpointed regions traced in line]; run node by node, so only where the call adds nothing (hooks)
    regions = has_checkpoint_regions(gm) and runs_its_graph_only(gm)

    # NOTE [Dynamo's float inputs kept as graph inputs]: ``traced`` reads those floats as float inputs
    kept = keep_float_inputs(gm, example_inputs, options)
    traced: Any = gm

    def flat_fn(*flat: Any) -> Any:
        if not num_lifted:
            return run_graph(traced, flat, keep_lines, regions, dynamo_graph=from_dynamo)
        params = dict(zip(param_names, flat[:len(param_names)]))
        buffers = dict(zip(buffer_names, flat[len(param_names):num_lifted]))
        # functional_call's tie_weights, without its call of the module (NOTE [Dynamo's graph runs without global
        # module hooks] in source_locations.py)
        tie_weights = not keep_lines and not regions
        with torch.nn.utils.stateless._reparametrize_module(traced, {**params, **buffers}, tie_weights=tie_weights):
            return run_graph(traced, flat[num_lifted:], keep_lines, regions, dynamo_graph=from_dynamo)

    _specialize_unspecialized_floats(gm, kept)
    if kept is not None:
        traced, example_inputs = kept.rewrite(gm, example_inputs)  # after the regions' floats were specialized
        kept.start()
    example_inputs = _symbolic_example_inputs(traced, example_inputs, static_where_traced=kept is not None)
    example = [*(_static_fakes(lifted(), example_inputs) if kept is not None else lifted()), *example_inputs]
    with _outside_dynamo_tracing_context(), compile_progress(f"{type(gm).__qualname__} (torch.compile graph)"), \
            capturing_source_locations(keep_lines):
        try:
            runtime = services.compile_graph(cache, traced, example_inputs, flat_fn, example, options,
                                             [*param_names, *buffer_names],
                                             captured_check=kept.check if kept is not None else None)
        except Exception as exc:
            if kept is None:
                raise
            # refused by the check, or a capture or compile that failed with the float as an input: specialized as
            # before (Dynamo restarts), so a graph that fails for another reason fails as it did (NOTE [Dynamo's
            # float inputs kept as graph inputs])
            reason = str(exc) if isinstance(exc, FloatsNotTensorified) else f"{type(exc).__name__}: {exc}"
            log_once(logging.DEBUG, f"dynamo-float-specialized:{reason}",
                     f"aotcache backend: a float Dynamo passed unspecialized is specialized ({reason})")
            kept.specialize_and_restart()

    # NOTE [Call contract of aot_module_simplified]
    # The graph was captured for the example inputs' requires_grad (of every input, lifted parameters
    # included) and for their aliasing (a duplicated input is one value in the graph). Dynamo guards on both,
    # but a direct caller may break either: a call that does is compiled again for its own contract (from
    # its real tensors, so statically), instead of dropping a gradient or reading one input for two.
    # NOTE [Offsets in the call contract]
    # Dynamo does not guard on storage offsets, and a graph whose result depends on them (an output that is a
    # view of an input, regenerated at the traced absolute offset: ``RuntimeMetadata.offsets_matter``) returned,
    # for ``x`` at another offset of its storage, a view at the first call's offset (another window's values).
    # So for such a graph the static offsets are part of the contract; past a few offsets a call runs Dynamo's
    # graph eagerly (a loop slicing a new window each step must not compile a graph per step).
    example_flat = [*example[:num_lifted], *example_inputs]
    offset_positions = ([index for index, value in enumerate(example_flat) if isinstance(value, torch.Tensor)
                         and type(value.storage_offset()) is int]
                        if getattr(getattr(runtime, "metadata", None), "offsets_matter", False) else [])

    # NOTE [Overlap in the call contract]
    # The capture accepts a mutated input that shares a storage with another input where their bytes are
    # disjoint (check_mutated_inputs_do_not_alias): each is traced as its own tensor, and aotcache's own signature
    # keys their relative offsets, so overlapping views trace again (and are refused). Dynamo's guards hold
    # sizes and strides but no offsets: a frame compiled for ``x = base[0:4]``, ``k = base[20:26]`` was reused
    # for ``k = base[2:8]`` and read ``k`` before ``x.add_(1)`` reached it (37 where eager gives 39). So where the
    # graph mutates an input, whether each such pair of inputs overlaps is part of the contract; a call that
    # differs is compiled again for its own inputs (and, overlapping, is refused and runs as Dynamo's graph).
    mutated_user_tensors = _mutated_user_tensors(runtime, example_flat, num_lifted)

    def contract_of(flat: Sequence[Any]) -> tuple:
        return (_call_contract(flat, num_lifted, mutated_user_tensors),
                tuple(flat[index].storage_offset() for index in offset_positions))

    compiled_for = {contract_of(example_flat): runtime}
    lock = threading.Lock()

    def run(*args: Any) -> Any:
        if kept is not None:
            args = kept.arguments(args)  # NOTE [Dynamo's float inputs kept as graph inputs]
        flat = [*lifted(), *args]
        contract = contract_of(flat)
        chosen = compiled_for.get(contract)
        if chosen is None:
            with lock:
                chosen = compiled_for.get(contract)
                if chosen is None:
                    if offset_positions and len(compiled_for) >= _MAX_OFFSET_VARIANTS:
                        return flat_fn(*flat)  # NOTE [Offsets in the call contract]
                    if kept is not None:  # a capture of this call would make its floats constants for every value
                        log_once(logging.INFO, f"aot-simplified-contract-floats:{id(compiled_for)}",
                                 "aot_module_simplified: a call broke the compiled graph's requires_grad, aliasing "
                                 "or storage-offset assumptions; it runs the graph as Python (float inputs)")
                        compiled_for[contract] = flat_fn
                        return flat_fn(*flat)
                    log_once(logging.INFO, f"aot-simplified-contract:{id(compiled_for)}",
                             "aot_module_simplified: a call broke the compiled graph's requires_grad, "
                             "aliasing or storage-offset assumptions; compiling it again for this call's inputs")
                    try:
                        chosen = compile_function(flat_fn, flat, options)
                    except CaptureError as exc:  # (overlapping views of a mutated input: NOTE [Overlap in ...])
                        from aotcache.aot.fallback import eager_dynamo_graph

                        eager_dynamo_graph(gm, exc)  # raises in strict mode; else counted, logged once
                        chosen = flat_fn  # Dynamo's graph as Python: eager's results
                    compiled_for[contract] = chosen
        return chosen(*flat)

    dynamic_dims = _dynamic_output_dims(gm)
    if dynamic_dims is not None:
        inner = run

        def run(*args: Any) -> Any:  # type: ignore[no-redef]
            outs = inner(*args)
            if isinstance(outs, (tuple, list)) and len(outs) == len(dynamic_dims):
                for value, dims in zip(outs, dynamic_dims):
                    if dims and isinstance(value, torch.Tensor):
                        _mark_propagated_dynamic(value, dims)
            return outs

    run.runtime = runtime  # type: ignore[attr-defined]
    return run


def _dynamic_output_dims(gm: nn.Module) -> list[set[int]] | None:
    """Per output of Dynamo's graph, the dimensions whose size is symbolic; None when none is.

    NOTE [Dynamic dimensions of a Dynamo graph's outputs]
    Torch's AOT Autograd runtime stamps each output tensor with the dimensions that were symbolic in its trace
    (``_dynamo_propagated_dynamic_indices``, an unguarded hint). Dynamo reads it when that tensor is an input of a
    later frame (after a graph break, or a KV cache an earlier graph filled) and compiles that frame with those
    dimensions dynamic from the start. Without the stamp the next frame is compiled static, then again as
    dynamic when the size changes: one compile more than ``backend="aot_eager"`` (a decode step of
    ``generate``). So our runtime stamps the same hint, read from the output node's example values. torch 2.11
    has no such attribute: its runtime stamps the outputs' ``_dynamo_weak_dynamic_indices`` (the mark of
    ``torch._dynamo.maybe_mark_dynamic``) and its Dynamo reads that one, so ours stamps whichever attribute this
    torch's runtime uses (:func:`propagated_dynamic_attribute`).
    """
    output = next((node for node in reversed(list(getattr(getattr(gm, "graph", None), "nodes", [])))
                   if node.op == "output"), None)
    if output is None or not output.args or not isinstance(output.args[0], (tuple, list)):
        return None
    dims: list[set[int]] = []
    for node in output.args[0]:
        value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
        shape = value.shape if isinstance(value, torch.Tensor) else ()
        dims.append({i for i, size in enumerate(shape) if isinstance(size, torch.SymInt)
                     and size.node.maybe_as_int() is None})
    return dims if any(dims) else None


@functools.cache
def propagated_dynamic_attribute() -> str:
    """The tensor attribute through which this torch's AOT Autograd runtime hands Dynamo an output's dynamic
    dimensions: ``_dynamo_propagated_dynamic_indices`` where the runtime has its own marker for it (torch 2.12
    on), else ``_dynamo_weak_dynamic_indices`` (torch 2.11 marks outputs as ``maybe_mark_dynamic`` does).

    The attribute torch 2.11's Dynamo reads is the second one: stamping the first left the next frame static there,
    one compile more than ``aot_eager`` (NOTE [Dynamic dimensions of a Dynamo graph's outputs])."""
    from torch._functorch._aot_autograd import runtime_wrappers

    if hasattr(runtime_wrappers, "mark_dynamo_propagated_dynamic_indices"):
        return "_dynamo_propagated_dynamic_indices"
    return "_dynamo_weak_dynamic_indices"


def _mark_propagated_dynamic(value: torch.Tensor, dims: set[int]) -> None:
    """Add ``dims`` to ``value``'s unguarded dynamic-dimension hint (NOTE [Dynamic dimensions of ...])."""
    attribute = propagated_dynamic_attribute()
    current = getattr(value, attribute, None)
    try:
        setattr(value, attribute, (current | dims) if isinstance(current, set) else set(dims))
    except (AttributeError, RuntimeError, TypeError):  # a tensor type that takes no attributes: only a hint
        pass


_MAX_OFFSET_VARIANTS = 8  # graphs per Dynamo graph for other storage offsets (NOTE [Offsets in the call contract])


def _mutated_user_tensors(runtime: Any, example_flat: Sequence[Any], num_lifted: int) -> frozenset[int]:
    """The positions among the user's tensor inputs (as :func:`_call_contract` counts them) that ``runtime``'s
    graph mutates; every one where the runtime does not say (NOTE [Overlap in the call contract])."""
    user_positions = [index for index in range(num_lifted, len(example_flat))
                      if isinstance(example_flat[index], torch.Tensor)]
    metadata = getattr(runtime, "metadata", None)
    inputs, positions = getattr(metadata, "inputs", None), getattr(metadata, "graph_input_positions", None)
    if inputs is None or positions is None:
        return frozenset(range(len(user_positions)))
    mutated_flat = {positions[index] for index, info in enumerate(inputs) if getattr(info, "mutates_data", False)}
    return frozenset(k for k, index in enumerate(user_positions) if index in mutated_flat)


def _call_contract(flat: Sequence[Any], num_lifted: int, mutated: frozenset[int] = frozenset()) -> tuple:
    """requires_grad of every tensor, which user inputs share a storage (NOTE [Call contract of ...]) and, for
    those the graph mutates (``mutated``: positions among the user's tensors), which overlap the inputs sharing
    their storage (NOTE [Overlap in the call contract]).

    Storages are compared as objects (``_cdata``), which works alike for Dynamo's fake example inputs (whose
    data pointers are all 0) and for the real tensors of a call."""
    requires_grad = tuple(value.requires_grad for value in flat if isinstance(value, torch.Tensor))
    user_tensors = [value for value in flat[num_lifted:] if isinstance(value, torch.Tensor)]
    if len(user_tensors) < 2:
        return requires_grad, (), ()
    sharing = storage_sharing(user_tensors, storage_object)
    overlaps = (mutated_input_overlaps(user_tensors, sharing, mutated)
                if mutated and sharing != tuple(range(len(sharing))) else ())
    return requires_grad, sharing, overlaps
