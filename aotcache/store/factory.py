"""open_tiers: the configured stack of cache tiers (memory, disk, Redis) as one TieredCache.

Reads config at call time: ``tiers``, ``cache_dir``, ``max_bytes``, ``secret``, ``compress_min_bytes``,
``redis_url``, ``redis_timeout``, ``redis_ttl``, ``enabled``. The Redis tier is skipped when no
``redis_url`` is set; with ``enabled`` false the result has no tiers (every lookup misses).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from aotcache import config
from aotcache.logs import logger
from aotcache.store.interface import Cache, CacheError
from aotcache.store.journal import StatsJournal
from aotcache.store.tiered import TieredCache

__all__ = ["TIER_NAMES", "open_tiers", "open_tier", "resolve_tier_names", "redis_prefix"]

TIER_NAMES = ("memory", "disk", "redis")
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise CacheError(f"cache namespace {namespace!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (e.g. 'aot' or 'eager-kernels')")
    return namespace


def redis_prefix(namespace: str) -> str:
    """The Redis key prefix of a namespace: ``aotcache:<namespace>`` (RedisCache adds the frame version)."""
    return f"aotcache:{_check_namespace(namespace)}"


def resolve_tier_names(tiers: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """Tier names from ``tiers`` ("memory,disk" or a sequence), or config ``tiers`` when None; validated.

    :raises CacheError: an unknown or repeated tier name, or an empty list.
    """
    if tiers is None:
        names = tuple(config.get("tiers"))
    elif isinstance(tiers, str):
        names = tuple(part.strip().lower() for part in tiers.split(",") if part.strip())
    else:
        names = tuple(str(part).strip().lower() for part in tiers)
    unknown = [name for name in names if name not in TIER_NAMES]
    if unknown or not names or len(set(names)) != len(names):
        raise CacheError(f"invalid cache tiers {list(names)!r}: give each of {', '.join(TIER_NAMES)} at most "
                         "once, fastest first (e.g. AOTCACHE_TIERS=memory,disk,redis)")
    return names


def open_tier(name: str, *, namespace: str = "default") -> Cache[Any, Any] | None:
    """One tier by name, configured from config; None for ``redis`` when no ``redis_url`` is set.

    :raises CacheError: an unknown tier name, a bad namespace, or an invalid Redis URL / timeout.
    """
    _check_namespace(namespace)
    if name == "memory":
        from aotcache.store.memory import InMemoryCache

        return InMemoryCache()
    if name == "disk":
        from aotcache.store.disk import OnDiskCache

        # OnDiskCache reads cache_dir, max_bytes, secret and compress_min_bytes from config itself.
        return OnDiskCache(namespace)
    if name == "redis":
        url = config.get("redis_url")
        if not url:
            logger.debug("aotcache: no redis_url set; the redis tier is skipped")
            return None
        from aotcache.store.redis import RedisCache

        return RedisCache(url, prefix=redis_prefix(namespace))
    raise CacheError(f"unknown cache tier {name!r}; use one of {', '.join(TIER_NAMES)}")


def open_tiers(tiers: str | Sequence[str] | None = None, *, namespace: str = "default",
               journal: StatsJournal | None = None, write_policy: str = "all") -> TieredCache:
    """A TieredCache over the configured tiers (or ``tiers``), fastest first, for ``namespace``.

    ``namespace`` separates independent caches (a disk sub-directory and a Redis key prefix). With
    ``journal`` (e.g. :func:`aotcache.store.journal.default_journal`), per-tier counters are fed to it.

    :raises CacheError: invalid tier names, namespace, write policy, or Redis settings.
    """
    _check_namespace(namespace)
    names = resolve_tier_names(tiers)
    built: list[Cache[Any, Any]] = []
    if config.get("enabled"):
        for name in names:
            tier = open_tier(name, namespace=namespace)
            if tier is not None:
                built.append(tier)
    else:
        logger.debug("aotcache: the cache is disabled (AOTCACHE_ENABLED=0); no tiers are opened")
    gate = None
    if any(tier.name == "disk" for tier in built) and any(getattr(tier, "remote", False) for tier in built):
        from pathlib import Path

        from aotcache.store.fanout import FetchGate

        # NOTE [per-machine fan-out]: processes sharing this cache dir download a remote entry once
        gate = FetchGate(Path(config.get("cache_dir")) / "locks" / namespace / "fetch")
    cache = TieredCache(built, write_policy=write_policy, fetch_gate=gate)
    if journal is not None:
        cache.attach_journal(journal)
    return cache
