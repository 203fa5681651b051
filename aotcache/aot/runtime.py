"""Runtime: run a compiled forward (and backward) with eager semantics for mutations, views and autograd.

:class:`CompiledRuntime` is everything needed to run one captured signature: the compiled forward, the
compiled backward (training only) and the :class:`~aotcache.aot.metadata.RuntimeMetadata`. It depends on no
tracing state, so the compiled-graph cache can rebuild it from artifacts plus ``RuntimeMetadata.from_json``.

Per call:
  1. training: :class:`_CompiledAutogradFunction` runs the compiled forward, saves what the partition chose,
     and later runs the compiled backward; inference: the compiled forward runs under ``no_grad``;
  2. mutation epilogue: the updated values of mutated inputs are copied into the real inputs;
  3. outputs that are inputs, or views of inputs / of other outputs, are regenerated as real views
     (``as_strided``) of the real tensors, so aliasing matches eager; constants are filled in;
  4. the flat outputs are put back into the user's structure (NOTE [Output structure] in metadata).

A backward under grad mode (double backward) replays the joint graph: :mod:`aotcache.aot.double_backward`.
"""

from __future__ import annotations

import contextlib
import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from aotcache.aot.double_backward import (
    DoubleBackwardError,
    differentiable_gradients,
    generator_states_of,
    generators_at,
)
from aotcache.aot.metadata import OutputInfo, OutputStructure, RuntimeMetadata

__all__ = ["CompiledRuntime", "DisableAutocast", "storage_pointer", "skip_backward_in_dynamo"]


# NOTE [Compiled graphs run without autocast]
# A graph traced under autocast already holds autocast's casts as explicit ATen ops, and regions where the
# function turned autocast off hold none. Running its ATen ops under the caller's autocast again would cast
# them a second time (an fp32 region comes back bf16, or a backward meets mixed dtypes), so compiled forwards
# and backwards run with the autocast dispatch keys excluded. Which autocast state a graph was traced under is
# part of its signature and cache key.
DisableAutocast = getattr(torch._C, "_DisableAutocast", contextlib.nullcontext)


def storage_pointer(tensor: torch.Tensor) -> int:
    """Identifies the memory of ``tensor``'s storage: its data pointer (0 when empty), or for a wrapper subclass
    without data of its own (TwoTensor, ...) a negative stand-in from its storage object."""
    storage = tensor.untyped_storage()
    try:
        return storage.data_ptr()
    except RuntimeError:
        return -storage._cdata


def _tangent_coercion(layout: dict) -> tuple[tuple[int, ...] | None, torch.memory_format]:
    """(exact strides or None, memory format) from a ``RuntimeMetadata.tangent_layouts`` entry."""
    if "stride" in layout:
        return tuple(int(v) for v in layout["stride"]), torch.contiguous_format
    memory_format = getattr(torch, str(layout.get("memory_format")), None)
    if not isinstance(memory_format, torch.memory_format):
        raise ValueError(f"runtime metadata names an unknown tangent memory format {layout!r}")
    return None, memory_format


class CompiledRuntime:
    """Runs one compiled signature: ``runtime(*flat_args)`` returns the user's output structure."""

    # the capture's joint graph as a flat callable, for double backward (NOTE [Double backward through the joint
    # graph]); None where there is none (inference, a warm start, an impure graph)
    joint: Callable | None = None
    # makes ``joint`` (from the graph inputs of the call being differentiated) where the runtime was loaded
    # without a capture: a torch.compile region found in the cache, a fingerprint warm start; called once
    joint_factory: Callable[[Sequence[Any]], None] | None = None
    # whether ``joint`` draws random numbers: its replay then needs the generators' states at the forward (NOTE
    # [Double backward through random ops])
    joint_random: bool = False
    # why ``joint`` cannot be replayed, for the DoubleBackwardError a double backward raises (None: no reason
    # known); e.g. :data:`CUSTOM_BACKWARD_REFUSAL`
    joint_refusal: str | None = None
    # the torch.Generator objects its graph holds (NOTE [Generator arguments] in generator_args.py)
    graph_generators: tuple = ()

    def __init__(self, metadata: RuntimeMetadata, forward: Callable, backward: Callable | None = None) -> None:
        if not metadata.is_inference and backward is None:
            raise ValueError("a training CompiledRuntime needs a compiled backward")
        self.metadata = metadata
        self.forward = forward
        skip_backward_in_dynamo()  # NOTE [The compiled backward runs outside Dynamo]
        self.backward = backward
        self.out_structure = OutputStructure(metadata.out_spec)  # ValueError: unresolvable type (a cache miss)
        self._positions = list(metadata.graph_input_positions)
        self._tangent_indices = list(metadata.tangent_indices)
        self._tangent_layouts = [_tangent_coercion(layout) for layout in metadata.tangent_layouts]
        if len(self._tangent_layouts) != len(self._tangent_indices):
            raise ValueError("runtime metadata has a tangent layout count that differs from its tangents")
        self._mutated = metadata.mutated_inputs
        # whether autograd saw the mutation (False: done through .detach() / .data / no_grad, or running stats)
        self._mutation_recordable = [metadata.inputs[index].mutation_requires_grad for index in self._mutated]
        self._metadata_mutations = [(index, info.metadata_mutation) for index, info in enumerate(metadata.inputs)
                                    if info.metadata_mutation]
        # (a view made under no_grad takes its status from the real input: NOTE [Views of inputs made under no_grad])
        self._outputs_requiring_grad = [k for k, info in enumerate(metadata.outputs)
                                        if info.requires_grad and not info.no_grad_view]
        # the metadata's derived counts, read several times per call (its properties rebuild a list each time)
        self._num_mutation_outputs = len(self._mutated)
        self._first_extra_output = self._num_mutation_outputs + metadata.num_graph_user_outputs
        self._num_fwd_outputs = self._first_extra_output + metadata.num_extra_outputs
        self._forward_grad_mode_independent = getattr(forward, "grad_mode_independent", False) is True
        # the generators the forward draws from exactly as its graph's ATen ops would (NOTE [Double backward through
        # random ops]); None: it draws nothing, or not replayably
        draws = getattr(forward, "eager_random_draws", None)
        self._random_draws = tuple(draws) if isinstance(draws, tuple) and draws else None
        # NOTE [Gradients of unused outputs]: with two or more tangents, an input whose gradient reads only some
        # of them gets None when autograd computed none of those (eager leaves its .grad None, not zeros)
        self._grad_tangents = [frozenset(dependencies) for dependencies in metadata.grad_tangents]
        self._unused_outputs_matter = (len(self._tangent_indices) > 1 and
                                       len(self._grad_tangents) == len(metadata.grad_inputs))
        self._detached_inputs = tuple(metadata.inputs_without_gradient)  # NOTE [Inputs the backward does not reach]

    def __call__(self, *flat_args: Any) -> Any:
        meta = self.metadata
        graph_args = [flat_args[pos] for pos in self._positions]
        real_args = graph_args
        if self._metadata_mutations:
            real_args = list(graph_args)
            self._replay_metadata_mutations(graph_args)
        if meta.is_inference:
            with torch.no_grad(), DisableAutocast():
                fw_outs = list(self.forward(*graph_args))
        else:
            function_args = graph_args
            if self._detached_inputs and self._detaching_keeps_outputs_differentiable(graph_args):
                function_args = list(graph_args)  # NOTE [Inputs the backward does not reach]
                for index in self._detached_inputs:
                    if isinstance(function_args[index], torch.Tensor):
                        function_args[index] = function_args[index].detach()
            with DisableAutocast():
                fw_outs = list(_CompiledAutogradFunction.apply(self, *function_args))
        self._apply_mutations(real_args, fw_outs)  # new values have the final geometry
        flat_outs = self._build_outputs(real_args, fw_outs)
        if torch.is_grad_enabled():
            self._check_requires_grad(flat_outs)
        return self.out_structure.unflatten(flat_outs)

    # -- steps -------------------------------------------------------------------------------------------

    def _detaching_keeps_outputs_differentiable(self, graph_args: list) -> bool:
        """Whether an input that requires grad is left undetached for the outputs that must require grad (NOTE
        [Inputs the backward does not reach]): where every such input gets no gradient (an empty input of
        ``linalg.householder_product``), eager's outputs still require grad, so nothing is detached."""
        if not self._outputs_requiring_grad:
            return True
        detached = set(self._detached_inputs)
        return any(isinstance(arg, torch.Tensor) and arg.requires_grad
                   for index, arg in enumerate(graph_args) if index not in detached)

    def _check_requires_grad(self, flat_outs: list) -> None:
        # NOTE [Output requires_grad]: capture recorded which outputs require grad when the function ran on
        # fake inputs (as eager would); an output that lost it here would silently drop gradients, so it is an
        # error (capture rejects the known causes up front, this catches anything it missed)
        for k in self._outputs_requiring_grad:
            out = flat_outs[k]
            if isinstance(out, torch.Tensor) and not out.requires_grad:
                raise RuntimeError(
                    f"aotcache: flat output {k} requires grad in eager but the compiled function returned it "
                    f"without grad (gradients would be silently dropped); please report this with the function. "
                    f"Call the function eagerly meanwhile.")

    def _replay_metadata_mutations(self, graph_args: list) -> None:
        """Give each input its final geometry now; the graph gets an alias with the geometry it was traced for.

        NOTE [Metadata mutations] (see capture): replayed *before* the graph runs, so the version bump of
        ``as_strided_`` happens before anything is saved for backward (our saved alias stays valid, while a
        tensor saved earlier by the caller's own graph is caught by autograd's version check, as in eager), and
        the saved alias keeps its own geometry however the input's changes.
        """
        for index, (size, stride, offset) in self._metadata_mutations:
            real = graph_args[index]
            graph_args[index] = real.as_strided(real.size(), real.stride(), real.storage_offset())
            real.as_strided_(size, stride, offset)

    def _apply_mutations(self, graph_args: list, fw_outs: list) -> None:
        # NOTE [Mutation epilogue]
        # The compiled forward is functional: it returns the new value of each mutated input, and the
        # runtime writes it into the real input here. When the new value requires grad, the copy_ is
        # recorded by autograd (the input is a non-leaf, as in eager); otherwise it runs under no_grad, so
        # e.g. BatchNorm running stats are updated without joining the autograd graph.
        pairs, recorded = [], []
        grad_enabled = torch.is_grad_enabled()
        for new, input_index, may_record in zip(fw_outs, self._mutated, self._mutation_recordable):
            real = graph_args[input_index]
            if new is not real:
                pairs.append((real, new))
                recorded.append(grad_enabled and may_record and isinstance(new, torch.Tensor) and new.requires_grad)
        if not pairs:
            return
        if not any(recorded):  # the usual case (e.g. running stats): one no_grad block, not one per copy
            with torch.no_grad():
                for real, new in pairs:
                    real.copy_(new)
            return
        for (real, new), record in zip(pairs, recorded):  # in order: mutated inputs may share memory
            if record:
                real.copy_(new)
            else:
                with torch.no_grad():
                    real.copy_(new)

    def _build_outputs(self, graph_args: list, fw_outs: list) -> list:
        meta = self.metadata
        first_user = self._num_mutation_outputs
        extras = fw_outs[self._first_extra_output:self._num_fwd_outputs]
        flat: list = [None] * len(meta.outputs)
        for k, info in enumerate(meta.outputs):
            if info.kind == "graph":
                out = fw_outs[first_user + info.index]
                if info.grad_free_leaf and not out.requires_grad:
                    out = out.requires_grad_(True)  # NOTE [Views made under no_grad] in capture.py
                flat[k] = out
            elif info.kind == "input":
                flat[k] = graph_args[info.input_index]
            elif info.kind == "alias_of_input" and info.no_grad_view:
                with torch.no_grad():  # NOTE [Views of inputs made under no_grad]
                    view = _regenerate_view(graph_args[info.input_index], info, extras)
                if view.requires_grad and not info.requires_grad:
                    view = view.detach()  # of a detached alias (``x.detach()[0]``)
                elif info.requires_grad and not meta.inputs[info.input_index].requires_grad:
                    view.requires_grad_(True)  # made a leaf by the function (NOTE [Leaf views of inputs])
                flat[k] = view
            elif info.kind == "alias_of_input":
                view = _regenerate_view(graph_args[info.input_index], info, extras)
                # an alias that does not require grad (``x.detach()``) must not carry the input's history
                if view.requires_grad and not info.requires_grad:
                    view = view.detach()
                elif info.requires_grad and not view.requires_grad:
                    # NOTE [Leaf views of inputs]: ``x.view(-1).requires_grad_()`` of an input that does not
                    # require grad is, in eager, a view of ``x`` and its own autograd leaf; so is this one
                    view.requires_grad_(True)
                elif info.multi_output_view and view.requires_grad:
                    mark_multi_output_view(view)
                flat[k] = view
            elif info.kind == "constant":
                flat[k] = info.value
        for k, info in enumerate(meta.outputs):
            if info.kind == "alias_of_output":
                computed = fw_outs[first_user + info.index]
                if not info.no_grad_view:
                    flat[k] = _regenerate_output_view(flat[info.base_output], computed, info)
                    continue
                with torch.no_grad():  # NOTE [Views of inputs made under no_grad]
                    view = _regenerate_output_view(flat[info.base_output], computed, info)
                if view is computed and isinstance(view, torch.Tensor):  # not a view: a leaf with eager's status
                    view = computed.detach().requires_grad_(bool(flat[info.base_output].requires_grad))
                if view.requires_grad and not info.requires_grad:
                    view = view.detach()  # of a detached alias
                elif (info.requires_grad and not view.requires_grad
                      and not meta.outputs[info.base_output].requires_grad):
                    view.requires_grad_(True)  # made a leaf by the function
                flat[k] = view
        return flat


def mark_multi_output_view(view: torch.Tensor) -> None:
    """Mark a regenerated view as made by a multi-output view op, as eager's was (``OutputInfo.multi_output_view``)."""
    from torch._C._autograd import CreationMeta, _set_creation_meta

    _set_creation_meta(view, CreationMeta.MULTI_OUTPUT_NODE)


def _resolve(entry: Any, extras: Sequence[Any]) -> int:
    return int(extras[entry["extra"]]) if isinstance(entry, dict) else entry


# NOTE [Views of inputs made under no_grad]
# ``with torch.no_grad(): return x.view(-1)`` (or ``y = h[1:]`` of an intermediate ``h`` also returned) gives, in
# eager, a view with its base's requires_grad and no autograd history: no gradient flows back through it, and
# whether it requires grad depends on the real input (a leaf that requires grad gives a view that requires grad;
# a leaf that is itself a view of a tensor without grad gives one that does not). The runtime regenerated such
# an output with grad enabled: it came back with an AsStridedBackward node and its gradient reached ``x``. The
# capture records the view as ``no_grad_view`` (autograd's creation meta of the traced output), and the runtime
# regenerates it under no_grad from the real base, so torch itself gives it eager's status. A view of such a view
# made with grad has a node that leads nowhere in eager, which nothing regenerated can have: it is refused.
def _regenerate_view(base: torch.Tensor, info: OutputInfo, extras: Sequence[Any]) -> torch.Tensor:
    """A real view of the real input, with the geometry the traced output had (absolute storage offset)."""
    size = [_resolve(e, extras) for e in info.size]
    stride = [_resolve(e, extras) for e in info.stride]
    return base.as_strided(size, stride, _resolve(info.storage_offset, extras))


def _regenerate_output_view(base: torch.Tensor, computed: torch.Tensor, info: OutputInfo) -> torch.Tensor:
    """A view of another output when the compiled base kept its traced layout; else the computed value."""
    if list(base.shape) == info.base_size and list(base.stride()) == info.base_stride:
        return base.as_strided(info.size, info.stride, base.storage_offset() + _resolve(info.storage_offset, ()))
    return computed


_STORAGE = operator.methodcaller("untyped_storage")
_DATA_PTR = operator.methodcaller("data_ptr")


def _protect_from_epilogue(saved: list, mutated_inputs: list) -> list:
    """Clone saved tensors that share memory with a mutated input: the backward needs the value from before
    the mutation epilogue overwrites the input."""
    if not mutated_inputs:
        return saved
    try:  # the usual case, in C-level loops: all tensors, no saved value sharing memory with a mutated input
        pointers = set(map(_DATA_PTR, map(_STORAGE, mutated_inputs)))
        if pointers.isdisjoint(map(_DATA_PTR, map(_STORAGE, saved))):
            return saved
    except (AttributeError, RuntimeError, TypeError):  # a non-tensor, a storage without data pointer
        pass
    pointers = {storage_pointer(t) for t in mutated_inputs if isinstance(t, torch.Tensor)}
    if not pointers:
        return saved
    return [value.clone() if isinstance(value, torch.Tensor) and storage_pointer(value) in pointers
            else value for value in saved]


def _unview_user_outputs(fw_outs: list, start: int, stop: int, saved: Sequence[Any], inputs: Sequence[Any]) -> None:
    """NOTE [Views of intermediates]
    A user output that the compiled forward returns as a view of an intermediate would come out of the
    autograd.Function as "a view created inside a custom Function", which autograd forbids modifying in place,
    while eager allows it. Nothing but that output (and its sibling outputs) sees the intermediate, so it is
    handed out as a plain tensor over the same memory (``set_``: siblings still see each other's writes);
    when a saved tensor shares the memory it is cloned instead, since an in-place write would otherwise change
    what the backward reads without autograd's version check noticing. A view of an input's memory (returned
    by a custom Function) stays a view: the input's version counter must see writes to it.
    """
    saved_pointers: set[int] | None = None
    input_pointers: set[int] = set()
    for index in range(start, stop):
        out = fw_outs[index]
        if type(out) is not torch.Tensor or not out._is_view() or out.layout != torch.strided:
            continue  # (subclass views keep autograd's view rules)
        if saved_pointers is None:
            saved_pointers = {storage_pointer(t) for t in saved if isinstance(t, torch.Tensor)}
            input_pointers = {storage_pointer(t) for t in inputs if isinstance(t, torch.Tensor)}
        storage = out.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in input_pointers:
            continue
        if pointer in saved_pointers or out.is_conj() or out.is_neg():  # (set_ would drop those bits)
            fw_outs[index] = out.clone()
        else:
            fw_outs[index] = torch.empty(0, dtype=out.dtype, device=out.device).set_(
                storage, out.storage_offset(), out.size(), out.stride())


class _CompiledAutogradFunction(torch.autograd.Function):
    """Compiled forward in ``forward``, compiled backward in ``backward``; saved values per the partition."""

    @staticmethod
    def forward(ctx: Any, runtime: CompiledRuntime, *graph_args: Any) -> tuple:  # type: ignore[override]
        meta = runtime.metadata
        if runtime._random_draws is not None and (runtime.joint is not None or runtime.joint_factory is not None):
            # NOTE [Double backward through random ops]
            ctx.generator_states = generator_states_of(runtime._random_draws)
        # NOTE [Forward under grad mode]
        # The joint graph was traced with grad mode on, and some kernels only produce what their backward
        # needs when it is (e.g. the mkldnn RNN workspace). Run the compiled forward the same way, on detached
        # inputs so that nothing is recorded by autograd.
        # Compiled code that declares ``grad_mode_independent`` (Inductor, AOTInductor: every op is explicit in
        # the graph) runs as it is, in the no-grad mode of autograd.Function.forward: no detach per input.
        if runtime._forward_grad_mode_independent:
            outs = list(runtime.forward(*graph_args))
        else:
            detached = [arg.detach() if isinstance(arg, torch.Tensor) else arg for arg in graph_args]
            with torch.enable_grad():
                outs = list(runtime.forward(*detached))
        if getattr(ctx, "generator_states", None) is not None:  # where the draws left them: checked by a replay
            ctx.generator_ends = [generator.get_state() for generator, _ in ctx.generator_states]
        num_fwd = runtime._num_fwd_outputs
        if len(outs) != num_fwd + meta.num_saved:
            raise RuntimeError(f"aotcache: compiled forward returned {len(outs)} values, expected "
                               f"{num_fwd} outputs + {meta.num_saved} saved values")
        fw_outs, saved = outs[:num_fwd], outs[num_fwd:]
        saved = _protect_from_epilogue(saved, [graph_args[i] for i in runtime._mutated])
        ctx.runtime = runtime
        if runtime.joint is not None or runtime.joint_factory is not None:  # NOTE [Double backward through the
            ctx.graph_args = graph_args  # joint graph]
        ctx.saved_is_tensor = [isinstance(value, torch.Tensor) for value in saved]
        ctx.saved_scalars = [value for value in saved if not isinstance(value, torch.Tensor)]
        ctx.save_for_backward(*[value for value in saved if isinstance(value, torch.Tensor)])
        _unview_user_outputs(fw_outs, runtime._num_mutation_outputs, runtime._first_extra_output, saved, graph_args)
        differentiable = set(runtime._tangent_indices)
        non_differentiable = [out for index, out in enumerate(fw_outs)
                              if isinstance(out, torch.Tensor) and index not in differentiable]
        if non_differentiable:
            ctx.mark_non_differentiable(*non_differentiable)
        if runtime._unused_outputs_matter:  # NOTE [Gradients of unused outputs]
            ctx.set_materialize_grads(False)
            ctx.tangent_specs = [(out.shape, out.dtype, out.device) for out in
                                 (fw_outs[index] for index in runtime._tangent_indices)]
        return tuple(fw_outs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple:  # type: ignore[override]
        # NOTE [The compiled backward runs outside Dynamo]
        # ``loss.backward()`` or ``torch.autograd.grad`` called inside a ``torch.compile``'d function (after its
        # graph break: a training step compiled whole) runs this backward while Dynamo's frame hook is on. Dynamo
        # then traced the compiled backward (the nop compiler's graph, Inductor's wrapper) as user code and handed
        # it to the backend as one more graph, which aotcache compiled again as an inference graph: every backward
        # compiled twice (a third graph where aot_eager makes two), and a double backward's replay of the joint
        # graph compiled as a region without one, which raised ``DoubleBackwardError`` under ``dynamic=True`` where
        # aot_eager runs (found by PyTorch's test_aot_autograd.py, test_eager_sequence_nr with dynamic shapes).
        # torch's own compiled backward is torch code, which Dynamo skips. So the backward runs with Dynamo off,
        # wherever torch._dynamo is loaded (it cannot be on otherwise). Compiled autograd, which traces a custom
        # Function's backward, breaks its graph here (it already did at ``DisableAutocast``; docs/limitations.md,
        # "Compiled autograd"). The wrapper costs about 0.3 us of CPU per backward call here.
        # Once Dynamo is loaded the class's ``backward`` becomes the Dynamo-disabled one itself (``skip_backward_in_
        # dynamo``): with only the call below disabled, Dynamo still traced this frame, graph-broke at the call, and
        # compiled its resume function with guards on ``ctx.saved_tensors`` (a recompile per new saved layout,
        # every training graph's backward sharing one recompile limit).
        backward = skip_backward_in_dynamo()
        return (backward or _backward)(ctx, *grad_outputs)


_BACKWARD_WITHOUT_DYNAMO: list[Callable] = []  # the Dynamo-disabled ``_backward``, once made


def skip_backward_in_dynamo() -> Callable | None:
    """Make :class:`_CompiledAutogradFunction`'s ``backward`` the Dynamo-disabled ``_backward``, so Dynamo never sees
    a frame of it (NOTE [The compiled backward runs outside Dynamo]), and return it; None until torch._dynamo is
    loaded. Made once (kept in a module list, not behind ``functools.lru_cache``: Dynamo warned at every
    lru_cache-wrapped call it traced). Called where a compiled runtime is made and at a backward."""
    if not _BACKWARD_WITHOUT_DYNAMO:
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None:
            return None
        _BACKWARD_WITHOUT_DYNAMO.append(dynamo.disable(_backward, recursive=True))
        _CompiledAutogradFunction.backward = staticmethod(_BACKWARD_WITHOUT_DYNAMO[0])  # type: ignore[method-assign]
    return _BACKWARD_WITHOUT_DYNAMO[0]


def _backward(ctx: Any, *grad_outputs: Any) -> tuple:
    """The backward of :class:`_CompiledAutogradFunction` (NOTE [The compiled backward runs outside Dynamo])."""
    runtime: CompiledRuntime = ctx.runtime
    differentiable = torch.is_grad_enabled()  # create_graph=True: NOTE [Double backward through the joint graph]
    if differentiable and runtime.joint is None and runtime.joint_factory is not None:
        factory, runtime.joint_factory = runtime.joint_factory, None
        factory(getattr(ctx, "graph_args", ()))
    if differentiable and runtime.joint is None and runtime.joint_refusal is not None:
        raise DoubleBackwardError(runtime.joint_refusal)
    if differentiable and (getattr(ctx, "graph_args", None) is None or runtime.joint is None):
        raise DoubleBackwardError(
            "aotcache: differentiating through the compiled backward (create_graph=True, double backward, "
            "or torch.autograd.grad of a gradient) needs the joint graph, which this compiled function does "
            "not have (loaded from the cache without a capture, or its graph mutates inputs it reads). Call the "
            "original function eagerly for higher-order gradients.")
    generator_states = getattr(ctx, "generator_states", None)
    if differentiable and runtime.joint_random and generator_states is None:
        raise DoubleBackwardError(  # NOTE [Double backward through random ops]
            "aotcache: differentiating through the compiled backward (create_graph=True, double backward) of a "
            "graph with random ops (dropout, ...) replays its forward with the same random numbers, which needs "
            "a compiled forward that draws them as eager does; this one draws its own way (Inductor's or "
            "AOTInductor's own random numbers, or a user's compiler). Use compiler='nop', or Inductor with "
            "fallback_random (aotcache.compile(..., options={'fallback_random': True})), for this function, or "
            "call it eagerly for higher-order gradients.")
    if differentiable:
        saved: Sequence[Any] = ()
    elif ctx.saved_scalars:
        tensors = iter(ctx.saved_tensors)
        scalars = iter(ctx.saved_scalars)
        saved = [next(tensors) if is_tensor else next(scalars) for is_tensor in ctx.saved_is_tensor]
    else:
        saved = ctx.saved_tensors
    # NOTE [Tangent strides]
    # The backward is traced ahead of time, before any real gradient exists, so the strides of its tangents
    # are a guess, and compiled code (and ATen kernels whose fake and real output strides differ, such as
    # native_layer_norm_backward on CPU) may depend on them. The guess is the forward output's own strides
    # when it is static, dense and non-overlapping (what autograd usually delivers, and what PyTorch's AOT
    # Autograd assumes), else its memory format (contiguous, channels_last). Incoming gradients, possibly
    # expanded or transposed, are copied into that layout when they differ. Gradients autograd did not
    # compute (outputs unused in the loss) arrive as materialized zeros of the output's shape, or as None
    # (NOTE [Gradients of unused outputs]), then made zeros here.
    tangents = []
    missing: set[int] = set()
    for position, (index, (stride, memory_format)) in enumerate(zip(runtime._tangent_indices,
                                                                    runtime._tangent_layouts)):
        grad = grad_outputs[index]
        if grad is None and runtime._unused_outputs_matter:
            missing.add(position)
            shape, dtype, device = ctx.tangent_specs[position]
            grad = torch.zeros(shape, dtype=dtype, device=device)
        if grad is not None:
            if stride is None or len(stride) != grad.dim():
                # (a rank mismatch: meta kernels may report a stride per dimension the real output lacks,
                # e.g. multilabel_margin_loss(reduction="none") of a 1-D input: strides (1,) for a 0-dim)
                grad = grad.contiguous(memory_format=memory_format)
            elif grad.stride() != stride:
                grad = torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)
        tangents.append(grad)
    with DisableAutocast():
        if differentiable and generator_states is not None and runtime.joint_random:
            with generators_at(generator_states):  # NOTE [Double backward through random ops]
                grads = differentiable_gradients(runtime, ctx.graph_args, tangents)
                ends = [generator.get_state() for generator, _ in generator_states]
            if not all(torch.equal(end, expected) for end, expected in zip(ends, ctx.generator_ends)):
                raise DoubleBackwardError(
                    "aotcache: the replay of a compiled forward's random ops for a double backward drew other "
                    "numbers than the compiled forward did (its generators ended elsewhere), so its gradients "
                    "would be another program's. Use compiler='nop' for this function, or call it eagerly for "
                    "higher-order gradients.")
        elif differentiable:
            grads = differentiable_gradients(runtime, ctx.graph_args, tangents)
        else:
            grads = list(runtime.backward(*saved, *tangents))
    grad_inputs = runtime.metadata.grad_inputs
    if missing:  # NOTE [Gradients of unused outputs]
        return (None, *[grad if needed and not (dependencies and dependencies <= missing) else None
                        for grad, needed, dependencies in zip(grads, grad_inputs, runtime._grad_tangents)])
    return (None, *[grad if needed else None for grad, needed in zip(grads, grad_inputs)])


# NOTE [Inputs the backward does not reach]
# A graph input may require grad while the function detaches it before any use (``self.buf = self.buf.detach() *
# 0.5 + self.bias``, where the buffer is the last call's result, through the Dynamo way). Eager's autograd graph
# then has no edge to the input's history; the compiled autograd function took the input as it was, so autograd
# saw an edge to the last call's backward node and ran it again at this call's backward, which failed ("Trying to
# backward through the graph a second time"). The capture records the inputs that require grad but get no
# gradient from the joint graph (``RuntimeMetadata.inputs_without_gradient``); they are passed to the autograd
# function detached (the same storage and version counter), so autograd reaches no further than eager does. Input
# mutations and outputs regenerated as views are applied to the inputs themselves, as before. Where *every* input
# that requires grad gets no gradient while an output requires grad in eager (``linalg.householder_product`` of an
# empty matrix: eager's autograd node links the inputs and gives them no gradient), detaching them all would return
# that output without grad (the runtime's check raised, found by PyTorch's OpInfo tests); then nothing is detached.

# NOTE [Gradients of unused outputs]
# In eager, a parameter that only outputs left out of the loss depend on (a pooler when the loss reads
# last_hidden_state, a box head when it reads logits) keeps ``.grad`` None, and an optimizer skips it (AdamW
# applies no weight decay). The compiled backward is one graph over all tangents, and autograd materializes the
# tangents of unused outputs as zeros, so it used to return zero gradients there (as torch.compile does), and
# AdamW then decayed weights eager leaves alone. With two or more tangents the forward turns materialization
# off: the backward makes the zeros itself, knows which tangents were missing, and returns None for an input
# whose gradient reads only missing tangents (``RuntimeMetadata.grad_tangents``, from the joint graph). With
# one tangent nothing changes: autograd does not call a backward whose only output is unused.
