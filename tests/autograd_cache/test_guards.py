"""Dynamic-shape guards: produced from a ShapeEnv, evaluated on real sizes, never executed as Python."""

from __future__ import annotations

import re

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from aotcache.autograd_cache.guards import (
    GuardExpressionError,
    dynamo_guards_expression,
    hinted_inputs,
    input_symbols,
    describe_inputs,
    evaluate_guards,
    find_shape_env,
    produce_guards_expression,
    symbolic_inputs,
    validate_guards_expression,
)


def size_dependent(x, y):
    if x.shape[0] > 4:
        return (x * 2).sum(0) + y[: x.shape[0] // 2].sum()
    return x + 1


def symbolic_trace(fn, *example_inputs):
    gm = make_fx(fn, tracing_mode="symbolic")(*example_inputs)
    return gm, symbolic_inputs(gm, list(example_inputs))


def test_guards_from_make_fx_symbolic_trace():
    gm, inputs = symbolic_trace(size_dependent, torch.randn(8, 3), torch.randn(10))
    expression = produce_guards_expression(inputs)
    assert expression is not None and "L['t0'].size()[0]" in expression
    validate_guards_expression(expression)

    assert evaluate_guards(expression, [torch.randn(8, 3), torch.randn(10)])
    assert evaluate_guards(expression, [torch.randn(6, 7), torch.randn(3)])  # another shape, same branch
    assert not evaluate_guards(expression, [torch.randn(4, 3), torch.randn(10)])  # the other branch of `if`
    assert not evaluate_guards(expression, [torch.randn(12, 3), torch.randn(5)])  # y too short for the slice


def test_guards_from_dynamo_dynamic_shape_env():
    captured = []

    def capture(gm, example_inputs):
        # Where each placeholder comes from: ("x", None) for a tensor, ("x", 0) for its size 0 (Dynamo passes
        # symbolic sizes as inputs too). Read now: Dynamo clears this meta after the backend returns.
        origins = []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                source = node.meta["grapharg"].source
                origins.append((source.local_name, None) if hasattr(source, "local_name")
                               else (source.base.local_name, source.idx))
        captured.append((gm, list(example_inputs), origins))
        return gm.forward

    def fn(x, y):
        if x.shape[0] % 2 == 0:
            return x.sum(0) + y[: max(x.shape[0] // 2, 2)].sum()
        return x.sum(0)

    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=capture, dynamic=True)(torch.randn(8, 3), torch.randn(10))
    finally:
        torch._dynamo.reset()
    gm, example_inputs, origins = captured[0]
    inputs = symbolic_inputs(gm, example_inputs)
    assert find_shape_env(inputs) is not None
    expression = produce_guards_expression(inputs)
    assert expression is not None

    def real_inputs(rows, length):
        # Dynamo's graph takes the SymInt sizes as inputs too: rebuild them from real tensors in graph order.
        tensors = {"x": torch.randn(rows, 3), "y": torch.randn(length)}
        return [tensors[name] if dim is None else tensors[name].shape[dim] for name, dim in origins]

    assert evaluate_guards(expression, real_inputs(8, 10))
    assert evaluate_guards(expression, real_inputs(12, 7))
    assert not evaluate_guards(expression, real_inputs(7, 10))  # odd: the other branch
    assert not evaluate_guards(expression, real_inputs(12, 3))  # slice would be longer than y


def test_static_inputs_have_no_guards():
    assert produce_guards_expression([torch.randn(3), 4]) is None
    assert evaluate_guards(None, [torch.randn(3)])
    assert evaluate_guards("", [])


def test_symbols_described_by_position_not_value():
    gm, inputs = symbolic_trace(lambda x, y: x + y, torch.randn(8, 3), torch.randn(8, 3))
    described = describe_inputs(inputs)
    assert described[0]["shape"] == ["L['t0'].size()[0]", "L['t0'].size()[1]"]
    # duck sizing made both inputs share symbols: the second input names the first one's locations
    assert described[1]["shape"] == ["L['t0'].size()[0]", "L['t0'].size()[1]"]
    assert described[0]["stride"] == ["L['t0'].size()[1]", 1]
    text = repr(described)
    assert "8" not in text and "s0" not in text


def test_handwritten_expressions_in_both_spellings():
    x, y = torch.randn(6, 4), torch.randn(3)
    assert evaluate_guards("Eq(Mod(L['t0'].size()[0], 2), 0) and Ne(L['t1'].size()[0], 1)", [x, y])
    assert evaluate_guards("2 <= L['t0'].size()[0] <= 8 and max(L['t0'].size()[1], 3) == 4", [x, y])
    assert evaluate_guards("math.floor(L['t0'].size()[0] / 4) == 1 and abs(-L['t2']) == 5", [x, y, 5])
    assert not evaluate_guards("L['t0'].stride()[0] != L['t0'].size()[1] or L['t0'].storage_offset() > 0",
                               [x, y])
    assert evaluate_guards("not (L['t1'].size()[0] % 2 == 0)", [x, y])


@pytest.mark.parametrize("malicious", [
    "__import__('os').system('touch {marker}')",
    "L['t0'].__class__.__mro__[1].__subclasses__()",
    "(lambda: __import__('os').system('touch {marker}'))()",
    "[c for c in ().__class__.__bases__[0].__subclasses__()]",
    "L['t0'].size.__self__",
    "open('{marker}', 'w')",
    "L['__builtins__']",
    "getattr(L['t0'], 'size')()[0] == 1",
    "math.__dict__",
    "torch.ops.aten",
    "L['t0'].size(0) == 3",
    "2 ** (10 ** 10) > 1",
    "'a' * 10 == 'aaa'",
])
def test_malicious_expressions_are_rejected_without_running(malicious, tmp_path):
    marker = tmp_path / "pwned"
    expression = malicious.format(marker=marker)
    with pytest.raises(GuardExpressionError):
        validate_guards_expression(expression)
    with pytest.raises(GuardExpressionError):
        evaluate_guards(expression, [torch.randn(3, 3)])
    assert not marker.exists()


def test_expressions_that_do_not_fit_the_inputs_are_errors():
    with pytest.raises(GuardExpressionError, match="refers to input 3 but only 1"):
        evaluate_guards("L['t3'].size()[0] == 2", [torch.randn(2)])
    with pytest.raises(GuardExpressionError, match="rank-1 input"):
        evaluate_guards("L['t0'].size()[4] == 2", [torch.randn(2)])
    with pytest.raises(GuardExpressionError, match="non-tensor input"):
        evaluate_guards("L['t0'].size()[0] == 2", [3])
    with pytest.raises(GuardExpressionError, match="not valid syntax"):
        evaluate_guards("L['t0'] ==", [3])
    with pytest.raises(GuardExpressionError, match="division by zero"):
        evaluate_guards("L['t0'] // 0 == 1", [3])


def test_an_expression_is_parsed_once_then_runs_as_compiled_code(monkeypatch):
    """Issue 13 item 1: every dynamic call ran ast.parse on the guard expression (0.2-0.6 s per call)."""
    import ast

    from aotcache.autograd_cache import guards

    parses = []
    real_parse = ast.parse
    monkeypatch.setattr(guards.ast, "parse", lambda *a, **k: parses.append(1) or real_parse(*a, **k))
    expression = " and ".join(f"L['t{n}'].stride()[0] == L['t{n}'].size()[1] and L['t{n}'].storage_offset() == 0"
                              for n in range(50)) + " and L['t0'].size()[1] == 1"
    good = [torch.randn(3, 1) for _ in range(50)]
    bad = [torch.randn(3, 2)] + good[1:]
    for _ in range(20):
        assert evaluate_guards(expression, good) and not evaluate_guards(expression, bad)
    assert len(parses) == 1
    assert guards.compile_guards(expression) is guards.compile_guards(expression)


def _fake_inputs(*tensors):
    """Fake tensors with symbolic sizes and strides in one fresh ShapeEnv (as Dynamo makes them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    return [mode.from_tensor(tensor) for tensor in tensors], mode.shape_env


def test_added_guards_are_written_by_input_position_and_cover_a_specialization():
    (x, y, other), shape_env = _fake_inputs(torch.randn(6, 4), torch.randn(10), torch.randn(3))
    symbols = input_symbols([x, y])
    assert bool(x.shape[1] * 2 < y.shape[0])  # held before the compile, over the inputs: kept
    assert bool(other.shape[0] < 5)  # held before, over a symbol no input has: left out
    before = len(shape_env.guards)
    assert int(x.shape[0]) == 6  # what Inductor does for some lowerings: Eq(s, 6), a replacement
    expression = dynamo_guards_expression([x, y], shape_env, symbols, before)
    assert "L['t0'].size()[0] == 6" in expression
    assert not re.search(r"\bs\d+", expression)  # no ShapeEnv symbol names: they differ between processes
    assert evaluate_guards(expression, [torch.randn(6, 4), torch.randn(10)])
    assert evaluate_guards(expression, [torch.randn(6, 3), torch.randn(7)])
    assert not evaluate_guards(expression, [torch.randn(7, 4), torch.randn(10)])  # the specialization
    assert not evaluate_guards(expression, [torch.randn(6, 6), torch.randn(10)])  # the earlier guard
    # nothing added: the guards held before still bound the entry (NOTE [Prior guards of a Dynamo entry])
    unadded = dynamo_guards_expression([x, y], shape_env, symbols, len(shape_env.guards))
    assert "2*L['t0'].size()[1] < L['t1'].size()[0]" in unadded
    assert not evaluate_guards(unadded, [torch.randn(6, 6), torch.randn(10)])
    assert dynamo_guards_expression([torch.randn(3), 4], shape_env, set(), len(shape_env.guards)) is None  # static


def test_a_guard_over_a_symbol_no_input_holds_cannot_be_written():
    (x, other), shape_env = _fake_inputs(torch.randn(6, 4), torch.randn(9))
    symbols = input_symbols([x])
    before = len(shape_env.guards)
    assert bool(other.shape[0] > 3)  # a guard over another graph's symbol in the shared ShapeEnv
    with pytest.raises(GuardExpressionError, match="no graph input holds"):
        dynamo_guards_expression([x], shape_env, symbols, before)


def test_hinted_inputs_check_guards_without_adding_any_and_symbolic_inputs_add_them():
    (x,), shape_env = _fake_inputs(torch.randn(5, 12)[1:, ::3])
    size = x.shape[0]
    hinted = hinted_inputs([x, size, 3])
    assert hinted[0].device.type == "meta"
    assert (tuple(hinted[0].shape), hinted[0].stride(), hinted[0].storage_offset()) == ((4, 4), (12, 3), 12)
    assert hinted[1:] == [4, 3] and type(hinted[1]) is int
    expression = "L['t0'].size()[0] == 4 and L['t1'] == 4 and L['t0'].storage_offset() == 12"
    before = len(shape_env.guards)
    assert evaluate_guards(expression, hinted) and len(shape_env.guards) == before
    # over the symbolic inputs the same expression is what a loaded entry's guards do to Dynamo's ShapeEnv
    assert evaluate_guards(expression, [x, size, 3])
    added = [str(guard.expr) for guard in shape_env.guards[before:]]
    assert any("Eq(" in guard and ", 4)" in guard for guard in added), added
    assert not evaluate_guards(expression, hinted_inputs([*_fake_inputs(torch.randn(7, 12)[1:, ::3])[0], 6, 3]))


def test_residual_guards_keep_the_conjuncts_that_read_an_input_not_pinned():
    # NOTE [Guards left to check when inputs are pinned]
    from aotcache.autograd_cache.guards import residual_guards_expression

    expression = ("L['t0'].size()[0] == 4 and L['t0'].stride()[0] == 8 and L['t1'].size()[2] == L['t0'].size()[0] "
                  "and L['t1'].storage_offset() == 0 and 2 <= L['t1'].size()[2]")
    residual = residual_guards_expression(expression, frozenset({0}))
    assert "L['t0'].stride()" not in residual and "L['t0'].size()[0] == 4" not in residual
    assert residual.count("L['t1']") == 3  # the mixed conjunct kept whole
    x, cache = torch.randn(4, 8), torch.randn(1, 2, 4, 8)
    assert evaluate_guards(residual, [x, cache]) and evaluate_guards(expression, [x, cache])
    assert not evaluate_guards(residual, [x, torch.randn(1, 2, 5, 8)])  # t1's size no longer t0's
    assert residual_guards_expression(expression, frozenset({0, 1})) == ""
    assert residual_guards_expression(expression, frozenset()) .count(" and ") == 4
    with pytest.raises(GuardExpressionError):
        residual_guards_expression("__import__('os')", frozenset())


def test_nan_checks_over_a_symbolic_float_add_no_guard_and_keep_it_symbolic():
    """NOTE [NaN checks of a symbolic float]: installing a loaded Dynamo entry's ``not math.isnan(L['t0'])`` over
    Dynamo's SymFloat made it a Python float (a guard ``lr == 0.05``: a warm process compiled a frame per LR value);
    over a symbol the checks stay symbolic and add nothing, over numbers they are math's."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from aotcache.autograd_cache.guards import evaluate_guards

    env = ShapeEnv()
    source = ConstantSource("lr")
    symbol = env.create_symbol(0.05, source=source, dynamic_dim=DimDynamic.DYNAMIC)
    lr = env.create_symfloatnode(symbol, hint=0.05, source=source)
    guards_before = len(env.guards)
    for expression in ("not math.isnan(L['t0'])", "math.isfinite(L['t0'])", "not math.isinf(L['t0'])"):
        assert evaluate_guards(expression, [lr]) is True, expression
    assert len(env.guards) == guards_before and symbol not in env.replacements
    assert evaluate_guards("not math.isnan(L['t0'])", [0.3]) is True
    assert evaluate_guards("not math.isnan(L['t0'])", [float("nan")]) is False
    assert evaluate_guards("math.isfinite(L['t0'])", [float("inf")]) is False
