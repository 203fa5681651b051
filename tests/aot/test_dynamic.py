"""dynamic=True: guards that relate or pin sizes (ShapeEnv replacements) are not metadata mutations; reuse
across sizes that satisfy the guards, retrace on sizes that violate them, results equal to eager."""

from __future__ import annotations

import pytest
import torch

from aotcache.aot import CaptureError, aot_function, capture
from aotcache.autograd_cache.guards import evaluate_guards


def graph_compiler(gm, example_inputs):
    return gm


def add_after_sin(x, y):
    return (x * 2).sin() + y  # guards x.size(i) == y.size(i): one symbol replaces the other


def matmul(x, w):
    return x @ w  # guards x.size(1) == w.size(0)


def cat_then_slice(x):
    return torch.cat([x, x])[:6]  # guards 3 <= x.size(0) (or pins x.size(0) == 2 when traced at 2 rows)


def make_inputs(shapes, requires_grad=True):
    return [torch.randn(*shape, requires_grad=requires_grad) for shape in shapes]


def assert_matches_eager(compiled, fn, shapes):
    """Call ``compiled`` and ``fn`` on equal inputs; compare outputs and input gradients."""
    inputs = make_inputs(shapes)
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = compiled(*inputs)
    expected = fn(*reference_inputs)
    torch.testing.assert_close(out, expected)
    cotangent = torch.randn_like(expected)
    out.backward(cotangent)
    expected.backward(cotangent)
    for got, want in zip(inputs, reference_inputs):
        torch.testing.assert_close(got.grad, want.grad)


# (function, shapes of the first call, shapes that satisfy its guards, shapes that violate a guard)
CASES = {
    "add_after_sin": (add_after_sin, [(5, 3), (5, 3)], [[(7, 4), (7, 4)], [(2, 9), (2, 9)]],
                      [(5, 3), (5, 1)]),  # a size-1 dimension broadcasts: it is specialized, guard fails
    "matmul": (matmul, [(5, 3), (3, 4)], [[(7, 6), (6, 2)], [(2, 3), (3, 9)]], [(5, 3), (3, 1)]),
    "cat_then_slice": (cat_then_slice, [(5, 3)], [[(3, 3)], [(8, 2)]], [(2, 3)]),  # 2 rows: cat has only 4
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_relating_guards_compile_match_eager_and_reuse_across_sizes(name):
    fn, first, satisfying, violating = CASES[name]
    compiled = aot_function(fn, graph_compiler, dynamic=True, cache=False)
    assert_matches_eager(compiled, fn, first)
    for shapes in satisfying:
        assert_matches_eager(compiled, fn, shapes)
    assert compiled.num_compiles == 1, "sizes that satisfy the guards must reuse the graph"
    assert_matches_eager(compiled, fn, violating)
    assert compiled.num_compiles == 2, "sizes that violate a guard must retrace"
    assert_matches_eager(compiled, fn, first)  # the first entry still serves its sizes
    assert compiled.num_compiles == 2


def test_the_cat_example_traced_at_a_pinned_size_serves_only_that_size():
    compiled = aot_function(cat_then_slice, graph_compiler, dynamic=True, cache=False)
    assert_matches_eager(compiled, cat_then_slice, [(2, 3)])  # the guard pins x.size(0) == 2
    assert_matches_eager(compiled, cat_then_slice, [(2, 7)])
    assert compiled.num_compiles == 1
    assert_matches_eager(compiled, cat_then_slice, [(4, 3)])
    assert compiled.num_compiles == 2


def test_guards_of_a_relating_capture_encode_the_relation():
    captured = capture(add_after_sin, make_inputs([(5, 3), (5, 3)]), dynamic=True)
    guards = captured.metadata.guards
    assert evaluate_guards(guards, [torch.randn(6, 4), torch.randn(6, 4)])
    assert not evaluate_guards(guards, [torch.randn(6, 4), torch.randn(7, 4)])
    assert not evaluate_guards(guards, [torch.randn(6, 4), torch.randn(6, 1)])


def test_inference_data_mutation_with_a_relating_guard_is_applied_to_the_input():
    def add_into(x, y):
        x.add_(y * 2)
        return x.sum(0)

    compiled = aot_function(add_into, graph_compiler, dynamic=True, cache=False)
    for rows in (4, 6):
        x, y = torch.randn(rows, 3), torch.randn(rows, 3)
        x_ref = x.clone()
        expected = add_into(x_ref, y)
        torch.testing.assert_close(compiled(x, y), expected)
        torch.testing.assert_close(x, x_ref)
    assert compiled.num_compiles == 1


def test_view_of_an_input_with_a_relating_guard_stays_a_view():
    compiled = aot_function(lambda x, y: (x.t(), x * y), graph_compiler, dynamic=True, cache=False)
    for rows in (4, 6):
        x, y = torch.randn(rows, 3), torch.randn(rows, 3)
        view, product = compiled(x, y)
        assert view._base is x
        torch.testing.assert_close(view, x.t())
        torch.testing.assert_close(product, x * y)
    assert compiled.num_compiles == 1


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda x, y: x.t_(), id="t_"),
    pytest.param(lambda x, y: x.transpose_(0, 1), id="transpose_"),
    pytest.param(lambda x, y: x.unsqueeze_(0), id="unsqueeze_"),
    pytest.param(lambda x, y: x.resize_(x.shape[0] * 2, x.shape[1]), id="resize_"),
    pytest.param(lambda x, y: x.as_strided_((x.shape[0] - 1, x.shape[1]), x.stride(), 1), id="as_strided_"),
    pytest.param(lambda x, y: (x + y, y.t_()), id="relating_guard_then_t_"),
])
def test_real_metadata_mutation_still_raises_with_dynamic(mutate):
    compiled = aot_function(mutate, graph_compiler, dynamic=True, cache=False, on_capture_error="raise")
    with pytest.raises(CaptureError, match="metadata mutated"):
        compiled(torch.randn(4, 4), torch.randn(4, 4))  # square: a transpose keeps the sizes, not the strides
