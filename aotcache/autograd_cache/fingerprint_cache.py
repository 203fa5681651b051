"""The two-level lookup of warm starts: call fingerprint -> full cache key -> entry, skipping capture.

:func:`compile_with_fingerprint` is the hook ``AOTFunction`` calls instead of
:func:`aotcache.autograd_cache.pipeline.compile_function_cached` when a cache is in use:

1. compute the call's :class:`~aotcache.autograd_cache.fingerprint.Fingerprint` (no tracing);
2. trusted: read the *alias records* ``aot/fp/<fingerprint>`` (slot 0), ``aot/fp/<fingerprint>/1``, ...
   (each a few hundred bytes of JSON naming one full key's parts) and load the first of their keys whose
   entry's guards hold for the call (:meth:`AOTAutogradCache.try_load`); a hit runs with neither a trace nor
   an Inductor import;
3. otherwise (untrusted, no alias yet, or the aliased entries are gone / their guards fail): the full pipeline
   (capture -> key -> load or compile + save); its key is recorded under the fingerprint, in the next free
   slot, for the next process.

NOTE [Alias records are derived data]
An alias maps a fingerprint to the key the full path computed for that very call. The fingerprint covers
everything that decides the captured graph (see the fingerprint module), so the mapping is a function:
it is never wrong, only possibly stale (its entry evicted), and a stale alias is just a miss. Records go
through the same store tiers as entries (checksums, optional HMAC signatures); a record that does not
parse is deleted and counted as a fault. Alias store keys never match ``aot/<64 hex>/<slot>``, so listings
and ``explain`` ignore them.

NOTE [Several graphs under one fingerprint]
The mapping is a function of the call only up to the guards: with dynamic dimensions the fingerprint writes
a dynamic size as "any" (as the in-process signature does), but the capture specializes some sizes and
guards the rest. BART's beam search through ``aotcache.compile`` after a greedy ``generate``: the second
decoding step has a KV length of 1 (torch specializes sizes 0 and 1: guard ``size == 1``) and the third a
length of 2 (guard ``2 <= size``); one fingerprint, two graphs, and with one alias per fingerprint the
second graph's warm start traced every time. So a fingerprint has up to ``MAX_ALIAS_SLOTS`` records, one key
each, in slots like an entry's (``aot/fp/<fp>`` is slot 0, the single record of old caches, unchanged;
``aot/fp/<fp>/<n>`` the others). Every store write stays insert-once (no record is rewritten, so two
processes recording at once each take a slot). A warm call tries the slots' keys in order; each key's entry
is used only if its guards hold for the call (``try_load``), so a key of the same fingerprint whose guards
do not match is skipped, never run. Reading stops at the first empty slot (a slot evicted before later ones
costs those graphs one trace, after which the hole names one of them). A slot whose key has no entry
left (stale) is the one place a record is replaced: when all slots are taken, a new key goes into the first
stale one (deleted, then inserted).

Counters (``AOTAutogradCache.counters`` and the stats journal section ``autograd``): ``fingerprint_hit``
(warm start served through an alias), ``fingerprint_miss`` (trusted, but no usable alias),
``fingerprint_fallback`` plus, in section ``autograd:fingerprint_fallback``, one counter per reason;
``fingerprint_state_recorded`` / ``fingerprint_state_changed`` (a capture changed the state its fingerprint
covers: recorded with the alias to replay / not replayable, no alias), ``fingerprint_replay`` (a warm start
made a recorded state change instead of tracing) and ``fingerprint_replay_refused`` (a recorded change did not
check against the live state: undone, traced; NOTE [State changed by the call]).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aotcache.autograd_cache.fingerprint import Fingerprint, fingerprint_call, fingerprint_module_call
from aotcache.autograd_cache.key import CacheKey, KeyPart
from aotcache.autograd_cache.lru_cache_values import vouch_cache_entries
from aotcache.autograd_cache.state_delta import StateBeforeCall, StateDelta, StateSnapshot
from aotcache.logs import event, handle_fault, logger, warn_not_cached
from aotcache.store.interface import LookupStatus

if TYPE_CHECKING:
    from aotcache.autograd_cache.cache import AOTAutogradCache

__all__ = ["ALIAS_PREFIX", "ALIAS_SCHEMA", "ALIAS_SCHEMA_REPLAY", "MAX_ALIAS_SLOTS", "FALLBACK_SECTION",
           "AliasRecord", "alias_store_key", "read_alias", "record_alias", "parse_alias_record", "parse_alias_entry",
           "alias_fingerprint", "parse_alias_store_key", "fingerprint_of", "compile_with_fingerprint"]

ALIAS_PREFIX = "aot/fp/"
ALIAS_SCHEMA = 1  # a key
ALIAS_SCHEMA_REPLAY = 2  # a key and a state change to replay (NOTE [Replaying a call's state change])
ALIAS_SCHEMAS = (ALIAS_SCHEMA, ALIAS_SCHEMA_REPLAY)
MAX_ALIAS_SLOTS = 8  # NOTE [Several graphs under one fingerprint]
FALLBACK_SECTION = "autograd:fingerprint_fallback"


def alias_store_key(fingerprint: Fingerprint, slot: int = 0) -> str:
    """The store key of alias record ``slot`` of a trusted fingerprint (slot 0: ``aot/fp/<digest>``)."""
    if not fingerprint.trusted:
        raise ValueError(f"an untrusted fingerprint ({fingerprint.reason}) has no alias record")
    if not 0 <= slot < MAX_ALIAS_SLOTS:
        raise ValueError(f"alias slot {slot} is outside 0..{MAX_ALIAS_SLOTS - 1}")
    return ALIAS_PREFIX + str(fingerprint.digest) + (f"/{slot}" if slot else "")


def _count_fallback(cache: AOTAutogradCache, reason: str) -> None:
    cache.count(fingerprint_fallback=1)
    journal = getattr(cache, "journal", None)
    if journal is not None:
        journal.add(FALLBACK_SECTION, {reason: 1})
    event(logging.INFO, "aotcache: the call fingerprint cannot be trusted (%s); capturing to compute the key",
          reason)
    warn_not_cached(f"fingerprint:fallback:{reason}", "a warm start of this call must trace it again to find its "
                    "cache entry, because its fingerprint cannot be trusted", reason)


_ABSENT = object()  # read_record's answer for "no record" when asked to tell it from a fault


def read_record(cache: AOTAutogradCache, store_key: str, parse: Callable[[Any], Any], fault_key: str,
                what: str, absent: Any = None) -> Any:
    """A small derived record (alias, route) parsed by ``parse``, or None: a store fault (counted), a record
    ``parse`` refuses with ValueError (counted as ``load_error`` and deleted: it is derived data), or no record
    (``absent``, None unless given).

    :raises aotcache.logs.CacheFault: a bad record, in strict mode only.
    """
    lookup = cache.tiers.lookup(store_key)
    if lookup.status is LookupStatus.ERROR:
        cache.count(store_error=1)
        return None
    if not lookup.hit:
        return absent
    try:
        return parse(lookup.value)
    except ValueError as exc:
        cache.count(load_error=1)
        cache.delete(store_key)
        handle_fault(fault_key, f"unusable {what} {store_key}; deleted it", exc)
        return None


def read_alias(cache: AOTAutogradCache, fingerprint: Fingerprint, slot: int = 0) -> CacheKey | None:
    """The full key recorded in alias ``slot`` of ``fingerprint``, or None (no record, a store fault, or a bad
    record).

    :raises aotcache.logs.CacheFault: a bad record, in strict mode only.
    """
    record = _read_slot(cache, fingerprint, slot)
    return None if record is None or record is _ABSENT else record.key


def _read_slot(cache: AOTAutogradCache, fingerprint: Fingerprint, slot: int) -> Any:
    """Alias ``slot``'s :class:`AliasRecord`; None for a fault or a bad record (counted, deleted), ``_ABSENT``
    when empty."""
    digest = str(fingerprint.digest)
    return read_record(cache, alias_store_key(fingerprint, slot), lambda value: parse_alias_entry(value, digest),
                       "autograd:alias", "fingerprint alias record", absent=_ABSENT)


@dataclass(frozen=True)
class AliasRecord:
    """One alias record: the full key, and for a call that changes its own state (schema 2) the change to
    replay, the fingerprint digest after it and the entry's guards (NOTE [Replaying a call's state change])."""

    key: CacheKey
    delta: StateDelta | None = None
    after: str | None = None
    guards: str | None = None


def parse_alias_record(value: Any, fingerprint_digest: str) -> CacheKey:
    """The full key an alias record (bytes of JSON) names, checked: schema, fingerprint, parts -> key digest.

    :raises ValueError: the record does not parse or does not check (naming what is wrong).
    """
    return parse_alias_entry(value, fingerprint_digest).key


def parse_alias_entry(value: Any, fingerprint_digest: str) -> AliasRecord:
    """An alias record (bytes of JSON), checked: schema 1 (a key) or 2 (a key and a state change to replay),
    fingerprint, parts -> key digest, the change's values.

    :raises ValueError: the record does not parse or does not check (naming what is wrong).
    """
    try:
        record = json.loads(bytes(value).decode("utf-8"))
        if record.get("schema") not in ALIAS_SCHEMAS or record.get("fingerprint") != fingerprint_digest:
            raise ValueError("alias record of another schema or fingerprint")
        key = CacheKey(tuple(KeyPart(str(name), str(digest)) for name, digest in record["parts"].items()))
        if key.digest != record["key"]:
            raise ValueError("alias record parts do not produce its key digest")
        if record["schema"] == ALIAS_SCHEMA:
            if "delta" in record:  # served as a plain alias, the change would never be made
                raise ValueError("alias record of schema 1 with a state change")
            return AliasRecord(key)
        after, guards = record["after"], record["guards"]
        if type(after) is not str or (guards is not None and type(guards) is not str):
            raise ValueError("alias record with a state change but no fingerprint after it")
        return AliasRecord(key, StateDelta.from_json(record["delta"]), after, guards)
    except (TypeError, KeyError, AttributeError, UnicodeDecodeError, RecursionError) as exc:  # (json nested deep)
        raise ValueError(f"malformed alias record: {type(exc).__name__}: {exc}") from None


def parse_alias_store_key(store_key: str) -> tuple[str, int] | None:
    """``(fingerprint digest, slot)`` of an alias store key (``aot/fp/<digest>`` or ``aot/fp/<digest>/<slot>``),
    None for any other key."""
    if not store_key.startswith(ALIAS_PREFIX):
        return None
    digest, _, slot_text = store_key[len(ALIAS_PREFIX):].partition("/")
    if not digest or any(char not in "0123456789abcdef" for char in digest):
        return None
    if not slot_text:
        return digest, 0
    if not slot_text.isdigit() or slot_text[0] == "0" or not 0 < int(slot_text) < MAX_ALIAS_SLOTS:
        return None
    return digest, int(slot_text)


def alias_fingerprint(store_key: str) -> str | None:
    """The fingerprint digest named by an alias store key (any slot), None for any other key."""
    parsed = parse_alias_store_key(store_key)
    return parsed[0] if parsed is not None else None


def alias_record_bytes(fingerprint: Fingerprint, key: CacheKey, replay: AliasRecord | None = None) -> bytes:
    """The JSON record of ``fingerprint -> key`` (the same in every slot): schema 1, or schema 2 with
    ``replay``'s state change (NOTE [Replaying a call's state change])."""
    record: dict[str, Any] = {"schema": ALIAS_SCHEMA, "fingerprint": fingerprint.digest, "key": key.digest,
                              "parts": key.parts_digests()}
    if replay is not None and replay.delta is not None:
        record.update(schema=ALIAS_SCHEMA_REPLAY, delta=replay.delta.to_json(), after=replay.after,
                      guards=replay.guards)
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")


def record_alias(cache: AOTAutogradCache, fingerprint: Fingerprint, key: CacheKey, slot: int = 0,
                 replay: AliasRecord | None = None) -> bool:
    """Record ``fingerprint -> key`` (with ``replay``'s state change, if any) in alias ``slot`` (never
    overwrites); True if stored now."""
    return bool(cache.tiers.insert(alias_store_key(fingerprint, slot), alias_record_bytes(fingerprint, key, replay)))


def fingerprint_of(function: Any, flat_args: Sequence[Any], in_spec: Any, options: Any = None) -> Fingerprint:
    """The fingerprint of a call of an ``AOTFunction``: module form when it wraps an ``aot_module``.

    ``options``: the call's options when they differ from the function's (``dynamic`` resolved to a spec).
    """
    options = function.options if options is None else options
    module = getattr(function, "fingerprint_module", None)
    if module is not None:
        return fingerprint_module_call(module, flat_args, in_spec, options)
    return fingerprint_call(function.fn, flat_args, in_spec, options)


def compile_with_fingerprint(cache: AOTAutogradCache, fingerprint: Fingerprint, flat_args: Sequence[Any],
                             full_path: Callable[..., Any],
                             refingerprint: Callable[[], Fingerprint] | None = None,
                             replay_root: Any = None) -> Any:
    """The runtime for a call: through the alias of ``fingerprint`` when it loads, else the full pipeline.

    ``full_path(cache, on_key=callback)`` runs the full cached pipeline (e.g.
    :func:`~aotcache.autograd_cache.pipeline.compile_function_cached`), calling ``callback(key)`` with the key
    it computes; that key is recorded under the fingerprint once the runtime is built, unless
    ``refingerprint()`` (the fingerprint again, after the capture) shows that the capture changed the program
    state the fingerprint covers (NOTE [State changed by the call]) in a way that cannot be replayed.
    ``replay_root``: the ``aot_module``'s module when the call is static, whose state changes a record may
    replay (NOTE [Replaying a call's state change]); None for any other call.
    """
    if not cache.enabled:
        return full_path(cache, on_key=None)
    if not fingerprint.trusted:
        _count_fallback(cache, str(fingerprint.reason))
        return full_path(cache, on_key=None)
    slots = _AliasSlots()
    for slot in range(MAX_ALIAS_SLOTS):  # NOTE [Several graphs under one fingerprint]
        record = _read_slot(cache, fingerprint, slot)
        if record is None or record is _ABSENT:  # None: a store fault, or a bad record (deleted, so free now)
            slots.first_empty = slot if slots.first_empty is None else slots.first_empty
            if record is _ABSENT:
                break
            continue  # later slots may still be fine
        slots.records.append(record)  # compared as bytes only when a miss records its key (cold path)
        key = record.key
        result = cache.try_load(key, flat_args)  # used only where the entry's guards hold for this call
        if result.hit and (record.delta is None or _replay(cache, record, result, replay_root, refingerprint)):
            cache.count(fingerprint_hit=1)
            logger.debug("aotcache: warm start through fingerprint %s (slot %d) -> key %s",
                         fingerprint.digest[:16], slot, key.digest[:16])
            return cache.record_hit(result)
        if result.status == "miss" and slots.stale is None:  # no entry of that key left
            slots.stale = slot
    cache.count(fingerprint_miss=1)
    computed: list[CacheKey] = []
    snapshot = StateSnapshot(replay_root) if replay_root is not None and refingerprint is not None else None
    runtime = full_path(cache, on_key=computed.append)
    if computed:
        # NOTE [Cached values a fingerprint vouches for] in lru_cache_values.py
        vouch_cache_entries(fingerprint.lru_caches)
        record = _after_capture(cache, fingerprint, computed[-1], runtime, refingerprint, snapshot)
        if record is not None:
            _record_in_free_slot(cache, fingerprint, record, slots)
    return runtime


class _AliasSlots:
    """What a lookup saw of a fingerprint's alias slots: the records read, the first empty (or
    unreadable) and the first stale slot."""

    def __init__(self) -> None:
        self.records: list[AliasRecord] = []
        self.first_empty: int | None = None
        self.stale: int | None = None


def _record_in_free_slot(cache: AOTAutogradCache, fingerprint: Fingerprint, record: AliasRecord,
                         slots: _AliasSlots) -> None:
    """Record ``record`` under ``fingerprint`` unless a slot holds it already: in the first empty slot (the next
    one when another process just took it), else over the first stale one (NOTE [Several graphs under one
    fingerprint]); with every slot naming a live entry, not at all (logged)."""
    key = record.key
    blob = alias_record_bytes(fingerprint, key, record)
    if any(alias_record_bytes(fingerprint, seen.key, seen) == blob for seen in slots.records):
        return
    if slots.first_empty is not None:
        for slot in range(slots.first_empty, MAX_ALIAS_SLOTS):
            if record_alias(cache, fingerprint, key, slot, record):
                return
            found = _read_slot(cache, fingerprint, slot)
            if isinstance(found, AliasRecord) and alias_record_bytes(fingerprint, found.key, found) == blob:
                return  # a concurrent process recorded the same
    if slots.stale is not None:
        cache.delete(alias_store_key(fingerprint, slots.stale))
        if record_alias(cache, fingerprint, key, slots.stale, record):
            return
    event(logging.INFO, "aotcache: fingerprint %s already names %d graphs; the key %s is not recorded, so a warm "
          "start of this call traces it", fingerprint.digest[:16], MAX_ALIAS_SLOTS, key.digest[:16])


def _guards_of(runtime: Any) -> str | None:
    guards = getattr(getattr(runtime, "metadata", None), "guards", None)
    return guards if isinstance(guards, str) else None


def _replay(cache: AOTAutogradCache, record: AliasRecord, result: Any, root: Any,
            refingerprint: Callable[[], Fingerprint] | None) -> bool:
    """Make the state change ``record`` holds on the live objects under ``root``, checked (NOTE [Replaying a
    call's state change]); False, with the state as found, when it does not apply (counted, logged)."""
    assert record.delta is not None
    reason = None
    if root is None or refingerprint is None:
        reason = "the call is not an aot_module call with static shapes"
    elif _guards_of(result.runtime) != record.guards:
        reason = "the entry found has other guards than the one recorded"
    else:
        undo = record.delta.apply(root)
        if undo is None:
            reason = "the attributes do not hold the values recorded before the change"
        else:
            try:
                after = refingerprint()
            except BaseException:
                undo()
                raise
            if not after.trusted or after.digest != record.after:
                undo()
                reason = "the state after the change is not the one recorded"
    if reason is None:
        result.runtime.before_call_state = StateBeforeCall(record.delta, root)  # a capture again starts from it
        cache.count(fingerprint_replay=1)
        logger.debug("aotcache: warm start replays the call's state change (%s)", record.delta.describe())
        return True
    cache.count(fingerprint_replay_refused=1)
    journal = getattr(cache, "journal", None)
    if journal is not None:
        journal.add(FALLBACK_SECTION, {"recorded state change does not replay": 1})
    event(logging.INFO, "aotcache: the state change recorded with a warm-start alias (%s) was not replayed: %s; "
          "tracing the call", record.delta.describe(), reason)
    return False


# NOTE [State changed by the call]
# The capture leaves the state as one run of the function's Python does (NOTE [State changed by a capture] in
# aot/call_state.py). When that Python assigns program state the fingerprint covers
# (transformers' sequence classifiers set ``config.problem_type`` on the first call with labels; a module that
# counts its calls in an attribute), eager makes the change at every first call, but a warm start served
# through the alias runs only the graph: the change would never happen (a saved config would differ from
# eager's), and a later call would keep finding the graph traced for the old state. So the fingerprint is
# computed again after a capture; if its code or ambient part differs, the change is recorded with the alias
# when it can be replayed exactly (plain values assigned to attributes of an ``aot_module``'s tree or its
# config, a static call: NOTE [Replaying a call's state change] in state_delta.py; counted as
# ``fingerprint_state_recorded``), and a warm start makes it, checked, instead of tracing. Otherwise (a
# submodule swapped, a container changed in place, a dynamic call, an ``aot_function``) no alias is recorded
# (``fingerprint_state_changed``): a warm start of this call traces (running the Python, making the change) and
# loads the entry by its full key, and the next call, seeing the new state, goes through that state's own alias.
_STATE_PARTS = ("code", "ambient")


def _after_capture(cache: AOTAutogradCache, before: Fingerprint, key: CacheKey, runtime: Any,
                   refingerprint: Callable[[], Fingerprint] | None,
                   snapshot: StateSnapshot | None) -> AliasRecord | None:
    """The alias record of a captured call: the key alone when the capture left the state the fingerprint covers
    unchanged, the key and the change when that can be replayed (NOTE [Replaying a call's state change]), else
    None (counted as ``fingerprint_state_changed``, warned once)."""
    if refingerprint is None:
        return AliasRecord(key)
    after = refingerprint()
    changed = [part for part in _STATE_PARTS if after.parts.get(part) != before.parts.get(part)]
    if after.trusted and not changed:
        return AliasRecord(key)
    replay = _replayable(before, after, snapshot, refingerprint)
    if isinstance(replay, StateDelta):
        cache.count(fingerprint_state_recorded=1)
        event(logging.INFO, "aotcache: the call changed the state its fingerprint covers (%s); recorded with its "
              "warm-start alias, to be replayed", replay.describe())
        return AliasRecord(key, replay, after.digest, _guards_of(runtime))
    reason = "call changes program state"
    cache.count(fingerprint_state_changed=1)
    journal = getattr(cache, "journal", None)
    if journal is not None:
        journal.add(FALLBACK_SECTION, {reason: 1})
    event(logging.INFO, "aotcache: the call changed the %s state its fingerprint covers and the change cannot be "
          "replayed (%s); no warm-start alias recorded", " and ".join(changed) or "program", replay)
    warn_not_cached(f"fingerprint:{reason}", "a warm start of this call must trace it again, because the call "
                    f"changes Python state it reads in a way that cannot be replayed ({replay})", reason)
    return None


def _replayable(before: Fingerprint, after: Fingerprint, snapshot: StateSnapshot | None,
                refingerprint: Callable[[], Fingerprint]) -> StateDelta | str:
    """The change a capture made, when it can be replayed (NOTE [Replaying a call's state change]), else why
    not."""
    if not after.trusted:
        return f"the fingerprint after the call cannot be trusted: {after.reason}"
    if snapshot is None:
        return "only an aot_module call with static shapes is replayed"
    delta = snapshot.delta()
    if isinstance(delta, str):
        return delta
    if not delta.changes:
        return "what changed is not a plain attribute of the model or its config"
    failed = snapshot.check_replay(delta, refingerprint, str(before.digest), str(after.digest))
    return delta if failed is None else failed
