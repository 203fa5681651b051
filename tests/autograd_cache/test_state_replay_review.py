"""Adversarial cases of a warm start replaying a call's state change (NOTE [Replaying a call's state change] in
autograd_cache/state_delta.py), found in review: each runs a cold process, then a warm one, both against eager
in the same process (results and final state)."""

from __future__ import annotations

import json

import pytest
import torch

import aotcache
from aotcache.logs import CacheFault
from tests.autograd_cache.test_state_replay import SetsMode, _recorded, fresh_cache
from tests.conftest import run_python

# argv: kind, calls (how many calls each process makes)
SCRIPT = r"""
import json, os, sys, torch
import aotcache
from aotcache.autograd_cache.cache import default_cache

kind, calls = sys.argv[1], int(sys.argv[2])
value = sys.argv[3] if len(sys.argv) > 3 else ""  # threads: the thread count; tag: the call's keyword argument
if kind == "threads":
    torch.set_num_threads(int(value))
SPACED = "x mode"  # a str constant that is not an identifier: not interned by the compiler
NAMED = "x_mode"  # an identifier: interned


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.mode = None
        self.tags = frozenset({"alpha", "beta", "gamma", "delta"})

    def forward(self, x, tag="-"):
        return step(self, x, tag)


# each kind's step defined alone: the fingerprint walks only the code the forward can reach
if kind in ("identity", "interned"):  # the state is a sentinel str tested by identity
    SENTINEL = SPACED if kind == "identity" else NAMED

    def step(self, x, tag):
        if self.mode is None:
            self.mode = SENTINEL
            return self.lin(x).sum()
        return self.lin(x).sum() * (2.0 if self.mode is SENTINEL else 3.0)
elif kind == "threads":  # a per-process value read through torch

    def step(self, x, tag):
        self.threads = torch.get_num_threads()
        return self.lin(x).sum()
elif kind == "env":  # a value the fingerprint pins: an environment variable read by a constant name

    def step(self, x, tag):
        if self.mode is None:
            self.mode = os.environ.get("REVIEW_MODE", "unset")
        return self.lin(x).sum()
elif kind == "tag":  # a value the fingerprint pins: a str keyword argument of the call

    def step(self, x, tag):
        if self.mode is None:
            self.mode = tag
        return self.lin(x).sum()
elif kind == "set_order":  # a set of str iterates in an order that follows the process's str hashing

    def step(self, x, tag):
        if self.mode is None:
            self.mode = next(iter(self.tags))
        return self.lin(x).sum()


def plain(model):
    return {name: value for name, value in vars(model).items() if not name.startswith("_")}


eager, model = Model(), Model()
compiled = aotcache.aot_module(model, "nop")
x = torch.ones(2, 4)
kwargs = {"tag": value} if kind == "tag" else {}
got = [compiled(x, **kwargs).item() for _ in range(calls)]
want = [eager(x, **kwargs).item() for _ in range(calls)]
print(json.dumps({"got": got, "want": want, "state": repr(plain(model)), "eager_state": repr(plain(eager)),
                  **{k: v for k, v in default_cache().counters.items() if k.startswith("fingerprint")}}))
"""


def _run(tmp_path, kind: str, calls: int, *extra: str, env: dict | None = None) -> dict:
    path = tmp_path / "review.py"
    path.write_text(SCRIPT)
    argv = ["review", kind, str(calls), *extra]
    code = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path({str(path)!r})"
    # each process under its own random hash seed unless a test sets one: the model's set of str is read only by the
    # "set_order" step, so every other kind keeps one fingerprint whatever the seed (NOTE [Sets in their iteration
    # order])
    return json.loads(run_python(code, env={"PYTHONHASHSEED": "random", **(env or {})}).stdout.strip().splitlines()[-1])


def _assert_eager(run: dict) -> None:
    assert run["got"] == run["want"] and run["state"] == run["eager_state"], run


def test_a_replayed_str_keeps_its_identity_for_a_later_is_test(tmp_path):
    # found in review: the cold process recorded `self.mode = SPACED` (a str constant that is not interned); the
    # warm replay wrote a new str object equal to it, so the next call, traced from that state, took the
    # `is not SPACED` branch (3x the loss where eager gives 2x)
    cold = _run(tmp_path, "identity", 1)  # the first call's change only
    _assert_eager(cold)
    assert cold["fingerprint_state_changed"] == 1 and "fingerprint_state_recorded" not in cold  # not replayable
    warm = _run(tmp_path, "identity", 2)
    _assert_eager(warm)
    assert "fingerprint_replay" not in warm


def test_a_replayed_interned_str_is_the_warm_processes_own_object(tmp_path):
    cold = _run(tmp_path, "interned", 1)
    _assert_eager(cold)
    assert cold["fingerprint_state_recorded"] == 1
    warm = _run(tmp_path, "interned", 2)
    _assert_eager(warm)
    assert warm["fingerprint_replay"] == 1, warm  # replayed, and the next call's `is` test holds


@pytest.mark.parametrize("corruption", ["nested past the JSON parser's limit", "tuples nested past the encoder's",
                                        "schema 1 with a change"])
def test_a_corrupt_replay_record_is_a_counted_miss_not_a_crash(monkeypatch, corruption):
    # found in review: a record nested deeper than json's recursion limit raised RecursionError out of the
    # warm call; a schema-2 record relabelled schema 1 was served as a plain alias (no replay: mode stayed None)
    cache = fresh_cache()
    (store_key, _), = _recorded(monkeypatch, cache)
    text = bytes(cache.tiers.get(store_key)).decode()
    after = json.dumps(json.loads(text)["delta"][0][3], separators=(",", ":"))
    if corruption == "nested past the JSON parser's limit":
        text = text.replace(after, '["tuple",[' * 3000 + after + "]]" * 3000)
    elif corruption == "tuples nested past the encoder's":
        text = text.replace(after, '["tuple",[' * 8 + after + "]]" * 8)
    else:
        text = text.replace('"schema":2', '"schema":1')
    cache.delete(store_key)
    cache.tiers.insert(store_key, text.encode())
    eager, model = SetsMode(), SetsMode()
    out = aotcache.aot_module(model, "nop", cache=cache)(torch.ones(2, 4))
    assert torch.equal(out, eager(torch.ones(2, 4))) and model.mode == eager.mode == "x"
    assert cache.counters["load_error"] == 1 and cache.counters["fingerprint_miss"] == 2
    assert cache.counters.get("fingerprint_hit", 0) == 0


def test_a_corrupt_replay_record_raises_in_strict_mode(monkeypatch):
    cache = fresh_cache()
    (store_key, _), = _recorded(monkeypatch, cache)
    text = bytes(cache.tiers.get(store_key)).decode().replace('"delta":[[', '"delta":[' + '[' * 3000, 1)
    cache.delete(store_key)
    cache.tiers.insert(store_key, text.encode())
    monkeypatch.setenv("AOTCACHE_STRICT", "1")
    with pytest.raises(CacheFault, match="unusable fingerprint alias record"):
        aotcache.aot_module(SetsMode(), "nop", cache=cache)(torch.ones(2, 4))


def test_a_value_torch_reads_from_the_process_is_not_replayed_into_another_process(tmp_path):
    # found in review: `self.threads = torch.get_num_threads()` was recorded in a process with 2 threads and
    # replayed as 2 in a process with 1; torch's per-process readers now make the fingerprint untrusted
    cold = _run(tmp_path, "threads", 1, "2")
    _assert_eager(cold)
    warm = _run(tmp_path, "threads", 1, "1")
    _assert_eager(warm)
    assert "fingerprint_replay" not in warm and "fingerprint_hit" not in warm, warm


def test_a_value_picked_by_a_sets_iteration_order_is_the_warm_processes_own(tmp_path):
    # a known limit until session 23 (the fingerprint held a set of str by its sorted members, so the value the
    # cold process picked was replayed); the set's iteration order is now part of the fingerprint
    _assert_eager(_run(tmp_path, "set_order", 1, env={"PYTHONHASHSEED": "1"}))
    warm = _run(tmp_path, "set_order", 1, env={"PYTHONHASHSEED": "2"})  # iterates the set in another order
    _assert_eager(warm)
    assert "fingerprint_replay" not in warm, warm


@pytest.mark.parametrize("kind", ["env", "tag"])
def test_a_change_computed_from_a_pinned_value_replays_only_where_that_value_is_the_same(tmp_path, kind):
    def run(value):
        extra = (value,) if kind == "tag" else ()
        return _run(tmp_path, kind, 1, *extra, env={"REVIEW_MODE": value})

    first, other, again = run("a"), run("b"), run("a")
    for result in (first, other, again):
        _assert_eager(result)
    assert "'mode': 'b'" in other["state"] and "fingerprint_replay" not in other  # another fingerprint: traced
    assert again["fingerprint_replay"] == 1 and "'mode': 'a'" in again["state"]


def test_the_snapshot_replays_interned_strs_only():
    from aotcache.autograd_cache.state_delta import StateDelta, StateSnapshot, decode_plain, encode_plain

    literal = "single_label_classification"  # an identifier: interned by the compiler
    built = "".join(["single_label", "_classification"])  # equal to it, another object
    for value, replayable in ((literal, True), (built, False), (("a", built), False),
                              (("a", ("b", 1)), True), ("", True), ("x mode".upper(), False)):
        model = SetsMode()
        snapshot = StateSnapshot(model)
        model.mode = value
        assert isinstance(snapshot.delta(), StateDelta) == replayable, value
    assert decode_plain(encode_plain(built)) is literal  # a replay writes this process's interned object
