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


# --------------------------------------------------------------------------------------------------------
# dynamic=None (the default): automatic, as in torch.compile (NOTE [Dynamic dimensions])
# --------------------------------------------------------------------------------------------------------


class TinyEncoder(torch.nn.Module):
    """Token embedding + attention-ish mixing over a sequence whose length varies between calls."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, ids):
        h = self.embed(ids)
        scores = (h @ h.transpose(-1, -2)).softmax(-1)
        return self.proj(scores @ h).sum(-1)


@pytest.mark.parametrize("api", ["aot_function", "aot_module"])
def test_automatic_dynamic_recompiles_once_then_reuses_across_lengths(api, caplog):
    """Issue 13 item 2: an inference loop over sequence lengths traced again for every new length."""
    import logging

    from aotcache.aot import aot_module

    torch.manual_seed(0)
    model = TinyEncoder()
    if api == "aot_module":
        compiled = aot_module(model, graph_compiler, cache=False)
        counter = compiled.compiled
    else:
        compiled = counter = aot_function(lambda ids: model(ids), graph_compiler, cache=False)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="aotcache"):
        for length in (5, 7, 9, 12, 5, 30):
            ids = torch.randint(0, 50, (2, length))
            torch.testing.assert_close(compiled(ids), model(ids))
    assert counter.num_compiles == 2  # static at length 5, then once with the length dimension dynamic
    assert "changed size since the first call" in caplog.text
    batch = torch.randint(0, 50, (3, 7))  # another batch size: that dimension becomes dynamic too
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch), model(batch))
        other = torch.randint(0, 50, (4, 9))
        torch.testing.assert_close(compiled(other), model(other))
    assert counter.num_compiles == 3


def test_automatic_dynamic_gives_up_when_the_dynamic_capture_fails(caplog):
    """A function that captures with static shapes only keeps working under the default dynamic=None."""
    import logging

    def static_only(x):
        if isinstance(x.shape[0], torch.SymInt):
            raise RuntimeError("this function needs concrete sizes")
        return x.sin() * x.shape[0]

    compiled = aot_function(static_only, graph_compiler, cache=False)
    with caplog.at_level(logging.WARNING, logger="aotcache"):
        for rows in (4, 5, 6, 5):
            x = torch.randn(rows)
            torch.testing.assert_close(compiled(x), static_only(x))
    assert compiled.num_compiles == 4  # static at 4 rows, the failed dynamic attempt, static at 5 and at 6
    assert caplog.text.count("compiling with dynamic dimensions failed") == 1
    # dynamic=True: the capture's error is not eager's, so the call runs as eager does (NOTE [Captures that fail
    # where eager may run]); on_capture_error="raise" raises it
    x = torch.randn(3)
    torch.testing.assert_close(aot_function(static_only, graph_compiler, dynamic=True, cache=False)(x), static_only(x))
    with pytest.raises(RuntimeError, match="needs concrete sizes"):
        aot_function(static_only, graph_compiler, dynamic=True, cache=False, on_capture_error="raise")(x)


@pytest.mark.parametrize("value", ["true", 1, 0, "auto"])
def test_dynamic_must_be_a_bool_or_none(value):
    from aotcache.aot import aot_module

    with pytest.raises(TypeError, match=r"dynamic must be True, False or None"):
        aot_function(add_after_sin, dynamic=value)
    with pytest.raises(TypeError, match=r"aot_module: dynamic must be"):
        aot_module(torch.nn.Linear(2, 2), dynamic=value)


def test_dynamic_module_keeps_parameters_static():
    """With dynamic=True only the caller's arguments get symbols: weights keep their sizes (as torch.compile),
    so the guards mention each parameter's sizes only as constants."""
    import re

    from aotcache.aot import aot_module

    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    compiled = aot_module(model, graph_compiler, dynamic=True, cache=False)
    for rows in (4, 9, 2):
        x = torch.randn(rows, 6)
        torch.testing.assert_close(compiled(x), model(x))
    assert compiled.compiled.num_compiles == 1
    [[runtime]] = compiled.compiled._entries.values()
    guards = runtime.metadata.guards
    # parameters are t0..t3: each size they have is compared with a constant, never with another size
    for position in range(4):
        for clause in re.findall(rf"L\['t{position}'\]\.size\(\)\[\d\] == ([^ ]+)", guards):
            assert clause.isdigit(), guards
    assert re.search(r"L\['t4'\]\.size\(\)\[0\]", guards) is None or "L['t4'].size()[0] ==" not in guards


# --------------------------------------------------------------------------------------------------------
# NOTE [Analysis without symbols]: an inference capture analyzes on static probes; the trace checks it
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def analyses(monkeypatch):
    """Records, per analysis pass, whether it ran with symbolic sizes."""
    import sys

    module = sys.modules["aotcache.aot.capture"]
    seen: list[bool] = []
    original = module.analyze

    def spy(*args, **kwargs):
        seen.append(kwargs["fake_mode"].shape_env is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "analyze", spy)
    return seen


def test_inference_capture_analyzes_without_symbols_and_serves_other_sizes(analyses):
    def fn(x, y):
        y.mul_(2)
        return x.t(), (x @ y).relu()

    compiled = aot_function(fn, graph_compiler, dynamic=True, cache=False)
    for rows, inner in ((4, 3), (6, 5)):
        x, y = torch.randn(rows, inner), torch.randn(inner, 2)
        y_ref = y.clone()
        view, out = compiled(x, y)
        expected = fn(x, y_ref)
        assert view._base is x
        torch.testing.assert_close(out, expected[1])
        torch.testing.assert_close(y, y_ref)
    assert compiled.num_compiles == 1
    assert analyses == [False]


def test_training_capture_analyzes_without_symbols_and_makes_its_tangents(analyses):
    compiled = aot_function(matmul, graph_compiler, dynamic=True, cache=False)
    for shapes in ([(5, 3), (3, 4)], [(7, 6), (6, 2)]):
        assert_matches_eager(compiled, matmul, shapes)
    assert compiled.num_compiles == 1
    assert analyses == [False]


def layer_norm_two_outputs(x, w, b):
    h = torch.nn.functional.layer_norm(x @ w + b, (w.shape[1],))
    return h.relu().sum(1), h.t()


def test_tangents_made_in_the_trace_give_the_graph_of_a_symbolic_analysis(monkeypatch):
    # NOTE [Tangents made in the trace]: the same joint graph, tangents and guards as with tangents as inputs
    import sys

    def structure(captured):  # the nodes in order; a size read (sym_size) may sit elsewhere, its uses do not
        nodes = [(node.op, str(node.target), len(node.args)) for node in captured.graph.graph.nodes]
        return sorted(nodes), [node for node in nodes if "sym_size" not in node[1]]

    shapes = [(5, 3), (3, 4), (4,)]
    made = capture(layer_norm_two_outputs, make_inputs(shapes), dynamic=True)
    monkeypatch.setattr(sys.modules["aotcache.aot.capture"], "_analyze_without_symbols", lambda *a, **k: None)
    given = capture(layer_norm_two_outputs, make_inputs(shapes), dynamic=True)
    assert structure(made) == structure(given)
    assert [n.name for n in made.graph.graph.nodes if n.op == "placeholder"] == [
        "primals_1", "primals_2", "primals_3", "tangents_1", "tangents_2"]
    assert [str(t.shape) for t in made.tangents] == [str(t.shape) for t in given.tangents]
    assert made.metadata.guards == given.metadata.guards


class Normalized(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(self.linear(x)).relu()


def test_training_capture_that_mutates_a_buffer_analyzes_without_symbols(analyses):
    from aotcache.aot import aot_module

    torch.manual_seed(0)
    model, reference = Normalized(), Normalized()
    reference.load_state_dict(model.state_dict())
    compiled = aot_module(model, graph_compiler, dynamic=True, cache=False)
    for rows in (5, 8):
        x = torch.randn(rows, 3)
        out, expected = compiled(x), reference(x)
        torch.testing.assert_close(out, expected)
        out.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(model.linear.weight.grad, reference.linear.weight.grad)
        torch.testing.assert_close(model.norm.running_mean, reference.norm.running_mean)
    assert analyses == [False]  # the running stats' mutation is seen on static probes too
    assert compiled.compiled.num_compiles == 1


def scaled_in_place(x, w):
    x.mul_(2)  # a non-leaf input that requires grad, changed in place
    return (x @ w).sin()


def test_training_capture_that_mutates_a_non_leaf_input_matches_eager(analyses):
    compiled = aot_function(scaled_in_place, graph_compiler, dynamic=True, cache=False)
    for rows in (5, 8, 11):
        a, w = torch.randn(rows, 3, requires_grad=True), torch.randn(3, 4, requires_grad=True)
        a_ref, w_ref = a.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        x, x_ref = a * 1, a_ref * 1
        out, expected = compiled(x, w), scaled_in_place(x_ref, w_ref)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(x, x_ref)
        out.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(a.grad, a_ref.grad)
        torch.testing.assert_close(w.grad, w_ref.grad)
    assert compiled.num_compiles == 1
    assert analyses == [False]


def test_a_size_output_is_not_taken_for_a_constant(analyses):
    # on static probes x.shape[0] is the constant 4; traced with symbols it is a SymInt: the trace sees the
    # mismatch and analyzes again with symbols, so a call with 6 rows returns 6, not a stale 4
    compiled = aot_function(lambda x: (x * 2, x.shape[0]), graph_compiler, dynamic=True, cache=False)
    for rows in (4, 6):
        x = torch.randn(rows, 3)
        doubled, size = compiled(x)
        torch.testing.assert_close(doubled, x * 2)
        assert size == rows
    assert compiled.num_compiles == 1
    assert analyses == [False, True]


# --------------------------------------------------------------------------------------------------------
# NOTE [Symbolic fake-tensor cache]: the symbolic trace runs with FakeTensorMode's cache off
# --------------------------------------------------------------------------------------------------------


def two_blocks(x, w1, w2):
    """The same block twice (the second repeats the first's ops: fake-tensor cache hits when it is on)."""
    for w in (w1, w2):
        x = torch.nn.functional.layer_norm(torch.relu(x @ w), (w.shape[1],)) + x
    return x.sum(-1)


@pytest.fixture
def symbolic_cache_lookups(monkeypatch):
    """Counts fake-tensor cache lookups of modes that have a ShapeEnv (symbolic traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    counts = [0]
    original = FakeTensorMode._cached_dispatch_impl

    def spy(self, *args, **kwargs):
        counts[0] += self.shape_env is not None
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FakeTensorMode, "_cached_dispatch_impl", spy)
    return counts


def _cache_left_on(monkeypatch):
    import contextlib
    import sys

    monkeypatch.setattr(sys.modules["aotcache.aot.capture"], "symbolic_fake_cache_off",
                        lambda mode, callers_mode: contextlib.nullcontext())


def test_symbolic_trace_does_not_use_the_fake_tensor_cache(symbolic_cache_lookups, monkeypatch):
    shapes = [(2, 5, 4), (4, 4), (4, 4)]
    capture(two_blocks, make_inputs(shapes), dynamic=True)
    assert symbolic_cache_lookups[0] == 0
    _cache_left_on(monkeypatch)  # the spy sees lookups where the cache is on
    capture(two_blocks, make_inputs(shapes), dynamic=True)
    assert symbolic_cache_lookups[0] > 0


@pytest.mark.parametrize("name", ["two_blocks", *sorted(CASES)])
def test_the_fake_tensor_cache_changes_neither_graph_nor_guards(name, monkeypatch):
    fn, shapes = (two_blocks, [(2, 5, 4), (4, 4), (4, 4)]) if name == "two_blocks" else CASES[name][:2]
    torch.manual_seed(0)
    without = capture(fn, make_inputs(shapes), dynamic=True)
    _cache_left_on(monkeypatch)
    torch.manual_seed(0)
    with_cache = capture(fn, make_inputs(shapes), dynamic=True)
    assert without.graph.code == with_cache.graph.code
    assert without.metadata.guards == with_cache.metadata.guards
    assert [str(t.shape) for t in without.tangents] == [str(t.shape) for t in with_cache.tangents]


def test_a_callers_fake_mode_keeps_its_cache(symbolic_cache_lookups):
    # Dynamo's ShapeEnv: its cache holds the ops Dynamo traced with the same fakes
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=False)
    fakes = [mode.from_tensor(t) for t in make_inputs([(5, 3), (3, 4)])]
    captured = capture(matmul, fakes, dynamic=True)
    assert captured.fake_mode is mode and mode.cache_enabled
    assert symbolic_cache_lookups[0] > 0


def test_two_blocks_serve_other_sizes_and_retrace_on_a_violated_guard():
    compiled = aot_function(two_blocks, graph_compiler, dynamic=True, cache=False)
    for shapes in ([(2, 5, 4), (4, 4), (4, 4)], [(3, 7, 4), (4, 4), (4, 4)]):
        assert_matches_eager(compiled, two_blocks, shapes)
    assert compiled.num_compiles == 1
    assert_matches_eager(compiled, two_blocks, [(3, 1, 4), (4, 4), (4, 4)])  # size 1: specialized, a retrace
    assert compiled.num_compiles == 2
