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
# NOTE [Library functions that reach themselves] (autograd_cache/reachable.py)
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
