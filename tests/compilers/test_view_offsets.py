"""Views of inputs whose storage offset Dynamo made symbolic, compiled with Inductor (NOTE [Storage offsets of
input views under Inductor] in ``aotcache/compilers/view_offsets.py``). Found by PyTorch's own
``test_adding_tensor_offsets`` (test/inductor/test_torchinductor.py) run through aotcache."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from aotcache.backend import aotcache_backend
from aotcache.compilers.view_offsets import UnsupportedViewOffset, spell_storage_offsets
from tests.conftest import run_python


def window(x):
    return x[16:32]


def window_at(x, n):
    return x[n:n + 4]


def upper_half(x):
    return x[x.shape[0] // 2:]


def _inductor(fn, **options):
    torch._dynamo.reset()
    return torch.compile(fn, backend=functools.partial(aotcache_backend, compiler="inductor"), fullgraph=True,
                         **options)


@pytest.fixture
def strict(monkeypatch):
    """A compiler fallback raises: the graphs below must compile with Inductor itself."""
    monkeypatch.setenv("AOTCACHE_STRICT", "1")


@pytest.mark.parametrize("implicit_fallbacks", [True, False])
def test_a_view_of_an_input_whose_offset_changed_is_the_view_eager_returns(strict, implicit_fallbacks):
    """Inductor's default placed the view wrongly; without its implicit fallbacks it could not lower the offset
    (the graph fell back to nop): now Inductor compiles it, right."""
    from torch._inductor import config as inductor_config

    compiled = _inductor(window)
    base = torch.arange(1024.0)
    with torch.no_grad(), inductor_config.patch(implicit_fallbacks=implicit_fallbacks):
        for start in (0, 128, 64):  # the second call makes Dynamo trace the input's offset as a symbol
            out = compiled(base[start:])
            assert out.storage_offset() == start + 16  # was 0: the elements at 0..15
            assert torch.equal(out, base[start + 16:start + 32])


@pytest.mark.parametrize("fn, extra", [(window_at, (5,)), (upper_half, ())], ids=["x[n:n+4]", "x[len//2:]"])
def test_a_symbolic_distance_from_the_input_is_computed_from_its_sizes(strict, fn, extra):
    compiled = _inductor(fn, dynamic=True)
    base = torch.arange(1024.0)
    with torch.no_grad():
        for start in (0, 128):
            out, expected = compiled(base[start:], *extra), fn(base[start:], *extra)
            assert out.storage_offset() == expected.storage_offset() and torch.equal(out, expected)


WARM_WINDOW = """
import functools, json, torch
from aotcache.backend import aotcache_backend
from aotcache.autograd_cache.cache import default_cache
compiled = torch.compile(lambda x: x[16:32], backend=functools.partial(aotcache_backend, compiler="inductor"))
base = torch.arange(1024.0)
with torch.no_grad():
    offsets = [compiled(base[start:]).storage_offset() for start in (0, 128, 64)]
print(json.dumps({"offsets": offsets, **default_cache().stats()}))
"""


def test_the_entry_for_a_symbolic_offset_loads_right_in_a_fresh_process():
    cold = json.loads(run_python(WARM_WINDOW).stdout.strip().splitlines()[-1])
    warm = json.loads(run_python(WARM_WINDOW).stdout.strip().splitlines()[-1])
    assert cold["offsets"] == warm["offsets"] == [16, 144, 80]
    assert cold["bypass"] == 0 and warm["compile"] == 0 and warm["hit"] == 2


def test_a_distance_no_input_size_spells_is_refused_not_guessed():
    shape_env = torch.fx.experimental.symbolic_shapes.ShapeEnv()
    fake_mode = torch._subclasses.FakeTensorMode(shape_env=shape_env)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    with fake_mode:
        x.meta["val"] = torch.empty(64)
    unbacked = shape_env.create_unbacked_symint()
    view = graph.call_function(torch.ops.aten.slice.Tensor, (x, 0, 0, 8))
    offset = graph.call_function(torch.ops.aten.sym_storage_offset.default, (view,))
    view.meta["val"] = x.meta["val"][:8]
    offset.meta["val"] = unbacked + 0  # a symbol held by no input
    graph.output((offset,))
    with pytest.raises(UnsupportedViewOffset, match="no input's size"):
        spell_storage_offsets(torch.fx.GraphModule(torch.nn.Module(), graph))
