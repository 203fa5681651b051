"""Dynamo graphs with NumPy calls are stored and hit, and a different NumPy call misses (NOTE [NumPy calls in a
Dynamo graph])."""

from __future__ import annotations

import functools
import json
import operator
import textwrap

import numpy as np
import pytest
import torch

from aotcache.autograd_cache.cache import AOTAutogradCache
from aotcache.autograd_cache.numpy_calls import numpy_call_token
from aotcache.autograd_cache.safety import BypassAOTAutogradCache, check_node_safe
from aotcache.backend import aotcache_backend
from aotcache.store.factory import open_tiers
from tests.conftest import FRESH_PROCESSES_TIMEOUT, run_python


def _cache() -> AOTAutogradCache:
    return AOTAutogradCache(open_tiers("disk", namespace="aot"), journal=False)


def _compile(fn, cache):
    torch._dynamo.reset()
    return torch.compile(fn, backend=functools.partial(aotcache_backend, compiler="nop", cache=cache))


def every_wrapper(x):
    a = x.numpy()
    return np.round(a) + a.max() - a.T * 2


def rounded(x):
    return np.round(x.numpy() * 3)


def floored(x):
    return np.floor(x.numpy() * 3)


def maxed(x):
    return x.numpy().max(axis=0)


def minned(x):
    return x.numpy().min(axis=0)


def added(x):
    a = x.numpy()
    return a + a


def subtracted(x):
    a = x.numpy()
    return a - a


def transposed(x):
    return x.numpy().T + 1


def real_part(x):
    return x.numpy().real + 1


def test_a_graph_of_numpy_calls_is_stored_and_hit_in_a_fresh_dynamo():
    x = torch.randn(3, 3)
    cache = _cache()
    first = _compile(every_wrapper, cache)(x)
    assert cache.stats()["bypass"] == 0 and cache.stats()["saved"] == 1
    second = _compile(every_wrapper, _cache())(x)
    np.testing.assert_allclose(first, every_wrapper(x))
    np.testing.assert_allclose(second, every_wrapper(x))
    fresh = _cache()
    _compile(every_wrapper, fresh)(x)
    assert (fresh.stats()["hit"], fresh.stats()["compile"]) == (1, 0)


@pytest.mark.parametrize("first, second", [(rounded, floored), (maxed, minned), (added, subtracted),
                                           (transposed, real_part)],
                         ids=["function", "method", "operator", "attribute"])
def test_a_different_numpy_call_misses(first, second):
    x = torch.randn(3, 3)
    _compile(first, _cache())(x)
    cache = _cache()
    result = _compile(second, cache)(x)
    assert (cache.stats()["hit"], cache.stats()["compile"]) == (0, 1)
    np.testing.assert_allclose(result, second(x))


def test_wrappers_of_anything_but_torch_numpy_stay_refused():
    from torch._dynamo.utils import numpy_method_wrapper, numpy_operator_wrapper, numpy_to_tensor_wrapper

    def user_round(a):
        return a

    assert numpy_call_token(numpy_to_tensor_wrapper(user_round)) is None
    assert numpy_call_token(numpy_to_tensor_wrapper(np.round)) is None  # real NumPy, not torch._numpy
    assert numpy_call_token(numpy_operator_wrapper(lambda a, b: a)) is None
    assert numpy_call_token(numpy_method_wrapper("not a name")) is None
    graph = torch.fx.Graph()
    node = graph.call_function(numpy_to_tensor_wrapper(user_round), (graph.placeholder("a"),))
    with pytest.raises(BypassAOTAutogradCache, match="unsafe call"):
        check_node_safe(node)
    import torch._numpy as tnp

    assert numpy_call_token(numpy_to_tensor_wrapper(tnp.round)).startswith(
        "torch._dynamo.utils.numpy_to_tensor_wrapper(torch._numpy._funcs_impl.round)[defaults torch.float64")
    assert numpy_call_token(numpy_operator_wrapper(operator.add)).startswith(
        "torch._dynamo.utils.numpy_operator_wrapper(operator.add)[defaults")


_DEFAULT_DTYPE_RUN = textwrap.dedent("""
    import functools, json, sys
    import numpy as np
    import torch
    import torch._dynamo.config
    torch._dynamo.config.numpy_default_float = sys.argv[1] if len(sys.argv) > 1 else "{flt}"
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.backend import aotcache_backend
    from aotcache.store.factory import open_tiers

    def fn(x):
        return np.linspace(0, 1, 3) + x.numpy()

    cache = AOTAutogradCache(open_tiers("disk", namespace="aot"), journal=False)
    out = torch.compile(fn, backend=functools.partial(aotcache_backend, compiler="nop", cache=cache))(torch.ones(3))
    print(json.dumps({{"dtype": str(out.dtype), "hit": cache.stats()["hit"], "compile": cache.stats()["compile"]}}))
""")


@FRESH_PROCESSES_TIMEOUT  # four fresh processes
def test_numpys_default_dtype_is_in_the_key_across_processes(tmp_path):
    """np.linspace is float64 or float32 by torch._dynamo.config.numpy_default_float, fixed per process; a process
    with the other default must not run the graph traced for the first (it did: float64 where eager gives float32)."""
    env = {"AOTCACHE_CACHE_DIR": str(tmp_path)}

    def run(flt):
        return json.loads(run_python(_DEFAULT_DTYPE_RUN.format(flt=flt), env=env).stdout.strip().splitlines()[-1])

    assert run("float64") == {"dtype": "float64", "hit": 0, "compile": 1}
    assert run("float32") == {"dtype": "float32", "hit": 0, "compile": 1}  # a miss, eager's dtype
    assert run("float32") == {"dtype": "float32", "hit": 1, "compile": 0}  # the same defaults hit
    assert run("float64") == {"dtype": "float64", "hit": 1, "compile": 0}


def test_a_function_dressed_as_a_torch_numpy_one_stays_refused():
    """functools.wraps copies torch._numpy's module, name and __wrapped__ onto any function; its code is the user's,
    so the token must not be the real function's (a graph calling it hit the real round's entry)."""
    from torch._dynamo.utils import numpy_to_tensor_wrapper
    from torch._numpy import _funcs_impl

    dressed = functools.wraps(_funcs_impl.round)(lambda *args, **kwargs: 42)
    assert numpy_call_token(numpy_to_tensor_wrapper(dressed)) is None
    graph = torch.fx.Graph()
    node = graph.call_function(numpy_to_tensor_wrapper(dressed), (graph.placeholder("a"),))
    with pytest.raises(BypassAOTAutogradCache, match="unsafe call"):
        check_node_safe(node)
