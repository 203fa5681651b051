"""Jagged nested tensors (NJT, ``torch.nested`` with ``layout=torch.jagged``) through aot_function, aot_module,
aotcache.compile and the torch.compile backend (NOTE [Nested tensors in a capture] in
aotcache/aot/unsupported_tensors.py).

aotcache captures no nested tensor: each such call runs as eager does and nothing of it is stored. These tests
check eager's values and gradients for calls whose ragged structure (offsets, lengths, batch count) changes
between calls of one compiled function and between processes, that the refusal names the nested tensor (it was
torch's "self.shape_env must not be None" for one built inside a static capture, and a storage-read refusal for a
symbolic one), and that the dense functions around them are still cached. Found by running PyTorch's
test_nestedtensor.py compile tests against aotcache (session 16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aotcache
from aotcache.aot.errors import CaptureError
from aotcache.autograd_cache.cache import default_cache
from tests.conftest import run_python


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _njt(lengths, requires_grad=False, seed=0):
    torch.manual_seed(seed)
    return torch.nested.nested_tensor([torch.randn(n, 8) for n in lengths], layout=torch.jagged,
                                      requires_grad=requires_grad)


def _parts(offsets, seed=0):
    torch.manual_seed(seed)
    offsets = torch.tensor(offsets)
    return torch.randn(int(offsets[-1]), 8, requires_grad=True), offsets


_linear = torch.nn.Linear(8, 8)
_norm = torch.nn.LayerNorm(8)


def _linear_gelu(nt):
    return F.gelu(_linear(nt))


def _layer_norm(nt):
    return _norm(nt).sin()


def _attention(nt):
    q = nt.unflatten(-1, [2, 4]).transpose(1, 2)
    return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(-2)


def _pointwise(nt):
    return nt.cos() * 2 + 1


def _compiled(route, fn):
    return {"aot_function": lambda: aotcache.aot_function(fn, "nop"),
            "compile": lambda: aotcache.compile(fn, compiler="nop"),
            "compile_dynamic": lambda: aotcache.compile(fn, compiler="nop", dynamic=True),
            "backend": lambda: torch.compile(fn, backend="aotcache", options={"compiler": "nop"})}[route]()


def _values(t):
    return t.values() if t.is_nested else t


# one compiled function, calls whose ragged structure differs: offsets only (same total length and batch),
# lengths and total, batch count, and the first structure again
_STRUCTURES = ([2, 3, 5], [5, 3, 2], [1, 4, 6], [2, 3, 5, 1], [2, 3, 5])


@pytest.mark.parametrize("route", ("aot_function", "compile", "compile_dynamic", "backend"))
@pytest.mark.parametrize("fn", (_linear_gelu, _layer_norm, _attention, _pointwise), ids=lambda f: f.__name__)
def test_a_nested_argument_gets_eager_values_and_gradients_for_every_ragged_structure(route, fn):
    compiled = _compiled(route, fn)
    for k, lengths in enumerate(_STRUCTURES):
        nt, nt_ref = _njt(lengths, True, seed=k), _njt(lengths, True, seed=k)
        out, ref = compiled(nt), fn(nt_ref)
        assert out.is_nested and out.shape[0] == len(lengths)
        torch.testing.assert_close(out.values(), ref.values())
        out.values().sum().backward()
        ref.values().sum().backward()
        torch.testing.assert_close(nt.grad.values(), nt_ref.grad.values())
        assert nt.grad.offsets().tolist() == nt_ref.grad.offsets().tolist()


def test_aot_module_with_a_nested_argument_matches_eager():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    compiled = aotcache.aot_module(model, "nop")
    for k, lengths in enumerate(_STRUCTURES):
        nt = _njt(lengths, seed=k)
        torch.testing.assert_close(compiled(nt).values(), model(nt).values())
    compiled(_njt([2, 3])).values().sum().backward()
    grad = model[0].weight.grad.clone()
    model.zero_grad()
    model(_njt([2, 3])).values().sum().backward()
    torch.testing.assert_close(grad, model[0].weight.grad)


def _built_inside(values, offsets):
    nt = torch.nested.nested_tensor_from_jagged(values, offsets)
    return _attention(nt.sin()).values()


def _built_from_a_list(values, offsets):
    return torch.nested.nested_tensor([values[:2], values[2:]], layout=torch.jagged).values() * 2


def _strided_nested_built_inside(values, offsets):
    return torch.nested.nested_tensor([values[:2], values[2:]]).to_padded_tensor(0.0)


@pytest.mark.parametrize("dynamic", (False, True), ids=("static", "dynamic"))
@pytest.mark.parametrize("fn", (_built_inside, _built_from_a_list, _strided_nested_built_inside),
                         ids=lambda f: f.__name__)
def test_a_nested_tensor_built_inside_is_refused_naming_it(dynamic, fn):
    # static: torch's AssertionError "self.shape_env must not be None" (or an unsupported fake op); symbolic: a
    # refusal as a storage read; neither named the nested tensor
    values, offsets = _parts([0, 4, 10])
    compiled = aotcache.aot_function(fn, "nop", dynamic=dynamic, on_capture_error="raise")
    with pytest.raises(CaptureError, match=r"nested tensor \(torch.nested\)") as info:
        compiled(values, offsets)
    assert info.value.reason == "unsupported_layout"


def test_a_nested_argument_is_refused_naming_it():
    compiled = aotcache.aot_function(_pointwise, "nop", on_capture_error="raise")
    with pytest.raises(CaptureError, match=r"flat argument 0 is a nested tensor .*nt.values\(\)"):
        compiled(_njt([2, 3]))


@pytest.mark.parametrize("route", ("aot_function", "compile", "compile_dynamic", "backend"))
def test_offsets_that_change_under_equal_shapes_get_eager_values(route):
    # the values and offsets tensors keep their shapes; only the ragged structure the offsets spell changes, so
    # a graph keyed by the shapes alone would give the first structure's attention for every call
    compiled = _compiled(route, _built_inside)
    for k, offsets in enumerate(([0, 4, 10], [0, 1, 10], [0, 9, 10], [0, 4, 10])):
        values, offsets = _parts(offsets, seed=k)
        ref_values = values.detach().clone().requires_grad_(True)
        out, ref = compiled(values, offsets), _built_inside(ref_values, offsets)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), values)[0],
                                   torch.autograd.grad(ref.sum(), ref_values)[0])


def test_nested_calls_store_nothing_and_the_dense_function_beside_them_is_stored():
    dense = aotcache.aot_function(lambda x: (x.sin() * 2).sum(0), "nop")
    on_nested = aotcache.aot_function(_layer_norm, "nop")
    built_inside = aotcache.aot_function(_built_inside, "nop")
    for lengths in ([2, 3], [4, 1]):
        on_nested(_njt(lengths))
        built_inside(*_parts([0, *torch.tensor(lengths).cumsum(0).tolist()]))
    dense(torch.randn(5, 8))
    stats = default_cache().stats()
    assert (stats["saved"], stats["hit"]) == (1, 0)


_TWO_PROCESS = """
import json, sys, torch
import aotcache
from aotcache.autograd_cache.cache import default_cache
from tests.aot.test_nested_tensors import _built_inside, _parts, _njt, _layer_norm
offsets = json.loads(sys.argv[1])
values, offsets_t = _parts(offsets, seed=len(offsets))
dense = aotcache.aot_function(lambda x: (x.sin() * 2).sum(0), "nop")
out = aotcache.compile(_built_inside, compiler="nop")(values, offsets_t)
lengths = torch.tensor(offsets).diff().tolist()
on_nested = aotcache.compile(_layer_norm, compiler="nop")(_njt(lengths)).values()
dense_out = dense(values.detach())
ok = (torch.allclose(out, _built_inside(values, offsets_t)) and torch.allclose(on_nested, _layer_norm(_njt(lengths)).values())
      and torch.allclose(dense_out, (values.detach().sin() * 2).sum(0)))
stats = default_cache().stats()
print(json.dumps({"equal": ok, "hit": stats["hit"], "saved": stats["saved"]}))
"""


def test_a_second_process_with_other_offsets_gets_eager_values_and_the_dense_graph_hits(isolated_cache_dir):
    import json

    def run(offsets):
        code = "import sys; sys.argv = ['x', %r]\n" % json.dumps(offsets) + _TWO_PROCESS
        return json.loads(run_python(code, env={"AOTCACHE_CACHE_DIR": str(isolated_cache_dir)}).stdout.splitlines()[-1])

    first = run([0, 4, 10])
    assert first == {"equal": True, "hit": 0, "saved": 1}
    # same shapes, other ragged structure: the nested calls are eager's again, the dense graph (same shapes) loads
    second = run([0, 7, 10])
    assert second == {"equal": True, "hit": 1, "saved": 0}
    # another batch count and total length: the dense graph's shape changed, so it misses and is stored anew
    third = run([0, 2, 5, 11])
    assert third == {"equal": True, "hit": 0, "saved": 1}
