"""Real transformers models (tiny random configs) through aotcache's public entry points, as a new user runs them:
each test is a bug found that way, kept in the shape it was found (nop compiler, CPU)."""

from __future__ import annotations

import pytest
import torch

import aotcache
from aotcache.autograd_cache.cache import resolve_cache
from tests.aot.tiny_transformers import tiny_roberta_classifier


def test_a_warm_start_makes_the_config_change_eager_makes_on_the_first_call_with_labels():
    # NOTE [State changed by the call]: transformers' sequence classifiers set config.problem_type on the first
    # call with labels; a warm start through the fingerprint alias used to skip that, leaving it None for good
    ids, labels = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2])
    cold = aotcache.compile(tiny_roberta_classifier(), compiler="nop")
    cold(input_ids=ids, labels=labels).loss.backward()
    assert cold.config.problem_type == "single_label_classification"
    counters = resolve_cache(True).counters
    assert counters["fingerprint_state_changed"] == 1
    cold(input_ids=ids, labels=labels)  # the new state: traced again (same graph: a hit), its alias recorded
    assert counters["fingerprint_state_changed"] == 1 and counters["compile"] == 1

    eager, fresh = tiny_roberta_classifier(), tiny_roberta_classifier()  # as in a new process: config unset
    warm = aotcache.compile(fresh, compiler="nop")
    hits = counters["hit"]
    loss = warm(input_ids=ids, labels=labels).loss
    expected = eager(input_ids=ids, labels=labels).loss
    assert fresh.config.problem_type == eager.config.problem_type == "single_label_classification"
    assert torch.allclose(loss, expected) and warm.route == "aot"
    assert counters["hit"] == hits + 1 and counters["compile"] == 1  # loaded by its full key, not compiled
    warm(input_ids=ids, labels=labels)  # the new state's own alias, recorded by the cold model's second call
    assert counters["fingerprint_hit"] == 1 and counters["compile"] == 1
