"""The hot paths' tensor check in C (NOTE [Tensor metadata checked in C] in aot/tensor_metadata.py): it must refuse
every tensor the Python comparison refuses, accept the ones it accepts, and never end the process on an odd tensor.

Each signature test runs twice: with torch's C check (``c``) and with the Python comparison it replaces
(``python``), so that the two agree field by field.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from aotcache.aot import aot_function, hot_path
from aotcache.aot.hot_path import HotSignature
from aotcache.aot.tensor_metadata import TensorMetadata, _c_tensor_guards

REPO_ROOT = str(Path(__file__).resolve().parents[2])
GRAPH = types.SimpleNamespace(input_offsets=None)  # a graph whose result does not depend on storage offsets


def graph_compiler(gm, example_inputs):
    return gm


@pytest.fixture(params=["c", "python"])
def check(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(hot_path.TensorMetadata, "of", classmethod(lambda cls, tensors, dims: None))
    elif _c_tensor_guards() is None:
        pytest.skip("this torch has no usable C tensor check")
    return request.param


def signature(tensors, dynamic, mode):
    hot = HotSignature(tensors, dynamic=dynamic, runtime=GRAPH)
    assert (hot._metadata is not None) == (mode == "c")
    return hot


def refuses(hot, tensors, mode):
    """Whether ``hot`` refuses ``tensors``; the Python comparison may raise for a tensor without sizes (a nested
    one), which its callers catch as a refusal; the C check answers False."""
    if mode == "python":
        try:
            return not hot.matches(tensors)
        except RuntimeError:
            return True
    return not hot.matches(tensors)


def nested(*shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prototype nested-tensor API warns
        return torch.nested.nested_tensor([torch.randn(*shape)])


def test_the_c_check_is_used_on_the_torch_versions_this_runs_on():
    # torch 2.11 and 2.13 (and Dynamo's TensorGuards since 2.1) pass the probe; if one stops, the hot paths fall
    # back to Python and this test names it
    assert _c_tensor_guards() is not None
    assert HotSignature([torch.randn(2)], dynamic=False, runtime=GRAPH)._metadata is not None


def test_a_static_signature_refuses_each_field(check):
    param = nn.Parameter(torch.randn(3))
    hot = signature([torch.randn(2, 3), param, torch.randn(4, requires_grad=True)], False, check)
    assert hot.matches([torch.randn(2, 3), nn.Parameter(torch.randn(3)), torch.randn(4, requires_grad=True)])
    others = {
        "dtype": torch.randn(2, 3, dtype=torch.float64), "size": torch.randn(3, 2), "stride": torch.randn(3, 2).t(),
        "rank": torch.randn(2, 3, 1), "type": nn.Parameter(torch.randn(2, 3)), "requires_grad":
        torch.randn(2, 3, requires_grad=True), "device": torch.randn(2, 3, device="meta"),
        "sparse": torch.randn(2, 3).to_sparse(), "nested": nested(2, 3),
    }
    for name, other in others.items():
        assert refuses(hot, [other, param, torch.randn(4, requires_grad=True)], check), name
    leaf = torch.randn(4, requires_grad=True)
    assert not hot.matches([torch.randn(2, 3), param, leaf * 2]), "a tensor requiring grad that is no leaf"
    assert not hot.matches([torch.randn(2, 3), torch.randn(3), leaf]), "a plain tensor where a parameter was"
    assert not hot.matches([torch.randn(2, 3), nn.Parameter(torch.randn(3), requires_grad=False), leaf])


def test_a_mixed_signature_refuses_each_field_outside_its_dynamic_dimensions(check):
    hot = signature([torch.randn(4, 8), torch.randn(1, 2, 5, 8)], ((), (2,)), check)
    assert hot.matches([torch.randn(4, 8), torch.randn(1, 2, 9, 8)])  # the dynamic dimension grew
    assert hot.matches([torch.randn(4, 8), torch.randn(1, 2, 8, 9).transpose(-1, -2)])  # strides of a dynamic one
    for static, moving in [(torch.randn(4, 9), torch.randn(1, 2, 9, 8)), (torch.randn(8, 4).t(), torch.randn(1, 2, 9, 8)),
                           (torch.randn(4, 8), torch.randn(1, 3, 9, 8)), (torch.randn(4, 8), torch.randn(2, 9, 8)),
                           (torch.randn(4, 8), torch.randn(1, 2, 9, 8).double()),
                           (torch.randn(4, 8), torch.randn(1, 2, 9, 8, requires_grad=True)),
                           (torch.randn(4, 8), nested(2, 9, 8)), (nested(4, 8), torch.randn(1, 2, 9, 8)),
                           (torch.randn(4, 8), torch.randn(1, 2, 9, 8).to_sparse())]:
        assert refuses(hot, [static, moving], check), (static.is_nested, moving.is_nested)
    offset = torch.randn(40)[8:].view(4, 8)
    assert hot.matches([offset, torch.randn(1, 2, 9, 8)])  # an offset is no part of the signature ...
    assert hot.pin_offsets()
    assert not hot.matches([offset, torch.randn(1, 2, 9, 8)])  # ... unless pinned for a call record's guards
    shared = torch.randn(4, 8)
    assert not hot.matches([shared, shared.view(1, 2, 2, 8)])  # memory sharing


def test_a_rank_only_signature_compares_ranks_and_fields(check):
    hot = signature([torch.randn(2, 3)], True, check)
    assert hot.matches([torch.randn(5, 7)]) and hot.matches([torch.randn(7, 5).t()])
    for other in (torch.randn(5), torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, requires_grad=True),
                  nested(5, 7)):
        assert refuses(hot, [other], check)


def test_transform_tensors_never_match(check):
    hot = signature([torch.randn(2, 3)], False, check)
    seen = []

    def inside(x):
        seen.append(hot.matches([x]) if check == "c" else None)
        return x.sum()

    torch.func.grad(inside)(torch.randn(2, 3))
    torch.vmap(inside)(torch.randn(4, 2, 3))
    if check == "c":  # (the Python comparison leaves them to its callers, which refuse them first)
        assert seen == [False, False]


def test_the_probe_imports_no_dynamo():
    # a warm start that loads its graphs never imports Dynamo (tests/test_compile.py); torch.func.grad would
    code = ("import sys, torch\nfrom aotcache.aot.tensor_metadata import _c_tensor_guards\n"
            "assert _c_tensor_guards() is not None\nassert 'torch._dynamo' not in sys.modules, 'Dynamo imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})


def test_a_probe_first_run_inside_a_fake_tensor_mode_still_finds_the_c_check():
    # the first hot-path call of a process can come from inside a capture's FakeTensorMode: the probe's own
    # tensors must be real, else the C check is off for the whole process (speed only, but every later call)
    code = ("import torch\nfrom torch._subclasses.fake_tensor import FakeTensorMode\n"
            "from aotcache.aot.tensor_metadata import _c_tensor_guards\n"
            "with FakeTensorMode():\n    found = _c_tensor_guards()\n"
            "assert found is not None, 'probe failed under FakeTensorMode'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})


def test_a_signature_recorded_outside_inference_mode_sends_calls_inside_it_to_the_full_path(check):
    hot = signature([torch.randn(2, 3)], False, check)
    with torch.inference_mode():
        x = torch.randn(2, 3)
        if check == "c":  # another dispatch state: the full path decides (and records its own signature)
            assert not hot.matches([x])
    compiled = aot_function(lambda t: t * 2 + 1, graph_compiler, cache=False)
    plain = torch.randn(2, 3)
    for _ in range(2):
        torch.testing.assert_close(compiled(plain), plain * 2 + 1)
        with torch.inference_mode():
            inner = torch.randn(2, 3)
            torch.testing.assert_close(compiled(inner), inner * 2 + 1)
    torch.testing.assert_close(compiled(plain), plain * 2 + 1)


def test_a_nested_tensor_where_a_plain_one_was_recorded_runs_as_eager(check):
    compiled = aot_function(lambda t: t * 2, graph_compiler, cache=False)
    plain = torch.randn(2, 3)
    compiled(plain)
    compiled(plain)  # recorded: the hot path compares the next calls with it
    x = nested(2, 3)
    got = compiled(x)  # never the C check on it (it would end the process): the full path runs it eagerly
    assert got.is_nested
    torch.testing.assert_close(got.unbind()[0], x.unbind()[0] * 2)


def test_the_c_check_is_built_only_for_plain_strided_tensors():
    if _c_tensor_guards() is None:
        pytest.skip("this torch has no usable C tensor check")
    assert TensorMetadata.of([torch.randn(2), torch.randn(3)], [False, False]) is not None
    assert TensorMetadata.of([torch.randn(2), nested(2)], [False, False]) is None
    assert TensorMetadata.of([torch.randn(2).to_sparse()], [False]) is None
    assert TensorMetadata.of([], []) is None


def conj_view(*shape):
    return torch.randn(*shape, dtype=torch.complex64).conj()


def neg_view(*shape):
    return torch.randn(*shape, dtype=torch.complex64).conj().imag  # a float tensor with the negative bit


def imag_view(*shape):
    return torch.randn(*shape, dtype=torch.complex64).imag  # the same geometry as neg_view, no bit


def complex_tensor(*shape):
    return torch.randn(*shape, dtype=torch.complex64)


@pytest.mark.parametrize("make, plain", [(conj_view, complex_tensor), (neg_view, imag_view)], ids=["conj", "neg"])
@pytest.mark.parametrize("order", ["plain_first", "view_first"])
def test_conj_and_neg_bits_select_their_own_graph(check, make, plain, order):
    # a conj / neg view reads through its bit: ``x.imag`` of a conj view traced into a graph for plain tensors
    # raised (view_as_real on an unresolved conj tensor), and ``is_conj()`` read in Python was baked in: a graph
    # traced for one must never serve the other (the full signature keys the bits; the hot paths refuse them)
    def function(t):
        marker = 1 if t.is_conj() or t.is_neg() else -1
        return (t.imag if t.is_complex() else t) * 2 + marker

    compiled = aot_function(function, graph_compiler, cache=False)
    sequence = [plain, make] if order == "plain_first" else [make, plain]
    for factory in sequence:
        for _ in range(3):
            x = factory(3)
            torch.testing.assert_close(compiled(x), function(x))


def test_the_hot_paths_never_record_conj_or_neg_views():
    assert not HotSignature.eligible([conj_view(2)])
    assert not HotSignature.eligible([neg_view(2)])
    assert HotSignature.eligible([torch.randn(2, dtype=torch.complex64)])


def test_conj_views_after_plain_calls_through_aotcache_compile():
    import aotcache

    class ImagPart(nn.Module):
        def forward(self, x):
            return x.imag * 2 + (1 if x.is_conj() else -1)

    module = ImagPart()
    compiled = aotcache.compile(module, compiler="nop", cache=False)
    for make in (complex_tensor, conj_view, complex_tensor, conj_view):
        for size in (3, 4):
            x = make(size)
            torch.testing.assert_close(compiled(x), module(x))
