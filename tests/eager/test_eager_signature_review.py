"""Session 26 review of the per-op kernel cache's lookup: calls that differ from an entry in one way that alters
the result must miss, calls that differ harmlessly must still hit.

An entry's "library" here is junk bytes (fault injection): a call whose signature matches the entry tries to
load it (``load_errors`` counts the hit, the stock kernel still answers), a call that does not match is a plain
miss. The slow test at the end compiles real kernels."""

from __future__ import annotations

import json
import math

import pytest
import torch

import aotcache.eager as eager
from aotcache.eager import meta
from aotcache.eager.index import OpIndex
from aotcache.eager.versions import runtime_versions

from tests.eager.test_eager_dispatch_faults import clean_dispatch  # noqa: F401 (autouse: dispatch off around each test)

aten = torch.ops.aten


@pytest.fixture
def default_dtype():
    """``default_dtype(dtype)`` sets torch's default dtype for the test (restored after)."""
    previous = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(previous)


def store_junk_entry(cache_dir, op, args, kwargs=None, **entry_options):
    values = meta.binder_for(op).bind(args, kwargs)
    info = meta.extract_call_metadata(op, values, dynamic=False, device_type="cpu")
    index = OpIndex(op.namespace, meta.op_file_name(op), "cpu", cache_dir=cache_dir)
    entry = index.new_entry(info, runtime_versions(), 1, **entry_options)
    index.add(entry, b"junk, not a library")
    return index, entry


def outcome(op, call):
    """Run ``call`` with ``op`` enabled: ('hit' | 'miss' | 'refused', result); the result is the stock one."""
    with eager.enabled([op]):
        eager.reset_stats()  # entries skipped while enabling are not this call's outcome
        result = call()
    counts = eager.stats()
    if counts["load_errors"]:
        return "hit", result
    if counts["unsupported_calls"]:
        return "refused", result
    assert counts["misses"] >= 1, counts
    return "miss", result


def test_a_kernel_built_under_one_default_dtype_misses_under_another(isolated_cache_dir, default_dtype):
    """div(int, int) is float32 under the default float32 and float64 under float64: before, a kernel built under
    float32 matched the float64 call (and returned float32)."""
    x, y = torch.arange(1, 7), torch.arange(2, 8)
    store_junk_entry(isolated_cache_dir, aten.div.Tensor, (x, y))  # built under float32 (the default)
    assert outcome(aten.div.Tensor, lambda: torch.div(x, y))[0] == "hit"
    default_dtype(torch.float64)
    kind, result = outcome(aten.div.Tensor, lambda: torch.div(x, y))
    assert kind == "miss" and result.dtype == torch.float64
    default_dtype(torch.float32)
    assert outcome(aten.div.Tensor, lambda: torch.div(x, y))[0] == "hit"  # back: the same kernel again


def test_a_kernel_built_under_float64_default_hits_only_under_it(isolated_cache_dir, default_dtype):
    x = torch.arange(6)
    default_dtype(torch.float64)
    _, entry = store_junk_entry(isolated_cache_dir, aten.add.Tensor, (x, 2.5))
    assert entry.default_dtype == "torch.float64"
    assert json.loads(OpIndex("aten", "add.Tensor", "cpu").index_path.read_text())[0]["default_dtype"] == \
        "torch.float64"
    assert outcome(aten.add.Tensor, lambda: x + 2.5)[0] == "hit"
    default_dtype(torch.float32)
    assert outcome(aten.add.Tensor, lambda: x + 2.5)[0] == "miss"


def test_entries_that_record_no_default_dtype_are_not_used(isolated_cache_dir):
    """An entry of format 1 baked an unknown default dtype: never matched (skipped as stale by its format, and
    as unreadable if it claims the new format without the field)."""
    x, y = torch.arange(1, 7), torch.arange(2, 8)
    index, entry = store_junk_entry(isolated_cache_dir, aten.div.Tensor, (x, y))
    raw = json.loads(index.index_path.read_text())
    del raw[0]["default_dtype"]
    index.index_path.write_text(json.dumps(raw))
    eager.reset_stats()
    with eager.enabled([aten.div.Tensor]):
        assert eager.stats()["load_errors"] == 1  # the entry, skipped when the op was enabled
        torch.div(x, y)
    assert eager.stats()["load_errors"] == 1 and eager.stats()["misses"] == 1


@pytest.mark.parametrize("stored, called, expected", [
    (0.0, -0.0, "miss"), (-0.0, 0.0, "miss"), (-0.0, -0.0, "hit"), (0.0, 0.0, "hit"), (0.5, 1 / 2, "hit")])
def test_signed_zero_scalars_are_told_apart(isolated_cache_dir, stored, called, expected):
    """mul(x, -0.0) is -0.0 where mul(x, 0.0) is +0.0: before, the -0.0 call ran the 0.0 kernel."""
    x = torch.ones(2, 3)
    store_junk_entry(isolated_cache_dir, aten.mul.Tensor, (x, stored))
    kind, result = outcome(aten.mul.Tensor, lambda: torch.mul(x, called))
    assert kind == expected
    assert torch.equal(torch.signbit(result), torch.full((2, 3), math.copysign(1.0, called) < 0))


def test_nan_scalars_take_the_stock_kernel(isolated_cache_dir):
    x = torch.ones(3)
    store_junk_entry(isolated_cache_dir, aten.mul.Tensor, (x, 2.0))
    with pytest.raises(meta.UnsupportedArgumentError, match="NaN"):
        store_junk_entry(isolated_cache_dir, aten.mul.Tensor, (x, float("nan")))
    kind, result = outcome(aten.mul.Tensor, lambda: torch.mul(x, float("nan")))
    assert kind == "refused" and bool(result.isnan().all())


@pytest.mark.slow
def test_real_kernels_follow_the_default_dtype_and_signed_zeros(isolated_cache_dir, default_dtype):
    """Real AOTInductor kernels: what a false hit returned before (float32 for a float64 default, +0.0 for
    -0.0), and the matching calls still hitting."""
    x, y = torch.arange(1, 7), torch.arange(2, 8)
    z = torch.linspace(0.5, 2.0, 6)
    eager.precompile(aten.div.Tensor, (x, y))
    eager.precompile(aten.mul.Tensor, (z, 0.0))
    eager.reset_stats()
    with eager.enabled([aten.div.Tensor, aten.mul.Tensor]):
        same_dtype = torch.div(x, y)
        positive = torch.mul(z, 0.0)
        assert eager.stats()["hits"] == 2
        negative = torch.mul(z, -0.0)
        default_dtype(torch.float64)
        wider = torch.div(x, y)
        assert eager.stats()["hits"] == 2 and eager.stats()["misses"] == 2
    assert same_dtype.dtype == torch.float32 and torch.equal(same_dtype, torch.div(x.double(), y).float())
    assert wider.dtype == torch.float64 and torch.equal(wider, torch.div(x.double(), y.double()))
    assert not positive.signbit().any() and negative.signbit().all()
