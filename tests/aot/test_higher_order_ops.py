"""Higher-order ops (cond, map, scan, while_loop, ...) through the torch.compile backend, on PyTorch's own samples
(torch.testing._internal.hop_db, the samples of its test_hops_compile): eager's values and gradients, captured where
the capture can, and run as Python where it fails (NOTE [Dynamo graphs whose capture fails] in aot/fallback.py)."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from torch.testing._internal.hop_db import hop_db
from torch.utils import _pytree as pytree

from aotcache.aot.fallback import fallback_counts

# the samples that run on CPU with Dynamo's fullgraph (flex_attention has no CPU backward, local_map_hop and
# register_hook are refused by Dynamo itself, inline_asm_elementwise is CUDA-only)
_CAPTURED = ("scan", "invoke_subgraph", "map", "cond", "invoke_quant_packed", "auto_functionalize")


def _samples(name):
    return [op for op in hop_db if op.name == name]


def _run(op, compile_, requires_grad):
    """(eager, compiled) pairs of (outputs, input gradients) over the op's samples."""
    pairs = []
    for sample in op.sample_inputs("cpu", torch.float, requires_grad=requires_grad):
        inputs = sample.input if isinstance(sample.input, tuple) else (sample.input,)
        eager_args = (*inputs, *sample.args)
        compiled_args = deepcopy(eager_args)

        def fn(args, kwargs):
            return op.op(*args, **kwargs)

        got = compile_(fn)(compiled_args, deepcopy(sample.kwargs))
        want = fn(eager_args, sample.kwargs)
        pairs.append(((want, _grads(want, eager_args)), (got, _grads(got, compiled_args))))
    return pairs


def _grads(out, args):
    outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
    leaves = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    if not outs or not leaves:
        return None
    return torch.autograd.grad(sum(o.sum() for o in outs), leaves, allow_unused=True)


def _backend(dynamic):
    def compile_(fn):
        return torch.compile(fn, backend="aotcache", options={"compiler": "nop"}, fullgraph=True, dynamic=dynamic)

    return compile_


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", (False, True))
@pytest.mark.parametrize("name", _CAPTURED)
def test_higher_order_ops_are_captured_with_eager_values_and_gradients(name, dynamic):
    for op in _samples(name):
        torch._dynamo.reset()
        before = fallback_counts().get("region", 0)
        for want, got in _run(op, _backend(dynamic), op.supports_autograd):
            torch.testing.assert_close(got, want)
        assert fallback_counts().get("region", 0) == before, f"{name}/{op.variant_test_name} was not captured"


@pytest.mark.parametrize(("name", "dynamic"), (("while_loop", False), ("while_loop_stack_output", False),
                                               ("while_loop_stack_output", True)))
def test_a_while_loop_the_capture_fails_on_runs_as_eager(name, dynamic):
    # NOTE [Dynamo graphs whose capture fails]: BackendCompilerFailed ('NoneType' object has no attribute
    # 'ignore_fresh_unbacked_symbols'; PendingUnbackedSymbolNotFound) where eager and aot_eager run
    (op,) = _samples(name)
    before = fallback_counts().get("region", 0)
    for want, got in _run(op, _backend(dynamic), op.supports_autograd):
        torch.testing.assert_close(got, want)
    assert fallback_counts().get("region", 0) > before


def test_a_while_loop_with_symbolic_sizes_is_captured():
    (op,) = _samples("while_loop")
    before = fallback_counts().get("region", 0)
    for want, got in _run(op, _backend(True), op.supports_autograd):
        torch.testing.assert_close(got, want)
    assert fallback_counts().get("region", 0) == before


def test_a_failed_capture_of_a_torch_compile_graph_raises_in_strict_mode(monkeypatch):
    monkeypatch.setenv("AOTCACHE_STRICT", "1")
    (op,) = _samples("while_loop")
    with pytest.raises(Exception, match="ignore_fresh_unbacked_symbols"):
        _run(op, _backend(False), op.supports_autograd)
