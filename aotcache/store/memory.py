"""InMemoryCache: the process-local tier (a thread-safe dict with an optional LRU byte bound).

Besides an empty cache, it can be seeded from an environment variable (:meth:`InMemoryCache.from_env_var`)
or from a pickled dict on disk (:meth:`InMemoryCache.from_file_path`), which lets a job ship a few
precompiled entries without a disk or Redis tier.

NOTE [memory values are shared, not copied]
``get`` returns the very object that was inserted (no serialization round trip: that is what makes this
tier cheap). Callers must treat cached values as immutable.
"""

from __future__ import annotations

import ast
import hashlib
import os
import pickle
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from aotcache.store.interface import (
    AsyncCache,
    CacheError,
    EntryInfo,
    K,
    Lookup,
    LookupStatus,
    TierStats,
    V,
    decode_key,
    display_key,
    encode_key,
)

__all__ = ["InMemoryCache", "value_size"]

# Values are measured with the same protocol the disk and Redis frames use, so bounds agree across tiers.
_SIZE_PICKLE_PROTOCOL = 5


def value_size(value: object) -> int:
    """Bytes a value counts against a size bound: ``len()`` for bytes-like values, else its pickled size.

    :raises CacheError: the value is not bytes-like and cannot be pickled.
    """
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, memoryview):
        return value.nbytes
    try:
        return len(pickle.dumps(value, protocol=_SIZE_PICKLE_PROTOCOL))
    except Exception as exc:  # pickling raises many types (PicklingError, TypeError, AttributeError)
        raise CacheError(f"cache value of type {type(value).__name__} is not picklable: {exc}") from exc


class _Entry:
    """One stored value with its LRU bookkeeping. ``size`` is None until measured (unbounded caches)."""

    __slots__ = ("value", "size", "created", "last_access")

    def __init__(self, value: object, size: int | None, now: float) -> None:
        self.value = value
        self.size = size
        self.created = now
        self.last_access = now


class InMemoryCache(AsyncCache[K, V]):
    """A thread-safe in-process cache; with ``max_bytes`` (> 0) the least recently used entries are evicted.

    Keys are identified by :func:`~aotcache.store.interface.encode_key`, like every other tier, so ``1`` and
    ``1.0`` are different keys here too, and unhashable but picklable keys (lists, dicts) work.
    """

    name = "memory"

    def __init__(self, max_bytes: int | None = None) -> None:
        """:param max_bytes: size bound (see :func:`value_size`); None or 0 = unbounded.

        :raises CacheError: ``max_bytes`` is negative or not an integer.
        """
        super().__init__()
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool)
                                      or max_bytes < 0):
            raise CacheError(f"InMemoryCache max_bytes must be a non-negative integer (0 = unbounded), "
                             f"got {max_bytes!r}")
        self.max_bytes = max_bytes or 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # LRU order: oldest first
        self._bytes = 0  # sum of measured sizes (bounded caches measure every entry)
        self._lock = threading.Lock()

    @property
    def _cache(self) -> dict:
        """A snapshot ``{key: value}`` of the entries (the attribute PyTorch's InMemoryCache exposes)."""
        with self._lock:
            items = [(encoded, entry.value) for encoded, entry in self._entries.items()]
        return {decode_key(encoded): value for encoded, value in items}

    # ------------------------------------------------------------------------------------------------
    # Cache contract
    # ------------------------------------------------------------------------------------------------

    def get(self, key: K) -> V | None:
        """The value for ``key`` or None; refreshes its LRU position.

        :raises CacheError: the key is not picklable.
        """
        return self.lookup(key).value

    def lookup(self, key: K) -> Lookup[V]:
        """Hit or miss (this tier has no faults).

        :raises CacheError: the key is not picklable.
        """
        start = time.perf_counter()
        encoded = encode_key(key)
        with self._lock:
            entry = self._entries.get(encoded)
            if entry is not None:
                entry.last_access = time.time()
                if self.max_bytes:
                    self._entries.move_to_end(encoded)
        elapsed = time.perf_counter() - start
        if entry is None:
            self.stats.add(misses=1, get_seconds=elapsed)
            return Lookup(LookupStatus.MISS, tier=self.name)
        self.stats.add(hits=1, get_seconds=elapsed)
        return Lookup(LookupStatus.HIT, entry.value, tier=self.name)

    def insert(self, key: K, value: V) -> bool:
        """Store ``value`` unless ``key`` is present; True if stored.

        With a bound, a value larger than ``max_bytes`` is not stored (False, counted as an eviction), and
        older entries are evicted to make room.

        :raises CacheError: the key is not picklable, the value is None, or (bounded caches) the value is
            not picklable.
        """
        start = time.perf_counter()
        encoded = encode_key(key)
        if value is None:
            raise CacheError("cannot cache None: get() returns None for a miss; wrap the value instead")
        size = value_size(value) if self.max_bytes else None
        if size is not None and size > self.max_bytes:
            self.stats.add(evictions=1, insert_seconds=time.perf_counter() - start)
            return False
        evicted = 0
        with self._lock:
            if encoded in self._entries:
                stored = False
            else:
                self._entries[encoded] = _Entry(value, size, time.time())
                stored = True
                if size is not None:
                    self._bytes += size
                    while self._bytes > self.max_bytes:
                        _, victim = self._entries.popitem(last=False)
                        self._bytes -= victim.size or 0
                        evicted += 1
        elapsed = time.perf_counter() - start
        if stored:
            self.stats.add(inserts=1, evictions=evicted, bytes_written=size or 0, insert_seconds=elapsed)
        else:
            self.stats.add(insert_conflicts=1, insert_seconds=elapsed)
        return stored

    # ------------------------------------------------------------------------------------------------
    # Maintenance
    # ------------------------------------------------------------------------------------------------

    def delete(self, key: K) -> bool:
        """Remove ``key``; True if it was present."""
        encoded = encode_key(key)
        with self._lock:
            entry = self._entries.pop(encoded, None)
            if entry is not None and entry.size is not None:
                self._bytes -= entry.size
        return entry is not None

    def clear(self) -> int:
        """Remove every entry; the number removed."""
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            self._bytes = 0
        return count

    def entries(self) -> Iterator[EntryInfo]:
        """Metadata of every entry (a snapshot). Unbounded caches measure values here, lazily."""
        with self._lock:
            snapshot = list(self._entries.items())
        for encoded, entry in snapshot:
            size = entry.size if entry.size is not None else _measure_quietly(entry.value)
            yield EntryInfo(
                digest=hashlib.sha256(encoded).hexdigest(),
                key=display_key(encoded),
                size=size,
                created=entry.created,
                last_access=entry.last_access,
                tier=self.name,
            )

    def total_bytes(self) -> int:
        """Sum of the entries' sizes (see :func:`value_size`)."""
        if self.max_bytes:
            with self._lock:
                return self._bytes
        return super().total_bytes()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # ------------------------------------------------------------------------------------------------
    # Seeding from the environment or a file
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_env_var(cls, env_var: str, *, max_bytes: int | None = None) -> InMemoryCache[Any, Any]:
        """A cache seeded from ``os.environ[env_var]`` (unset or empty: an empty cache).

        The format is ``repr(pickle.dumps(key)),repr(pickle.dumps(value))`` pairs separated by ``;``;
        whitespace around pairs and separators is ignored, and so are empty pairs. See
        :meth:`env_var_value` to produce it. The variable is trusted input (it is unpickled).

        :raises CacheError: naming the offending pair: no comma, a side that is not a bytes literal,
            bytes that do not unpickle, or one key given two different values.
        """
        cache: InMemoryCache[Any, Any] = cls(max_bytes=max_bytes)
        text = os.environ.get(env_var, "")
        for index, pair in enumerate(_split_outside_literals(text, ";")):
            pair = pair.strip()
            if not pair:
                continue
            where = f"{env_var} pair {index + 1} ({_abbreviate(pair)})"
            sides = _split_outside_literals(pair, ",")
            if len(sides) != 2:
                raise CacheError(f"{where}: expected repr(pickle.dumps(key)),repr(pickle.dumps(value)) "
                                 f"with exactly one comma outside the byte literals, found {len(sides) - 1}")
            key = _unpickle_literal(sides[0], f"{where}, key")
            value = _unpickle_literal(sides[1], f"{where}, value")
            cache._seed(key, value, where)
        cache.stats = TierStats()  # seeding is not use: start the counters from zero
        return cache

    @staticmethod
    def env_var_value(mapping: Mapping[Any, Any]) -> str:
        """The ``from_env_var`` text for ``mapping`` (``repr(pickle.dumps(k)),repr(pickle.dumps(v))`` pairs)."""
        return ";".join(f"{pickle.dumps(key)!r},{pickle.dumps(value)!r}" for key, value in mapping.items())

    @classmethod
    def from_file_path(cls, path: str | os.PathLike[str], *, max_bytes: int | None = None
                       ) -> InMemoryCache[Any, Any]:
        """A cache seeded from a pickled ``dict`` at ``path`` (a missing file: an empty cache).

        The file is trusted input (it is unpickled).

        :raises CacheError: the file cannot be read, does not unpickle, or does not hold a dict.
        """
        cache: InMemoryCache[Any, Any] = cls(max_bytes=max_bytes)
        file_path = Path(path)
        try:
            blob = file_path.read_bytes()
        except FileNotFoundError:
            return cache
        except OSError as exc:
            raise CacheError(f"cannot read the cache file {file_path}: {exc}") from exc
        try:
            mapping = pickle.loads(blob)
        except Exception as exc:  # unpickling raises nearly anything on foreign or truncated input
            raise CacheError(f"cache file {file_path} does not unpickle ({type(exc).__name__}: {exc}); "
                             f"it must hold pickle.dumps(a dict of key -> value)") from exc
        if not isinstance(mapping, dict):
            raise CacheError(f"cache file {file_path} holds a {type(mapping).__name__}, expected a dict of "
                             f"key -> value (write it with pickle.dump(dict, file))")
        for key, value in mapping.items():
            cache._seed(key, value, f"cache file {file_path}, key {key!r}")
        cache.stats = TierStats()  # seeding is not use: start the counters from zero
        return cache

    def _seed(self, key: object, value: object, where: str) -> None:
        """Insert a seed entry; an existing key must hold an equal value."""
        try:
            if self.insert(key, value):
                return
        except CacheError as exc:
            raise CacheError(f"{where}: {exc}") from exc
        existing = self.get(key)
        if existing is not None and not _same_value(existing, value):
            raise CacheError(f"{where}: key {key!r} is given two different values ({_abbreviate(repr(existing))} "
                             f"and {_abbreviate(repr(value))})")


def _measure_quietly(value: object) -> int:
    try:
        return value_size(value)
    except CacheError:
        return 0  # stored in an unbounded cache without being picklable: it has no serialized size


def _same_value(left: object, right: object) -> bool:
    try:
        return bool(left == right)
    except Exception:  # == on arbitrary objects may raise (e.g. ambiguous truth values); treat as different
        return False


def _abbreviate(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _split_outside_literals(text: str, separator: str) -> list[str]:
    """Split ``text`` at ``separator`` characters that are not inside a quoted (bytes) literal.

    NOTE [repr of pickles contains separators]
    ``repr(pickle.dumps("a;b,c"))`` contains ``;`` and ``,`` verbatim, so the env-var format cannot be
    split naively. Python's ``repr`` of bytes never uses triple quotes, so tracking one quote character
    and backslash escapes is enough.
    """
    parts: list[str] = []
    start = 0
    quote: str | None = None
    index = 0
    while index < len(text):
        char = text[index]
        if quote is not None:
            if char == "\\":
                index += 1  # skip the escaped character
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == separator:
            parts.append(text[start:index])
            start = index + 1
        index += 1
    parts.append(text[start:])
    return parts


def _unpickle_literal(text: str, where: str) -> object:
    text = text.strip()
    try:
        blob = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise CacheError(f"{where}: {_abbreviate(text)} is not a Python bytes literal such as "
                         f"repr(pickle.dumps(obj)) ({type(exc).__name__})") from None
    if not isinstance(blob, bytes):
        raise CacheError(f"{where}: expected a bytes literal (repr(pickle.dumps(obj))), got a "
                         f"{type(blob).__name__}")
    try:
        return pickle.loads(blob)
    except Exception as exc:  # unpickling raises nearly anything on bad input
        raise CacheError(f"{where}: the bytes do not unpickle ({type(exc).__name__}: {exc})") from None
