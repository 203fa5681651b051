"""aotcache: an ahead-of-time compiler and persistent, shareable compilation cache for PyTorch.

The store (``aotcache.store``) and ``aotcache.config`` import no torch; the compiler entry points below
are imported lazily on first use so that ``import aotcache`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first attribute access)
_LAZY = {
    "compile": "aotcache.compile_api",
    "aot_function": "aotcache.api",
    "aot_module": "aotcache.api",
    "aot_module_simplified": "aotcache.api",
    "aot_export_module": "aotcache.api",
    "aot_export_joint_simple": "aotcache.api",
    "reset": "aotcache.api",
    "default_partition": "aotcache.aot.partition",
    "min_cut_rematerialization_partition": "aotcache.aot.partition",
    "AOTAutogradCache": "aotcache.autograd_cache.cache",
    "aotcache_backend": "aotcache.backend",
}
# subpackages reachable as attributes (``aotcache.eager.precompile(...)``) without an explicit import
_SUBMODULES = ("config", "store", "aot", "compilers", "autograd_cache", "eager")

__all__ = ["__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f"aotcache.{name}")
        globals()[name] = value
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aotcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
