"""AOT Autograd: capture functionalized ATen forward/backward graphs ahead of time, partition, compile, run.

Public API (see docs/aot.md): :func:`aot_function`, :func:`aot_module`, :func:`aot_module_simplified`,
:func:`aot_export_module`, :func:`aot_export_joint_simple`; :func:`compile_function` is the single
capture-partition-compile step that the compiled-graph cache wraps.
"""

from aotcache.aot.api import (
    AOTFunction,
    AOTModule,
    AOTOptions,
    aot_function,
    aot_module,
    aot_module_simplified,
    compile_function,
)
from aotcache.aot.capture import CaptureError, CapturedGraph, capture, mutating_nodes
from aotcache.aot.fallback import fallback_counts
from aotcache.aot.export import ExportSignature, aot_export_joint_simple, aot_export_module
from aotcache.aot.metadata import InputInfo, OutputInfo, RuntimeMetadata
from aotcache.aot.runtime import CompiledRuntime, DoubleBackwardError

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
