"""Installed packages imported under another name than their distribution's (``_pytest``, ``yaml``, ``PIL``) are
library code, pinned by their distribution's version (NOTE [Import names that are not distribution names])."""

from __future__ import annotations

import importlib
import sys
import uuid

import pytest
import torch
from torch.utils import _pytree as pytree

from aotcache.aot.api import AOTOptions
from aotcache import code_origin
from aotcache.autograd_cache.fingerprint import fingerprint_call


def _install(site, dist, version, *, top_level=None, record=None):
    """A distribution's metadata in ``site`` (its top-level names in ``top_level.txt``, or only in ``RECORD``)."""
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    if top_level is not None:
        (info / "top_level.txt").write_text("".join(f"{name}\n" for name in top_level))
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in record or ()))
    return info


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh site-packages directory on ``sys.path``, with the lookups' memos cleared before and after."""
    directory = tmp_path / "lib" / "site-packages"
    directory.mkdir(parents=True)
    monkeypatch.syspath_prepend(str(directory))
    importlib.invalidate_caches()
    code_origin.installed_distribution.cache_clear()
    code_origin._site_top_level_versions.cache_clear()
    yield directory
    code_origin.installed_distribution.cache_clear()
    code_origin._site_top_level_versions.cache_clear()


def _names(*stems):
    suffix = uuid.uuid4().hex[:8]
    return [f"aotc_{stem}_{suffix}" for stem in stems]


def test_import_names_other_than_the_distributions_are_library_code_with_its_version(site):
    package, module, shared, local = _names("pkg", "mod", "ns", "local")
    (site / package).mkdir()
    (site / package / "__init__.py").write_text("def f(t):\n    return t * 2\n")
    (site / f"{module}.py").write_text("def g(t):\n    return t + 1\n")
    _install(site, "acme-dist", "1.2", top_level=[package, shared])  # names in top_level.txt
    _install(site, "beta-dist", "3.0", record=[f"{module}.py", f"{shared}/b.py", "beta_dist-3.0.dist-info/RECORD"])
    (site / shared).mkdir()
    try:
        importlib.import_module(package), importlib.import_module(module)
        assert code_origin.is_library(f"{package}.sub") and code_origin.library_version(package) == "@1.2"
        assert code_origin.is_library(module) and code_origin.library_version(module) == "@3.0"
        # a namespace package two distributions share is pinned by both
        assert code_origin.library_version(shared) == "@acme-dist==1.2+beta-dist==3.0"
        # a module in site-packages that no distribution names is still the program's (walked, not named)
        (site / f"{local}.py").write_text("X = 1\n")
        importlib.import_module(local)
        assert not code_origin.is_library(local)
        assert code_origin.is_library("_pytest") and code_origin.library_version("_pytest").startswith("@")
    finally:
        for name in (package, module, local):
            sys.modules.pop(name, None)


def _fingerprint(fn):
    flat, spec = pytree.tree_flatten(((torch.ones(3),), {}))
    return fingerprint_call(fn, flat, spec, AOTOptions())


@pytest.mark.parametrize("reached", ["module_global", "function_global", "body_import"])
@pytest.mark.parametrize("naming", ["same_name", "other_name"])
def test_a_library_is_fingerprinted_by_its_version(site, naming, reached):
    """NOTE [Library versions in every library token], both directions: another version of the distribution
    changes the fingerprint (a library function reached through its module did not carry it: a warm process
    after an upgrade loaded the old version's graph), the same version leaves it (the library is not read)."""
    (package,) = _names("versioned")
    (site / package).mkdir()
    (site / package / "__init__.py").write_text("def f(t):\n    return t * 2\n")
    dist = package if naming == "same_name" else "acme-versioned"
    info = _install(site, dist, "1.0", top_level=[package] if naming == "other_name" else None)
    try:
        library = importlib.import_module(package)
        namespace: dict = {}
        source = {"module_global": f"import {package}\ndef forward(x):\n    return {package}.f(x) + 1\n",
                  "function_global": f"from {package} import f\ndef forward(x):\n    return f(x) + 1\n",
                  "body_import": f"def forward(x):\n    import {package}\n    return {package}.f(x) + 1\n"}[reached]
        exec(source, namespace)
        forward = namespace["forward"]
        first = _fingerprint(forward)
        assert code_origin.is_library(package)
        assert _fingerprint(forward) == first

        # the same version: the library's code is pinned by it, not read (a module-level helper it adds is unseen)
        library.helper_added_later = lambda t: t
        code_origin.installed_distribution.cache_clear()
        code_origin._site_top_level_versions.cache_clear()
        assert _fingerprint(forward) == first

        # another version of the distribution: another fingerprint
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.1\n")
        info.rename(site / f"{dist.replace('-', '_')}-1.1.dist-info")
        code_origin.installed_distribution.cache_clear()
        code_origin._site_top_level_versions.cache_clear()
        assert code_origin.library_version(package) == "@1.1"
        assert _fingerprint(forward) != first
    finally:
        sys.modules.pop(package, None)


@pytest.mark.parametrize("imported_first", [False, True])
def test_a_namespace_package_in_site_packages_is_library_code_whether_imported_yet_or_not(site, imported_first):
    """A namespace package (no ``__init__.py``: ``__file__`` is None) was library code while unloaded (found by its
    spec's search locations) and program code once imported (only ``__file__`` was read): the same program's
    fingerprint hung on which came first in the process, and its code was walked as the program's."""
    namespace, = _names("nspkg")
    (site / namespace).mkdir()
    (site / namespace / "sub.py").write_text("def f(t):\n    return t * 2\n")
    _install(site, "nsdist", "4.5", top_level=[namespace])
    try:
        if imported_first:
            importlib.import_module(f"{namespace}.sub")
            assert getattr(sys.modules[namespace], "__file__", None) is None
        assert code_origin.is_library(f"{namespace}.sub") and code_origin.library_version(namespace) == "@4.5"
    finally:
        for name in (namespace, f"{namespace}.sub"):
            sys.modules.pop(name, None)
