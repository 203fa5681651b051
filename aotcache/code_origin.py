"""Where code comes from: the library (torch and its companions, aotcache, the standard library, installed
distributions: named by version, never read) or the user's program (read and guarded).

One rule for every layer: the fingerprint's walk (:mod:`aotcache.autograd_cache.value_kinds`) and the reuse
signature's code arguments (NOTE [Code passed as an argument] in aot/signature.py) both decide by it. Imports
nothing of aotcache or torch.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import sys
import types

__all__ = ["is_library", "is_core_library", "library_version", "installed_distribution", "defining_module"]

_LIBRARY_ROOTS = frozenset({"torch", "functorch", "numpy", "sympy", "triton", "aotcache", "typing_extensions"})


def is_library(module_name: str | None) -> bool:
    """Code named, not traversed: torch, the standard library, and installed third-party distributions."""
    return is_core_library(module_name) or installed_distribution((module_name or "").split(".")[0]) is not None


def is_core_library(module_name: str | None) -> bool:
    """torch (and its companions), aotcache and the standard library: pinned by the versions in the key."""
    root = (module_name or "").split(".")[0]
    # code without a module name (exec'd into a bare namespace) is user code: it is read, never just named
    return root in _LIBRARY_ROOTS or root in sys.stdlib_module_names or root == "builtins"


# NOTE [Library versions in every library token]
# Library code is named, not read, so the name must carry what pins its behaviour: the version of the
# distribution that installed it. Classes and functions walked as values carried it, but a library function reached
# through its module (``import einops`` then ``einops.rearrange(x, ...)``: the module global's token lists what the
# code reads of it by qualified name) and a library module held as a value did not: after ``pip install -U`` of
# that library, a warm process found the same fingerprint and loaded the graph traced with the old version's
# code (session 22). Every library token now ends in the version (``@1.2``; "" where there is none: the standard
# library, user code).
def library_version(module_name: str | None) -> str:
    """``@<version>`` for code of an installed distribution (torch included), "" for the stdlib and user code."""
    version = installed_distribution((module_name or "").split(".")[0])
    return f"@{version}" if version else ""


@functools.lru_cache(maxsize=None)
def installed_distribution(root: str) -> str | None:
    """The version of the installed (non-editable) distribution that provides top-level module ``root``.

    NOTE [Installed packages are pinned by version] Code of a package installed into site-packages (e.g.
    transformers) is treated like torch's: named with its version, not traversed (traversing transformers'
    registries reaches hundreds of functions and costs ~0.1 s). Memoized per process: where a top-level
    module lives does not change under a running program. Editable installs and scripts are user code.
    """
    module = sys.modules.get(root)
    # a namespace package has no ``__file__``: its first search location, as the unloaded spec gives it (else it
    # was library code before its import and the program's after, within one process)
    path = ((getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or ()), None))
            if module is not None else _unloaded_origin(root)) or ""
    if not path or not any(part in ("site-packages", "dist-packages") for part in path.split(os.sep)):
        return None
    try:
        return importlib.metadata.version(root)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pass
    # NOTE [Import names that are not distribution names]
    return _site_top_level_versions(_site_directory(path)).get(root)


def _site_directory(path: str) -> str:
    """The site-packages (or dist-packages) directory that ``path`` lies in."""
    parts = path.split(os.sep)
    last = max(i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages"))
    return os.sep.join(parts[:last + 1])


# NOTE [Import names that are not distribution names]
# Many packages are imported under another name than the one they are installed as: ``_pytest`` (pytest),
# ``yaml`` (PyYAML), ``PIL`` (pillow), ``sklearn`` (scikit-learn), ``attr`` (attrs). Looked up by their import
# name they had no version, so their code was walked as the program's own: slowly, and a forward with an
# ``assert`` in a pytest test module reached pytest's session state through the rewritten assert's helpers,
# which the capture then refused as Python state the call changes (session 22, torch 2.11 run of
# test_odd_forwards). Such a module is found among the distributions of the site directory it lies in, by their
# top-level names (``top_level.txt``, else the first part of each path in ``RECORD``); a name several
# distributions share (a namespace package like ``google``) is pinned by all their versions. Read once per site
# directory and process (~0.1 s), only when a module under one is not a distribution's own name.
@functools.lru_cache(maxsize=None)
def _site_top_level_versions(site_dir: str) -> dict[str, str]:
    """Top-level import name -> the version(s) of the distribution(s) in ``site_dir`` that provide it."""
    providers: dict[str, set[str]] = {}
    try:
        distributions = list(importlib.metadata.distributions(path=[site_dir]))
    except OSError:
        return {}
    for distribution in distributions:
        try:
            name, version = distribution.metadata["Name"], distribution.version
            top_level = distribution.read_text("top_level.txt")
            names = set(top_level.split()) if top_level else _recorded_top_level_names(distribution.read_text("RECORD"))
        except (OSError, KeyError, ValueError):
            continue
        for top in names:
            providers.setdefault(top, set()).add(f"{name}=={version}")
    return {top: next(iter(pins)).split("==", 1)[1] if len(pins) == 1 else "+".join(sorted(pins))
            for top, pins in providers.items()}


def _recorded_top_level_names(record: str | None) -> set[str]:
    """The top-level modules and packages a distribution's ``RECORD`` installs."""
    names = set()
    for line in (record or "").splitlines():
        first, _, rest = line.split(",", 1)[0].partition("/")
        if rest:  # a package directory
            if not first.endswith((".dist-info", ".data")) and first not in ("__pycache__", "..", ""):
                names.add(first)
        elif first.endswith((".py", ".so", ".pyd")):  # a top-level module (an extension's name ends at its first dot)
            names.add(first.split(".", 1)[0])
    return names


def _unloaded_origin(root: str) -> str | None:
    """Where top-level module ``root`` would be imported from, found without importing it (a top-level spec
    imports nothing): an unloaded distribution is recognised as one, as it is once loaded."""
    try:
        spec = importlib.util.find_spec(root) if root else None
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and os.path.isabs(spec.origin):
        return spec.origin
    return next(iter(spec.submodule_search_locations or ()), None)


def defining_module(fn: types.FunctionType) -> str:
    """The module whose code defined ``fn`` (``functools.wraps`` copies ``__module__``, not the globals)."""
    return fn.__globals__.get("__name__") or fn.__module__ or ""
