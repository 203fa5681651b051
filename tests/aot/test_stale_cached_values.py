"""Values a ``functools.lru_cache`` / ``functools.cache`` function returns from its cache (NOTE [Values an lru_cache
holds] in autograd_cache/lru_cache_values.py): after ``cache_clear()`` eager computes from the state as it is, and
so must a compiled call (it kept the graph traced with the cached value); a clear that changes nothing keeps the
graph."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import aotcache
from tests.conftest import run_python

X = torch.ones(2, 4)

_ROUTES = {
    "aot_module": lambda model: aotcache.aot_module(model, "nop", cache=False),
    "compile": lambda model: aotcache.compile(model, compiler="nop", cache=False),
}

SETTINGS = {"scale": 2.0}


@functools.lru_cache(maxsize=None)
def configured_scale() -> float:
    return SETTINGS["scale"]


@functools.lru_cache(maxsize=4)
def configured_offset(base: float, *, bias: float = 0.0) -> float:
    return base + bias + SETTINGS["scale"]


class ScaledByTheCachedSetting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * configured_scale()


class ShiftedByABoundedCache(ScaledByTheCachedSetting):
    def forward(self, x):
        return self.lin(x) + configured_offset(1.0, bias=0.5)


class ScaledByACachedMethod(ScaledByTheCachedSetting):
    @functools.cache
    def scale(self) -> float:
        return SETTINGS["scale"] * 3

    def forward(self, x):
        return self.lin(x) * self.scale()


def _compiles(compiled) -> int:
    return compiled.compiled.num_compiles


@pytest.fixture(autouse=True)
def fresh_settings():
    SETTINGS["scale"] = 2.0
    for cached in (configured_scale, configured_offset):
        cached.cache_clear()
    yield
    SETTINGS["scale"] = 2.0


@pytest.mark.parametrize("route", list(_ROUTES))
@pytest.mark.parametrize("model_class", [ScaledByTheCachedSetting, ShiftedByABoundedCache, ScaledByACachedMethod])
def test_a_cache_cleared_after_the_setting_changed_gives_eagers_new_value(route, model_class):
    model = model_class()
    compiled = _ROUTES[route](model)
    torch.testing.assert_close(compiled(X), model(X))
    SETTINGS["scale"] = 5.0  # the cache still holds the old value: eager keeps it
    torch.testing.assert_close(compiled(X), model(X))
    (model.scale if model_class is ScaledByACachedMethod else
     configured_offset if model_class is ShiftedByABoundedCache else configured_scale).cache_clear()
    expected = model(X)  # eager computes the new value (and caches it)
    torch.testing.assert_close(compiled(X), expected)  # was the old value's graph
    torch.testing.assert_close(compiled(X), model(X))


@pytest.mark.parametrize("route", list(_ROUTES))
def test_a_cache_filled_by_the_capture_or_cleared_without_a_change_keeps_the_graph(route):
    model = ScaledByTheCachedSetting()
    compiled = _ROUTES[route](model)
    torch.testing.assert_close(compiled(X), model(X))  # the capture filled the cache
    torch.testing.assert_close(compiled(X), model(X))
    configured_scale(); configured_scale()  # hits outside the compiled call write nothing
    torch.testing.assert_close(compiled(X), model(X))
    assert _compiles(compiled) == 1
    configured_scale.cache_clear()  # the same setting: eager computes the same value (the first program's)
    torch.testing.assert_close(compiled(X), model(X))
    assert _compiles(compiled) == 1


WARM_START_SCRIPT = """
import functools, torch
from torch import nn
import aotcache
from aotcache.autograd_cache.cache import default_cache

SETTINGS = {"scale": 2.0}


@functools.lru_cache(maxsize=None)
def configured_scale():
    return SETTINGS["scale"]


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * configured_scale()


model, x = Scaled(), torch.ones(2, 4)
compiled = aotcache.compile(model, compiler="nop")
for _ in range(2):
    torch.testing.assert_close(compiled(x), model(x))
print(compiled.route, default_cache().stats()["compile"], min(default_cache().counters.get("fingerprint_hit", 0), 1))
"""


def test_a_program_calling_a_cached_function_starts_warm():
    """The capture fills the cache; the fingerprint after it must still be the one before (else no warm-start
    alias: every warm process traced)."""
    assert run_python(WARM_START_SCRIPT).stdout.split()[-3:] == ["aot", "1", "0"]  # compiled once
    assert run_python(WARM_START_SCRIPT).stdout.split()[-3:] == ["aot", "0", "1"]  # loaded by its fingerprint
