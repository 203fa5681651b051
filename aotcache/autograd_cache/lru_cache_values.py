"""What a ``functools.lru_cache`` function holds, for the walk of :class:`~aotcache.autograd_cache.reachable.Reachable`.

The cache's dict is read through the C wrapper's GC referents, a bounded cache's values through its C links
(NOTE [Values a bounded lru_cache holds]); the in-process walk writes the entries beside the function (NOTE [Values
an lru_cache holds]), and a fingerprint is trusted only while every entry it reaches was filled by a trusted
capture (NOTE [Cached values a fingerprint vouches for]: :func:`vouch_cache_entries` records them).
:class:`LruCacheWalk` is one part of :class:`Reachable` (a mixin over its state and its ``ref`` dispatch), as
:class:`~aotcache.autograd_cache.code_walk.CodeWalk` is; the module-level readers serve the program guards too.
"""

from __future__ import annotations

import functools
import gc
import threading
from typing import Any

import torch

from aotcache.autograd_cache.digests import Untrusted, sha256_text
from aotcache.autograd_cache.live_containers import entries_of

__all__ = ["LruCacheWalk", "LRU_CACHE_WRAPPER", "lru_cache_dict", "lru_cache_entries", "vouch_cache_entries",
           "immutable_cached_value", "cached_value_state"]

LRU_CACHE_WRAPPER = type(functools.lru_cache(maxsize=None)(len))  # the C wrapper's type
_NOT_VOUCHED = object()  # an entry no trusted capture filled


def lru_cache_dict(wrapper: Any) -> dict | None:
    """The dict an ``functools.lru_cache`` wrapper keeps its values in (the C wrapper holds it as a GC referent
    beside its own ``__dict__``), or None where it cannot be told (NOTE [Values an lru_cache holds])."""
    own = getattr(wrapper, "__dict__", None)
    found = [item for item in gc.get_referents(wrapper) if type(item) is dict and item is not own]
    return found[0] if len(found) == 1 else None


def _lru_keyword_marker() -> Any:
    """The object the C ``lru_cache`` puts between positional and keyword arguments in its keys."""
    probe = functools.lru_cache(maxsize=None)(lambda **keywords: None)
    probe(k=0)
    cache = lru_cache_dict(probe)
    key = next(iter(cache)) if cache else None
    return key[0] if isinstance(key, tuple) and len(key) == 3 else None


_LRU_KEYWORD_MARKER = _lru_keyword_marker()


# NOTE [Values a bounded lru_cache holds] (session 26 review)
# A bounded ``lru_cache`` (``maxsize=n``) maps each key to a C link (``_lru_list_elem``: key, result, list
# neighbours) that Python cannot read, so its values were named by the link's identity, and a mutable value
# changed in place (``bounded_table()[0] = 7.0``) kept the graph traced with the old contents. The C wrapper's GC
# traversal hands out each link's key and result, in list order, before the cache dict: ``gc.get_referents`` of
# the wrapper reads them. The layout is checked twice: once per process on a probe cache (the triple ``key,
# result, link type`` per link, right before the dict), and at every read against the dict itself (as many
# triples as entries, each key the very object the dict holds, each once); a wrapper that fails either check is
# read as before (links by identity: the known gap), never guessed. ``cache_info()`` gives counts only.
def _bounded_lru_layout_ok() -> bool:
    keys, results = (object(), object()), (object(), object())
    probe = functools.lru_cache(maxsize=4)(lambda key: results[keys.index(key)])
    for key in keys:
        probe(key)
    cache = lru_cache_dict(probe)
    if cache is None or len(cache) != 2:
        return False
    return _bounded_lru_results(probe, cache, list(cache.items()), checked=False) == {
        id(key): result for key, result in zip(cache, results)}


def _bounded_lru_results(wrapper: Any, cache: dict, entries: list, *, checked: bool = True) -> dict | None:
    """id(key) -> result of a bounded lru_cache's links (NOTE [Values a bounded lru_cache holds]); None when the
    wrapper's referents do not have the layout checked for."""
    if checked and not _BOUNDED_LRU_READABLE:
        return None
    referents = gc.get_referents(wrapper)
    end = next((index for index, item in enumerate(referents) if item is cache), None)
    if end is None or end != 1 + 3 * len(entries):
        return None
    link_type = type(entries[0][1]) if entries else None
    results: dict[int, Any] = {}
    for index in range(1, end, 3):
        key, result, kind = referents[index:index + 3]
        if kind is not link_type or id(key) in results:
            return None
        results[id(key)] = result
    if any(id(key) not in results for key, _ in entries):
        return None
    return results


_BOUNDED_LRU_READABLE = _bounded_lru_layout_ok()


def lru_cache_entries(wrapper: Any, cache: dict) -> list[tuple[Any, Any]]:
    """(key, cached value) pairs of ``wrapper``'s cache ``cache``: a bounded cache's values read from its links
    (NOTE [Values a bounded lru_cache holds]), or the links themselves where they cannot be read."""
    entries = entries_of(cache)  # NOTE [Containers another thread changes]
    if not entries or type(entries[0][1]).__name__ != "_lru_list_elem":
        return entries
    results = _bounded_lru_results(wrapper, cache, entries)
    if results is None or len(cache) != len(entries):
        return entries
    return [(key, results[id(key)]) for key, _ in entries]


# NOTE [Cached values a fingerprint vouches for]: id(an lru_cache's dict) -> (that dict, its entries vouched for)
_VOUCHED_CACHE_ENTRIES: dict[int, tuple[dict, dict]] = {}
_VOUCHED_LOCK = threading.Lock()


def vouch_cache_entries(caches: Any) -> None:
    """Vouch for the entries the lru_caches ``caches`` (``(dict, function)`` pairs, as a trusted fingerprint reached
    them) hold now, after a capture filled them from the state that fingerprint names (NOTE [Cached values a
    fingerprint vouches for]): each value by identity, and a mutable one by its contents too (a bounded cache's
    values read from its links: NOTE [Values a bounded lru_cache holds])."""
    for cache, wrapper in caches:
        entries = {key: (value, cached_value_state(value)) for key, value in lru_cache_entries(wrapper, cache)}
        with _VOUCHED_LOCK:
            if len(_VOUCHED_CACHE_ENTRIES) >= 4096 and id(cache) not in _VOUCHED_CACHE_ENTRIES:
                _VOUCHED_CACHE_ENTRIES.clear()  # (bounded: a dropped record costs a warm start, never a false hit)
            _VOUCHED_CACHE_ENTRIES[id(cache)] = (cache, entries)


_IMMUTABLE_CACHED_TYPES = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)


def immutable_cached_value(value: Any, depth: int = 0) -> bool:
    """Whether an lru_cache's value is a plain immutable value (a number, string, bytes, None, dtype or device,
    tuples and frozensets of them). A bounded cache's C link that could not be read is not: it may hold anything
    (NOTE [Values a bounded lru_cache holds])."""
    if isinstance(value, _IMMUTABLE_CACHED_TYPES):
        return True
    return (type(value) in (tuple, frozenset) and depth < 4 and len(value) <= 64
            and all(immutable_cached_value(item, depth + 1) for item in value))


def cached_value_state(value: Any) -> str | None:
    """"" for an immutable cached value; else a digest of a mutable one's contents (a walk of its own), None where
    it cannot be told (NOTE [Cached values a fingerprint vouches for])."""
    if immutable_cached_value(value):
        return ""
    from aotcache.autograd_cache.reachable import Reachable  # (the walker that mixes LruCacheWalk in)

    try:
        walk = Reachable(process_state=True)
        root = walk.add_root(value)
        return sha256_text(root + walk.digest())
    except Untrusted:
        return None


class LruCacheWalk:
    """The part of :class:`~aotcache.autograd_cache.reachable.Reachable` that writes down an lru_cache function's
    values (in-process) or checks them vouched for (the fingerprint); it uses the walker's state and ``ref``."""

    # NOTE [Values an lru_cache holds]
    # A ``functools.lru_cache`` / ``functools.cache`` function returns what it computed at its first call with those
    # arguments, whatever the state it reads now, until ``cache_clear()`` (or an eviction) lets it compute again.
    # The walk wrote down only the function, so a graph traced with the cached value kept running after
    # ``cache_clear()`` (eager then computes from the state as it is: ``SETTINGS["scale"] = 5; scale.cache_clear()``
    # gave the graph of 2 where eager gives 5; found in session 24). The in-process walk writes the cache's entries
    # beside the function (keys and values; an empty cache as such), and the guards compare the dict behind it by
    # identity of its keys and values (its version tag first): a miss, an eviction or a clear writes it, a hit does
    # not. A bounded cache's values are read from its C links (NOTE [Values a bounded lru_cache holds]). The
    # capture's own runs fill the cache, and it cannot be put back between them: the guards take it as the capture
    # leaves it (``refresh_caches``), so the first graph is kept, under the digest written with the cache as the call
    # found it (an empty cache's values are computed from the state the digest names, so a later walk to that digest
    # may reuse the graph).
    # Not seen: (1) across processes the fingerprint writes the function only, as before: written with its values,
    # the fingerprint after the capture (which fills the cache) differed from the one before, and every warm start
    # traced (NOTE [State changed by the call] in fingerprint_cache.py); a cache holding a value computed under
    # another state makes the fingerprint untrusted instead (NOTE [Cached values a fingerprint vouches for]). (2) A
    # warm start that loads the graph never calls the function, so its cache stays empty, and a later change of the
    # state it reads is computed afresh where eager keeps the first value.
    def _lru_cache_values(self, wrapper: Any) -> str:
        """The entries of ``wrapper``'s cache (NOTE [Values an lru_cache holds]); "" outside the in-process walk."""
        if self._guards is None:
            if self.process_state:  # NOTE [Cached values a fingerprint vouches for]
                self._vouched_cache_entries(wrapper)
            return ""
        cache = lru_cache_dict(wrapper)
        if cache is None:
            raise Untrusted("lru_cache whose cache cannot be read")
        self._guards.cached_values(cache, wrapper)
        entries = lru_cache_entries(wrapper, cache)  # NOTE [Values a bounded lru_cache holds]
        if not entries:
            return "[empty]"
        return "[cache{" + ",".join(f"{self._lru_key_token(key)}={self.ref(value)}" for key, value in entries) + "}]"

    # NOTE [Cached values a fingerprint vouches for] (session 25 review)
    # The fingerprint writes an lru_cache function without its values (NOTE [Values an lru_cache holds], (1)), which
    # holds only while the cache's values are those the function computes from the state the fingerprint names. A
    # value cached before (an eager call under another setting) is not: ``SETTINGS["scale"] = 5`` with the cache
    # holding 2 traced the graph of 2 under the fingerprint of 5, and after ``cache_clear()`` the retrace (eager
    # now gives 5) loaded that graph through the same fingerprint (a false hit in one process, with the default
    # cache; across processes alike). So a fingerprint is trusted only while every entry of every cache it reaches
    # is vouched for: filled by a capture whose fingerprint was trusted (:func:`vouch_cache_entries`, after the
    # capture; each entry by its key and the identity of its value, a mutable value by its contents too: a list the
    # program then changed in place is no longer the one the graph was traced with). An empty cache, the common warm
    # start, needs nothing; a cache an eager call filled first sends the call down the full key (a trace, its
    # compile loaded).
    def _vouched_cache_entries(self, wrapper: Any) -> None:
        """Note a cache holding an entry no trusted capture filled (NOTE [Cached values a fingerprint vouches
        for])."""
        cache = lru_cache_dict(wrapper)
        if cache is None:
            self._note("lru_cache whose cache cannot be read")
            return
        self.lru_caches.append((cache, wrapper))
        entries = lru_cache_entries(wrapper, cache)  # NOTE [Values a bounded lru_cache holds]
        if not entries:
            return
        with _VOUCHED_LOCK:
            vouched = _VOUCHED_CACHE_ENTRIES.get(id(cache))
        known = vouched[1] if vouched is not None and vouched[0] is cache else {}
        for key, value in entries:
            held, state = known.get(key, (_NOT_VOUCHED, None))
            if held is not value or state is None or (state and cached_value_state(value) != state):
                self._note("an lru_cache holding a value no compiled call computed, or changed since")
                return

    def _lru_key_token(self, key: Any) -> str:
        if type(key) is not tuple:  # (a single int or str argument is its own key)
            return self.ref(key)
        return "key(" + ",".join("keywords" if part is _LRU_KEYWORD_MARKER is not None else self.ref(part)
                                 for part in key) + ")"
