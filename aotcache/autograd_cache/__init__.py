"""The compiled-graph cache: key (named parts), safety (bypass reasons), guards (dynamic shapes).

``key``, ``safety`` and ``guards`` are the building blocks; ``cache`` (entries, try_load / save,
single-flight) is built on them. See docs/cache_key.md for what the key contains and why.
"""

from __future__ import annotations

from aotcache.autograd_cache.guards import (
    GuardExpressionError,
    describe_inputs,
    evaluate_guards,
    produce_guards_expression,
    symbolic_inputs,
    validate_guards_expression,
)
from aotcache.autograd_cache.key import (
    CacheKey,
    KeyPart,
    canonical_graph,
    compute_key,
    explain_difference,
    normalize_placeholder_names,
    system_parts,
)
from aotcache.autograd_cache.safety import (
    BypassAOTAutogradCache,
    cacheable,
    check_cacheable,
    check_node_safe,
)

__all__ = [
    "BypassAOTAutogradCache",
    "CacheKey",
    "GuardExpressionError",
    "KeyPart",
    "cacheable",
    "canonical_graph",
    "check_cacheable",
    "check_node_safe",
    "compute_key",
    "describe_inputs",
    "evaluate_guards",
    "explain_difference",
    "normalize_placeholder_names",
    "produce_guards_expression",
    "symbolic_inputs",
    "system_parts",
    "validate_guards_expression",
]
