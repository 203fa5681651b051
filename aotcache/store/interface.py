"""The store's contract: ``Cache`` (get / insert-once), ``AsyncCache``, lookup results, per-tier stats.

Keys are any picklable value; they are identified by :func:`key_digest` (sha256 of :func:`encode_key`).
``insert`` never overwrites: it returns False when the key already holds a value. ``get`` returns None
for a miss; :meth:`Cache.lookup` tells a miss from a fault (:class:`Lookup`).
"""

from __future__ import annotations

import enum
import hashlib
import pickle
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Generic, TypeVar

__all__ = [
    "K",
    "V",
    "CacheError",
    "LookupStatus",
    "Lookup",
    "TierStats",
    "EntryInfo",
    "Cache",
    "AsyncCache",
    "encode_key",
    "decode_key",
    "key_digest",
    "Key",
    "Value",
]

K = TypeVar("K")
V = TypeVar("V")
# The key and value types PyTorch's torch/_inductor/cache.py names, for code written against it (its tests
# parametrize over their constraints). aotcache's caches take any picklable key and value.
Key = TypeVar("Key", str, int, tuple[Any, ...])
Value = TypeVar("Value", str, int, tuple[Any, ...], bytes, dict[Any, Any], list[Any])

# Fixed pickle protocol so that a key's bytes (and so its file name / Redis key) never depend on the
# running Python's default protocol.
KEY_PICKLE_PROTOCOL = 4


class CacheError(ValueError):
    """Misuse of a cache: an unpicklable key or value, a malformed env-var or file cache, a read-only insert."""


def encode_key(key: Any) -> bytes:
    """Canonical bytes of a key: ``str`` and ``bytes`` keys are tagged raw bytes, others are pickled.

    :raises CacheError: the key cannot be pickled.
    """
    if isinstance(key, str):
        return b"s:" + key.encode("utf-8")
    if isinstance(key, bytes):
        return b"b:" + key
    try:
        return b"p:" + pickle.dumps(key, protocol=KEY_PICKLE_PROTOCOL)
    except Exception as exc:  # pickling can raise nearly anything (TypeError, PicklingError, AttributeError)
        raise CacheError(f"cache key {key!r} is not picklable: {exc}") from exc


def decode_key(encoded: bytes) -> Any:
    """The key :func:`encode_key` encoded (unpickles pickled keys: only for keys this process encoded)."""
    tag, body = encoded[:2], encoded[2:]
    if tag == b"s:":
        return body.decode("utf-8")
    if tag == b"b:":
        return body
    return pickle.loads(body)


def key_digest(key: Any) -> str:
    """Hex sha256 of :func:`encode_key`; the stable name of a key on disk and in Redis."""
    return hashlib.sha256(encode_key(key)).hexdigest()


def display_key(encoded: bytes) -> str:
    """A human-readable form of an encoded key, for listings."""
    tag, body = encoded[:2], encoded[2:]
    if tag == b"s:":
        return body.decode("utf-8", errors="replace")
    if tag == b"b:":
        return "0x" + body.hex()
    return f"<pickled key, {len(body)} bytes>"


class LookupStatus(enum.Enum):
    HIT = "hit"
    MISS = "miss"
    ERROR = "error"  # the entry existed but could not be read (corrupt, tampered, tier down): a miss for callers


@dataclass(frozen=True)
class Lookup(Generic[V]):
    """The result of :meth:`Cache.lookup`: status, the value on a hit, the tier that answered, the error."""

    status: LookupStatus
    value: V | None = None
    tier: str | None = None
    error: str | None = None

    @property
    def hit(self) -> bool:
        return self.status is LookupStatus.HIT


@dataclass
class TierStats:
    """Counters of one cache tier. All fields are numbers so that stats merge by addition."""

    hits: int = 0
    misses: int = 0
    inserts: int = 0  # values stored
    insert_conflicts: int = 0  # insert() on an existing key (returned False)
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    errors: int = 0  # faults: I/O errors, tier down, corrupt or tampered entries
    corrupt: int = 0  # of which: entries that failed framing / checksum checks (removed)
    # Entries that are whole but signed with another AOTCACHE_SECRET, or unsigned while one is set: a miss for
    # this reader, left in place (frame.py NOTE [a bad signature is not corruption]); not faults.
    unverified: int = 0
    get_seconds: float = 0.0
    insert_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def add_hit(self, bytes_read: int, seconds: float) -> None:
        """``add(hits=1, bytes_read=..., get_seconds=...)`` without the keyword dict (the hot path)."""
        with self._lock:
            self.hits += 1
            self.bytes_read += bytes_read
            self.get_seconds += seconds

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def merged(self, other: dict[str, float]) -> dict[str, float]:
        mine = self.to_dict()
        return {name: mine.get(name, 0) + other.get(name, 0) for name in mine}


@dataclass(frozen=True)
class EntryInfo:
    """One stored entry, for listings (``aotcache ls``) and eviction."""

    digest: str
    key: str  # human-readable key (see display_key)
    size: int  # bytes on the medium, framing included
    created: float  # unix time
    last_access: float  # unix time of the last read or write (LRU order)
    tier: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Cache(ABC, Generic[K, V]):
    """A key -> value cache where a key's value, once inserted, never changes."""

    #: Short tier name used in stats and logs ("memory", "disk", "redis", ...).
    name: str = "cache"

    def __init__(self) -> None:
        self.stats = TierStats()

    @abstractmethod
    def get(self, key: K) -> V | None:
        """The value for ``key``, or None on a miss (a fault is also a miss; see :meth:`lookup`).

        :raises CacheError: the key is not picklable.
        """

    @abstractmethod
    def insert(self, key: K, value: V) -> bool:
        """Store ``value`` under ``key`` unless the key exists. True if stored, False if it existed.

        :raises CacheError: the key or value is not serializable, or the cache is read-only.
        """

    def lookup(self, key: K) -> Lookup[V]:
        """Like :meth:`get` but tells a hit, a miss and a fault apart."""
        value = self.get(key)
        if value is None:
            return Lookup(LookupStatus.MISS, tier=self.name)
        return Lookup(LookupStatus.HIT, value, tier=self.name)

    def __contains__(self, key: K) -> bool:
        return self.get(key) is not None

    # Maintenance, used by the `aotcache` command. Tiers that cannot do it say so.
    def delete(self, key: K) -> bool:
        """Remove ``key``; True if something was removed."""
        raise NotImplementedError(f"{type(self).__name__} does not support delete")

    def clear(self) -> int:
        """Remove every entry; the number removed."""
        raise NotImplementedError(f"{type(self).__name__} does not support clear")

    def entries(self) -> Iterator[EntryInfo]:
        """Every entry's metadata, in no particular order."""
        raise NotImplementedError(f"{type(self).__name__} does not support listing")

    def total_bytes(self) -> int:
        """Bytes used by the entries of this tier."""
        return sum(info.size for info in self.entries())

    def close(self) -> None:
        """Release connections and file handles; the cache may not be used afterwards."""


class AsyncCache(Cache[K, V]):
    """A cache whose get / insert can also run on an executor, returning futures."""

    def get_async(self, key: K, executor: Executor) -> Future[V | None]:
        """Submit :meth:`get` to ``executor``."""
        return executor.submit(self.get, key)

    def insert_async(self, key: K, value: V, executor: Executor) -> Future[bool]:
        """Submit :meth:`insert` to ``executor``."""
        return executor.submit(self.insert, key, value)
