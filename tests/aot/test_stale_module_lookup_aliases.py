"""Modules looked up by name through an alias (NOTE [Modules looked up by name] in
aotcache/autograd_cache/code_reading.py): ``import sys as _sys; _sys.modules["cfg"]``, ``from sys import modules``,
``from importlib import import_module as load``, and ``sys`` held in a closure cell. Found in session 20's review:
the lookup was recognised only under the names ``sys`` / ``import_module`` / ``__import__``, so through an alias
a changed ``cfg.K`` kept the old graph in-process (and ``_sys`` left the fingerprint trusted without ``cfg``: a
false hit across processes). Both directions: a change retraces, none keeps the graph."""

from __future__ import annotations

import sys
import sys as _sys
import types
from importlib import import_module as load_module
from sys import modules as loaded_modules

import pytest
import torch

import aotcache
from aotcache.aot import fallback_counts
from aotcache.autograd_cache.fingerprint import code_fingerprint

X = torch.ones(3)
CONFIG = "aotcache_test_aliased_lookup_config"


def through_aliased_sys(x):
    return x * _sys.modules["aotcache_test_aliased_lookup_config"].K


def through_aliased_sys_get(x):
    return x * _sys.modules.get("aotcache_test_aliased_lookup_config").K


def through_imported_modules_dict(x):
    return x * loaded_modules["aotcache_test_aliased_lookup_config"].K


def through_aliased_import_module(x):
    return x * load_module("aotcache_test_aliased_lookup_config").K


def _through_sys_in_a_closure():
    system = sys

    def reads(x):
        return x * system.modules["aotcache_test_aliased_lookup_config"].K

    return reads


ALIASED = [lambda: through_aliased_sys, lambda: through_aliased_sys_get, lambda: through_imported_modules_dict,
           lambda: through_aliased_import_module, _through_sys_in_a_closure]
IDS = ["import_sys_as", "import_sys_as_get", "from_sys_import_modules", "import_module_as", "sys_in_a_closure"]


@pytest.fixture
def config(monkeypatch):
    module = types.ModuleType(CONFIG)
    module.K = 2.0
    monkeypatch.setitem(sys.modules, CONFIG, module)
    return module


@pytest.mark.parametrize("make", ALIASED, ids=IDS)
def test_attribute_of_a_module_looked_up_through_an_alias_changed_retraces(make, config, monkeypatch):
    fn = make()
    compiled = aotcache.aot_function(fn, "nop", cache=False)
    torch.testing.assert_close(compiled(X), X * 2)
    compiled(X)
    assert compiled.num_compiles == 1  # unchanged: the graph
    monkeypatch.setattr(config, "K", 5.0)
    torch.testing.assert_close(compiled(X), X * 5)  # was X * 2 on 06950dc
    assert compiled.num_compiles == 2
    replacement = types.ModuleType(CONFIG)
    replacement.K = 7.0
    monkeypatch.setitem(sys.modules, CONFIG, replacement)
    torch.testing.assert_close(compiled(X), X * 7)


@pytest.mark.parametrize("make", [ALIASED[0], ALIASED[2], ALIASED[3], ALIASED[4]], ids=[IDS[0], IDS[2], IDS[3], IDS[4]])
def test_the_fingerprint_holds_what_the_code_reads_of_a_module_looked_up_through_an_alias(make, config, monkeypatch):
    fn = make()
    first = code_fingerprint(fn)
    monkeypatch.setattr(config, "K", 5.0)
    second = code_fingerprint(fn)
    monkeypatch.setattr(config, "K", 2.0)
    again = code_fingerprint(fn)
    assert first.trusted and second.trusted, first.reason
    assert first.digest != second.digest and first.digest == again.digest


def test_a_computed_name_through_an_aliased_sys_leaves_the_fingerprint_untrusted(config):
    name = CONFIG

    def by_computed_name(x):
        return x * _sys.modules[name].K

    fingerprint = code_fingerprint(by_computed_name)
    assert not fingerprint.trusted and "computed name" in fingerprint.reason, fingerprint.reason


def test_an_unrelated_global_named_like_an_alias_is_no_lookup():
    modules = {"aotcache_test_aliased_lookup_config": 3.0}  # a plain dict, not sys.modules

    def reads_a_dict(x):
        return x * modules["aotcache_test_aliased_lookup_config"]

    fingerprint = code_fingerprint(reads_a_dict)
    assert fingerprint.trusted, fingerprint.reason


def test_attribute_read_by_getattr_of_a_looked_up_module_changed_retraces(config, monkeypatch):
    # NOTE [Module attributes read by getattr]: a string constant counts as a name the code reads
    def by_getattr(x):
        return x * getattr(sys.modules["aotcache_test_aliased_lookup_config"], "K")

    compiled = aotcache.aot_function(by_getattr, "nop", cache=False)
    compiled(X)
    monkeypatch.setattr(config, "K", 5.0)
    torch.testing.assert_close(compiled(X), X * 5)


LAZY = "aotcache_test_module_imported_by_a_capture"
IMPORT_RUNS = "aotcache_test_module_import_runs"


def reads_sys_modules_and_imports_lazily(x):
    import aotcache_test_module_imported_by_a_capture  # noqa: F401 - first imported inside the capture
    return x * loaded_modules["aotcache_test_aliased_lookup_config"].K


def test_a_module_imported_during_the_capture_of_a_function_holding_sys_modules_stays_imported(
        config, monkeypatch, tmp_path):
    # NOTE [sys.modules as a value]: the module table was walked as a plain dict, its length and members guarded,
    # so a module imported while the capture ran (torch 2.11's make_fx imports torch.distributed.tensor the first
    # time it prints a graph) failed the guards, and the capture's put-back deleted it from sys.modules: the next
    # import ran the module again (torch's registrations raised "already registered"), eager's job with them
    runs = types.ModuleType(IMPORT_RUNS)
    runs.count = 0
    monkeypatch.setitem(sys.modules, IMPORT_RUNS, runs)
    (tmp_path / f"{LAZY}.py").write_text(f"import {IMPORT_RUNS}\n{IMPORT_RUNS}.count += 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, LAZY, raising=False)
    compiled = aotcache.aot_function(reads_sys_modules_and_imports_lazily, "nop", cache=False)
    fallbacks = sum(fallback_counts().values())
    torch.testing.assert_close(compiled(X), X * 2)
    torch.testing.assert_close(compiled(X), X * 2)
    assert LAZY in sys.modules and runs.count == 1  # imported once, kept
    assert compiled.num_compiles == 1 and sum(fallback_counts().values()) == fallbacks
    monkeypatch.setattr(config, "K", 5.0)  # the lookup is still guarded by name
    torch.testing.assert_close(compiled(X), X * 5)
    monkeypatch.delitem(sys.modules, LAZY)
