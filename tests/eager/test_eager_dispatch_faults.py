"""Dispatch without compiling: fallbacks, faults (broken / missing / stale libraries), enable errors, restore."""

from __future__ import annotations

import logging

import pytest
import torch

import aotcache.eager as eager
from aotcache import config
from aotcache.eager import meta
from aotcache.eager.index import OpIndex
from aotcache.eager.versions import runtime_versions
from aotcache.logs import CacheFault

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def clean_dispatch():
    eager.disable()
    eager.reset_stats()
    yield
    eager.disable()


def store_entry(cache_dir, op, args, kwargs=None, *, library=b"this is not a shared library", versions=None):
    """Index an entry for ``op(*args, **kwargs)`` whose 'library' is whatever bytes we want (no compile)."""
    values = meta.binder_for(op).bind(args, kwargs)
    info = meta.extract_call_metadata(op, values, dynamic=False, device_type="cpu")
    index = OpIndex(op.namespace, meta.op_file_name(op), "cpu", cache_dir=cache_dir)
    entry = index.new_entry(info, versions or runtime_versions(), 1)
    index.add(entry, library)
    return index, entry


def test_unloadable_library_falls_back_to_the_stock_kernel(isolated_cache_dir, caplog):
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    store_entry(isolated_cache_dir, aten.add.Tensor, (x, y))
    expected = x + y
    with caplog.at_level(logging.WARNING, logger="aotcache"), eager.enabled([aten.add.Tensor]):
        assert torch.equal(torch.add(x, y), expected)
        assert torch.equal(torch.add(x, y), expected)
    counts = eager.stats()
    assert counts["load_errors"] == 1 and counts["fallbacks"] == 2 and counts["hits"] == 0
    assert counts["misses"] == 1  # the broken entry was dropped: the second call is a plain miss
    assert "cannot load kernel library" in caplog.text


def test_missing_library_is_counted_logged_and_skipped(isolated_cache_dir, caplog):
    x, y = torch.randn(3, 3), torch.randn(3, 3)
    index, entry = store_entry(isolated_cache_dir, aten.add.Tensor, (x, y))
    index.library_path(entry).unlink()
    with caplog.at_level(logging.WARNING, logger="aotcache"), eager.enabled("aten::add.Tensor"):
        assert torch.equal(x + y, torch.ops.aten.add.Tensor(x, y))
    assert eager.stats()["load_errors"] == 1 and eager.stats()["misses"] == 2
    assert "is missing" in caplog.text
    with config.patch(strict=True), pytest.raises(CacheFault, match="missing"):
        eager.enable([aten.add.Tensor])


def test_entry_for_another_torch_is_skipped(isolated_cache_dir, caplog):
    x = torch.randn(5)
    store_entry(isolated_cache_dir, aten.gelu.default, (x,), versions={**runtime_versions(), "torch": "1.0.0"})
    with caplog.at_level(logging.WARNING, logger="aotcache"), eager.enabled([aten.gelu.default]):
        result = torch.nn.functional.gelu(x)
    eager.disable()
    assert torch.equal(result, torch.nn.functional.gelu(x))
    assert eager.stats()["stale_entries"] == 1 and eager.stats()["load_errors"] == 1
    assert "another host" in caplog.text or "built for" in caplog.text


def test_corrupt_index_at_enable_is_rebuilt_and_counted(isolated_cache_dir):
    x, y = torch.randn(2, 2), torch.randn(2, 2)
    index, _ = store_entry(isolated_cache_dir, aten.mm.default, (x, y))
    index.index_path.write_text("[{")
    with eager.enabled([aten.mm.default]):
        result = torch.mm(x, y)
    assert torch.equal(result, x @ y)
    counts = eager.stats()
    assert counts["index_rebuilds"] == 1 and counts["load_errors"] >= 2  # rebuild + the bogus library


def test_numbers_arriving_in_tensor_slots_keep_wrapped_number_semantics():
    # C++ callers (isclose -> add) pass wrapped numbers, which reach a Python kernel as Python numbers.
    ints = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    halves = torch.randn(4, dtype=torch.float16)
    doubles = torch.randn(3, dtype=torch.float64)
    stock = [torch.allclose(doubles, doubles + 1e-12), ints + 2.5, halves * 3, doubles + 1e-8,
             torch.isclose(halves, halves)]
    with eager.enabled([aten.add.Tensor, aten.mul.Tensor]):
        ours = [torch.allclose(doubles, doubles + 1e-12), ints + 2.5, halves * 3, doubles + 1e-8,
                torch.isclose(halves, halves)]
        wrapped = torch.ops.aten.add.Tensor(ints, 2.5)  # the JIT path passes a wrapped number too
    assert ours[0] == stock[0]
    for mine, theirs in zip(ours[1:], stock[1:]):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    assert wrapped.dtype == torch.float32
    assert eager.stats()["fallbacks"] > 0


def test_unsupported_views_take_the_stock_kernel(isolated_cache_dir):
    z = torch.randn(2, 2, dtype=torch.complex64)
    store_entry(isolated_cache_dir, aten.mm.default, (z, z))
    with eager.enabled([aten.mm.default]):
        result = torch.mm(z.conj(), z)
    assert torch.allclose(result, z.conj().resolve_conj() @ z)
    assert eager.stats()["hits"] == 0


def test_gradients_flow_through_the_override():
    x = torch.randn(3, 3, requires_grad=True)
    with eager.enabled([aten.mul.Tensor]):
        (x * x).sum().backward()
    assert torch.allclose(x.grad, 2 * x.detach())


def test_enable_refuses_bad_ops_and_disable_restores():
    with pytest.raises(meta.UnsupportedOperatorError, match="mutates"):
        eager.enable([aten.add_.Tensor])
    with pytest.raises(ValueError, match="does not name an op overload"):
        eager.enable(["aten::no_such_op"])
    with pytest.raises(TypeError, match="overload packet"):
        eager.enable([aten.add])
    assert eager.enabled_ops() == []
    eager.enable(["aten.add.Tensor", "aten::mm"])
    assert eager.enabled_ops() == ["aten::add.Tensor", "aten::mm"]
    torch.ones(2) + torch.ones(2)
    calls = eager.stats()["fallbacks"]
    assert calls == 1
    with eager.enabled([aten.add.Tensor, aten.gelu.default]) as added:
        assert added == ["aten::gelu"]
    assert eager.enabled_ops() == ["aten::add.Tensor", "aten::mm"]  # the outer enable survives
    eager.disable()
    torch.ones(2) + torch.ones(2)
    assert eager.enabled_ops() == [] and eager.stats()["fallbacks"] == calls


def test_precompile_refuses_dynamic_and_bad_input_before_compiling():
    with pytest.raises(NotImplementedError, match="dynamic=True is not supported"):
        eager.precompile(aten.add.Tensor, (torch.ones(2), torch.ones(2)), dynamic=True)
    with pytest.raises(meta.UnsupportedArgumentError, match="argument 'other'"):
        eager.precompile(aten.add.Tensor, (torch.ones(2), object()))
    with pytest.raises(ValueError, match="supports devices"):
        eager.precompile(aten.add.Tensor, (torch.ones(2), torch.ones(2)), device="meta")
    with pytest.raises(TypeError, match="missing required argument"):
        eager.precompile(aten.add.Tensor, (torch.ones(2),))
    assert eager.stats()["compiles"] == 0
