"""AOT Autograd: capture functionalized ATen forward/backward graphs ahead of time, partition, compile, run.

The core lives here: :class:`AOTFunction`, :class:`AOTModule`, :func:`compile_function` (the single
capture-partition-compile step that the compiled-graph cache wraps), :func:`capture` and the exports. The
public entry points that add the cache, :func:`aotcache.aot_function`, :func:`aotcache.aot_module` and
:func:`aotcache.aot_module_simplified`, are defined in :mod:`aotcache.api` (see docs/aot.md).

NOTE [Public names re-exported lazily]
``from aotcache.aot import aot_function`` (and ``aot_module``, ``aot_module_simplified``) keeps working: the
names resolve, on first access, to :mod:`aotcache.api`'s. The lookup happens only then, so importing this
package or any module in it never imports the cache layer (NOTE [Compile services] in ``services.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

from aotcache.aot.api import AOTFunction
from aotcache.aot.compile_step import AOTOptions, compile_function
from aotcache.aot.capture import CaptureError, CapturedGraph, capture, mutating_nodes
from aotcache.aot.export import ExportSignature, aot_export_joint_simple, aot_export_module
from aotcache.aot.fallback import fallback_counts
from aotcache.aot.metadata import InputInfo, OutputInfo, RuntimeMetadata
from aotcache.aot.module import AOTModule
from aotcache.aot.double_backward import DoubleBackwardError
from aotcache.aot.runtime import CompiledRuntime

_PUBLIC_ENTRY_POINTS = ("aot_function", "aot_module", "aot_module_simplified")

__all__ = [
    "AOTFunction",
    "AOTModule",
    "AOTOptions",
    "CaptureError",
    "CapturedGraph",
    "CompiledRuntime",
    "DoubleBackwardError",
    "ExportSignature",
    "InputInfo",
    "OutputInfo",
    "RuntimeMetadata",
    "aot_export_joint_simple",
    "aot_export_module",
    "aot_function",
    "aot_module",
    "aot_module_simplified",
    "capture",
    "compile_function",
    "fallback_counts",
    "mutating_nodes",
]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC_ENTRY_POINTS:  # NOTE [Public names re-exported lazily]
        value = getattr(importlib.import_module("aotcache.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aotcache.aot' has no attribute {name!r}")
