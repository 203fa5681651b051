"""Runtime: mutation epilogue, view regeneration, non-tensor outputs, autograd behaviour; all against eager."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from aotcache.aot import (
    CompiledRuntime,
    DoubleBackwardError,
    RuntimeMetadata,
    aot_function,
    aot_module,
)


def graph_compiler(gm, example_inputs):
    return gm


def compile_fn(fn, **kwargs):
    return aot_function(fn, graph_compiler, **kwargs)


def clone_args(args):
    return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


def test_user_input_mutation_is_applied_to_the_real_input():
    def fn(x, y):
        x.add_(1)
        y.mul_(y)
        return x * 2

    args = [torch.randn(3), torch.randn(3)]
    ref_args = clone_args(args)
    out = compile_fn(fn)(*args)
    ref = fn(*ref_args)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(args, ref_args)


def test_mutation_of_a_non_leaf_that_requires_grad_matches_eager_grads():
    def fn(x):
        x.mul_(2)
        return (x * x).sum()

    leaf = torch.randn(3, requires_grad=True)
    leaf_ref = leaf.detach().clone().requires_grad_()
    x, x_ref = leaf * 1, leaf_ref * 1
    compile_fn(fn)(x).backward()
    fn(x_ref).backward()
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(leaf.grad, leaf_ref.grad)


def test_batchnorm_running_stats_are_updated_in_training_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    reference = copy.deepcopy(model)
    compiled = aot_module(model, graph_compiler)
    for _ in range(2):
        inp = torch.randn(8, 4)
        out, ref = compiled(inp), reference(inp)
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(out, ref)
    bn, bn_ref = model[1], reference[1]
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked) == 2
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad)
    assert compiled.compiled.num_compiles == 1


def test_view_outputs_are_real_views_of_the_real_input():
    def fn(x):
        return x.view(-1), x[0], x.t()[1:], x * 2

    x = torch.randn(3, 4, requires_grad=True)
    flat, row, sliced, doubled = compile_fn(fn)(x)
    for view in (flat, row, sliced):
        assert view._base is x
        assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    ref = fn(x.detach())
    for got, want in zip((flat, row, sliced, doubled), ref):
        torch.testing.assert_close(got.detach(), want)
    (flat.sum() + row.sum() * 2 + sliced.sum() * 3).backward()
    expected = torch.ones(3, 4)
    expected[0] += 2
    expected[:, 1:] += 3  # x.t()[1:] is columns 1.. of x
    torch.testing.assert_close(x.grad, expected)


def test_view_of_a_mutated_input_sees_the_mutation():
    def fn(x):
        x.add_(10)
        return x.view(-1)

    x = torch.zeros(2, 2)
    out = compile_fn(fn)(x)
    assert out._base is x
    x[0, 0] = -1.0  # a write through the input is visible in the returned view, as in eager
    assert out[0].item() == -1.0 and out[1].item() == 10.0


def test_returning_an_input_returns_the_same_object():
    x = torch.randn(3, requires_grad=True)
    out, doubled = compile_fn(lambda t: (t, t * 2))(x)
    assert out is x
    torch.testing.assert_close(doubled, x.detach() * 2)


def test_outputs_aliasing_other_outputs_are_views():
    def fn(x):
        y = x * 2
        return y, y.view(-1), y[1]

    x = torch.randn(2, 3, requires_grad=True)
    y, flat, row = compile_fn(fn)(x)
    assert flat._base is y and row._base is y
    (flat.sum() + row.sum()).backward()
    expected = torch.full((2, 3), 2.0)
    expected[1] += 2
    torch.testing.assert_close(x.grad, expected)


def test_non_tensor_outputs_and_nested_structures():
    def fn(x, scale):
        return {"out": x * scale, "meta": (x.shape[0], None, "tag", [1.5, True])}

    x = torch.randn(3, 2)
    result = compile_fn(fn)(x, 2.0)
    assert result["meta"] == (3, None, "tag", [1.5, True])
    torch.testing.assert_close(result["out"], x * 2.0)


def test_mixed_requires_grad_inputs():
    def fn(a, b, c):
        return (a * b + c.sin()).sum()

    args = [torch.randn(3, requires_grad=True), torch.randn(3), torch.randn(3, requires_grad=True)]
    ref_args = clone_args(args)
    compile_fn(fn)(*args).backward()
    fn(*ref_args).backward()
    assert args[1].grad is None
    torch.testing.assert_close(args[0].grad, ref_args[0].grad)
    torch.testing.assert_close(args[2].grad, ref_args[2].grad)


def test_retain_graph_allows_a_second_backward():
    x = torch.randn(4, requires_grad=True)
    loss = compile_fn(lambda t: t.sin().sum())(x)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * x.detach().cos())


def test_second_backward_without_retain_graph_raises():
    x = torch.randn(4, requires_grad=True)
    loss = compile_fn(lambda t: t.sin().sum())(x)
    loss.backward()
    with pytest.raises(RuntimeError, match="second time|freed"):
        loss.backward()


def test_no_grad_call_uses_the_inference_graph():
    graphs: list = []

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = aot_function(lambda t: t.exp(), compiler)
    x = torch.randn(3, requires_grad=True)
    with torch.no_grad():
        out = compiled(x)
    assert not out.requires_grad
    assert len(graphs) == 1  # one inference graph, no backward
    assert not any(n.name.startswith("tangents") for n in graphs[0].graph.nodes)
    assert compiled(x).requires_grad  # grad mode on: a new (training) signature
    assert compiled.num_compiles == 2


def test_outputs_unused_in_the_loss_get_zero_tangents():
    def fn(x):
        return x.sin(), x.cos(), x * 3

    x = torch.randn(5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    outs = compile_fn(fn)(x)
    ref = fn(x_ref)
    outs[1].sum().backward()
    ref[1].sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_non_contiguous_incoming_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    out = compile_fn(lambda t: (t * 2).t())(x)
    out.backward(torch.ones(1, 1).expand(4, 3))
    torch.testing.assert_close(x.grad, torch.full((3, 4), 2.0))


def test_tangents_are_traced_with_the_output_strides():
    """NOTE [Tangent strides]: a transposed output's tangent is traced with its strides, not contiguous."""
    seen = {}

    def backward_compiler(gm, example_inputs):
        seen["tangent"] = example_inputs[-1]
        return gm

    x = torch.randn(3, 4, requires_grad=True)
    out = aot_function(lambda t: (t * 2).t(), graph_compiler, backward_compiler, cache=False)(x)
    assert out.stride() == (1, 4)
    out.backward(torch.arange(12.0).reshape(4, 3))  # contiguous: copied into the traced layout
    assert seen["tangent"].stride() == out.stride()
    torch.testing.assert_close(x.grad, 2 * torch.arange(12.0).reshape(4, 3).t())


class ChannelLastNorm(torch.nn.Module):
    """A norm over channels, then LayerNorm over a transposed view (Wav2Vec2 / ConvNeXt blocks)."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.ln = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.ln(self.norm(x).transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("norm", [lambda: torch.nn.GroupNorm(2, 8), lambda: torch.nn.InstanceNorm1d(8, affine=True)],
                         ids=["group_norm", "instance_norm"])
def test_grads_through_layer_norm_of_a_transposed_view_match_eager(norm):
    """Regression: with contiguous traced tangents, fake native_layer_norm_backward strides differ from the CPU
    kernel's, the traced backward omitted GroupNorm's contiguous() and gave wrong weight gradients."""
    torch.manual_seed(0)
    eager = ChannelLastNorm(norm())
    with torch.no_grad():
        eager.ln.weight.normal_()
    mine = copy.deepcopy(eager)
    x = torch.randn(2, 8, 8)
    eager(x).sum().backward()
    aot_module(mine, graph_compiler, cache=False)(x).sum().backward()
    for (name, ref), (_, got) in zip(eager.named_parameters(), mine.named_parameters()):
        torch.testing.assert_close(got.grad, ref.grad, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_double_backward_matches_eager():
    """NOTE [Double backward through the joint graph]: create_graph=True through a compiled function (it raised
    DoubleBackwardError) gives eager's first and second derivatives, also through a module's parameters whose
    saved activations the trace detaches (tanh saves its output)."""
    x = torch.randn(3, requires_grad=True)
    y = compile_fn(lambda t: t.pow(3).sum())(x)
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    torch.testing.assert_close(g, 3 * x.detach() ** 2)
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, 6 * x.detach())

    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    mine = copy.deepcopy(eager)
    compiled = aot_module(mine, graph_compiler, cache=False)
    for model, run in ((eager, eager), (mine, compiled)):
        inp = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = run(inp).pow(2).sum()
        grads = torch.autograd.grad(out, [inp, *model.parameters()], create_graph=True)
        (out + sum(g.pow(2).sum() for g in grads)).backward()
        model.input_grad = inp.grad
    torch.testing.assert_close(mine.input_grad, eager.input_grad)
    for (name, ref), (_, got) in zip(eager.named_parameters(), mine.named_parameters()):
        torch.testing.assert_close(got.grad, ref.grad, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_double_backward_without_a_pure_joint_graph_raises_a_clear_error():
    """A graph with random ops has no joint graph to run again (a second run would draw other numbers)."""
    x = torch.randn(3, requires_grad=True)
    y = compile_fn(lambda t: (t * torch.rand_like(t)).pow(3).sum())(x)
    with pytest.raises(DoubleBackwardError, match="double backward"):
        torch.autograd.grad(y, x, create_graph=True)


def test_random_ops_have_the_right_distribution():
    compiled = compile_fn(lambda t: t + torch.rand_like(t))
    first, second = compiled(torch.zeros(1000)), compiled(torch.zeros(1000))
    assert 0 <= float(first.min()) and float(first.max()) < 1
    assert 0.4 < float(first.mean()) < 0.6
    assert not torch.equal(first, second)  # fresh randomness per call


def test_runtime_rebuilt_from_json_metadata_runs_the_same():
    def fn(x, buf):
        buf.add_(1)
        return x.view(-1), (x * buf).sum()

    compiled = compile_fn(fn)
    x = torch.randn(2, 3, requires_grad=True)
    compiled(x, torch.zeros(3))
    (runtime,) = [r for entries in compiled._entries.values() for r in entries]
    metadata = RuntimeMetadata.from_json(json.loads(json.dumps(runtime.metadata.to_json())))
    rebuilt = CompiledRuntime(metadata, runtime.forward, runtime.backward)
    buf = torch.zeros(3)
    x2 = x.detach().clone().requires_grad_()
    view, loss = rebuilt(x2, buf)
    loss.backward()
    assert view._base is x2
    torch.testing.assert_close(buf, torch.ones(3))
    torch.testing.assert_close(x2.grad, torch.ones(2, 3))


def test_saved_input_that_the_epilogue_mutates_keeps_its_old_value_for_backward():
    # min-cut may save the primal ``buf`` and recompute ``buf + 1`` in the backward: the saved value must be
    # the one from before the mutation epilogue overwrites ``buf``
    from aotcache.aot.partition import min_cut_rematerialization_partition

    def fn(w, buf):
        buf.add_(1)
        return (w * buf).sum()

    w, buf = torch.randn(3, requires_grad=True), torch.randn(3)
    original = buf.clone()
    compile_fn(fn, partition_fn=min_cut_rematerialization_partition)(w, buf).backward()
    torch.testing.assert_close(w.grad, original + 1)
    torch.testing.assert_close(buf, original + 1)


def test_detached_alias_of_an_input_does_not_require_grad():
    a = torch.randn(3, 3, requires_grad=True)
    b = torch.randn(3, 3, requires_grad=True)
    out = compile_fn(lambda x, y: (x.detach(), y * 2), cache=False)(a, b)
    assert not out[0].requires_grad and out[0].untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    (out[0].sum() + out[1].sum()).backward()
    assert a.grad is None
    torch.testing.assert_close(b.grad, torch.full((3, 3), 2.0))


class _Half(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5


def test_input_returned_by_a_custom_function_keeps_its_backward():
    """NOTE [Custom Function views]: regenerating it from the real input skipped the Function's backward."""
    x_ref = torch.ones(2, 2, requires_grad=True)
    x = torch.ones(2, 2, requires_grad=True)
    _Half.apply(x_ref).sum().backward()
    compile_fn(lambda t: _Half.apply(t), cache=False)(x).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_tensor_subclass_inputs_run_forward_and_backward():
    from torch.testing._internal.two_tensor import TwoTensor

    def fn(t):
        return (t * 3).sin()

    a, b = torch.randn(4), torch.randn(4)
    x_ref = TwoTensor(a.clone(), b.clone()).requires_grad_(True)
    x = TwoTensor(a.clone(), b.clone()).requires_grad_(True)
    want, got = fn(x_ref), compile_fn(fn, cache=False)(x)
    torch.testing.assert_close(got.a, want.a)
    torch.testing.assert_close(got.b, want.b)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(x.grad.a, x_ref.grad.a)
    torch.testing.assert_close(x.grad.b, x_ref.grad.b)


def test_outputs_that_are_views_of_intermediates_can_be_modified_in_place():
    """NOTE [Views of intermediates]: autograd refused in-place ops on them ("a view created inside a custom
    Function"); eager allows them, and sibling views of one intermediate see each other's writes."""
    def two_views(a):
        out = a * 3
        return out.view(-1), out.view(-1)

    x_ref, x = torch.ones(3, 3, requires_grad=True), torch.ones(3, 3, requires_grad=True)
    ref, got = two_views(x_ref), compile_fn(two_views, cache=False)(x)
    ref[0].mul_(2)
    got[0].mul_(2)
    torch.testing.assert_close(got[1], ref[1])
    ref[0].sum().backward()
    got[0].sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_in_place_write_to_a_view_output_never_changes_what_backward_reads():
    """The output shares memory with a value saved for backward (tanh saves its result): it is a copy."""
    x = torch.randn(3, 3, requires_grad=True)
    out = compile_fn(lambda a: a.tanh().view(-1), cache=False)(x)
    out.mul_(2)
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * (1 - x.detach().tanh() ** 2))


def test_mutated_inputs_over_disjoint_memory_of_one_tensor_are_supported():
    def scale_both(a, b):
        a.mul_(3)
        b.mul_(2)
        return a.sum() + b.sum()

    x_ref, x = torch.ones(4, 4), torch.ones(4, 4)
    compiled = compile_fn(scale_both, cache=False)
    torch.testing.assert_close(compiled(x[0:2], x[2:4]), scale_both(x_ref[0:2], x_ref[2:4]))
    torch.testing.assert_close(x, x_ref)
    # overlapping rows: traced again, over a synthetic base (NOTE [Synthetic bases]), with eager's values
    torch.testing.assert_close(compiled(x[0:2], x[1:3]), scale_both(x_ref[0:2], x_ref[1:3]))
    torch.testing.assert_close(x, x_ref)
    assert compiled.num_compiles == 3  # disjoint; overlapping refused as separate inputs; over the base


def test_view_outputs_with_a_conjugate_bit_keep_their_values():
    """Regression: handing out a conjugate view (ifft) as a plain tensor over its memory dropped the bit."""
    x = torch.randn(5, 7, 10, requires_grad=True)

    def fn(t):
        return torch.fft.ifft(t, dim=1)

    got = compile_fn(fn, cache=False)(x)
    torch.testing.assert_close(got, fn(x))
    got.mul_(2)  # and it can still be modified in place


def _fp32_region_under_autocast(x, w):
    with torch.autocast("cpu", enabled=False):
        y = torch.mm(x.float(), w.float())  # kept in fp32 on purpose
    return y, torch.mm(y, w)  # the second matmul under autocast: bf16


def test_compiled_graphs_do_not_apply_the_callers_autocast_twice():
    """NOTE [Compiled graphs run without autocast]: the fp32 region came back bf16 (casts applied again)."""
    x, w_ref = torch.randn(4, 4), torch.randn(4, 4, requires_grad=True)
    w = w_ref.detach().clone().requires_grad_(True)
    compiled = compile_fn(_fp32_region_under_autocast, cache=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _fp32_region_under_autocast(x, w_ref)
        got = compiled(x, w)
        (ref[0].sum() + ref[1].float().sum()).backward()
        (got[0].sum() + got[1].float().sum()).backward()
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_tangent_of_an_output_whose_meta_strides_have_another_rank():
    """Regression (ModuleInfo sweep): multilabel_margin_loss(reduction="none") of a 1-D input is 0-dim, but its
    meta kernel reports strides (1,); the tangent layout must not be rebuilt from those strides."""
    x = torch.randn(10, requires_grad=True)
    target = torch.randint(0, 10, (10,))

    def loss(inp, tgt):
        return torch.nn.functional.multilabel_margin_loss(inp, tgt, reduction="none")

    out = compile_fn(loss, cache=False)(x, target)
    out.backward()
    expected_x = x.detach().clone().requires_grad_()
    expected = loss(expected_x, target)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, expected_x.grad)
