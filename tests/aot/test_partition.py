"""Partitioners on joint graphs traced here with make_fx + torch.autograd.grad (contract naming)."""

from __future__ import annotations

import operator

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from aotcache.aot.partition import (
    PartitionError,
    default_partition,
    is_recomputable,
    min_cut_rematerialization_partition,
    saved_value_bytes,
)

PARTITIONERS = [default_partition, min_cut_rematerialization_partition]


def make_joint(fn, args, *, tracing_mode="fake"):
    """Joint graph of ``fn`` (returns a tuple of outputs) w.r.t. all ``args``; placeholders primals_*/tangents_*."""
    with torch.no_grad():
        example_outs = fn(*args)
    tangents = [torch.ones_like(out) for out in example_outs]

    def joint(primals, tangents):
        leaves = [p.requires_grad_(True) if p.is_floating_point() else p for p in primals]
        with torch.enable_grad():
            outs = fn(*leaves)
            grads = torch.autograd.grad(outs, [p for p in leaves if p.requires_grad], tangents,
                                        allow_unused=True)
        return (*outs, *grads)

    gm = make_fx(joint, tracing_mode=tracing_mode)(list(args), tangents)
    return gm, tangents, len(example_outs)


def eager_reference(fn, args, tangents):
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    outs = fn(*leaves)
    grads = torch.autograd.grad(outs, leaves, tangents, allow_unused=True)
    return [o.detach() for o in outs], grads


def run_partitioned(fw_gm, bw_gm, args, tangents, num_fwd):
    outs = fw_gm(*args)
    fw_outs, saved = outs[:num_fwd], outs[num_fwd:]
    grads = bw_gm(*saved, *tangents)
    return fw_outs, saved, grads


def saved_bytes(fw_gm, num_fwd):
    (output,) = [n for n in fw_gm.graph.nodes if n.op == "output"]
    return sum(saved_value_bytes(n) for n in output.args[0][num_fwd:])


def saved_names(fw_gm, num_fwd):
    (output,) = [n for n in fw_gm.graph.nodes if n.op == "output"]
    return [n.name for n in output.args[0][num_fwd:]]


def mlp(x, w1, b1, w2, b2):
    hidden = torch.nn.functional.gelu(torch.addmm(b1, x, w1))
    return ((torch.tanh(hidden) @ w2 + b2).sum(),)


def pointwise_chain(x, y):
    a = torch.sin(x) * torch.cos(y)
    b = torch.exp(a) + torch.sigmoid(a) * x
    c = torch.tanh(b) * b + a
    return (c.sum(),)


def mlp_args():
    torch.manual_seed(0)
    return [torch.randn(16, 32), torch.randn(32, 64), torch.randn(64), torch.randn(64, 8), torch.randn(8)]


def chain_args():
    torch.manual_seed(1)
    return [torch.randn(64, 64), torch.randn(64, 64)]


@pytest.mark.parametrize("partition", PARTITIONERS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("case", ["mlp", "chain"])
def test_partitioned_graphs_match_eager(partition, case):
    fn, args = (mlp, mlp_args()) if case == "mlp" else (pointwise_chain, chain_args())
    joint, tangents, num_fwd = make_joint(fn, args)
    fw_gm, bw_gm = partition(joint, [*args, *tangents], num_fwd_outputs=num_fwd)
    fw_outs, saved, grads = run_partitioned(fw_gm, bw_gm, args, tangents, num_fwd)
    ref_outs, ref_grads = eager_reference(fn, args, tangents)
    for got, want in zip(fw_outs, ref_outs):
        torch.testing.assert_close(got, want)
    assert len(grads) == len(args)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert fw_gm.meta["num_saved_tensors"] + fw_gm.meta["num_saved_symints"] == len(saved)
    # backward placeholders: saved values (with meta) then tangents
    bw_placeholders = [n for n in bw_gm.graph.nodes if n.op == "placeholder"]
    assert len(bw_placeholders) == len(saved) + len(tangents)
    assert all("val" in n.meta for n in bw_placeholders)
    assert all("val" in n.meta for n in fw_gm.graph.nodes if n.op == "call_function")


def test_min_cut_saves_fewer_bytes_than_default():
    for fn, args, strictly in [(mlp, mlp_args(), False), (pointwise_chain, chain_args(), True)]:
        joint, tangents, num_fwd = make_joint(fn, args)
        default_fw, _ = default_partition(joint, [], num_fwd_outputs=num_fwd)
        mincut_fw, _ = min_cut_rematerialization_partition(joint, [], num_fwd_outputs=num_fwd)
        default_bytes, mincut_bytes = saved_bytes(default_fw, num_fwd), saved_bytes(mincut_fw, num_fwd)
        assert mincut_bytes <= default_bytes
        if strictly:
            # the chain needs only the two inputs: 2 * 64 * 64 floats
            assert mincut_bytes < default_bytes
            assert mincut_bytes == 2 * 64 * 64 * 4


def _tangent_independent(joint):
    tangent_dependent = set()
    for node in joint.graph.nodes:
        if node.op == "placeholder" and node.name.startswith("tangents"):
            tangent_dependent.add(node)
        elif any(arg in tangent_dependent for arg in node.all_input_nodes):
            tangent_dependent.add(node)
    return {n.name for n in joint.graph.nodes if n not in tangent_dependent}


def test_matmuls_are_never_recomputed():
    args = mlp_args()
    joint, tangents, num_fwd = make_joint(mlp, args)
    forward_names = _tangent_independent(joint)
    _, bw_gm = min_cut_rematerialization_partition(joint, [], num_fwd_outputs=num_fwd)
    expensive = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    recomputed = [n.name for n in bw_gm.graph.nodes
                  if n.op == "call_function" and n.target in expensive and n.name in forward_names]
    assert recomputed == []
    assert not is_recomputable(next(n for n in joint.graph.nodes if n.target is torch.ops.aten.addmm.default))


def dropout_model(x, w):
    h = torch.nn.functional.dropout(torch.relu(x * w), p=0.5, training=True)
    noise = torch.rand_like(x)
    return ((h * noise).sum(),)


@pytest.mark.parametrize("partition", PARTITIONERS, ids=lambda p: p.__name__)
def test_random_ops_run_once_in_forward(partition):
    args = [torch.randn(32, 32), torch.randn(32, 32)]
    joint, tangents, num_fwd = make_joint(dropout_model, args)
    random_targets = [n.target for n in joint.graph.nodes if n.op == "call_function"
                      and isinstance(n.target, torch._ops.OpOverload)
                      and torch.Tag.nondeterministic_seeded in n.target.tags]
    assert random_targets, "the test graph should contain random ops"
    fw_gm, bw_gm = partition(joint, [], num_fwd_outputs=num_fwd)
    assert not [n for n in bw_gm.graph.nodes if n.target in random_targets]
    assert sum(1 for n in fw_gm.graph.nodes if n.target in random_targets) == len(random_targets)
    # gradient consistency: d(sum(relu(x*w) * mask * scale * noise))/dw = x * that factor where x*w > 0
    torch.manual_seed(3)
    outs = fw_gm(*args)
    grads = bw_gm(*outs[num_fwd:], *tangents)
    assert grads[0].shape == args[0].shape
    # with w == x the forward is deterministic given the masks; grads w.r.t. x and w are then related
    ratio_consistent = torch.where(args[0] != 0, grads[1] * args[1] / args[0], grads[0])
    torch.testing.assert_close(ratio_consistent, grads[0], rtol=1e-4, atol=1e-4)


def test_saved_order_is_deterministic():
    layouts = []
    for _ in range(3):
        for partition in PARTITIONERS:
            joint, _, num_fwd = make_joint(pointwise_chain, chain_args())
            fw_gm, bw_gm = partition(joint, [], num_fwd_outputs=num_fwd)
            layouts.append((partition.__name__, saved_names(fw_gm, num_fwd),
                            [n.name for n in bw_gm.graph.nodes if n.op == "placeholder"]))
    assert layouts[0::2] == [layouts[0]] * 3
    assert layouts[1::2] == [layouts[1]] * 3


@pytest.mark.parametrize("partition", PARTITIONERS, ids=lambda p: p.__name__)
def test_symbolic_shapes_save_symints_and_run_other_sizes(partition):
    def fn(x, w):
        y = (x @ w).relu()
        return (y.view(-1).sin().view(y.shape[0], -1).sum(0),)

    args = [torch.randn(6, 4), torch.randn(4, 5)]
    joint, tangents, num_fwd = make_joint(fn, args, tracing_mode="symbolic")
    fw_gm, bw_gm = partition(joint, [], num_fwd_outputs=num_fwd)
    num_tensors = fw_gm.meta["num_saved_tensors"]
    other = [torch.randn(9, 4), torch.randn(4, 5)]
    outs = fw_gm(*other)
    saved = outs[num_fwd:]
    assert all(isinstance(v, torch.Tensor) for v in saved[:num_tensors])
    assert all(isinstance(v, int) for v in saved[num_tensors:])
    grads = bw_gm(*saved, *tangents)
    ref_outs, ref_grads = eager_reference(fn, other, tangents)
    torch.testing.assert_close(outs[0], ref_outs[0])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_multi_output_forward_op_saves_items_not_tuples():
    def fn(x):
        values, indices = torch.max(x, dim=1)
        return (values * 2,)

    args = [torch.randn(5, 7)]
    joint, tangents, num_fwd = make_joint(fn, args)
    for partition in PARTITIONERS:
        fw_gm, bw_gm = partition(joint, [], num_fwd_outputs=num_fwd)
        (output,) = [n for n in fw_gm.graph.nodes if n.op == "output"]
        for node in output.args[0][num_fwd:]:
            assert isinstance(node.meta["val"], (torch.Tensor, int, torch.SymInt))
        _, _, grads = run_partitioned(fw_gm, bw_gm, args, tangents, num_fwd)
        torch.testing.assert_close(grads[0], eager_reference(fn, args, tangents)[1][0])
        assert any(n.target is operator.getitem for n in fw_gm.graph.nodes)


def test_contract_violations_are_named():
    joint, _, num_fwd = make_joint(pointwise_chain, chain_args())
    bad = next(n for n in joint.graph.nodes if n.op == "placeholder")
    bad.name = "weights_1"
    with pytest.raises(PartitionError, match="weights_1"):
        default_partition(joint, [], num_fwd_outputs=num_fwd)
    joint, _, num_fwd = make_joint(pointwise_chain, chain_args())
    with pytest.raises(PartitionError, match="num_fwd_outputs"):
        min_cut_rematerialization_partition(joint, [], num_fwd_outputs=99)


def test_min_cut_saves_max_pool_offsets_not_indices():
    """Inductor's max-pool decomposition computes int64 indices from int8 window offsets: min-cut recomputes
    the indices in the backward and saves the offsets (an eighth of the bytes), as PyTorch's partitioner does."""
    from aotcache.aot import aot_function
    from aotcache.compilers.inductor_decomp import inductor_decompositions

    saved_dtypes = []

    def record_backward(gm, example_inputs):
        saved_dtypes.extend(node.meta["val"].dtype for node in gm.graph.nodes
                            if node.op == "placeholder" and not node.name.startswith("tangents"))
        return gm

    def fn(x):
        return torch.nn.functional.max_pool2d(x.relu(), 2)

    compiled = aot_function(fn, lambda gm, _: gm, record_backward, partition_fn=min_cut_rematerialization_partition,
                            decompositions=inductor_decompositions(), cache=False)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    compiled(x).sum().backward()
    reference = x.detach().clone().requires_grad_()
    fn(reference).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
    assert torch.int8 in saved_dtypes and torch.int64 not in saved_dtypes


@pytest.mark.parametrize("torch_partition", ["default_partition", "min_cut_rematerialization_partition"])
def test_pytorch_partitioners_as_partition_fn_save_symints_in_their_order(torch_partition):
    # PyTorch's test_aotdispatch (test_min_cut_partitioner_output_tensor_shape_tensor): torch's partitioners
    # return saved SymInts after the tensors but take them first in the backward; a SymInt reached aten.mm
    # (NOTE [Foreign partitioners])
    import functorch.compile

    from aotcache.aot import aot_function

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return gm
        return compiler

    def fn(a, b, c):
        rows = b.size(0) + c.size(0)
        stacked = torch.cat([a.expand(rows, a.size(0)), b, c])
        return stacked, torch.mm(torch.mm(stacked, c.t()), a.view(c.size(0), -1))

    def run(f):
        args = [torch.randn(6, requires_grad=True), torch.randn(3, 6, requires_grad=True),
                torch.randn(2, 6, requires_grad=True)]
        stacked, product = f(*args)
        (stacked.sum() + product.sum()).backward()
        return [stacked, product, *[arg.grad for arg in args]]

    compiled = aot_function(fn, keep("fw"), keep("bw"), partition_fn=getattr(functorch.compile, torch_partition),
                            dynamic=True, cache=False, on_capture_error="raise")
    torch.manual_seed(0)
    expected = run(fn)
    torch.manual_seed(0)
    got = run(compiled)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    saved = [node.name for node in graphs["bw"].graph.nodes if node.op == "placeholder"]
    if torch_partition == "min_cut_rematerialization_partition":
        assert saved[0].startswith("sym_size"), saved  # the case that broke: a SymInt saved first


@pytest.mark.parametrize("torch_partition", ["default_partition", "min_cut_rematerialization_partition"])
def test_pytorch_partitioners_with_random_ops_in_a_selective_checkpoint(torch_partition):
    # PyTorch's test_activation_checkpointing (test_compile_selective_checkpoint_random_op): torch's partitioners
    # ask detect_fake_mode() for the fake mode when they move a checkpointed dropout into the backward, and
    # raised "fake_mode must not be None" outside Dynamo's TracingContext (NOTE [Partitioners that look for the
    # fake mode] in compile_step.py)
    import functools

    import functorch.compile
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from aotcache.api import aot_module_simplified

    def save_sigmoid(ctx, func, *args, **kwargs):
        if func == torch.ops.aten.sigmoid.default:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def block(x):
        return torch.sigmoid(torch.dropout(torch.sigmoid(x), p=0.5, train=True))

    def fn(x):
        return checkpoint(block, x, use_reentrant=False, preserve_rng_state=True,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, save_sigmoid))

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler="nop",
                                     partition_fn=getattr(functorch.compile, torch_partition), cache=False)

    torch._dynamo.reset()
    x = torch.randn(16, 16, requires_grad=True)
    x_compiled = x.detach().clone().requires_grad_()
    torch.manual_seed(0)
    expected = fn(x)
    expected.sum().backward()
    torch.manual_seed(0)
    got = torch.compile(fn, backend=backend, fullgraph=True)(x_compiled)
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x_compiled.grad, x.grad)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "selective_checkpoint"])
def test_pytorch_default_partition_saves_the_forward_it_places_by_tags(checkpointed):
    # PyTorch's test_activation_checkpointing (test_compile_selective_checkpoint_must_not_recompute_gemm with
    # default_partition): torch's default_partition places nodes by meta["partitioner_tag"]; without the tags only
    # the inputs were saved and the backward recomputed the whole forward (6 mm instead of 4), with or without a
    # checkpoint (NOTE [Forward and backward tags of the joint graph] in capture.py)
    import functools

    import functorch.compile
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from aotcache.api import aot_module_simplified

    mm_counts = {}

    def counting(name):
        def compiler(gm, example_inputs):
            mm_counts[name] = sum(1 for node in gm.graph.nodes if node.target == torch.ops.aten.mm.default)
            return gm
        return compiler

    def save_mm(ctx, func, *args, **kwargs):
        if func == torch.ops.aten.mm.default:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def block(x, y):
        return torch.sigmoid(torch.matmul(torch.matmul(x, y), y)) * y

    def fn(x, y):
        if not checkpointed:
            return block(x, y)
        return checkpoint(block, x, y, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, save_mm))

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=counting("fw"), bw_compiler=counting("bw"),
                                     partition_fn=functorch.compile.default_partition, cache=False)

    torch._dynamo.reset()
    x, y = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    xc, yc = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    expected = fn(x, y)
    expected.sum().backward()
    got = torch.compile(fn, backend=backend, fullgraph=True)(xc, yc)
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(xc.grad, x.grad)
    torch.testing.assert_close(yc.grad, y.grad)
    assert mm_counts == {"fw": 2, "bw": 4}  # two matmuls, two gradient matmuls each, none recomputed


class _SavesOnesOfIntPlusOne(torch.nn.Module):
    """Saves ``ones(n + 1, 4)`` for the weight's gradient, ``n`` an int argument traced as a symbol."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4))

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return (torch.ones(n + 1, 4) * 2 * self.w).sum(0) + x


def test_a_symbol_used_only_inside_a_saved_size_is_saved_for_the_backward():
    """NOTE [Sizes the backward must bind]: the backward's only input with the int's symbol ``s0`` has ``s0 + 1``
    rows; Inductor failed that backward (the graph ran with nop, uncached) until ``s0`` was saved as a SymInt."""
    import copy

    import aotcache
    from aotcache.autograd_cache.cache import resolve_cache

    counters = resolve_cache(True).counters
    bypassed = counters.get("bypass", 0)
    eager = _SavesOnesOfIntPlusOne()
    module = copy.deepcopy(eager)
    compiled = aotcache.aot_module(module, "inductor")
    for n in (2, 3, 5):
        x = torch.linspace(0.0, 1.0, 4)
        want, got = eager(x, n), compiled(x, n)
        want.sum().backward()
        got.sum().backward()
        assert torch.allclose(want, got) and torch.allclose(eager.w.grad, module.w.grad), n
    assert compiled.compiled.num_compiles == 2  # the first int, then the int as a symbol
    assert counters.get("bypass", 0) == bypassed  # both compiled by Inductor (no nop fallback) and stored
