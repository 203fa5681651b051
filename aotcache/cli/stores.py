"""Opening the persistent tiers for maintenance: every disk namespace under the cache dir, and Redis.

The user's jobs open one namespace at a time (``factory.open_tiers(namespace=...)``); the command line works
on all of them unless ``--namespace`` narrows it down. The memory tier lives inside each process, so there
is nothing of it to list or clear here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aotcache import config
from aotcache.store.eviction import PruneReport
from aotcache.store.interface import Cache, EntryInfo

__all__ = [
    "TierHandle",
    "store_dir",
    "disk_namespaces",
    "open_disk_tiers",
    "open_redis_tiers",
    "redis_namespaces",
    "prune_disk",
    "iter_entries",
    "close_all",
]

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # the factory's rule for namespaces


@dataclass
class TierHandle:
    """One opened tier of one namespace, as the command line addresses it (``disk/default``)."""

    tier: str
    namespace: str
    cache: Cache[Any, Any]

    @property
    def label(self) -> str:
        return f"{self.tier}/{self.namespace}"


def store_dir() -> Path:
    """``<cache_dir>/store``: the parent of every disk namespace (see ``OnDiskCache``'s default)."""
    return Path(config.get("cache_dir")) / "store"


def disk_namespaces() -> list[str]:
    """Namespaces that have a directory under :func:`store_dir`, sorted."""
    try:
        names = [entry.name for entry in os.scandir(store_dir()) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    return sorted(name for name in names if _NAMESPACE_RE.match(name))


def open_disk_tiers(namespaces: Sequence[str] | None = None, *, max_bytes: int | None = None) -> list[TierHandle]:
    """An ``OnDiskCache`` per namespace (all existing ones when ``namespaces`` is None)."""
    from aotcache.store.disk import OnDiskCache

    names = disk_namespaces() if namespaces is None else list(namespaces)
    return [TierHandle("disk", name, OnDiskCache(name, max_bytes=max_bytes)) for name in names]


def redis_namespaces(url: str) -> list[str]:
    """Namespaces holding entries in the Redis at ``url`` (keys ``aotcache:<namespace>:v<F>:{<tag>}:<digest>``).

    :raises CacheError: Redis is unreachable.
    """
    from urllib.parse import urlsplit

    import redis as redis_py

    from aotcache.store import frame
    from aotcache.store.interface import CacheError
    from aotcache.store.redis import CLUSTER_SCHEMES

    suffix = f":v{frame.FRAME_VERSION}:"
    timeout = config.get("redis_timeout")
    found: set[str] = set()
    client = None
    try:
        if urlsplit(url).scheme in CLUSTER_SCHEMES:  # redis+cluster://host:port: scan every node
            from redis.cluster import RedisCluster

            scheme, _, rest = url.partition("+cluster")
            client = RedisCluster.from_url(scheme + rest, socket_timeout=max(timeout, 1.0),
                                           socket_connect_timeout=timeout)
        else:
            client = redis_py.Redis.from_url(url, socket_timeout=max(timeout, 1.0), socket_connect_timeout=timeout)
        for name in client.scan_iter(match=f"aotcache:*{suffix}*", count=1000):
            parts = name.decode("utf-8", errors="replace").split(":")
            if len(parts) == 5 and parts[3].startswith("{") and _NAMESPACE_RE.match(parts[1]):
                found.add(parts[1])
    except (redis_py.exceptions.RedisError, redis_py.exceptions.RedisClusterException) as exc:
        raise CacheError(f"cannot list Redis at {_redacted(url)}: {exc} (is the server running? "
                         "check AOTCACHE_REDIS_URL or --redis-url)") from exc
    finally:
        if client is not None:
            client.close()
    return sorted(found)


def open_redis_tiers(namespaces: Sequence[str] | None = None) -> list[TierHandle]:
    """A ``RedisCache`` per namespace (all that hold entries when None); empty when no Redis is configured.

    :raises CacheError: a malformed URL, or Redis unreachable while discovering namespaces.
    """
    url = config.get("redis_url")
    if not url:
        return []
    from aotcache.store.factory import redis_prefix
    from aotcache.store.redis import RedisCache

    names = redis_namespaces(url) if namespaces is None else list(namespaces)
    return [TierHandle("redis", name, RedisCache(url, prefix=redis_prefix(name))) for name in names]


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}{parts.path}"


def close_all(handles: Sequence[TierHandle]) -> None:
    """Close every opened tier (flushes the disk tiers' usage counters)."""
    for handle in handles:
        handle.cache.close()


# ----------------------------------------------------------------------------------------------------
# Prune: one LRU order across every disk namespace
# ----------------------------------------------------------------------------------------------------


def prune_disk(handles: Sequence[TierHandle], max_bytes: int, *, dry_run: bool = False,
               libraries: bool = False, recency: dict[str, dict[str, int]] | None = None) -> PruneReport:
    """Remove least recently used entries, across ``handles``, until their total is at most ``max_bytes``.

    The most recently used entries are kept, as many as fit in the bound (no hysteresis: the bound asked
    for is the bound reached). A reader that has an entry open keeps reading it; a later lookup of a
    removed entry is a miss.

    NOTE [one LRU order across namespaces]
    Each namespace is its own ``OnDiskCache``, which prunes itself (``OnDiskCache.prune``: files and rows,
    its usage counter resynced, an entry read meanwhile kept). For several namespaces, one listing in LRU
    order decides how many bytes each namespace keeps; pruning each namespace down to that budget removes
    exactly the globally least recently used entries (within a namespace the two orders agree).

    With ``libraries``, the AOTInductor libraries materialized under ``<cache_dir>/aoti_libs`` count in the
    bound and take part in the same LRU order (NOTE [derived files in the bound] in
    :mod:`aotcache.store.derived_files`); they are listed in the report under namespace ``aoti_libs``.

    ``recency`` (namespace -> digest -> ns) orders some entries as if used then (NOTE [ordered with another
    entry] in :mod:`aotcache.store.eviction`).

    :raises OSError: a cache directory, lock or database cannot be used.
    """
    from aotcache.store import derived_files

    recency = recency or {}
    library_infos = derived_files.entries() if libraries else []
    if len(handles) == 1 and not library_infos:
        return handles[0].cache.prune(max_bytes, dry_run=dry_run,  # type: ignore[attr-defined]
                                      recency=recency.get(handles[0].namespace))
    listed: list[tuple[EntryInfo, TierHandle | None]] = [(info, handle) for handle, info in iter_entries(handles)]
    listed += [(info, None) for info in library_infos]
    total = sum(info.size for info, _ in listed)
    result = PruneReport(max_bytes=max_bytes, dry_run=dry_run, entries_before=len(listed), bytes_before=total,
                         bytes_after=total)
    if total <= max_bytes:
        return result
    def order(pair: tuple[EntryInfo, TierHandle | None]) -> tuple[float, str]:
        info, handle = pair
        override = recency.get(handle.namespace, {}).get(info.digest) if handle is not None else None
        return (info.last_access if override is None else override / 1e9, info.digest)

    listed.sort(key=order)  # oldest first
    budgets = {handle.namespace: 0 for handle in handles}
    for info, handle in listed:
        if handle is not None:
            budgets[handle.namespace] += info.size
    remaining = total
    for info, handle in listed:
        if remaining <= max_bytes:
            break
        remaining -= info.size
        if handle is not None:
            budgets[handle.namespace] -= info.size
        elif dry_run:
            result.removed.append(info)
            result.bytes_after -= info.size
        elif derived_files.remove(info):  # a library used since the listing is kept
            result.removed.append(info)
            result.bytes_after -= info.size
    bytes_before_by_namespace = {handle.namespace: 0 for handle in handles}
    for info, handle in listed:
        if handle is not None:
            bytes_before_by_namespace[handle.namespace] += info.size
    for handle in handles:
        if budgets[handle.namespace] < bytes_before_by_namespace[handle.namespace]:
            report = handle.cache.prune(budgets[handle.namespace], dry_run=dry_run,  # type: ignore[attr-defined]
                                        recency=recency.get(handle.namespace))
            result.removed += report.removed
            result.bytes_after -= report.bytes_before - report.bytes_after
    result.removed.sort(key=lambda info: (info.last_access, info.digest))
    return result


def iter_entries(handles: Sequence[TierHandle]) -> Iterator[tuple[TierHandle, EntryInfo]]:
    """Every entry of every handle, with the handle it came from.

    Disk entries are listed without counting as use (``OnDiskCache.entries()`` reads files with O_NOATIME
    and rows without touching their recency), so an ``ls`` before a ``prune`` does not change what goes.
    """
    for handle in handles:
        for info in handle.cache.entries():
            yield handle, info
