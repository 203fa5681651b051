"""Modules a program looks up by name instead of importing them (NOTE [Modules looked up by name] in
aotcache/autograd_cache/code_reading.py; found in session 20): ``importlib.import_module("cfg").K``,
``__import__("cfg").K``, ``sys.modules["cfg"].K``. A changed attribute or a module put in the name's place gives
eager's result in-process and another fingerprint across processes; an unchanged one keeps the graph."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

import aotcache
from aotcache.autograd_cache.fingerprint import code_fingerprint

X = torch.ones(3)
CONFIG = "aotcache_test_looked_up_config"


def by_import_module(x):
    return x * importlib.import_module("aotcache_test_looked_up_config").K


def by_dunder_import(x):
    return x * __import__("aotcache_test_looked_up_config").K


def by_sys_modules(x):
    return x * sys.modules["aotcache_test_looked_up_config"].K


def by_sys_modules_get(x):
    return x * sys.modules.get("aotcache_test_looked_up_config").K


SCALE = 2.0


def by_own_module(x):
    return x * sys.modules[__name__].SCALE


LOOKUPS = [by_import_module, by_dunder_import, by_sys_modules, by_sys_modules_get]


@pytest.fixture
def config(monkeypatch):
    module = types.ModuleType(CONFIG)
    module.K = 2.0
    monkeypatch.setitem(sys.modules, CONFIG, module)
    return module


@pytest.mark.parametrize("fn", LOOKUPS, ids=lambda fn: fn.__name__)
def test_attribute_of_a_looked_up_module_changed_retraces_and_unchanged_keeps_the_graph(fn, config, monkeypatch):
    compiled = aotcache.aot_function(fn, "nop", cache=False)
    torch.testing.assert_close(compiled(X), X * 2)
    compiled(X)
    assert compiled.num_compiles == 1
    monkeypatch.setattr(config, "K", 5.0)
    torch.testing.assert_close(compiled(X), X * 5)  # was X * 2
    assert compiled.num_compiles == 2
    replacement = types.ModuleType(CONFIG)
    replacement.K = 7.0
    monkeypatch.setitem(sys.modules, CONFIG, replacement)  # another module under the name
    torch.testing.assert_close(compiled(X), X * 7)
    assert compiled.num_compiles == 3


def test_the_functions_own_module_looked_up_is_guarded(monkeypatch):
    compiled = aotcache.aot_function(by_own_module, "nop", cache=False)
    torch.testing.assert_close(compiled(X), X * 2)
    monkeypatch.setitem(globals(), "SCALE", 3.0)
    torch.testing.assert_close(compiled(X), X * 3)


@pytest.mark.parametrize("fn", LOOKUPS, ids=lambda fn: fn.__name__)
def test_the_fingerprint_holds_what_the_code_reads_of_a_looked_up_module(fn, config, monkeypatch):
    first = code_fingerprint(fn)
    monkeypatch.setattr(config, "K", 5.0)
    second = code_fingerprint(fn)
    monkeypatch.setattr(config, "K", 2.0)
    again = code_fingerprint(fn)
    assert first.trusted and second.trusted, first.reason
    assert first.digest != second.digest and first.digest == again.digest


def test_a_module_looked_up_by_a_computed_name_leaves_the_fingerprint_untrusted(config):
    name = CONFIG

    def by_computed_name(x):
        return x * importlib.import_module(name).K

    fingerprint = code_fingerprint(by_computed_name)
    assert not fingerprint.trusted and "computed name" in fingerprint.reason, fingerprint.reason


def test_a_modules_method_attribute_keeps_the_fingerprint_trusted():
    def reads_submodules(model, x):  # ``model.modules()`` is no lookup in sys.modules
        return x * len(list(model.modules()))

    assert code_fingerprint(reads_submodules).trusted
