"""Partitioners: split a joint forward+backward graph into a forward graph and a backward graph.

Both follow the joint-graph contract (see ``aot_contract``): placeholders ``primals_*`` then ``tangents_*``;
output ``(*fw_outs, *grads)``. They return ``(fw_gm, bw_gm)`` where ``fw_gm(*primals) -> (*fw_outs, *saved)``
and ``bw_gm(*saved, *tangents) -> grads``. ``saved`` lists the saved tensors first, then the saved SymInts,
each in joint-graph order, so the same joint graph always gives the same layout. The number of each is
recorded in ``fw_gm.meta["num_saved_tensors"]`` / ``["num_saved_symints"]``.

- :func:`default_partition` saves every forward value that the backward reads.
- :func:`min_cut_rematerialization_partition` chooses what to save by a minimum cut over saved bytes,
  recomputing cheap ops (pointwise, views, ...) in the backward; it never recomputes expensive or random ops.

Both recompute the inside of activation-checkpointed regions in the backward (NOTE [Activation checkpoint
regions]).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

__all__ = [
    "PartitionError",
    "default_partition",
    "min_cut_rematerialization_partition",
    "is_recomputable",
    "saved_value_bytes",
    "PARTITIONER_NAMES",
    "resolve_partition",
    "align_saved_to_backward",
    "hold_constant_objects_as_attributes",
]


class PartitionError(ValueError):
    """A joint graph that does not follow the contract (placeholder names, tangent-dependent forward outputs)."""


# ----------------------------------------------------------------------------------------------------------
# Joint graph structure
# ----------------------------------------------------------------------------------------------------------


class _Joint:
    """The parts of a joint graph that both partitioners need, computed once."""

    def __init__(self, joint_gm: fx.GraphModule, num_fwd_outputs: int) -> None:
        self.gm = joint_gm
        self.nodes = list(joint_gm.graph.nodes)
        self.order = {node: index for index, node in enumerate(self.nodes)}
        self.primals: list[fx.Node] = []
        self.tangents: list[fx.Node] = []
        for node in self.nodes:
            if node.op != "placeholder":
                continue
            if node.name.startswith("primals"):
                self.primals.append(node)
            elif node.name.startswith("tangents"):
                self.tangents.append(node)
            else:
                raise PartitionError(f"joint graph placeholder {node.name!r} is neither primals_* nor tangents_*; "
                                     "trace the joint graph with inputs named (primals, tangents)")
        (self.output,) = [node for node in self.nodes if node.op == "output"]
        flat = self.output.args[0]
        flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
        if not 0 <= num_fwd_outputs <= len(flat):
            raise PartitionError(f"num_fwd_outputs={num_fwd_outputs} but the joint graph has {len(flat)} outputs")
        self.fw_outs = flat[:num_fwd_outputs]
        self.grads = flat[num_fwd_outputs:]
        # Tangent-dependent nodes can only run in the backward.
        self.tangent_dependent: set[fx.Node] = set(self.tangents)
        for node in self.nodes:
            if node.op != "output" and any(arg in self.tangent_dependent for arg in node.all_input_nodes):
                self.tangent_dependent.add(node)
        for index, value in enumerate(self.fw_outs):
            if isinstance(value, fx.Node) and value in self.tangent_dependent:
                raise PartitionError(f"forward output {index} ({value.name}) depends on a tangent; "
                                     "check num_fwd_outputs")
        # NOTE [Random draws nothing uses], NOTE [Checks of the backward]
        unused = [node for node in self.nodes if node.op == "call_function" and not node.users and _kept(node)]
        self.bw_effects = [node for node in unused if _in_backward(self, node) and not _is_random(node.target)]
        self.fw_effects = [node for node in unused if node not in self.tangent_dependent
                           and node not in self.bw_effects]
        # what the backward computes: the gradients, and its own checks
        self.bw_roots = [*self.grads, *self.bw_effects]

    def sorted(self, nodes: Iterable[fx.Node]) -> list[fx.Node]:
        """Nodes in joint-graph order (never set order)."""
        return sorted(nodes, key=self.order.__getitem__)

    def ancestors(self, roots: Iterable[Any], stop: set[fx.Node] | frozenset = frozenset()) -> set[fx.Node]:
        """``roots`` and everything they read, not walking past ``stop`` nodes (which are included)."""
        seen: set[fx.Node] = set()
        stack = [root for root in roots if isinstance(root, fx.Node)]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node not in stop:
                stack.extend(node.all_input_nodes)
        return seen


def _val(node: fx.Node) -> Any:
    return node.meta.get("val")


def _is_symint(node: fx.Node) -> bool:
    return isinstance(_val(node), (torch.SymInt, int)) and not isinstance(_val(node), bool)


def _order_saved(joint: _Joint, saved: Iterable[fx.Node]) -> list[fx.Node]:
    """Saved tensors first, then SymInts (and other scalars), each in graph order."""
    ordered = joint.sorted(set(saved))
    return [n for n in ordered if not _is_symint(n)] + [n for n in ordered if _is_symint(n)]


# ----------------------------------------------------------------------------------------------------------
# Activation checkpoint regions
# ----------------------------------------------------------------------------------------------------------


def _recompute_tag(node: fx.Node) -> Any:
    """The node's ``recompute`` tag if it asks to be recomputed (MUST_ / PREFER_RECOMPUTE), else None."""
    tag = node.meta.get("recompute")
    if tag is None:
        return None
    from torch.utils.checkpoint import CheckpointPolicy

    return tag if tag in (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE) else None


def _checkpointed_internals(joint: _Joint, region: set[fx.Node]) -> set[fx.Node]:
    """NOTE [Activation checkpoint regions]
    ``torch.utils.checkpoint`` (transformers' ``gradient_checkpointing_enable()``) asks for the activations inside
    a region to be recomputed in the backward instead of kept: the memory a model needs to train at all. Under
    Dynamo the region is a higher-order op whose nodes reach the joint graph tagged ``meta["recompute"]`` (and
    ``ac_graph_id``, one per region; NOTE [Checkpointed regions traced in line] in checkpoint_regions.py); a
    partitioner that ignores the tags saves every activation, as if there were no checkpoint (same results, the
    memory of the unchecked model: the Dynamo way of ``aotcache.compile`` and ``torch.compile(backend="aotcache")``
    did so until 2026-12-05). Both partitioners recompute a region's
    *internal* values in the backward: forward nodes tagged to be recomputed whose forward users all belong to
    the same region (tagged with its ``ac_graph_id``, whatever a selective-checkpoint policy chose for them: a
    matmul the policy saves does not make its recomputable input saved too, as torch's partitioner does). A
    region's outputs (read outside it, or forward outputs) and its inputs are saved where the backward needs them,
    as eager's checkpoint keeps its inputs and its caller keeps its outputs, so two regions in a row never
    recompute each other. Random ops are saved (a second draw would differ; eager's checkpoint
    replays the RNG state instead), and so is anything that is not a plain op (effectful higher-order ops), or
    a tuple item whose op is not recomputed. Recomputing runs the same ops on the same values: bitwise eager's.
    """
    found: set[fx.Node] = set()
    for node in joint.nodes:
        if node not in region or node.op != "call_function" or _recompute_tag(node) is None:
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if _is_random(target):
                continue
        elif target is not operator.getitem and not _is_symint(node):
            continue
        if node in joint.fw_outs:
            continue
        graph_id = node.meta.get("ac_graph_id")
        users = [user for user in node.users if user in region]
        # a user the region's selective-checkpoint policy saves (MUST_SAVE) is still inside the region
        if all("recompute" in user.meta and user.meta.get("ac_graph_id") == graph_id for user in users):
            found.add(node)
    changed = True
    while changed:  # a tuple item is recomputed only with its op (a tuple cannot be saved)
        changed = False
        for node in list(found):
            if node.target is operator.getitem and node.args[0] not in found:
                found.discard(node)
                changed = True
    return found


# ----------------------------------------------------------------------------------------------------------
# Building the two graphs
# ----------------------------------------------------------------------------------------------------------


def _copy_into(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
    copied = graph.node_copy(node, lambda arg: env[arg])
    env[node] = copied
    return copied


def _new_module(joint: _Joint, graph: fx.Graph) -> fx.GraphModule:
    graph.eliminate_dead_code(is_impure_node=_kept)
    graph.lint()
    gm = fx.GraphModule(joint.gm, graph)  # copies the get_attr constants that the graph still uses
    gm.meta.update({key: value for key, value in joint.gm.meta.items() if key != "val"})
    return gm


# NOTE [Random draws nothing uses]
# A random op whose result nothing uses (``torch.rand(3)`` on its own line, a draw whose use was optimized away)
# still moves the generator in eager, so every later draw depends on it. The forward used to keep only what its
# outputs and saved values need, and dead-code elimination dropped such ops: the compiled call drew fewer
# numbers, and its values and the generator's state after it differed from eager's. Both partitions keep them
# in the forward (in the joint graph's order), as the trace kept them in the joint graph.
#
# So for side effects nothing uses: a runtime check (``torch._assert_async(cond)``; ``torch._check_tensor_all``
# in a capture, NOTE [Tensor checks in a capture]) has no users, and the training forward dropped it, so a call
# that eager (and an inference graph) refuses ran on with wrong inputs (found with transformers' multimodal
# models, whose placeholder-count check is one). Forward side effects are kept as the unused draws are.
# NOTE [Checks of the backward]
# A check traced in the backward (a custom autograd.Function's backward asserting on what it saved; the
# recomputation of a checkpointed region, which repeats its forward's checks) is tagged ``is_backward`` (NOTE
# [Forward and backward tags of the joint graph] in capture.py) and may read no tangent. Kept in the forward as
# the forward's own side effects are, it raised in a forward that eager runs (a forward-only call under grad
# mode, as an evaluation without no_grad) and ran once more per checkpointed region; kept nowhere (a check of a
# gradient), a backward eager refuses ran on. Such checks are the backward's: it computes them with its
# gradients, from saved or recomputed values. Random draws of the backward are left where they were (the
# forward), as a checkpointed region's draws are refused by the capture.
def _in_backward(joint: _Joint, node: fx.Node) -> bool:
    """Whether ``node`` runs in eager's backward: it reads a tangent, or was traced after the backward began."""
    return node in joint.tangent_dependent or node.meta.get("partitioner_tag") == "is_backward"


def _kept(node: fx.Node) -> bool:
    """What dead-code elimination keeps: side effects, and random ops (NOTE [Random draws nothing uses])."""
    return node.is_impure() or (node.op == "call_function" and _is_random(node.target))


# NOTE [Sizes the backward must bind]
# A backward graph's sizes are bound from its inputs: a symbol is known to the compiled backward where some input
# has it as a whole size, stride or offset, or is a SymInt equal to it. A saved value whose size is only an
# expression of a symbol (``cat([cache, x])`` of a cache with ``s0`` rows saved for the matmul's weight gradient:
# ``s0 + 1`` rows) leaves ``s0`` unbound; Inductor then failed the backward ("For s0 + 1, expected [s0] to have been
# codegen-ed"), and the graph ran uncompiled and uncached (found in the session-13 review of growing buffers, where
# the cache is a symbolic buffer; a caller's tensor had it too). Such a symbol is saved as one more SymInt (after
# the others), read in the forward from the primal that has it as a whole size, stride or offset, as torch's
# partitioner saves the symbols of the saved values' sizes.


def _whole_symbol(value: Any) -> Any:
    """The sympy symbol ``value`` is (a SymInt that is one symbol), else None."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        if getattr(expr, "is_Symbol", False):
            return expr
    return None


def _geometry(value: Any) -> list:
    """A tensor's sizes, strides and storage offset (sizes only for a layout without strides); a SymInt itself."""
    if isinstance(value, torch.SymInt):
        return [value]
    if not isinstance(value, torch.Tensor):
        return []
    try:
        return [*value.shape, *value.stride(), value.storage_offset()]
    except RuntimeError:  # a layout without strides
        return list(value.shape)


def _symbols_of(value: Any) -> set:
    """The free symbols of a tensor's geometry, or of a SymInt."""
    return {symbol for part in _geometry(value) if isinstance(part, torch.SymInt)
            for symbol in part.node.expr.free_symbols}


def _bound_symbols(value: Any) -> set:
    """The symbols a backward input holding ``value`` binds: the parts of its geometry that are one symbol."""
    return {symbol for part in _geometry(value) if (symbol := _whole_symbol(part)) is not None}


def _symbol_bindings(joint: _Joint, saved: Sequence[fx.Node], fw_graph: fx.Graph,
                     fw_env: dict[fx.Node, fx.Node]) -> list[fx.Node]:
    """Forward nodes (a primal, or a ``sym_size`` / ``sym_stride`` / ``sym_storage_offset`` of one, added to
    ``fw_graph``) for the symbols the backward's inputs use but do not bind, to be saved after the other values
    (NOTE [Sizes the backward must bind])."""
    inputs = [_val(node) for node in [*saved, *joint.tangents]]
    used = set().union(*map(_symbols_of, inputs)) if inputs else set()
    missing = used - set().union(*map(_bound_symbols, inputs)) if used else set()
    bindings: list[fx.Node] = []
    for symbol in sorted(missing, key=str):
        source = _primal_with(joint, symbol)
        if source is None:  # not a primal's whole size (an unbacked symbol): left to the compiler, as before
            continue
        primal, kind, dim, value = source
        if kind == "symint":
            node = fw_env[primal]
        else:
            op = {"size": torch.ops.aten.sym_size.int, "stride": torch.ops.aten.sym_stride.int,
                  "offset": torch.ops.aten.sym_storage_offset.default}[kind]
            node = fw_graph.call_function(op, (fw_env[primal], dim) if kind != "offset" else (fw_env[primal],))
            node.meta["val"] = value
        bindings.append(node)
    return bindings


def _primal_with(joint: _Joint, symbol: Any) -> tuple[fx.Node, str, int, Any] | None:
    """A primal that has ``symbol`` as a whole size, stride or offset (or is it), with where."""
    for primal in joint.primals:
        value = _val(primal)
        if isinstance(value, torch.SymInt):
            if _whole_symbol(value) == symbol:
                return primal, "symint", 0, value
            continue
        if not isinstance(value, torch.Tensor):
            continue
        for dim, size in enumerate(value.shape):
            if _whole_symbol(size) == symbol:
                return primal, "size", dim, size
        try:
            strides, offset = value.stride(), value.storage_offset()
        except RuntimeError:
            continue
        for dim, stride in enumerate(strides):
            if _whole_symbol(stride) == symbol:
                return primal, "stride", dim, stride
        if _whole_symbol(offset) == symbol:
            return primal, "offset", 0, offset
    return None


def _build(joint: _Joint, saved: Sequence[fx.Node]) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward GraphModules for a chosen list of saved values."""
    saved_set = set(saved)
    # Forward: everything the forward outputs and the saved values need, and draws and side effects nothing uses
    # (NOTE [Random draws nothing uses]).
    fw_graph = fx.Graph()
    fw_env: dict[fx.Node, fx.Node] = {}
    for primal in joint.primals:
        _copy_into(fw_graph, primal, fw_env)
    needed_fw = joint.ancestors([*joint.fw_outs, *saved, *joint.fw_effects])
    for node in joint.nodes:
        if node in needed_fw and node.op != "placeholder":
            if node in joint.tangent_dependent:
                raise PartitionError(f"saved value {node.name} depends on a tangent")
            _copy_into(fw_graph, node, fw_env)
        elif node in needed_fw and node not in fw_env:
            raise PartitionError(f"forward needs placeholder {node.name}, which is not a primal")
    bindings = _symbol_bindings(joint, saved, fw_graph, fw_env)  # NOTE [Sizes the backward must bind]
    fw_graph.output((*(fw_env[v] if isinstance(v, fx.Node) else v for v in [*joint.fw_outs, *saved]), *bindings))
    fw_gm = _new_module(joint, fw_graph)
    fw_gm.meta["num_saved_tensors"] = sum(1 for node in saved if not _is_symint(node))
    fw_gm.meta["num_saved_symints"] = sum(1 for node in saved if _is_symint(node)) + len(bindings)

    # Backward: saved values and tangents as inputs, then what the gradients need beyond them.
    bw_graph = fx.Graph()
    bw_env: dict[fx.Node, fx.Node] = {}
    for node in [*saved, *bindings, *joint.tangents]:
        placeholder = bw_graph.placeholder(node.name)
        placeholder.meta = dict(node.meta)
        bw_env[node] = placeholder
    needed_bw = joint.ancestors(joint.bw_roots, stop=saved_set | set(joint.tangents))
    for node in joint.nodes:
        if node not in needed_bw or node in bw_env:
            continue
        if node.op == "placeholder":
            raise PartitionError(f"backward needs {node.name} but it was not saved")
        _copy_into(bw_graph, node, bw_env)
    bw_graph.output(tuple(bw_env[g] if isinstance(g, fx.Node) else g for g in joint.grads))
    return fw_gm, _new_module(joint, bw_graph)


# ----------------------------------------------------------------------------------------------------------
# default_partition
# ----------------------------------------------------------------------------------------------------------


def _forward_region(joint: _Joint) -> set[fx.Node]:
    """What the forward computes anyway: the primals and the ancestors of the forward outputs, plus the
    ``getitem``s of multi-output forward nodes (a tuple cannot be saved, its items can)."""
    region = joint.ancestors(joint.fw_outs) | set(joint.primals)
    for node in joint.nodes:
        if node.target is operator.getitem and node.args[0] in region and node not in joint.tangent_dependent:
            region.add(node)
    return region


def default_partition(joint_gm: fx.GraphModule, joint_inputs: Sequence[Any] = (), *,
                      num_fwd_outputs: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split the joint graph; the forward saves every forward value (tensor or SymInt) that the backward reads.

    Values the forward does not compute but the backward needs (and that do not depend on tangents) are
    computed in the backward from saved values.

    :raises PartitionError: the joint graph does not follow the contract.
    """
    del joint_inputs  # the fake values on the nodes carry all we need
    joint = _Joint(joint_gm, num_fwd_outputs)
    region = _forward_region(joint)
    kept = region - _checkpointed_internals(joint, region)  # NOTE [Activation checkpoint regions]
    backward_nodes = joint.ancestors(joint.bw_roots, stop=kept) - kept
    saved = {arg for user in backward_nodes for arg in user.all_input_nodes if arg in kept}
    saved |= {grad for grad in joint.grads if isinstance(grad, fx.Node) and grad in kept}
    return _build(joint, _order_saved(joint, saved))


# ----------------------------------------------------------------------------------------------------------
# min_cut_rematerialization_partition
# ----------------------------------------------------------------------------------------------------------

# Ops that are cheap enough to compute twice (besides pointwise ops and views, found from op tags).
_CHEAP_OPS = {
    "aten::clone", "aten::_to_copy", "aten::to", "aten::expand", "aten::expand_copy", "aten::view",
    "aten::_unsafe_view", "aten::reshape", "aten::permute", "aten::t", "aten::transpose", "aten::squeeze",
    "aten::unsqueeze", "aten::slice", "aten::select", "aten::split", "aten::split_with_sizes", "aten::unbind",
    "aten::cat", "aten::stack", "aten::full", "aten::full_like", "aten::zeros", "aten::zeros_like",
    "aten::ones", "aten::ones_like", "aten::empty", "aten::empty_like", "aten::arange", "aten::scalar_tensor",
    "aten::lift_fresh_copy", "aten::sum", "aten::mean", "aten::amax", "aten::amin", "aten::var", "aten::std",
    "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::alias",
    "aten::detach", "aten::slice_scatter", "aten::select_scatter", "aten::as_strided", "aten::repeat",
    "aten::where", "aten::masked_fill", "aten::constant_pad_nd", "aten::squeeze_copy", "aten::view_copy",
    "aten::permute_copy", "aten::unsqueeze_copy", "aten::transpose_copy", "aten::t_copy", "aten::copy",
    "prims::convert_element_type", "prims::broadcast_in_dim", "prims::squeeze", "prims::view_of",
    "prims::collapse_view", "prims::iota", "prims::full", "prims::sum", "prims::var", "prims::amax",
    # Inductor's max-pool decomposition: int8 window offsets -> int64 indices; recomputing the indices in the
    # backward saves the offsets (1/8 of the bytes) and spares the forward a write of the indices
    "prims::_low_memory_max_pool_offsets_to_indices",
}
# Never computed twice even if a rule above would allow it: the cost is the point of saving them.
_EXPENSIVE_OPS = {
    "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::matmul", "aten::linear",
    "aten::convolution", "aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d",
    "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
    "aten::_flash_attention_forward", "aten::_efficient_attention_forward", "aten::einsum", "aten::addmv",
    "aten::mv", "aten::dot", "aten::vdot", "aten::_int_mm", "aten::_scaled_mm", "aten::cumsum", "aten::sort",
    "aten::topk", "aten::native_layer_norm", "aten::native_batch_norm", "aten::_native_batch_norm_legit",
    "aten::_native_batch_norm_legit_functional", "aten::native_group_norm", "aten::embedding_dense_backward",
}
# Random ops: computing them again gives other values, so they are always saved.
_RANDOM_OPS = {
    "aten::rand", "aten::rand_like", "aten::randn", "aten::randn_like", "aten::randint", "aten::randint_like",
    "aten::randperm", "aten::bernoulli", "aten::dropout", "aten::native_dropout", "aten::feature_dropout",
    "aten::alpha_dropout", "aten::multinomial", "aten::normal", "aten::uniform", "aten::exponential",
    "aten::poisson", "aten::rrelu_with_noise", "aten::_fused_dropout", "aten::_standard_gamma",
    "prims::inductor_random", "prims::inductor_randint", "prims::inductor_seeds", "prims::inductor_lookup_seed",
}


def _op_name(target: Any) -> str | None:
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else None


def _is_random(target: Any) -> bool:
    name = _op_name(target)
    if name in _RANDOM_OPS:
        return True
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def is_recomputable(node: fx.Node) -> bool:
    """Whether the min-cut partitioner may compute ``node`` again in the backward instead of saving it."""
    if node.op == "get_attr":
        return True
    if node.op != "call_function":
        return False
    if node.target is operator.getitem or is_constant_object(node):  # NOTE [Constant objects in the joint graph]
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return _is_symint(node)  # SymInt arithmetic (operator.mul, sym_max, ...)
    name = _op_name(node.target)
    if name in _EXPENSIVE_OPS or _is_random(node.target):
        return False
    if name in _CHEAP_OPS or node.target.is_view:
        return True
    return torch.Tag.pointwise in node.target.tags


def _hint(value: Any) -> int:
    if isinstance(value, torch.SymInt):
        hint = getattr(value.node, "hint", None)
        return int(hint) if hint is not None else 4096  # unbacked size: assume a large-ish value
    return int(value)


def saved_value_bytes(node: fx.Node) -> float:
    """Bytes it costs to keep ``node``'s value until the backward (tensors by their example size, SymInts 1,
    values that cannot be saved on their own -- tuples -- infinite)."""
    value = _val(node)
    if isinstance(value, torch.Tensor):
        numel = 1
        for size in value.shape:
            numel *= _hint(size)
        return float(numel * value.element_size())
    if _is_symint(node) or isinstance(value, (torch.SymFloat, torch.SymBool, float, bool)):
        return 1.0
    return math.inf


def min_cut_rematerialization_partition(joint_gm: fx.GraphModule, joint_inputs: Sequence[Any] = (), *,
                                        num_fwd_outputs: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split the joint graph saving the fewest bytes: cheap ops feeding the backward are recomputed there.

    NOTE [min-cut formulation]
    Every tangent-independent node ``n`` the backward may need becomes two vertices ``n_in -> n_out`` whose
    edge capacity is the bytes of saving ``n``; each use is an infinite edge ``producer_out -> user_in``. The
    source feeds (infinitely) the primals and every node that must not be computed in the backward (expensive
    and random ops, and ops not known to be cheap). Every value a tangent-dependent node or a gradient reads
    feeds the sink. A minimum source/sink cut crosses ``n_in -> n_out`` edges only: those nodes are saved;
    nodes whose ``n_in`` is on the sink side are (re)computed in the backward from saved values. The forward
    still computes whatever its outputs and the saved values need. The flow graph is built in graph order,
    so the same joint graph always gives the same cut.

    :raises PartitionError: the joint graph does not follow the contract.
    """
    import networkx as nx

    del joint_inputs
    joint = _Joint(joint_gm, num_fwd_outputs)
    backward_roots = {arg for node in joint.tangent_dependent for arg in node.all_input_nodes
                      if arg not in joint.tangent_dependent}
    backward_roots |= {grad for grad in joint.grads if isinstance(grad, fx.Node)
                       and grad not in joint.tangent_dependent}
    backward_roots |= {arg for check in joint.bw_effects for arg in check.all_input_nodes  # NOTE [Checks of the
                       if arg not in joint.tangent_dependent}                              # backward]
    relevant = joint.ancestors(backward_roots)  # tangent-independent values the backward may need
    # NOTE [Activation checkpoint regions]: a region's internal values cannot be saved, and may be recomputed
    # whatever they cost
    checkpointed = _checkpointed_internals(joint, _forward_region(joint))

    flow = nx.DiGraph()
    flow.add_node("source")
    flow.add_node("sink")
    # An edge without a "capacity" attribute has infinite capacity in networkx.
    for node in joint.sorted(relevant):
        node_in, node_out = f"{node.name}__in", f"{node.name}__out"
        cost = saved_value_bytes(node)
        if math.isinf(cost) or node in checkpointed:
            flow.add_edge(node_in, node_out)
        else:
            # NOTE [tie-break]: an intermediate costs one byte more than a primal of equal size, so between
            # saving an input and saving a view/copy of it the input wins.
            flow.add_edge(node_in, node_out, capacity=cost + (0.0 if node.op == "placeholder" else 1.0))
        if node.op == "placeholder" or (not is_recomputable(node) and node not in checkpointed):
            flow.add_edge("source", node_in)
        if node in backward_roots:
            flow.add_edge(node_out, "sink")
        for arg in node.all_input_nodes:
            flow.add_edge(f"{arg.name}__out", node_in)
    _, (source_side, _sink_side) = nx.minimum_cut(flow, "source", "sink")
    saved = [node for node in relevant
             if f"{node.name}__in" in source_side and f"{node.name}__out" not in source_side]
    return _build(joint, _order_saved(joint, saved))



def is_own_partitioner(partition_fn: Any) -> bool:
    """Whether ``partition_fn`` is one of aotcache's partitioners (not a foreign one, NOTE [Foreign partitioners])."""
    return partition_fn in (default_partition, min_cut_rematerialization_partition)


def is_constant_object(node: fx.Node) -> bool:
    """Whether ``node`` builds a Python object (not a tensor) by calling a class on constants alone."""
    return node.op == "call_function" and isinstance(node.target, type) and not node.all_input_nodes \
        and not isinstance(node.meta.get("val"), torch.Tensor)


def mark_constant_objects_for_recompute(joint_gm: fx.GraphModule) -> int:
    """Mark the joint graph's nodes that build a Python object from constants as recomputed; returns how many.

    NOTE [Constant objects in the joint graph]
    FX writes a dataclass argument of a traced call as a node that constructs it from its fields (a higher-order
    op's options: ``invoke_quant_packed(..., quant_options=InvokeQuant(codegen_low_precision=True))``, traced
    because the capture sets ``is_compiling``, NOTE [is_compiling during capture]). The forward and the backward
    both read it, so a partitioner must hand it over: PyTorch's ``min_cut_rematerialization_partition`` can
    neither save it (not a tensor) nor recompute it (not on its allowlist) and raised "failed to partition the
    joint forward-backward graph" (PyTorch's OpInfo test of ``invoke_quant``). Such a node has no inputs and
    calls a class: building it again in the backward costs nothing and gives an equal object, so it is marked
    as checkpointing marks what must be recomputed, which PyTorch's min-cut partitioner honours; aotcache's own
    min-cut partitioner counts it as recomputable. PyTorch's ``default_partition`` reads no such mark and still
    refuses the graph ("Expected invoke_quant to be a tensor"): see NOTE [Constant objects held as attributes].
    """
    from torch.utils.checkpoint import CheckpointPolicy

    marked = 0
    for node in joint_gm.graph.nodes:
        if is_constant_object(node) and "recompute" not in node.meta:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            marked += 1
    return marked


def hold_constant_objects_as_attributes(joint_gm: fx.GraphModule) -> int:
    """Turn each node that builds a Python object from constants into a read of a module attribute holding it.

    NOTE [Constant objects held as attributes]
    PyTorch's ``default_partition`` asserts that every ``call_function`` node of the forward is a tensor before it
    reads the recompute marks of NOTE [Constant objects in the joint graph], so the ``InvokeQuant`` options node
    raised on it (PyTorch's ``disable_functionalization`` OpInfo test of ``invoke_quant``; PyTorch's own
    ``aot_function`` passes it because it does not set ``is_compiling`` and traces the body inline). A
    ``get_attr`` node is neither asserted on nor saved when marked recomputed: both partitions read the attribute.
    The object is built once here; it comes from constants alone, so it equals what each run would build.
    Only for foreign partitioners (aotcache's own recompute such nodes). Returns how many nodes were replaced.
    """
    replaced = 0
    for node in list(joint_gm.graph.nodes):
        if not is_constant_object(node):
            continue
        name = f"_aotcache_constant_object_{replaced}"
        setattr(joint_gm, name, node.target(*node.args, **node.kwargs))
        with joint_gm.graph.inserting_before(node), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")  # a plain attribute
            attribute = joint_gm.graph.get_attr(name)
        attribute.meta.update(node.meta)
        node.replace_all_uses_with(attribute)
        joint_gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        joint_gm.recompile()
    return replaced


def align_saved_to_backward(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, num_fwd_outputs: int) -> None:
    """Reorder ``fw_gm``'s saved outputs to the order of ``bw_gm``'s leading placeholders, in place.

    NOTE [Foreign partitioners]
    Our partitioners hand the saved values to the backward in the forward's output order. PyTorch's
    (``functorch.compile.default_partition`` / ``min_cut_rematerialization_partition``, accepted as
    ``partition_fn``) return them as ``(*tensors, *symints)`` from the forward but take ``(*symints, *tensors)``
    in the backward; the runtime passes them positionally, so a saved SymInt would reach a tensor argument.
    Both graphs keep the joint graph's node names, which gives the permutation; a partition whose names do not
    match is left as it is.
    """
    output = next(node for node in reversed(fw_gm.graph.nodes) if node.op == "output")
    outs = list(output.args[0])
    saved = outs[num_fwd_outputs:]
    placeholders = [node.name for node in bw_gm.graph.nodes if node.op == "placeholder"][:len(saved)]
    if not all(isinstance(node, fx.Node) for node in saved):
        return
    names = [node.name for node in saved]
    if names == placeholders or sorted(names) != sorted(placeholders) or len(set(names)) != len(names):
        return
    by_name = {node.name: node for node in saved}
    output.args = (tuple(outs[:num_fwd_outputs]) + tuple(by_name[name] for name in placeholders),)
    fw_gm.recompile()

#: Partitioners by the names ``aot_function`` / ``aot_module`` / the backend accept for ``partition_fn``.
PARTITIONER_NAMES = ("default", "min_cut")


def resolve_partition(partition_fn: Any, api: str = "aot_function") -> Any:
    """A partition function from ``partition_fn``: None (the default), a callable, or a name in PARTITIONER_NAMES.

    :raises ValueError: an unknown name (the message lists the valid ones).
    :raises TypeError: neither None, a callable nor a string.
    """
    if partition_fn is None or callable(partition_fn):
        return partition_fn
    if isinstance(partition_fn, str):
        table = {"default": default_partition, "min_cut": min_cut_rematerialization_partition}
        if partition_fn not in table:
            raise ValueError(f"aotcache.{api}: unknown partition_fn {partition_fn!r}; use one of "
                             f"{', '.join(repr(name) for name in PARTITIONER_NAMES)} or a partition function "
                             "partition_fn(joint_gm, joint_inputs, *, num_fwd_outputs)")
        return table[partition_fn]
    raise TypeError(f"aotcache.{api}: partition_fn must be a partition function or one of "
                    f"{', '.join(repr(name) for name in PARTITIONER_NAMES)}, got {type(partition_fn).__name__}")
