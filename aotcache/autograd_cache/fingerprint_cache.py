"""The two-level lookup of warm starts: call fingerprint -> full cache key -> entry, skipping capture.

:func:`compile_with_fingerprint` is the hook ``AOTFunction`` calls instead of
:func:`aotcache.autograd_cache.pipeline.compile_function_cached` when a cache is in use:

1. compute the call's :class:`~aotcache.autograd_cache.fingerprint.Fingerprint` (no tracing);
2. trusted: read the *alias record* ``aot/fp/<fingerprint>`` (a few hundred bytes of JSON naming the full
   key's parts) and load the entry of that key (:meth:`AOTAutogradCache.try_load`); a hit runs with neither a
   trace nor an Inductor import;
3. otherwise (untrusted, no alias yet, or the aliased entry is gone / its guards fail): the full pipeline
   (capture -> key -> load or compile + save); its key is recorded under the fingerprint for the next process.

NOTE [Alias records are derived data]
An alias maps a fingerprint to the key the full path computed for that very call. The fingerprint covers
everything that decides the captured graph (see the fingerprint module), so the mapping is a function:
it is never wrong, only possibly stale (its entry evicted), and a stale alias is just a miss. Records go
through the same store tiers as entries (checksums, optional HMAC signatures); a record that does not
parse is deleted and counted as a fault. Alias store keys never match ``aot/<64 hex>/<slot>``, so listings
and ``explain`` ignore them.

Counters (``AOTAutogradCache.counters`` and the stats journal section ``autograd``): ``fingerprint_hit``
(warm start served through an alias), ``fingerprint_miss`` (trusted, but no usable alias),
``fingerprint_fallback`` plus, in section ``autograd:fingerprint_fallback``, one counter per reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aotcache.autograd_cache.fingerprint import Fingerprint, fingerprint_call, fingerprint_module_call
from aotcache.autograd_cache.key import CacheKey, KeyPart
from aotcache.logs import event, handle_fault, logger, warn_not_cached
from aotcache.store.interface import LookupStatus

if TYPE_CHECKING:
    from aotcache.autograd_cache.cache import AOTAutogradCache

__all__ = ["ALIAS_PREFIX", "ALIAS_SCHEMA", "FALLBACK_SECTION", "alias_store_key", "read_alias", "record_alias",
           "parse_alias_record", "alias_fingerprint",
           "fingerprint_of", "compile_with_fingerprint"]

ALIAS_PREFIX = "aot/fp/"
ALIAS_SCHEMA = 1
FALLBACK_SECTION = "autograd:fingerprint_fallback"


def alias_store_key(fingerprint: Fingerprint) -> str:
    """The store key of the alias record of a trusted fingerprint."""
    if not fingerprint.trusted:
        raise ValueError(f"an untrusted fingerprint ({fingerprint.reason}) has no alias record")
    return ALIAS_PREFIX + str(fingerprint.digest)


def _count_fallback(cache: AOTAutogradCache, reason: str) -> None:
    cache.count(fingerprint_fallback=1)
    journal = getattr(cache, "journal", None)
    if journal is not None:
        journal.add(FALLBACK_SECTION, {reason: 1})
    event(logging.INFO, "aotcache: the call fingerprint cannot be trusted (%s); capturing to compute the key",
          reason)
    warn_not_cached(f"fingerprint:fallback:{reason}", "a warm start of this call must trace it again to find its "
                    "cache entry, because its fingerprint cannot be trusted", reason)


def read_record(cache: AOTAutogradCache, store_key: str, parse: Callable[[Any], Any], fault_key: str,
                what: str) -> Any:
    """A small derived record (alias, route) parsed by ``parse``, or None: no record, a store fault (counted), or
    a record ``parse`` refuses with ValueError (counted as ``load_error`` and deleted: it is derived data).

    :raises aotcache.logs.CacheFault: a bad record, in strict mode only.
    """
    lookup = cache.tiers.lookup(store_key)
    if lookup.status is LookupStatus.ERROR:
        cache.count(store_error=1)
        return None
    if not lookup.hit:
        return None
    try:
        return parse(lookup.value)
    except ValueError as exc:
        cache.count(load_error=1)
        cache.delete(store_key)
        handle_fault(fault_key, f"unusable {what} {store_key}; deleted it", exc)
        return None


def read_alias(cache: AOTAutogradCache, fingerprint: Fingerprint) -> CacheKey | None:
    """The full key recorded for ``fingerprint``, or None (no record, a store fault, or a bad record).

    :raises aotcache.logs.CacheFault: a bad record, in strict mode only.
    """
    digest = str(fingerprint.digest)
    return read_record(cache, alias_store_key(fingerprint), lambda value: parse_alias_record(value, digest),
                       "autograd:alias", "fingerprint alias record")


def parse_alias_record(value: Any, fingerprint_digest: str) -> CacheKey:
    """The full key an alias record (bytes of JSON) names, checked: schema, fingerprint, parts -> key digest.

    :raises ValueError: the record does not parse or does not check (naming what is wrong).
    """
    try:
        record = json.loads(bytes(value).decode("utf-8"))
        if record.get("schema") != ALIAS_SCHEMA or record.get("fingerprint") != fingerprint_digest:
            raise ValueError("alias record of another schema or fingerprint")
        key = CacheKey(tuple(KeyPart(str(name), str(digest)) for name, digest in record["parts"].items()))
        if key.digest != record["key"]:
            raise ValueError("alias record parts do not produce its key digest")
    except (TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed alias record: {type(exc).__name__}: {exc}") from None
    return key


def alias_fingerprint(store_key: str) -> str | None:
    """The fingerprint digest named by an alias store key (``aot/fp/<digest>``), None for any other key."""
    if not store_key.startswith(ALIAS_PREFIX):
        return None
    digest = store_key[len(ALIAS_PREFIX):]
    return digest if digest and all(char in "0123456789abcdef" for char in digest) else None


def record_alias(cache: AOTAutogradCache, fingerprint: Fingerprint, key: CacheKey) -> bool:
    """Record ``fingerprint -> key`` (never overwrites); True if stored now."""
    record = {"schema": ALIAS_SCHEMA, "fingerprint": fingerprint.digest, "key": key.digest,
              "parts": key.parts_digests()}
    blob = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return bool(cache.tiers.insert(alias_store_key(fingerprint), blob))


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
                             refingerprint: Callable[[], Fingerprint] | None = None) -> Any:
    """The runtime for a call: through the alias of ``fingerprint`` when it loads, else the full pipeline.

    ``full_path(cache, on_key=callback)`` runs the full cached pipeline (e.g.
    :func:`~aotcache.autograd_cache.pipeline.compile_function_cached`), calling ``callback(key)`` with the key
    it computes; that key is recorded under the fingerprint once the runtime is built, unless
    ``refingerprint()`` (the fingerprint again, after the capture) shows that the capture changed the program
    state the fingerprint covers (NOTE [State changed by the call]).
    """
    if not cache.enabled:
        return full_path(cache, on_key=None)
    if not fingerprint.trusted:
        _count_fallback(cache, str(fingerprint.reason))
        return full_path(cache, on_key=None)
    key = read_alias(cache, fingerprint)
    if key is not None:
        result = cache.try_load(key, flat_args)
        if result.hit:
            cache.count(fingerprint_hit=1)
            logger.debug("aotcache: warm start through fingerprint %s -> key %s", fingerprint.digest[:16],
                         key.digest[:16])
            return cache.record_hit(result)
    cache.count(fingerprint_miss=1)
    computed: list[CacheKey] = []
    runtime = full_path(cache, on_key=computed.append)
    if computed and not _state_changed(cache, fingerprint, refingerprint):
        record_alias(cache, fingerprint, computed[-1])
    return runtime


# NOTE [State changed by the call]
# The capture leaves the state as one run of the function's Python does (NOTE [State changed by a capture] in
# aot/call_state.py). When that Python assigns program state the fingerprint covers
# (transformers' sequence classifiers set ``config.problem_type`` on the first call with labels; a module that
# counts its calls in an attribute), eager makes the change at every first call, but a warm start served
# through the alias runs only the graph: the change would never happen (a saved config would differ from
# eager's), and a later call would keep finding the graph traced for the old state. So the fingerprint is
# computed again after a capture; if its code or ambient part differs, no alias is recorded: a warm start of
# this call traces (running the Python, making the change) and loads the entry by its full key, and the next
# call, seeing the new state, goes through that state's own alias.
_STATE_PARTS = ("code", "ambient")


def _state_changed(cache: AOTAutogradCache, before: Fingerprint,
                   refingerprint: Callable[[], Fingerprint] | None) -> bool:
    """True (counted, warned once) when the fingerprint after the capture differs in code or ambient state."""
    if refingerprint is None:
        return False
    after = refingerprint()
    changed = [part for part in _STATE_PARTS if after.parts.get(part) != before.parts.get(part)]
    if after.trusted and not changed:
        return False
    reason = "call changes program state"
    cache.count(fingerprint_state_changed=1)
    journal = getattr(cache, "journal", None)
    if journal is not None:
        journal.add(FALLBACK_SECTION, {reason: 1})
    event(logging.INFO, "aotcache: the call changed the %s state its fingerprint covers; no warm-start alias "
          "recorded", " and ".join(changed) or "program")
    warn_not_cached(f"fingerprint:{reason}", "a warm start of this call must trace it again, because the call "
                    "changes Python state it reads (an attribute of the model or its config)", reason)
    return True
