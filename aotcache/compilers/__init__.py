"""Graph compilers: ``nop`` (runs the FX graph), ``inductor`` (Python-wrapper code), ``aoti`` (a shared library).

Each turns an ATen FX graph into a CompiledGraph whose artifact bytes reload in a fresh process.
"""

from aotcache.compilers.base import (
    COMPILER_NAMES,
    Artifact,
    ArtifactError,
    CompiledGraph,
    Compiler,
    get_compiler,
    load_artifact,
    pack_artifact,
    unpack_artifact,
)

__all__ = [
    "COMPILER_NAMES",
    "Artifact",
    "ArtifactError",
    "CompiledGraph",
    "Compiler",
    "get_compiler",
    "load_artifact",
    "pack_artifact",
    "unpack_artifact",
]
