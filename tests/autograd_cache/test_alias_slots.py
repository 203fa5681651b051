"""Several graphs under one call fingerprint (NOTE [Several graphs under one fingerprint] in fingerprint_cache.py):
each warm-loads through its own alias slot, a key is used only where its entry's guards hold, and bad or stale
slots are counted misses."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils import _pytree as pytree

import aotcache
from aotcache.autograd_cache import fingerprint_cache, pipeline
from aotcache.autograd_cache.fingerprint_cache import alias_store_key, fingerprint_of, read_alias


def fresh_cache():
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store.factory import open_tiers

    return AOTAutogradCache(open_tiers("memory,disk", namespace="aot"), journal=False)


def scaled_rows(x):
    return (x * 2).sum(0) + x.shape[0]


def rows(n: int) -> torch.Tensor:
    return torch.arange(n * 4, dtype=torch.float32).reshape(n, 4)


def compiled(cache):
    # dynamic=True: the fingerprint holds the rank only, but a batch of 1 is specialized by the capture (guard
    # `size == 1`) and any other is symbolic (guard `2 <= size`): one fingerprint, two graphs
    return aotcache.aot_function(scaled_rows, "nop", dynamic=True, cache=cache)


def fingerprint(function, x):
    """The fingerprint of ``function(x)`` as its compile computes it (``dynamic`` resolved to a spec)."""
    flat, spec = pytree.tree_flatten(((x,), {}))
    return fingerprint_of(function, flat, spec, function._resolve_dynamic(flat, spec, None))


def forbid_capture(monkeypatch):
    def no_capture(*args, **kwargs):
        raise AssertionError("a fingerprint hit must not capture")

    monkeypatch.setattr(pipeline, "capture", no_capture)


def test_two_graphs_under_one_fingerprint_both_start_warm(monkeypatch):
    cache = fresh_cache()
    cold = compiled(cache)
    for n in (1, 3):
        assert torch.equal(cold(rows(n)), scaled_rows(rows(n)))
    assert cache.counters["compile"] == 2 and cache.counters["fingerprint_miss"] == 2
    fp = fingerprint(cold, rows(1))
    assert fp.trusted and fingerprint(cold, rows(3)) == fp  # what the bug was: one fingerprint for both graphs
    assert read_alias(cache, fp, 0) != read_alias(cache, fp, 1) and read_alias(cache, fp, 2) is None

    forbid_capture(monkeypatch)  # the second graph's warm start used to trace (its alias was never recorded)
    warm = compiled(cache)  # a new function, as in a fresh process
    for n in (3, 1):
        assert torch.equal(warm(rows(n)), scaled_rows(rows(n)))
    assert cache.counters["fingerprint_hit"] == 2 and cache.counters["compile"] == 2


def test_a_call_whose_guards_hold_for_no_recorded_key_traces_and_is_recorded_next():
    cache = fresh_cache()
    cold = compiled(cache)
    for n in (1, 3):
        cold(rows(n))
    fp = fingerprint(cold, rows(1))
    warm = compiled(cache)
    empty = torch.zeros(0, 4)  # a batch of 0: specialized too, neither recorded key's guards hold
    assert fingerprint(warm, empty) == fp
    assert torch.equal(warm(empty), scaled_rows(empty))  # traced, never the size-1 or the symbolic graph
    assert cache.counters["fingerprint_miss"] == 3 and cache.counters["fingerprint_hit"] == 0
    assert cache.counters["compile"] == 3
    assert read_alias(cache, fp, 2) not in (None, read_alias(cache, fp, 0), read_alias(cache, fp, 1))
    again = compiled(cache)
    assert torch.equal(again(empty), scaled_rows(empty)) and cache.counters["fingerprint_hit"] == 1


def test_a_corrupt_slot_is_a_counted_miss_and_is_replaced():
    cache = fresh_cache()
    compiled(cache)(rows(1))
    fp = fingerprint(compiled(cache), rows(1))
    cache.tiers.insert(alias_store_key(fp, 1), b"{not json")
    warm = compiled(cache)
    assert torch.equal(warm(rows(3)), scaled_rows(rows(3)))
    assert cache.counters["load_error"] == 1 and cache.counters["fingerprint_miss"] == 2
    record = json.loads(bytes(cache.tiers.get(alias_store_key(fp, 1))))
    assert record["schema"] == 1 and record["key"] == read_alias(cache, fp, 1).digest  # the slot's new record
    forbid = compiled(cache)
    assert torch.equal(forbid(rows(3)), scaled_rows(rows(3))) and cache.counters["fingerprint_hit"] == 1


def test_stale_slots_are_a_miss_and_the_recompiled_keys_are_not_recorded_twice():
    cache = fresh_cache()
    cold = compiled(cache)
    for n in (1, 3):
        cold(rows(n))
    fp = fingerprint(cold, rows(1))
    slots = [read_alias(cache, fp, slot) for slot in (0, 1)]
    assert cache.clear() == 2  # entries go; the alias records stay (derived data, now stale)
    warm = compiled(cache)
    for n in (3, 1):
        assert torch.equal(warm(rows(n)), scaled_rows(rows(n)))
    assert cache.counters["fingerprint_miss"] == 4 and cache.counters["compile"] == 4
    assert [read_alias(cache, fp, slot) for slot in (0, 1, 2)] == [*slots, None]  # the same keys: not added again


def test_slots_are_bounded_and_a_stale_one_is_reused(monkeypatch, caplog):
    monkeypatch.setattr(fingerprint_cache, "MAX_ALIAS_SLOTS", 2)
    cache = fresh_cache()
    cold = compiled(cache)
    for n in (1, 3):
        cold(rows(n))
    fp = fingerprint(cold, rows(1))
    with caplog.at_level("INFO", logger="aotcache"):
        cold(torch.zeros(0, 4))  # a third graph: both slots name live entries, so it is not recorded
    assert "already names 2 graphs" in caplog.text
    assert read_alias(cache, fp, 1) is not None and cache.counters["compile"] == 3
    first = read_alias(cache, fp, 0)
    assert cache.delete(f"aot/{first.digest}/0")  # the size-1 graph's entry goes: slot 0 is stale
    compiled(cache)(torch.zeros(0, 4))
    assert read_alias(cache, fp, 0) not in (None, first)  # the stale slot now names the batch-0 graph


def test_an_alias_slot_outside_the_bound_is_refused():
    cache = fresh_cache()
    fp = fingerprint(compiled(cache), rows(1))
    with pytest.raises(ValueError, match="alias slot 8"):
        alias_store_key(fp, 8)
    assert fingerprint_cache.parse_alias_store_key(alias_store_key(fp, 3)) == (fp.digest, 3)
    assert fingerprint_cache.parse_alias_store_key(alias_store_key(fp)) == (fp.digest, 0)
    assert fingerprint_cache.parse_alias_store_key(alias_store_key(fp) + "/0") is None
    assert fingerprint_cache.parse_alias_store_key(alias_store_key(fp) + "/9") is None


def test_a_bundle_carries_every_slot_and_import_puts_each_back_in_its_slot(tmp_path):
    from aotcache.cli.bundles import import_aliases, read_bundle, write_bundle

    cache = fresh_cache()
    cold = compiled(cache)
    for n in (1, 3):
        cold(rows(n))
    fp = fingerprint(cold, rows(1))
    blobs = {name: bytes(cache.tiers.get(alias_store_key(fp, slot))) for slot, name in ((0, fp.digest),
                                                                                         (1, f"{fp.digest}/1"))}
    bundle = tmp_path / "aliases.tar"
    index = write_bundle(bundle, "aot", [], blobs)
    assert [(record["file"], record.get("slot")) for record in index["aliases"]] == [
        (f"aliases/{fp.digest}.json", None), (f"aliases/{fp.digest}-1.json", 1)]
    _, _, members = read_bundle(bundle)
    other = fresh_cache()
    other.tiers.clear()
    keys = {read_alias(cache, fp, slot).digest for slot in (0, 1)}
    assert import_aliases(other, members, keys) == (2, [])
    assert [read_alias(other, fp, slot) for slot in (0, 1)] == [read_alias(cache, fp, slot) for slot in (0, 1)]
    members[1].record["slot"] = 8  # outside the bound: refused, never stored under another key
    other.tiers.clear()
    stored, rejected = import_aliases(other, members, keys)
    assert stored == 1 and rejected[0]["reason"].startswith("the fingerprint is not a hex digest, or the slot")
