"""Generic caches (no torch): memory, disk and Redis tiers, their composition, framing and stats journal.

``Cache`` is the contract: ``get(key) -> value | None``, ``insert(key, value) -> bool`` (never overwrites).
Names are imported lazily so that ``import aotcache.store`` does not pull in redis-py or filelock.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Cache": "aotcache.store.interface",
    "AsyncCache": "aotcache.store.interface",
    "CacheError": "aotcache.store.interface",
    "Lookup": "aotcache.store.interface",
    "LookupStatus": "aotcache.store.interface",
    "TierStats": "aotcache.store.interface",
    "EntryInfo": "aotcache.store.interface",
    "key_digest": "aotcache.store.interface",
    "Key": "aotcache.store.interface",
    "Value": "aotcache.store.interface",
    "InMemoryCache": "aotcache.store.memory",
    "OnDiskCache": "aotcache.store.disk",
    "RedisCache": "aotcache.store.redis",
    "TieredCache": "aotcache.store.tiered",
    "ReadOnly": "aotcache.store.tiered",
    "open_tiers": "aotcache.store.factory",
    "StatsJournal": "aotcache.store.journal",
    "FrameError": "aotcache.store.frame",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aotcache.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
