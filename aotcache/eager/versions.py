"""What a precompiled op kernel depends on: aotcache format, torch build, machine, CPU ISA, C++ compiler.

The host / build identity comes from :mod:`aotcache.compilers.aoti_lib` (shared with the ``aoti`` graph
compiler); this module adds the per-op cache's own format and the aotcache version.

NOTE [which versions gate a load]: an entry is loaded only when its format and aotcache version equal this
process's and :func:`aoti_lib.check_identity` accepts its build identity (same torch build and machine, an
ISA this CPU has: an AVX-512 library faults with SIGILL on an AVX2 machine). The compiler that built it is
recorded and is part of the entry's identity (two compilers give two entries), but does not gate loading:
a shared library needs no compiler to run, and deployment machines often have none.
"""

from __future__ import annotations

from typing import Any

import aotcache
from aotcache.compilers import aoti_lib
from aotcache.compilers.base import ArtifactError

__all__ = ["FORMAT_VERSION", "runtime_versions", "build_versions", "incompatibility"]

#: Version of the on-disk layout of the per-op kernel cache (index fields, sidecars, library naming).
#: 2: entries record the default dtype they were built under (NOTE [Default dtype of a kernel] in meta.py);
#: entries of format 1 are skipped as stale, since the default dtype they baked in is unknown.
FORMAT_VERSION = 2


def _own_versions() -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "aotcache": aotcache.__version__}


def runtime_versions(device: str = "cpu") -> dict[str, Any]:
    """This process's versions (cheap: no Inductor import, no subprocess), for listings and messages."""
    return {**_own_versions(), **aoti_lib.host_identity(device)}


def build_versions(device: str = "cpu") -> dict[str, Any]:
    """Versions recorded with a freshly built kernel (imports Inductor: the vector ISA and the compiler)."""
    return {**_own_versions(), **aoti_lib.build_identity(device)}


def incompatibility(entry_versions: Any, device: str = "cpu") -> str | None:
    """Why a kernel built under ``entry_versions`` cannot be loaded here, or None when it can."""
    if not isinstance(entry_versions, dict):
        return "the entry records no versions (written by another tool or an older format)"
    for name, value in _own_versions().items():
        if entry_versions.get(name) != value:
            return f"built for {name} {entry_versions.get(name)!r}, this process has {value!r}"
    try:
        aoti_lib.check_identity(entry_versions, device)
    except ArtifactError as exc:
        return str(exc)
    return None
