"""Bugs found by running PyTorch's OpInfo tests (test_aotdispatch.py, TestEagerFusionOpInfo) through aotcache's
aot_function: each test is the smallest form of a failing sample, compared with eager values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

from aotcache import aot_function
from aotcache.aot.api import AOTOptions
from aotcache.autograd_cache.fingerprint import fingerprint_call
from tests.conftest import run_python


def _values_and_grads(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), [t for t in leaves if t.requires_grad])
    return out, grads


def _check_like_eager(fn, *inputs, dynamic=False):
    compiled = aot_function(fn, dynamic=dynamic, on_capture_error="raise", cache=False)
    expected = _values_and_grads(fn, *inputs)
    torch.testing.assert_close(_values_and_grads(compiled, *inputs), expected)
    return compiled


# ----------------------------------------------------------------------------------------------------
# NOTE [Library functions that reach themselves] (autograd_cache/code_walk.py)
# ----------------------------------------------------------------------------------------------------

# held as values (a global, or a closure cell as OpInfo's wrappers hold them), so that the walk reads them
REFLECTED_SUB = torch.Tensor.__rsub__


def reflected_sub(x):
    return REFLECTED_SUB(x, 1.5)


def calling(op):
    def call(x):
        return op(x, 1.5)
    return call


reflected_pow = calling(torch.Tensor.__rpow__)


@pytest.mark.parametrize("fn", [reflected_sub, reflected_pow], ids=["rsub", "rpow"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_reflected_tensor_operators_compile_like_eager(fn, dynamic):
    # torch's reflected operators hold themselves in their closures; the program walk recursed forever
    _check_like_eager(fn, torch.randn(3, 4, requires_grad=True), dynamic=dynamic)


def _fingerprint(fn):
    x = torch.randn(3, 4)
    flat, spec = pytree.tree_flatten(((x,), {}))
    return fingerprint_call(fn, flat, spec, AOTOptions())


def test_reflected_operators_have_distinct_trusted_fingerprints():
    sub, pow_ = _fingerprint(reflected_sub), _fingerprint(reflected_pow)
    assert sub.trusted and pow_.trusted, (sub.reason, pow_.reason)
    assert sub.digest == _fingerprint(reflected_sub).digest  # the same program: the same fingerprint
    assert sub.digest != pow_.digest  # another operator: another fingerprint


CROSS_PROCESS = """
import torch
from torch.utils import _pytree as pytree
from aotcache.aot.api import AOTOptions
from aotcache.autograd_cache.fingerprint import fingerprint_call
REFLECTED_SUB = torch.Tensor.__rsub__
def reflected_sub(x):
    return REFLECTED_SUB(x, 1.5)
flat, spec = pytree.tree_flatten(((torch.randn(3, 4),), {}))
print(fingerprint_call(reflected_sub, flat, spec, AOTOptions()).digest)
"""


def test_reflected_operator_fingerprint_is_stable_across_processes():
    first = run_python(CROSS_PROCESS, env={"PYTHONHASHSEED": "1"}).stdout.split()[-1]
    second = run_python(CROSS_PROCESS, env={"PYTHONHASHSEED": "2"}).stdout.split()[-1]
    assert first == second and first != "None"


def test_reflected_operator_reuses_the_stored_graph():
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store.memory import InMemoryCache
    from aotcache.store.tiered import TieredCache

    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)
    x = torch.randn(3, 4, requires_grad=True)
    aot_function(reflected_sub, cache=cache, on_capture_error="raise")(x)
    second = aot_function(reflected_sub, cache=cache, on_capture_error="raise")
    torch.testing.assert_close(second(x), reflected_sub(x))
    assert cache.counters["saved"] == 1 and cache.counters["hit"] == 1, dict(cache.counters)


# ----------------------------------------------------------------------------------------------------
# NOTE [Constant objects in the joint graph] (aot/partition.py)
# ----------------------------------------------------------------------------------------------------

def quantized_region(x):
    from torch._higher_order_ops import InvokeQuant

    def body(a, b):
        return (torch.sin(a) * b,)

    return InvokeQuant()(body, x, x)[0] * 2.0


@pytest.mark.parametrize("partition_fn", [
    "torch_min_cut", None, "min_cut", "torch_default"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_higher_order_op_options_object_partitions_like_eager(partition_fn, dynamic):
    # the InvokeQuant options object is a node the forward and the backward both read; PyTorch's min-cut
    # partitioner could neither save nor recompute it, its default_partition asserted it was a tensor
    import functorch.compile as torch_compile

    partition = {"torch_min_cut": torch_compile.min_cut_rematerialization_partition,
                 "torch_default": torch_compile.default_partition}.get(partition_fn, partition_fn)
    compiled = aot_function(quantized_region, partition_fn=partition, dynamic=dynamic, on_capture_error="raise",
                            cache=False)
    x = torch.randn(2, 3, requires_grad=True)
    torch.testing.assert_close(_values_and_grads(compiled, x), _values_and_grads(quantized_region, x))


def test_only_inputless_object_constructions_are_marked():
    from torch.utils.checkpoint import CheckpointPolicy

    from aotcache.aot.partition import mark_constant_objects_for_recompute

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    options = graph.call_function(torch.nn.Identity, ())  # a class called on constants: marked
    built_from_input = graph.call_function(torch.Size, (x,))  # reads an input: left alone
    op = graph.call_function(torch.ops.aten.sin.default, (x,))
    graph.output((options, built_from_input, op))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert mark_constant_objects_for_recompute(gm) == 1
    assert options.meta["recompute"] == CheckpointPolicy.MUST_RECOMPUTE
    assert "recompute" not in built_from_input.meta and "recompute" not in op.meta


def test_constant_objects_become_attribute_reads_and_the_graph_still_runs():
    # NOTE [Constant objects held as attributes]: PyTorch's default_partition asserts on a non-tensor call node
    from torch._higher_order_ops import InvokeQuant

    from aotcache.aot.partition import hold_constant_objects_as_attributes

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    options = graph.call_function(InvokeQuant, (), {"codegen_low_precision": False})
    built_from_input = graph.call_function(torch.Size, (x,))  # reads an input: left alone
    graph.output((options, built_from_input))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert hold_constant_objects_as_attributes(gm) == 1
    assert [node.op for node in gm.graph.nodes].count("get_attr") == 1
    assert built_from_input in gm.graph.nodes
    held, size = gm([2, 3])
    assert held == InvokeQuant(codegen_low_precision=False) and size == torch.Size([2, 3])


# ----------------------------------------------------------------------------------------------------
# NOTE [Inputs the backward does not reach] (aot/runtime.py)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_output_of_inputs_that_get_no_gradient_still_requires_grad(dynamic):
    # an empty matrix: eager's output requires grad, and its inputs get no (or empty) gradients
    compiled = aot_function(torch.linalg.householder_product, dynamic=dynamic, on_capture_error="raise", cache=False)
    a = torch.randn(0, 0, requires_grad=True)
    tau = torch.randn(0, requires_grad=True)
    out = compiled(a, tau)
    expected = torch.linalg.householder_product(a, tau)
    assert out.requires_grad == expected.requires_grad
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (a, tau), allow_unused=True)
    expected_grads = torch.autograd.grad(expected.sum(), (a, tau), allow_unused=True)
    for got, want in zip(grads, expected_grads):
        assert (got is None or got.numel() == 0) and (want is None or want.numel() == 0)
