"""TieredCache: several caches read fastest first, with backfill, write-through and per-tier stats.

``TieredCache([memory, disk, redis])`` answers a get from the first tier that hits and copies the value into
the faster tiers it passed (backfill). An insert is written through to every writable tier. A tier that fails
(Redis down, disk full, permission denied, a bug in a tier) is a fault: counted, logged once through
:func:`aotcache.logs.handle_fault`, and a miss for that tier; the other tiers keep working.
``ReadOnly(cache)`` makes a tier readable but never written (e.g. a shared Redis filled only by CI).
With a :class:`~aotcache.store.fanout.FetchGate`, the processes of one machine fetch a remote entry once
(NOTE [per-machine fan-out] in :mod:`aotcache.store.fanout`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from aotcache.logs import CacheFault, handle_fault
from aotcache.store.interface import (
    AsyncCache,
    Cache,
    CacheError,
    EntryInfo,
    Lookup,
    LookupStatus,
    TierStats,
    encode_key,
    key_digest,
)

if TYPE_CHECKING:
    from aotcache.store.fanout import FetchGate
    from aotcache.store.journal import StatsJournal

__all__ = ["TieredCache", "ReadOnly", "WRITE_POLICIES"]

T = TypeVar("T")

#: ``"all"``: write through the writable tiers (slowest first, see NOTE [insert-once across tiers]);
#: ``insert`` returns True if at least one tier stored the value now and none already held the key.
#: ``"require_all"``: the same writes, but True only if in addition no tier failed (every tier holds it).
WRITE_POLICIES = ("all", "require_all")

# Counters measured by the TieredCache around each tier call, vs. those taken from the tier's own stats.
_MEASURED_FIELDS = ("hits", "misses", "inserts", "insert_conflicts", "get_seconds", "insert_seconds")
_TIER_OWN_FIELDS = ("bytes_read", "bytes_written", "evictions", "errors", "corrupt", "unverified")

_FAILED = object()  # sentinel result of a tier call that raised (the fault was handled)
_UNSUPPORTED = object()  # sentinel result of a delete / clear the tier does not implement


class ReadOnly(Cache[Any, Any]):
    """Reads pass through to ``cache``; ``insert`` stores nothing and returns False.

    A refused insert is not an error (so that ``TieredCache([memory, disk, ReadOnly(redis)])`` just works):
    it is counted in ``rejected_inserts``. ``delete`` and ``clear`` raise :class:`CacheError`.
    The wrapper shares the wrapped tier's ``name`` and ``stats``.
    """

    def __init__(self, cache: Cache[Any, Any]) -> None:
        super().__init__()
        if not isinstance(cache, Cache):
            raise CacheError(f"ReadOnly wraps a Cache, got {type(cache).__name__}")
        self.inner = cache
        self.name = cache.name
        self.stats = cache.stats
        self.remote = getattr(cache, "remote", False)
        self._rejected = Counter[str]()
        self._lock = threading.Lock()

    @property
    def rejected_inserts(self) -> int:
        """Inserts refused because this tier is read-only."""
        return self._rejected["insert"]

    def get(self, key: Any) -> Any | None:
        """The wrapped tier's value for ``key``."""
        return self.inner.get(key)

    def lookup(self, key: Any) -> Lookup[Any]:
        """The wrapped tier's lookup."""
        return self.inner.lookup(key)

    def contains(self, key: Any) -> bool | None:
        """The wrapped tier's ``contains`` (None when it has none)."""
        contains = getattr(self.inner, "contains", None)
        return contains(key) if callable(contains) else None

    def insert(self, key: Any, value: Any) -> bool:
        """Store nothing; False (counted in ``rejected_inserts``).

        :raises CacheError: the key is not picklable (the same misuse a writable tier reports).
        """
        encode_key(key)
        with self._lock:
            self._rejected["insert"] += 1
        return False

    def delete(self, key: Any) -> bool:
        """:raises CacheError: always; the tier is read-only."""
        raise CacheError(f"the {self.name} tier is read-only here; delete from it through a writable handle")

    def clear(self) -> int:
        """:raises CacheError: always; the tier is read-only."""
        raise CacheError(f"the {self.name} tier is read-only here; clear it through a writable handle")

    def entries(self) -> Iterator[EntryInfo]:
        """The wrapped tier's entries."""
        return self.inner.entries()

    def total_bytes(self) -> int:
        """The wrapped tier's size."""
        return self.inner.total_bytes()

    def close(self) -> None:
        """Close the wrapped tier."""
        self.inner.close()


def _unique_labels(tiers: Sequence[Cache[Any, Any]]) -> tuple[str, ...]:
    """Tier names, made unique with ``#2``, ``#3``... when a name repeats (two disk tiers)."""
    seen: Counter[str] = Counter()
    labels = []
    for tier in tiers:
        seen[tier.name] += 1
        labels.append(tier.name if seen[tier.name] == 1 else f"{tier.name}#{seen[tier.name]}")
    return tuple(labels)


class _TierCounters:
    """The per-tier counters of a TieredCache: what it measured, and each tier's own stats object.

    Kept apart from the tiers so that a :class:`StatsJournal` holding it does not keep caches alive.
    """

    def __init__(self, labels: tuple[str, ...], tiers: tuple[Cache[Any, Any], ...]) -> None:
        self.labels = labels
        self.measured = {label: TierStats() for label in labels}
        self.tier_stats = tuple(tier.stats for tier in tiers)
        self._backfills: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add_backfill(self, label: str) -> None:
        with self._lock:
            self._backfills[label] += 1

    def rows(self) -> dict[str, dict[str, float]]:
        with self._lock:
            backfills = dict(self._backfills)
        rows: dict[str, dict[str, float]] = {}
        for label, tier_stats in zip(self.labels, self.tier_stats):
            measured = self.measured[label].to_dict()
            own = tier_stats.to_dict()
            row: dict[str, float] = {name: measured[name] for name in _MEASURED_FIELDS}
            row.update({name: own.get(name, 0) for name in _TIER_OWN_FIELDS})
            row["backfills"] = backfills.get(label, 0)
            rows[label] = row
        return rows


class _StatsFeed:
    """Per-tier counter deltas since the previous collection, as ``tier:<label>`` journal sections."""

    def __init__(self, counters: _TierCounters) -> None:
        self._counters = counters
        self._last: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, dict[str, float]]:
        with self._lock:
            current = self._counters.rows()
            deltas: dict[str, dict[str, float]] = {}
            for label, row in current.items():
                before = self._last.get(label, {})
                changed = {name: value - before.get(name, 0) for name, value in row.items()
                           if value != before.get(name, 0)}
                if changed:
                    deltas[f"tier:{label}"] = changed
            self._last = current
            return deltas

    def forget_inherited(self) -> None:
        """In a forked child: count from now on (the parent reports what it did before the fork)."""
        self._lock = threading.Lock()
        self._last = self._counters.rows()


class TieredCache(AsyncCache[Any, Any]):
    """Caches read in order with backfill of faster tiers; inserts written through (see ``WRITE_POLICIES``).

    ``lookup`` returns a :class:`Lookup` whose ``tier`` names the tier that answered. Per-tier counters are
    in :meth:`stats_by_tier`; ``stats`` holds the composite's own (a hit is a hit in any tier).

    :raises CacheError: an unknown write policy, or a tier that is not a :class:`Cache`.
    """

    name = "tiered"

    def __init__(self, tiers: Sequence[Cache[Any, Any]], *, write_policy: str = "all",
                 backfill: bool = True, fetch_gate: FetchGate | None = None) -> None:
        super().__init__()
        if write_policy not in WRITE_POLICIES:
            raise CacheError(f"unknown write_policy {write_policy!r}; use one of {', '.join(WRITE_POLICIES)}")
        for tier in tiers:
            if not isinstance(tier, Cache):
                raise CacheError(f"TieredCache tiers must be Cache objects, got {type(tier).__name__}")
        self.tiers: tuple[Cache[Any, Any], ...] = tuple(tiers)
        self.labels: tuple[str, ...] = _unique_labels(self.tiers)
        self.write_policy = write_policy
        self.backfill = backfill
        self.fetch_gate = fetch_gate
        self._counters = _TierCounters(self.labels, self.tiers)
        self._measured = self._counters.measured

    # ------------------------------------------------------------------------------------------------
    # Tier calls under the fault policy
    # ------------------------------------------------------------------------------------------------

    def _call_tier(self, label: str, tier: Cache[Any, Any], operation: str, call: Callable[[], T],
                   *, misuse_is_fault: bool = False) -> T | object:
        """``call()``, or ``_FAILED`` after counting and reporting the fault it raised.

        NOTE [tier faults]
        Tiers are expected to turn their own faults into misses, but a tier can still raise (a full disk
        during a write, a permission error, a bug). Any exception from a tier is caught here, on purpose
        broadly: it is counted in that tier's ``stats.errors`` and reported through ``handle_fault`` (a
        warning once, or CacheFault in strict mode), and the remaining tiers carry on. Only misuse
        (CacheError: an unpicklable key or value) and strict-mode CacheFault propagate.
        """
        try:
            return call()
        except CacheFault:
            raise
        except CacheError as exc:
            if not misuse_is_fault:
                raise
            tier.stats.add(errors=1)
            handle_fault(f"tiered:{label}:{operation}:CacheError", f"the {label} tier refused {operation}", exc)
            return _FAILED
        except Exception as exc:  # see NOTE [tier faults]
            tier.stats.add(errors=1)
            handle_fault(f"tiered:{label}:{operation}:{type(exc).__name__}",
                         f"the {label} cache tier failed during {operation}", exc)
            return _FAILED

    # ------------------------------------------------------------------------------------------------
    # Cache contract
    # ------------------------------------------------------------------------------------------------

    def get(self, key: Any) -> Any | None:
        """The value from the first tier that has it (None on a miss in every tier).

        :raises CacheError: the key is not picklable.
        """
        return self.lookup(key).value

    def lookup(self, key: Any) -> Lookup[Any]:
        """Ask the tiers in order; on a hit, backfill the faster tiers and name the tier that answered.

        Status is MISS when every tier missed, ERROR when none hit and at least one tier faulted.

        :raises CacheError: the key is not picklable.
        """
        encode_key(key)  # misuse is reported before any tier is asked
        started = time.perf_counter()
        faults: list[str] = []
        for index, (label, tier) in enumerate(zip(self.labels, self.tiers)):
            if index and self.fetch_gate is not None and getattr(tier, "remote", False):
                gated = self._gated_lookup(index, key, faults)
                if gated is not None:
                    self.stats.add(hits=1, get_seconds=time.perf_counter() - started)
                    return gated
                continue
            measured = self._measured[label]
            tier_started = time.perf_counter()
            result = self._call_tier(label, tier, "get", lambda tier=tier: tier.lookup(key))
            measured.add(get_seconds=time.perf_counter() - tier_started)
            if result is _FAILED:
                measured.add(misses=1)
                faults.append(f"{label}: raised")
                continue
            assert isinstance(result, Lookup)
            if result.hit:
                measured.add(hits=1)
                if self.backfill:
                    self._backfill(index, key, result.value)
                self.stats.add(hits=1, get_seconds=time.perf_counter() - started)
                return Lookup(LookupStatus.HIT, result.value, tier=label)
            measured.add(misses=1)
            if result.status is LookupStatus.ERROR:
                faults.append(f"{label}: {result.error}")
        self.stats.add(misses=1, errors=1 if faults else 0, get_seconds=time.perf_counter() - started)
        if faults:
            return Lookup(LookupStatus.ERROR, error="; ".join(faults))
        return Lookup(LookupStatus.MISS)

    def _ask(self, index: int, key: Any, faults: list[str], *, count_miss: bool = True) -> Lookup[Any] | None:
        """Look ``key`` up in tier ``index`` (counted); the hit after backfilling faster tiers, else None."""
        label, tier = self.labels[index], self.tiers[index]
        measured = self._measured[label]
        tier_started = time.perf_counter()
        result = self._call_tier(label, tier, "get", lambda: tier.lookup(key))
        measured.add(get_seconds=time.perf_counter() - tier_started)
        if result is _FAILED:
            measured.add(misses=1)
            faults.append(f"{label}: raised")
            return None
        assert isinstance(result, Lookup)
        if result.hit:
            measured.add(hits=1)
            if self.backfill:
                self._backfill(index, key, result.value)
            return Lookup(LookupStatus.HIT, result.value, tier=label)
        if count_miss:
            measured.add(misses=1)
        if result.status is LookupStatus.ERROR:
            faults.append(f"{label}: {result.error}")
        return None

    def _gated_lookup(self, index: int, key: Any, faults: list[str]) -> Lookup[Any] | None:
        """NOTE [per-machine fan-out]: ask remote tier ``index`` under the machine's fetch lock of ``key``."""
        label, tier = self.labels[index], self.tiers[index]
        contains = getattr(tier, "contains", None)
        present = self._call_tier(label, tier, "get", lambda: contains(key)) if callable(contains) else None
        if present is False:
            self._measured[label].add(misses=1)
            return None
        assert self.fetch_gate is not None
        with self.fetch_gate.hold(key_digest(key)):
            for earlier in range(index):  # another process of this machine may have fetched it meanwhile
                if getattr(self.tiers[earlier], "remote", False):
                    continue
                found = self._ask(earlier, key, [], count_miss=False)  # its miss was counted already
                if found is not None:
                    return found
            return self._ask(index, key, faults)

    def _backfill(self, hit_index: int, key: Any, value: Any) -> None:
        """Copy a value found in tier ``hit_index`` into the writable tiers before it."""
        for label, tier in zip(self.labels[:hit_index], self.tiers[:hit_index]):
            if isinstance(tier, ReadOnly):
                continue
            measured = self._measured[label]
            tier_started = time.perf_counter()
            stored = self._call_tier(label, tier, "backfill", lambda tier=tier: tier.insert(key, value),
                                     misuse_is_fault=True)
            measured.add(insert_seconds=time.perf_counter() - tier_started)
            if stored is True:
                measured.add(inserts=1)
                self._counters.add_backfill(label)

    def _holds(self, label: str, tier: Cache, key: Any, value: Any) -> bool:
        """Whether ``tier`` holds ``value`` for ``key`` (False when it cannot tell)."""
        found = self._call_tier(label, tier, "get", lambda: tier.get(key))
        try:
            return bool(found is not _FAILED and found == value)
        except Exception:  # values whose == is not a bool (arrays): cannot tell
            return False

    def insert(self, key: Any, value: Any) -> bool:
        """Write ``value`` through the writable tiers, slowest first; a failing tier never stops the others.

        NOTE [insert-once across tiers]
        The slowest tier (disk, Redis) is the authority on whether a key exists, so writes go slowest first,
        and a tier that already holds the key (insert returned False without a fault) ends the write: the
        faster tiers are left for ``get`` to backfill with the value already stored, so that a process whose
        memory tier is empty cannot put a second value for the key in front of the first. The result is
        False whenever some tier already held the key, like a single cache's ``insert``, except a faster
        tier found holding the same value after a slower one stored it now: a concurrent ``get`` backfilled
        the value just stored (exactly one insert per key returns True). Tiers slower than
        the one holding the key (a Redis entry that expired, say) do receive this value: for a cache of
        deterministic compilations the two are equivalent.

        Returns per ``write_policy`` (see ``WRITE_POLICIES``): with ``"all"`` True if at least one tier
        stored it now and none held it; with ``"require_all"`` True only if, in addition, no tier failed. A
        tier held the key when its insert returned False and its ``stats.insert_conflicts`` grew; any other
        False (a fault the tier handled itself, a Redis tier backing off) or a raise is a failure.

        :raises CacheError: the key or value is not serializable.
        """
        encode_key(key)
        started = time.perf_counter()
        stored_any = False
        failed_any = False
        existed = False
        for label, tier in reversed(list(zip(self.labels, self.tiers))):
            if isinstance(tier, ReadOnly):
                continue
            measured = self._measured[label]
            conflicts_before = tier.stats.insert_conflicts
            tier_started = time.perf_counter()
            stored = self._call_tier(label, tier, "insert", lambda tier=tier: tier.insert(key, value))
            measured.add(insert_seconds=time.perf_counter() - tier_started)
            if stored is True:
                measured.add(inserts=1)
                stored_any = True
            elif stored is not _FAILED and tier.stats.insert_conflicts > conflicts_before:
                measured.add(insert_conflicts=1)
                # A faster tier holding this very value after a slower one stored it now: a concurrent get
                # backfilled it in between, and this insert still is the one that stored it.
                existed = not (stored_any and self._holds(label, tier, key, value))
                break
            else:  # raised, counted a fault, or skipped (a Redis tier backing off): not stored there
                failed_any = True
        result = stored_any and not existed and not (failed_any and self.write_policy == "require_all")
        self.stats.add(inserts=1 if stored_any else 0, insert_conflicts=1 if existed else 0,
                       errors=1 if failed_any else 0, insert_seconds=time.perf_counter() - started)
        return result

    # ------------------------------------------------------------------------------------------------
    # Stats
    # ------------------------------------------------------------------------------------------------

    def stats_by_tier(self) -> dict[str, dict[str, float]]:
        """Counters of each tier by label, fastest first.

        ``hits``, ``misses``, ``inserts`` (backfills included), ``insert_conflicts``, ``get_seconds`` and
        ``insert_seconds`` are measured by this TieredCache around its calls to the tier (comparable across
        tier kinds); ``backfills`` counts values copied in from a slower tier; ``bytes_read``,
        ``bytes_written``, ``evictions``, ``errors``, ``corrupt`` and ``unverified`` come from the tier's own ``stats``
        (to which this cache adds the faults a tier raised).
        """
        return self._counters.rows()

    def attach_journal(self, journal: StatsJournal) -> None:
        """Feed this cache's per-tier counters to ``journal`` as ``tier:<label>`` sections at each flush."""
        journal.add_collector(_StatsFeed(self._counters))

    # ------------------------------------------------------------------------------------------------
    # Maintenance (the `aotcache` command usually works per tier through ``tiers`` / ``labels``)
    # ------------------------------------------------------------------------------------------------

    def _maintain(self, label: str, tier: Cache[Any, Any], operation: str, call: Callable[[], T]) -> T | object:
        """``call()`` (a delete or clear of one writable tier): ``_UNSUPPORTED`` if the tier cannot do it,
        ``_FAILED`` if it faulted (counted and reported, see NOTE [maintenance faults])."""

        def supported_call() -> T | object:
            try:
                return call()
            except NotImplementedError:
                return _UNSUPPORTED

        return self._call_tier(label, tier, operation, supported_call, misuse_is_fault=True)

    def delete(self, key: Any) -> bool:
        """Remove ``key`` from every reachable writable tier; True if any tier removed something.

        NOTE [maintenance faults]
        A delete usually removes a bad entry, so it must reach every tier it can: a tier that fails (Redis
        down, whose maintenance methods raise CacheError rather than degrade; a disk error) is counted in its
        ``stats.errors`` and reported once through ``handle_fault``, and the other tiers are still cleaned;
        the failed tier may still hold the entry. ReadOnly tiers are skipped silently (not ours to change),
        as are tiers without delete support.

        :raises CacheError: the key is not picklable.
        :raises aotcache.logs.CacheFault: a tier faulted, in strict mode.
        """
        encode_key(key)  # misuse is reported before any tier is asked
        removed = False
        failed = False
        for label, tier in zip(self.labels, self.tiers):
            if isinstance(tier, ReadOnly):
                continue
            result = self._maintain(label, tier, "delete", lambda tier=tier: tier.delete(key))
            if result is _FAILED:
                failed = True
            elif result is not _UNSUPPORTED:
                removed = bool(result) or removed
        if failed:
            self.stats.add(errors=1)
        return removed

    def clear(self) -> int:
        """Clear every reachable writable tier; the number of entries removed in all.

        Faults and ReadOnly tiers are handled as in :meth:`delete` (NOTE [maintenance faults]).

        :raises aotcache.logs.CacheFault: a tier faulted, in strict mode.
        """
        removed = 0
        failed = False
        for label, tier in zip(self.labels, self.tiers):
            if isinstance(tier, ReadOnly):
                continue
            result = self._maintain(label, tier, "clear", tier.clear)
            if result is _FAILED:
                failed = True
            elif result is not _UNSUPPORTED:
                removed += int(result)  # type: ignore[call-overload]
        if failed:
            self.stats.add(errors=1)
        return removed

    def entries(self) -> Iterator[EntryInfo]:
        """Entries of every tier that can list them (each EntryInfo names its tier)."""
        for tier in self.tiers:
            try:
                yield from tier.entries()
            except NotImplementedError:
                continue

    def close(self) -> None:
        """Close every tier."""
        for tier in self.tiers:
            tier.close()
