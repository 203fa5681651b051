"""Per-op precompiled kernel cache (AOTI eager): precompile an op for a call signature, dispatch to it.

``precompile(op, args, kwargs)`` compiles one op overload for one signature with AOTInductor into a
persistent per-op index; ``enable(ops)`` / ``enabled(ops)`` make eager CPU calls whose arguments match an
entry run that kernel (falling back to the stock kernel otherwise); ``disable()`` restores the stock kernels;
``stats()`` counts hits, misses, fallbacks, load errors and compiles. See docs/eager.md.
"""

from aotcache.eager.dispatch import (
    disable,
    enable,
    enabled,
    enabled_ops,
    precompile,
    reset_stats,
    resolve_op,
    stats,
)
from aotcache.eager.manage import clear, list_entries, precompile_from_spec
from aotcache.eager.meta import UnsupportedArgumentError, UnsupportedOperatorError

__all__ = [
    "precompile",
    "enable",
    "enabled",
    "disable",
    "enabled_ops",
    "stats",
    "reset_stats",
    "resolve_op",
    "list_entries",
    "precompile_from_spec",
    "clear",
    "UnsupportedArgumentError",
    "UnsupportedOperatorError",
]
