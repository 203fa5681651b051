"""AOTAutogradCache: compiled functions stored in the store's tiers, loaded by any later process.

Entries (:mod:`aotcache.autograd_cache.entry`) are bytes values in a :class:`~aotcache.store.tiered.TieredCache`
(memory -> disk -> Redis, namespace ``"aot"`` by default) under the store key ``aot/<key digest>/<slot>``.

NOTE [slots]
Several entries may share a key digest with different guards (dynamic shapes): they live in slots
0..``max_slots``-1. A lookup probes the slots in order until an empty one and returns the first entry whose
guards hold; entries exist but none fits -> ``guard_miss``. A save takes the first free slot; inserts never
overwrite, so a save that loses a race (another process filled the slot) moves on to the next one. An entry
with the same guards already present means the work was done: nothing is added.

NOTE [faults are misses]
An entry that cannot be used -- corrupt or truncated, built by another torch, bad artifact, metadata of
another schema, a guard expression outside the grammar, an artifact whose library does not load -- is a
miss: the fault is counted (``load_error``), reported once through ``handle_fault`` (strict mode raises), the
entry is deleted from every writable tier, and the function is compiled and saved again. Faults the store
itself reports (a corrupt frame, an unreadable file, Redis down) are counted as ``store_error``.

NOTE [counters]
Each cache counts, per process, in ``counters`` and in the stats journal section ``"autograd"`` (plus
``"autograd:bypass"`` per reason), so that ``aotcache stats`` shows totals over all processes:
``hit``, ``miss``, ``guard_miss``, ``bypass``, ``load_error``, ``store_error``, ``saved``, ``not_saved``,
``compile`` (compiles done through the cache), ``compile_s``, ``time_saved_s`` (recorded compile seconds of
the entries hit), ``lock_wait``, ``lock_wait_s`` (seconds waited for another process's compile) and
``lock_timeout``; ``remote_hit`` and ``bytes_fetched`` count hits served by a remote tier (Redis).

NOTE [job counters]
When the process belongs to a job (:func:`aotcache.store.journal.current_job_id`: AOTCACHE_JOB_ID, else
torchrun's TORCHELASTIC_RUN_ID), the counters of ``_JOB_FIELDS`` are also added to the journal section
``job:<job id>``, so ``aotcache stats`` shows what each job compiled, fetched, waited and saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from aotcache import config
from aotcache.aot.metadata import RuntimeMetadata, object_output_types
from aotcache.aot.runtime import CompiledRuntime
from aotcache.autograd_cache.entry import CacheEntry, EntryError, pack_entry, read_manifest, unpack_entry
from aotcache.autograd_cache.guards import GuardExpressionError, evaluate_guards, validate_guards_expression
from aotcache.autograd_cache.key import CacheKey, explain_difference
from aotcache.autograd_cache.safety import BypassAOTAutogradCache
from aotcache.autograd_cache.singleflight import SingleFlight
from aotcache.compilers.fallback import fell_back
from aotcache.logs import CacheFault, event, handle_fault, log_once, logger, warn_not_cached
from aotcache.progress import stage
from aotcache.store.interface import CacheError, LookupStatus
from aotcache.store.journal import StatsJournal
from aotcache.store.tiered import ReadOnly, TieredCache

__all__ = [
    "DEFAULT_NAMESPACE",
    "MAX_SLOTS",
    "JOURNAL_SECTION",
    "AOTAutogradCache",
    "CompileResult",
    "LoadResult",
    "EntryListing",
    "default_cache",
    "resolve_cache",
    "entry_store_key",
    "entry_group",
    "read_journal_counters",
    "explain_last_miss",
]

DEFAULT_NAMESPACE = "aot"
MAX_SLOTS = 8
JOURNAL_SECTION = "autograd"
BYPASS_SECTION = "autograd:bypass"
_STORE_KEY_PREFIX = "aot/"
_JOB_FIELDS = ("compile", "compile_s", "hit", "remote_hit", "bytes_fetched", "lock_wait_s", "time_saved_s")
_LAST_MISS_FILE = "last_miss.json"


def entry_store_key(digest: str, slot: int) -> str:
    """The store key of slot ``slot`` of key ``digest`` (a plain string: readable in listings)."""
    return f"{entry_group(digest)}/{slot}"


def entry_group(digest: str) -> str:
    """The store-key group of every slot of ``digest``: a Redis Cluster keeps the group and its compile lock on
    one node (NOTE [hash tags] in :mod:`aotcache.store.redis`)."""
    return f"{_STORE_KEY_PREFIX}{digest}"


def _parse_store_key(text: str) -> tuple[str, int] | None:
    if not text.startswith(_STORE_KEY_PREFIX):
        return None
    digest, _, slot = text[len(_STORE_KEY_PREFIX):].partition("/")
    return (digest, int(slot)) if slot.isdigit() and len(digest) == 64 else None


@dataclasses.dataclass
class CompileResult:
    """What a compile on a miss produced: the runtime plus what its entry records."""

    runtime: CompiledRuntime
    guards: str | None = None  # guard expression over graph inputs (aotcache grammar), None = no guards
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0  # measured by the cache when 0
    uncacheable: str | None = None  # a bypass reason found while compiling: the runtime is used, not saved


@dataclasses.dataclass
class LoadResult:
    """The outcome of :meth:`AOTAutogradCache.try_load`: ``status`` is hit, miss or guard_miss."""

    status: str
    runtime: CompiledRuntime | None = None
    entry: CacheEntry | None = None
    slot: int | None = None
    tier: str | None = None
    detail: str = ""
    size: int = 0  # bytes of the stored entry

    @property
    def hit(self) -> bool:
        return self.status == "hit"


@dataclasses.dataclass
class EntryListing:
    """One stored entry for ``aotcache ls``: where it is and its manifest (no artifact bytes)."""

    digest: str
    slot: int
    tiers: list[str]
    size: int
    manifest: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _artifact_of(compiled: Any, role: str) -> bytes:
    to_bytes = getattr(compiled, "artifact", None)
    if not callable(to_bytes):
        raise BypassAOTAutogradCache(f"compiler output not storable: {type(compiled).__name__} has no artifact()")
    try:
        blob = to_bytes()
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise BypassAOTAutogradCache(f"artifact not serializable: {type(exc).__name__}") from exc
    if not isinstance(blob, (bytes, bytearray)):
        raise BypassAOTAutogradCache(f"compiler output not storable: {role} artifact is {type(blob).__name__}")
    return bytes(blob)


_SAME_GUARDS_STORED = "<an entry with the same guards is stored>"  # sentinel of _insert_in_free_slot


class AOTAutogradCache:
    """The compiled-graph cache over ``tiers``: try_load / save / make_entry, single-flight, counters.

    ``tiers`` defaults to :func:`aotcache.store.factory.open_tiers` for ``namespace``; ``journal`` (default:
    the process's default journal) receives the counters; ``lock_dir`` (default
    ``<cache_dir>/locks/<namespace>``) holds the single-flight file locks.
    """

    def __init__(self, tiers: TieredCache | None = None, *, namespace: str = DEFAULT_NAMESPACE,
                 journal: StatsJournal | None | bool = True, lock_dir: str | os.PathLike[str] | None = None,
                 max_slots: int = MAX_SLOTS) -> None:
        from aotcache.store.journal import default_journal

        if journal is True:
            journal = default_journal()
        elif journal is False:
            journal = None
        if tiers is None:
            from aotcache.store.factory import open_tiers

            tiers = open_tiers(namespace=namespace, journal=journal)
        if not isinstance(tiers, TieredCache):
            raise TypeError(f"AOTAutogradCache needs a TieredCache (aotcache.store.factory.open_tiers), got "
                            f"{type(tiers).__name__}")
        if max_slots < 1:
            raise ValueError(f"max_slots must be at least 1, got {max_slots}")
        self.tiers = tiers
        self.namespace = namespace
        self.journal = journal
        self.max_slots = max_slots
        self.cache_dir = Path(config.get("cache_dir"))
        self.lock_dir = Path(lock_dir) if lock_dir is not None else self.cache_dir / "locks" / namespace
        self.flight = SingleFlight(self.lock_dir, self._redis_tier())
        self.counters: Counter[str] = Counter()
        self.bypass_reasons: Counter[str] = Counter()
        self.last_miss: CacheKey | None = None
        self._lock = threading.Lock()
        from aotcache.store.journal import current_job_id

        self.job_id = current_job_id()

    def __repr__(self) -> str:
        return f"AOTAutogradCache(namespace={self.namespace!r}, tiers={list(self.tiers.labels)})"

    @property
    def enabled(self) -> bool:
        """False when there is no tier to read or write (e.g. AOTCACHE_ENABLED=0)."""
        return bool(self.tiers.tiers)

    def _is_remote(self, label: str) -> bool:
        for tier_label, tier in zip(self.tiers.labels, self.tiers.tiers):
            if tier_label == label:
                return bool(getattr(tier, "remote", False))
        return False

    def _redis_tier(self) -> Any | None:
        for tier in self.tiers.tiers:
            inner = tier.inner if isinstance(tier, ReadOnly) else tier
            if inner.name == "redis" and callable(getattr(inner, "lock", None)):
                return inner
        return None

    # ------------------------------------------------------------------------------------------------
    # Counters
    # ------------------------------------------------------------------------------------------------

    def count(self, **deltas: float) -> None:
        """Add ``deltas`` to this process's counters and to the stats journal (NOTE [counters]).

        Public so that layers built on the cache (e.g. the fingerprint lookup) count through the same path.
        """
        with self._lock:
            self.counters.update(deltas)
        if self.journal is not None:
            self.journal.add(JOURNAL_SECTION, deltas)
            job = {name: value for name, value in deltas.items() if name in _JOB_FIELDS}
            if self.job_id is not None and job:  # NOTE [job counters]
                from aotcache.store.journal import JOB_SECTION_PREFIX

                self.journal.add(JOB_SECTION_PREFIX + self.job_id, job)

    def count_bypass(self, reason: str) -> None:
        """Count a graph that was not cached (``reason`` from :class:`BypassAOTAutogradCache`)."""
        reason = reason or "unknown"
        with self._lock:
            self.bypass_reasons[reason] += 1
        self.count(bypass=1)
        if self.journal is not None:
            self.journal.add(BYPASS_SECTION, {reason: 1})
        event(logging.INFO, "aotcache: compiled graph not cached (%s)", reason)
        warn_not_cached(f"bypass:{reason}", "a compiled graph will not be cached, so every new process "
                        "compiles it again", reason)

    def stats(self) -> dict[str, Any]:
        """This process's counters and bypass reasons (see NOTE [counters])."""
        with self._lock:
            return {**{name: self.counters.get(name, 0) for name in (
                "hit", "miss", "guard_miss", "bypass", "load_error", "store_error", "saved", "not_saved",
                "compile", "compile_s", "time_saved_s", "lock_wait", "lock_wait_s", "lock_timeout", "remote_hit",
                "bytes_fetched")},
                "bypass_reasons": dict(self.bypass_reasons)}

    # ------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------

    def try_load(self, key: CacheKey, flat_args: Sequence[Any] | None = None, *,
                 guard_inputs: Sequence[Any] | None = None, count_store_errors: bool = True) -> LoadResult:
        """Find an entry of ``key`` whose guards hold for ``flat_args`` and rebuild its runtime.

        ``flat_args`` are the runtime's flat arguments (graph inputs are picked by the entry's metadata);
        ``guard_inputs``, instead, are the values the guards index directly (``L['tN']`` is ``guard_inputs[N]``:
        a Dynamo graph's inputs at their size hints). With neither, an entry with guards never fits (a
        ``guard_miss``, not a fault). Counts nothing but faults (``count_store_errors=False``: not even tier
        faults, for a waiter that probes every 50 ms).

        :raises aotcache.logs.CacheFault: a fault, in strict mode only.
        """
        found_any = False
        for slot in range(self.max_slots):
            store_key = entry_store_key(key.digest, slot)
            lookup = self.tiers.lookup(store_key)
            if lookup.status is LookupStatus.ERROR:
                if count_store_errors:
                    self.count(store_error=1)
                continue  # this slot is unreadable now; later slots may still be fine
            if not lookup.hit:
                break
            try:
                entry = self._decode(lookup.value, key)
                if not self._guards_hold(entry, flat_args, guard_inputs):
                    found_any = True
                    continue
                runtime = self._rebuild(entry)
            except CacheFault:
                raise
            except (EntryError, GuardExpressionError, CacheError, ValueError, TypeError, KeyError,
                    RuntimeError, OSError, ImportError) as exc:
                # NOTE [faults are misses]: whatever made this entry unusable, it is deleted and recompiled.
                self._bad_entry(store_key, exc)
                continue
            return LoadResult("hit", runtime, entry, slot, lookup.tier, size=len(lookup.value))
        return LoadResult("guard_miss" if found_any else "miss")

    def _decode(self, value: Any, key: CacheKey) -> CacheEntry:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise EntryError("foreign", f"store value is a {type(value).__name__}, not entry bytes")
        entry = unpack_entry(value, verify_blobs=False)  # the store's frame checked these bytes already
        if entry.digest != key.digest:
            raise EntryError("key mismatch", f"entry belongs to key {entry.digest[:16]}")
        return entry

    @staticmethod
    def _graph_inputs(entry: CacheEntry, flat_args: Sequence[Any]) -> list[Any]:
        positions = entry.metadata.get("graph_input_positions")
        if not isinstance(positions, list) or any(not isinstance(p, int) or not 0 <= p < len(flat_args)
                                                  for p in positions):
            raise EntryError("malformed", "graph_input_positions do not fit the arguments")
        return [flat_args[p] for p in positions]

    def _guards_hold(self, entry: CacheEntry, flat_args: Sequence[Any] | None,
                     guard_inputs: Sequence[Any] | None = None) -> bool:
        if not entry.guards:
            return True
        if guard_inputs is not None:
            return evaluate_guards(entry.guards, guard_inputs)
        if flat_args is None:  # nothing to check the guards against: this entry cannot be used for this call
            return False
        return evaluate_guards(entry.guards, self._graph_inputs(entry, flat_args))

    @staticmethod
    def _rebuild(entry: CacheEntry) -> CompiledRuntime:
        from aotcache.compilers.base import load_artifact

        metadata = RuntimeMetadata.from_json(entry.metadata)
        metadata.guards = entry.guards
        if metadata.is_inference:
            runtime = CompiledRuntime(metadata, load_artifact(entry.artifacts["inference"]))
        else:
            runtime = CompiledRuntime(metadata, load_artifact(entry.artifacts["forward"]),
                                      load_artifact(entry.artifacts["backward"]))
        runtime.from_cache = True  # type: ignore[attr-defined]  # its guards came from a store
        return runtime

    def _bad_entry(self, store_key: str, exc: BaseException) -> None:
        self.count(load_error=1)
        reason = getattr(exc, "reason", type(exc).__name__)
        self.delete(store_key)
        handle_fault(f"autograd:load:{reason}", f"unusable compiled-graph entry {store_key} ({reason}); "
                                                "deleted it and recompiling", exc)

    def delete(self, store_key: str) -> bool:
        """Remove ``store_key`` from every reachable writable tier; True if any tier removed it.

        A tier that fails is counted and reported once, never stops the others (raises only in strict mode);
        read-only tiers are left alone: see NOTE [maintenance faults] in :mod:`aotcache.store.tiered`.
        """
        return self.tiers.delete(store_key)

    # ------------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------------

    def make_entry(self, key: CacheKey, result: CompileResult) -> CacheEntry:
        """The entry recording ``result`` under ``key``.

        :raises BypassAOTAutogradCache: the compiled graphs cannot be stored (no ``artifact()``, or it
            failed; a compiler fell back to another), or the guard expression is outside the grammar.
        """
        runtime = result.runtime
        if result.guards is not None:
            try:
                validate_guards_expression(result.guards)
            except GuardExpressionError as exc:
                raise BypassAOTAutogradCache("guards not expressible") from exc
        held = object_output_types(runtime.metadata.out_spec)
        if held:  # NOTE [Object outputs]: their templates never leave the process
            raise BypassAOTAutogradCache(f"object output: {', '.join(held)}")
        roles = {"inference": runtime.forward} if runtime.metadata.is_inference else {
            "forward": runtime.forward, "backward": runtime.backward}
        for compiled in roles.values():  # NOTE [compiler fallback] in aotcache/compilers/fallback.py
            fallback = fell_back(compiled)
            if fallback:
                raise BypassAOTAutogradCache(f"compiler fallback: {fallback}")
        artifacts = {role: _artifact_of(compiled, role) for role, compiled in roles.items()}
        compilers = {role: str(getattr(compiled, "compiler_name", type(compiled).__name__))
                     for role, compiled in roles.items()}
        metadata = runtime.metadata.to_json()
        metadata["guards"] = None  # the entry's guards (aotcache grammar) are recorded beside it
        return CacheEntry(key=key.to_json(), metadata=metadata, artifacts=artifacts, guards=result.guards,
                          compilers=compilers, compile_seconds=result.compile_seconds, summary=result.summary)

    def save(self, key: CacheKey, entry: CacheEntry) -> bool:
        """Store ``entry`` in the first free slot of ``key``; True if stored now (False: already there, or no
        tier took it). Never raises for store faults (strict mode: CacheFault)."""
        if entry.digest != key.digest:
            raise ValueError(f"entry of key {entry.digest[:16]} cannot be saved under key {key.digest[:16]}")
        store_key = self._insert_in_free_slot(key.digest, pack_entry(entry), entry.guards)
        if store_key is _SAME_GUARDS_STORED:
            return False
        if store_key is not None:
            self.count(saved=1)
            return True
        self.count(not_saved=1)
        log_once(logging.INFO, f"autograd:slots-full:{key.digest}",
                 "aotcache: key %s already has %d entries; not saving another", key.digest[:16], self.max_slots)
        return False

    def _insert_in_free_slot(self, digest: str, blob: bytes, guards: str | None) -> str | None:
        """Insert ``blob`` in the first free slot of ``digest``: its store key; ``_SAME_GUARDS_STORED`` when a
        slot already holds an entry with the same guards; None when every slot is taken or no tier took it."""
        for slot in range(self.max_slots):
            store_key = entry_store_key(digest, slot)
            existing = self.tiers.lookup(store_key)
            if existing.hit:
                if self._same_guards(existing.value, guards):
                    return _SAME_GUARDS_STORED
                continue
            if self._insert(store_key, blob):
                return store_key
        return None

    @staticmethod
    def _same_guards(value: Any, guards: str | None) -> bool:
        try:
            return read_manifest(value).get("guards") == guards
        except (EntryError, TypeError):
            return False

    def _insert(self, store_key: str, blob: bytes) -> bool:
        # NOTE [insert races across tiers]: the TieredCache reports success when any tier stored the value; a
        # shared tier may at the same moment hold another process's entry in this slot (a race lost outside
        # the single-flight lock). Both entries are valid for their own guards, so the divergence is harmless;
        # the entry is inserted again in a later slot so that the shared tiers keep it too.
        # A tier that refused the insert is read back: only another value there is a lost race (a tier that
        # skipped or failed the write, e.g. Redis backing off, holds nothing and is not one).
        before = self.tiers.stats_by_tier()
        stored = self.tiers.insert(store_key, blob)
        after = self.tiers.stats_by_tier()
        for label, tier in zip(self.tiers.labels, self.tiers.tiers):
            if label == "memory" or after[label]["insert_conflicts"] <= before[label]["insert_conflicts"]:
                continue
            held = tier.lookup(store_key)
            if held.hit and held.value != blob:
                return False
        return stored

    # ------------------------------------------------------------------------------------------------
    # The whole step: load, or compile once (single-flight) and save
    # ------------------------------------------------------------------------------------------------

    def load_or_compile(self, make_key: Callable[[], CacheKey], compile_fn: Callable[[], CompileResult],
                        flat_args: Sequence[Any] | None = None, *,
                        guard_inputs: Sequence[Any] | None = None,
                        on_key: Callable[[CacheKey], None] | None = None,
                        name: str | None = None) -> CompiledRuntime:
        """The runtime for ``make_key()``: loaded from the cache, else compiled (once across processes) and saved.

        ``make_key`` may raise :class:`BypassAOTAutogradCache`: the graph is compiled and runs uncached.
        ``flat_args`` / ``guard_inputs``: what entries' guards are checked against (see :meth:`try_load`).
        ``name`` (the function or model, as listings show it) goes into the last-miss record for ``explain``.
        ``on_key(key)`` is called with the computed key before the lookup (e.g. to record it under a call
        fingerprint); never for a bypass or a disabled cache. ``compile_fn`` and ``on_key`` errors propagate
        (they are the caller's errors, not cache faults).
        """
        if not self.enabled:
            return compile_fn().runtime
        try:
            with stage("key"):
                key = make_key()
        except BypassAOTAutogradCache as bypass:
            self.count_bypass(bypass.reason)
            return compile_fn().runtime
        if on_key is not None:
            on_key(key)
        with stage("lookup"):
            result = self.try_load(key, flat_args, guard_inputs=guard_inputs)
        if result.hit:
            return self.record_hit(result)

        def saved_meanwhile() -> LoadResult | None:
            # count_store_errors=False: the first try_load counted them
            found = self.try_load(key, flat_args, guard_inputs=guard_inputs, count_store_errors=False)
            return found if found.hit else None

        # NOTE [waiters probe, they do not queue] in singleflight.py: a waiter loads the entry as soon as the
        # holder saves it, without taking the lock; only compiling is serialized.
        with self.flight.hold(key.digest, config.get("lock_timeout"), ready=saved_meanwhile,
                              group=entry_group(key.digest)) as ticket:
            if ticket.waited:
                self.count(lock_wait=1, lock_wait_s=ticket.waited_s)
            if ticket.timed_out:
                self.count(lock_timeout=1)
            if ticket.found is not None:
                return self.record_hit(ticket.found)
            result = self.try_load(key, flat_args, guard_inputs=guard_inputs)  # saved while we waited?
            if result.hit:
                return self.record_hit(result)
            self.count(**{result.status: 1})
            self._remember_miss(key, result.status, name)
            return self._compile_and_save(key, compile_fn)

    def record_hit(self, result: LoadResult) -> CompiledRuntime:
        """Count a hit that :meth:`try_load` found (``hit``, ``time_saved_s``) and return its runtime.

        :meth:`try_load` counts nothing but faults, so a caller that serves its result records it here.

        :raises ValueError: ``result`` is not a hit.
        """
        if not result.hit or result.entry is None or result.runtime is None:
            raise ValueError(f"record_hit needs a hit from try_load, got status {result.status!r}")
        remote = result.tier is not None and self._is_remote(result.tier)
        self.count(hit=1, time_saved_s=result.entry.compile_seconds, remote_hit=int(remote),
                   bytes_fetched=result.size if remote else 0)
        event(logging.INFO, "aotcache: cache hit %s slot %s from %s (saves %.2f s of compiling)",
              result.entry.digest[:16], result.slot, result.tier, result.entry.compile_seconds or 0.0)
        return result.runtime

    def _compile_and_save(self, key: CacheKey, compile_fn: Callable[[], CompileResult]) -> CompiledRuntime:
        started = time.perf_counter()
        compiled = compile_fn()
        elapsed = time.perf_counter() - started
        compiled.compile_seconds = compiled.compile_seconds or elapsed
        self.count(compile=1, compile_s=elapsed)
        if compiled.uncacheable is not None:
            self.count_bypass(compiled.uncacheable)
            return compiled.runtime
        with stage("store"):  # serializing the artifacts and writing every tier
            try:
                entry = self.make_entry(key, compiled)
            except BypassAOTAutogradCache as bypass:
                self.count_bypass(bypass.reason)
                return compiled.runtime
            stored = self.save(key, entry)
        event(logging.INFO, "aotcache: cache miss %s: compiled in %.2f s, %s", key.digest[:16], elapsed,
              "stored" if stored else "not stored")
        return compiled.runtime

    # ------------------------------------------------------------------------------------------------
    # Explaining misses
    # ------------------------------------------------------------------------------------------------

    def _remember_miss(self, key: CacheKey, status: str, name: str | None = None) -> None:
        if status != "miss":
            return
        self.last_miss = key
        path = self.cache_dir / JOURNAL_SECTION / _LAST_MISS_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temp.write_text(json.dumps({"namespace": self.namespace, "key": key.to_json(), "time": time.time(),
                                        "name": name}), encoding="utf-8")
            os.replace(temp, path)
        except OSError as exc:  # diagnostics only: a read-only cache dir just loses the record
            logger.debug("aotcache: could not record the last miss in %s: %s", path, exc)

    def explain_miss(self, key: CacheKey | dict[str, Any] | None = None) -> list[str]:
        """Why ``key`` (default: this process's last miss) missed: its parts vs the nearest stored entry's.

        :raises ValueError: no key given and no miss happened in this process.
        """
        if key is None:
            key = self.last_miss
        if key is None:
            raise ValueError("no compiled-graph cache miss happened in this process; pass the key to explain")
        parts = CacheKey.from_json(key) if isinstance(key, dict) else key
        nearest, best, saved_since = None, -1, False
        wanted = parts.parts_digests()
        for listing in self.list_entries():
            if listing.digest == parts.digest:
                saved_since = True  # the entry compiled after the miss: compare with the others
                continue
            recorded = listing.manifest.get("key") or {}
            try:
                digests = CacheKey.from_json(recorded).parts_digests()
            except ValueError:
                continue
            same = sum(1 for name, digest in wanted.items() if digests.get(name) == digest)
            if same > best:
                nearest, best = recorded, same
        if nearest is None:
            return ["the cache holds no other entries to compare with" if saved_since
                    else "the cache holds no entries to compare with"]
        return [f"nearest entry {str(nearest.get('digest'))[:16]}:", *explain_difference(nearest, parts)]

    # ------------------------------------------------------------------------------------------------
    # Listing, export / import, clearing
    # ------------------------------------------------------------------------------------------------

    def iter_store_keys(self) -> Iterator[tuple[str, list[str], int]]:
        """``(store key, tiers holding it, size)`` of every entry of this namespace."""
        found: dict[str, tuple[list[str], int]] = {}
        for label, tier in zip(self.tiers.labels, self.tiers.tiers):
            try:
                infos = list(tier.entries())
            except NotImplementedError:
                continue
            except (CacheError, OSError) as exc:
                log_once(logging.WARNING, f"autograd:list:{label}", "aotcache: cannot list the %s tier: %s", label, exc)
                continue
            for info in infos:
                if _parse_store_key(info.key) is None:
                    continue
                tiers, size = found.setdefault(info.key, ([], info.size))
                tiers.append(label)
        for store_key, (tiers, size) in sorted(found.items()):
            yield store_key, tiers, size

    def list_entries(self) -> list[EntryListing]:
        """Every readable entry with its manifest (unreadable ones are skipped), sorted by digest and slot."""
        listings = []
        for store_key, tiers, size in self.iter_store_keys():
            digest, slot = _parse_store_key(store_key)  # type: ignore[misc]
            value = self.tiers.get(store_key)
            if value is None:
                continue
            try:
                manifest = read_manifest(value)
            except (EntryError, TypeError):
                continue
            listings.append(EntryListing(digest, slot, tiers, size, manifest))
        return listings

    def load_manifest(self, digest_prefix: str) -> list[dict[str, Any]]:
        """Manifests of the entries whose key digest starts with ``digest_prefix`` (every slot)."""
        return [listing.manifest for listing in self.list_entries() if listing.digest.startswith(digest_prefix)]

    def export_entry(self, digest: str, slot: int = 0) -> bytes:
        """The container bytes of one entry (for ``aotcache export``).

        :raises KeyError: no such entry.
        """
        value = self.tiers.get(entry_store_key(digest, slot))
        if value is None:
            raise KeyError(f"no compiled-graph entry {digest[:16]} slot {slot} in {list(self.tiers.labels)}")
        return bytes(value)

    def import_entry(self, blob: bytes) -> str | None:
        """Check and store an exported entry in the first free slot of its key; its store key, or None when
        an entry with the same guards already exists.

        :raises EntryError: the bytes are not a valid entry for this torch / Python.
        """
        entry = unpack_entry(blob)
        key_record = entry.key
        key = CacheKey.from_json(key_record)
        if key.digest != entry.digest:
            raise EntryError("key mismatch", "the recorded key parts do not produce the recorded digest")
        if entry.guards is not None:
            validate_guards_expression(entry.guards)
        RuntimeMetadata.from_json(entry.metadata)
        store_key = self._insert_in_free_slot(key.digest, bytes(blob), entry.guards)
        return None if store_key is _SAME_GUARDS_STORED else store_key

    def clear(self) -> int:
        """Remove every entry of this namespace from every writable tier; the number removed."""
        removed = 0
        for store_key, _, _ in list(self.iter_store_keys()):
            removed += bool(self.delete(store_key))
        return removed


# ----------------------------------------------------------------------------------------------------------
# The default cache of a configuration
# ----------------------------------------------------------------------------------------------------------

# NOTE [default cache per configuration]: ``cache=True`` shares one AOTAutogradCache per process and
# configuration (cache dir, tiers, Redis, secret, sizes), so that its memory tier is shared by every
# aot_function. This dict is the only module-level state; a changed configuration (e.g. another
# AOTCACHE_CACHE_DIR) gets its own cache.
_DEFAULT_CACHES: dict[str, AOTAutogradCache] = {}
_DEFAULT_LOCK = threading.Lock()
_CONFIG_FINGERPRINT = ("cache_dir", "tiers", "redis_url", "redis_timeout", "redis_ttl", "secret", "max_bytes",
                       "compress_min_bytes", "enabled")


def _configuration_fingerprint() -> str:
    values = {name: str(config.get(name)) for name in _CONFIG_FINGERPRINT}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def default_cache() -> AOTAutogradCache:
    """This process's cache for the current configuration (namespace ``"aot"``)."""
    fingerprint = _configuration_fingerprint()
    with _DEFAULT_LOCK:
        cache = _DEFAULT_CACHES.get(fingerprint)
        if cache is None:
            for problem in config.unknown_env_vars():  # a misnamed cache dir would be ignored silently
                log_once(logging.WARNING, f"unknown-env:{problem}", "aotcache: %s; it is ignored", problem)
            cache = _DEFAULT_CACHES[fingerprint] = AOTAutogradCache()
        return cache


def resolve_cache(cache: bool | AOTAutogradCache | None) -> AOTAutogradCache | None:
    """``True`` -> :func:`default_cache`; ``False``/``None`` -> no cache; an instance -> itself.

    :raises TypeError: anything else.
    """
    if cache is True:
        return default_cache()
    if cache is False or cache is None:
        return None
    if isinstance(cache, AOTAutogradCache):
        return cache
    raise TypeError(f"aotcache: cache must be True, False or an AOTAutogradCache instance, got "
                    f"{type(cache).__name__}")


def read_journal_counters(journal: StatsJournal | None = None) -> dict[str, Any]:
    """Totals over all processes from the stats journal: the ``autograd`` counters and bypass reasons."""
    from aotcache.store.journal import default_journal

    sections = (journal or default_journal()).read()
    return {**sections.get(JOURNAL_SECTION, {}), "bypass_reasons": dict(sections.get(BYPASS_SECTION, {}))}


def explain_last_miss(cache: AOTAutogradCache | None = None) -> list[str]:
    """Explain the last miss recorded under the cache dir (by any process), e.g. for ``aotcache explain``.

    :raises ValueError: no miss has been recorded.
    """
    cache = cache or default_cache()
    path = cache.cache_dir / JOURNAL_SECTION / _LAST_MISS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        key = record["key"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"no compiled-graph cache miss is recorded in {path} ({type(exc).__name__})") from None
    return cache.explain_miss(key)

