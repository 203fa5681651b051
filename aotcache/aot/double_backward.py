"""Double backward through a compiled function: the joint graph of its capture replayed as Python under grad mode,
so that autograd differentiates the forward's ops with its own formulas (NOTE [Double backward through the joint
graph]), from the generators' states at the forward where it draws random numbers (NOTE [Double backward through
random ops]); and :class:`DoubleBackwardError` where no such graph can be replayed (NOTE [Custom backwards and double
backward]). The compiled backward (:mod:`aotcache.aot.runtime`) calls it when grad mode is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from aotcache.aot.runtime import CompiledRuntime

__all__ = ["DoubleBackwardError", "CUSTOM_BACKWARD_REFUSAL", "generator_states_of", "generators_at",
           "differentiable_gradients"]


class DoubleBackwardError(RuntimeError):
    """Raised when differentiating through the compiled backward (create_graph=True / double backward)."""


# NOTE [Double backward through the joint graph]
# The compiled backward is opaque to autograd: a gradient it returns has no history, so ``create_graph=True``
# (a gradient penalty, Hessian-vector products, MAML) cannot differentiate it again. Where the runtime keeps the
# joint graph of its capture (``CompiledRuntime.joint``: ATen ops of the forward and the backward, each with its
# own derivative formula), a backward under grad mode runs that graph as Python on the call's inputs (kept on
# the context, so they carry their history) and the incoming gradients: the gradients it returns are built by
# autograd from eager ops, as eager's double backward is, and the forward is computed once more. Only joint graphs
# that are pure functions of their inputs qualify (random ops only where their draws can be replayed: NOTE [Double
# backward through random ops]; no effect tokens; an input the call updated only where no differentiable output
# reads its value, since it holds the new value by then: NOTE [Replaying a graph that updated its inputs] in
# compile_step.py). A runtime loaded without
# a capture (a torch.compile region found in the cache, a fingerprint warm start of ``aot_function`` /
# ``aot_module``) captures the call again at its first double backward (``joint_factory``: the Dynamo graph, or
# the function on the differentiated call's graph inputs and the first call's constants). Where no pure joint
# graph comes out, ``DoubleBackwardError`` is raised as before. A first-order backward is unchanged (the
# compiled backward, saved values as partitioned). The joint graph stays in memory with its runtime.
#
# NOTE [Double backward through random ops]
# A joint graph with random ops (dropout in training: a gradient penalty through a critic with dropout) draws its
# numbers again when it is replayed, and eager's double backward draws nothing: it differentiates the forward's
# own masks. So where the compiled forward draws exactly as its graph's ATen ops run in order would
# (``eager_random_draws``, the generators it draws from: the nop compiler; Inductor where it compiled with
# ``fallback_random``, under which its random ops on the default generators run ATen's kernels), the forward
# saves those generators' states on the autograd context before it runs (the CPU default generator, and CUDA's
# where CUDA is initialized, for ops on the default generator; a torch.Generator the graph names), and the replay
# runs from those states, then puts each generator back where it was. The replay then draws the forward's very
# numbers, the gradients are eager's, and the generators end where eager leaves them. As a check, the forward
# also saves where its draws left the generators, and a replay that leaves them elsewhere (it drew another count
# of numbers: a compiled forward that was not what its ``eager_random_draws`` claimed) raises
# ``DoubleBackwardError`` rather than return another program's gradients. Saving the states costs two small
# copies per generator per training call (about 1 us each on CPU), only for runtimes whose forward draws random
# numbers. Not covered: another thread drawing from the same generator while a replay runs (it would draw from the
# forward's state, and the replay's restore would undo its draws); eager's double backward draws nothing. A
# compiled forward that draws its own way (Inductor lowering dropout itself, AOTInductor's Philox, a user's
# compiler) cannot be replayed: ``DoubleBackwardError`` names the fixes (the nop compiler, Inductor with
# ``fallback_random``, or eager).
# NOTE [Custom backwards and double backward]
# The replay of NOTE [Double backward through the joint graph] differentiates the joint graph's forward ops with
# autograd's own formulas. A custom autograd.Function's backward is the user's, not the derivative of its forward
# (a straight-through estimator, a clipped or rescaled gradient, an approximation, ``once_differentiable``), so for
# a graph whose backward ran one, the replay returned autograd's derivative of the forward: with
# ``create_graph=True`` the first-order gradients silently differed from eager's (``round(x) * x`` with a backward
# of ``3 * x``: 1.0 where eager gives 3.9), and a ``once_differentiable`` backward was differentiated where eager
# raises. Such a runtime keeps no joint graph: the capture notes that a custom Function's node (Python's
# ``BackwardCFunction``, C++'s ``CppFunction``; Dynamo's ``autograd_function_apply`` runs as one) was among the
# outputs' autograd nodes, and a double backward raises ``DoubleBackwardError`` naming the Function, as
# torch.compile's own AOT Autograd raises for every double backward. First-order gradients are unchanged.
CUSTOM_BACKWARD_REFUSAL = (
    "aotcache: differentiating through the compiled backward (create_graph=True, double backward, or "
    "torch.autograd.grad of a gradient) of a graph that contains a custom torch.autograd.Function is not "
    "supported: its backward is user code, which the replay of the forward cannot differentiate as eager does. "
    "Call the function eagerly (or the Function outside the compiled region) for higher-order gradients.")


def generator_states_of(draws: Sequence[Any]) -> list:
    """(generator, state) for each generator ``draws`` names (None: the default generators)."""
    states = []
    for generator in draws:
        if generator is not None:
            states.append((generator, generator.get_state()))
            continue
        states.append((torch.default_generator, torch.default_generator.get_state()))
        if torch.cuda.is_initialized():  # (ops on CUDA tensors draw from these)
            states.extend((cuda, cuda.get_state()) for cuda in torch.cuda.default_generators)
    return states


@contextlib.contextmanager
def generators_at(states: Sequence[tuple]) -> Any:
    """Run the block from the generator ``states``, then put each generator back where it was."""
    now = [(generator, generator.get_state()) for generator, _ in states]
    for generator, state in states:
        generator.set_state(state)
    try:
        yield
    finally:
        for generator, state in now:
            generator.set_state(state)


def differentiable_gradients(runtime: CompiledRuntime, graph_args: Sequence[Any], tangents: list) -> list:
    """The gradients of the graph inputs with autograd history (NOTE [Double backward through the joint graph])."""
    forward = runtime.__dict__.get("_joint_forward")
    if forward is None:
        forward = runtime._joint_forward = _forward_part(runtime.joint, runtime._num_fwd_outputs)
    with torch.enable_grad():
        fw_outs = forward(*graph_args, *tangents)
    pairs = [(fw_outs[index], tangent) for index, tangent in zip(runtime._tangent_indices, tangents)
             if isinstance(fw_outs[index], torch.Tensor) and fw_outs[index].requires_grad]
    needed = [position for position, (arg, wanted) in enumerate(zip(graph_args, runtime.metadata.grad_inputs))
              if wanted and isinstance(arg, torch.Tensor) and arg.requires_grad]
    grads: list = [None] * len(graph_args)
    if pairs and needed:
        computed = torch.autograd.grad([out for out, _ in pairs], [graph_args[p] for p in needed],
                                       [tangent for _, tangent in pairs], create_graph=True, allow_unused=True)
        for position, grad in zip(needed, computed):
            grads[position] = grad
    return grads


def _forward_part(joint: torch.fx.GraphModule, num_fwd_outputs: int) -> torch.fx.GraphModule:
    """A copy of the joint graph returning only its forward outputs (the gradient part left out as dead code).

    Its ops run as Python under grad mode, so autograd differentiates them with its own formulas: the joint's
    backward part is not reused, since the trace put ``detach`` between the forward values autograd saved and the
    backward ops reading them (a second derivative through them would be lost)."""
    graph = torch.fx.Graph()
    outputs = graph.graph_copy(joint.graph, {})  # the output node's value, without the node
    graph.output(tuple(outputs[:num_fwd_outputs]))
    graph.eliminate_dead_code(is_impure_node=_kept_in_replay)
    return torch.fx.GraphModule(joint, graph)


def _kept_in_replay(node: torch.fx.Node) -> bool:
    """Whether dead-code elimination keeps ``node``: side effects, and random ops whose results nothing uses (the
    compiled forward draws them: NOTE [Double backward through random ops])."""
    return node.is_impure() or (node.op == "call_function" and
                                torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()))
