"""RedisCache: the shared remote tier (insert-once with SET NX, framed and optionally signed values).

A dead or slow Redis must never stall the user's job: every command has a short timeout (config
``redis_timeout``), and after a connection failure or timeout the cache stops talking to Redis for a
back-off window (see NOTE [back-off]) so that a dead server costs one timeout per window, not one per call.
Also provides :class:`RedisLock`, a token-checked lock for single-flight compiles across machines.

NOTE [chunked entries]
A value whose frame is larger than ``chunk_bytes`` (config ``redis_chunk_bytes``, 4 MiB) is stored as chunks
under keys private to one upload (``<prefix>:chunk:v<F>:{tag}:<digest>:<upload id>:<i>``), then a small
manifest (upload id, chunk sizes and xxh3-64 checksums) is written last with ``SET NX`` under the entry's own
key. A reader sees either no manifest (a miss) or a manifest whose chunks are all written: it reads them one
``GET`` each (so N readers of a 100 MB entry interleave with other clients instead of stalling the server
with whole-value replies, and no request exceeds the server's ``proto-max-bulk-len``) and checks every
chunk's size and checksum, then the frame's own checksum. A missing or wrong chunk (evicted, expired) makes
the entry a counted fault: a miss, and the manifest is deleted. Chunks are written with a provisional expiry
of ``_PROVISIONAL_CHUNK_TTL_S`` and given the entry's lifetime once the manifest is stored, so an upload
whose writer dies leaves nothing behind for long; chunks outlive their manifest by ``_CHUNK_TTL_MARGIN_S``.

NOTE [hash tags]
Every Redis key of an entry carries a hash tag ``{tag}``: the tag of the key's *group*, which for a str key
containing ``/`` is the part before its last ``/`` (``aot/<digest>/<slot>``: all slots of one graph), and
otherwise the key itself. On a Redis Cluster the entry, its chunks and the compile lock of its group
(``lock(..., group=...)``) therefore live on one node, while different groups spread over the nodes; a node
that dies takes whole entries with it (misses), never part of one. A plain server ignores the tags.

NOTE [cluster URLs]
``redis+cluster://host:port`` (or ``rediss+cluster://`` for TLS) selects a Redis Cluster: ``host:port`` is any
one node, the others are discovered. The client is created on first use, so a cluster that is down when the
job starts costs a miss, not a crash.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis as redis_py
import xxhash
from redis.backoff import NoBackoff
from redis.retry import Retry

from aotcache import config
from aotcache.logs import handle_fault
from aotcache.store import frame
from aotcache.store.interface import (
    AsyncCache,
    CacheError,
    EntryInfo,
    Lookup,
    LookupStatus,
    display_key,
    encode_key,
)

__all__ = ["RedisCache", "RedisLock", "DEFAULT_PREFIX", "BACKOFF_INITIAL_S", "BACKOFF_MAX_S", "CLUSTER_SCHEMES",
           "group_of"]

T = TypeVar("T")

DEFAULT_PREFIX = "aotcache"
BACKOFF_INITIAL_S = 5.0
BACKOFF_MAX_S = 60.0
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

# NOTE [chunked entries]: the manifest's first bytes; a frame starts with frame.MAGIC, so the two never clash.
_MANIFEST_MAGIC = b"AOTCHUNKS1\n"
_PROVISIONAL_CHUNK_TTL_S = 3600
_CHUNK_TTL_MARGIN_S = 3600

# Errors that mean "the server is not reachable or not answering in time": these start a back-off.
_UNAVAILABLE_ERRORS = (redis_py.exceptions.ConnectionError, redis_py.exceptions.TimeoutError, OSError)

# Sentinel results of RedisCache._run: the command was not sent (back-off) / failed (fault handled).
_SKIPPED = object()
_FAILED = object()

# KEYS[1] = lock key, ARGV[1] = token. Delete only if we still own it.
_RELEASE_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] = lock key, ARGV[1] = token, ARGV[2] = new expiry in ms. Extend only if we still own it.
_REFRESH_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] = entry key, ARGV[1] = sha1 hex of the bad value we read. Delete only that value.
_DELETE_IF_UNCHANGED_LUA = """
local value = redis.call('GET', KEYS[1])
if value and redis.sha1hex(value) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

_GLOB_SPECIALS = "\\*?[]"


def _escape_glob(text: str) -> str:
    return "".join("\\" + char if char in _GLOB_SPECIALS else char for char in text)


def group_of(key: Any, encoded: bytes) -> bytes:
    """The group of a store key (NOTE [hash tags]): a str key's text before its last ``/``, else the key."""
    if isinstance(key, str) and "/" in key:
        return key.rsplit("/", 1)[0].encode("utf-8", "surrogatepass")
    return encoded


def _tag(group: bytes) -> str:
    return hashlib.sha256(group).hexdigest()[:20]


def _redacted(url: str) -> str:
    """``host:port/db`` of a Redis URL, without user name or password, for logs and fault keys."""
    parts = urlsplit(url)
    host = parts.hostname or parts.path or "?"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: shown as "?" (this runs while reporting a malformed URL too)
        port = ":?"
    path = parts.path if parts.hostname else ""
    return f"{parts.scheme}://{host}{port}{path}"


class _Backoff:
    """A circuit breaker: closed while Redis answers; after a failure, open for a window that doubles.

    NOTE [back-off]
    After a connection error or timeout, no command is sent for ``initial_s`` seconds; each further failure
    doubles the window up to ``max_s``; one success closes the breaker and resets the window. When a window
    ends, a single caller probes (the others keep skipping until the probe's outcome is known), so N threads
    hitting a dead server still pay one timeout per window.
    """

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max(max_s, initial_s)
        self._lock = threading.Lock()
        self._window_s = 0.0  # 0 = closed (healthy)
        self._open_until = 0.0  # time.monotonic() deadline
        self._probing = False
        self.skipped = 0  # calls refused by try_enter

    def try_enter(self) -> bool:
        """True if a command may be sent now (marks this caller as the probe when recovering)."""
        with self._lock:
            if self._window_s == 0.0:
                return True
            if self._probing or time.monotonic() < self._open_until:
                self.skipped += 1
                return False
            self._probing = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._window_s = 0.0
            self._open_until = 0.0
            self._probing = False

    def record_failure(self) -> float:
        """Open (or re-open) the breaker; returns the new window in seconds."""
        with self._lock:
            self._window_s = self.initial_s if self._window_s == 0.0 else min(self._window_s * 2, self.max_s)
            self._open_until = time.monotonic() + self._window_s
            self._probing = False
            return self._window_s

    def state(self) -> dict[str, float | bool]:
        with self._lock:
            remaining = max(0.0, self._open_until - time.monotonic()) if self._window_s else 0.0
            return {"available": self._window_s == 0.0, "backoff_window_s": self._window_s,
                    "backoff_remaining_s": remaining}


class RedisCache(AsyncCache[Any, Any]):
    """The Redis tier: values framed like disk entries under ``<prefix>:v<frame version>:<key digest>``.

    ``url`` defaults to config ``redis_url``; ``timeout`` (connect and command, seconds) to
    ``redis_timeout``; ``ttl`` (seconds, 0 = never expire) to ``redis_ttl``; ``secret`` to ``secret``;
    ``compress_min_bytes`` to ``compress_min_bytes``. Faults (refused, timeout, server killed, corrupt or
    tampered entry) are counted in ``stats.errors``, go through :func:`aotcache.logs.handle_fault` and
    become a miss / ``insert() == False``. ``stats.misses`` counts every get that returned no value, faults
    and back-off skips included; ``skipped`` counts commands not sent because of the back-off.

    :raises CacheError: no URL configured, a malformed URL, or a non-positive timeout.
    """

    name = "redis"
    remote = True  # a TieredCache with a FetchGate fetches from it once per machine (NOTE [per-machine fan-out])

    def __init__(self, url: str | None = None, *, prefix: str = DEFAULT_PREFIX, timeout: float | None = None,
                 ttl: int | None = None, secret: str | bytes | None = None,
                 compress_min_bytes: int | None = None, backoff_initial_s: float = BACKOFF_INITIAL_S,
                 backoff_max_s: float = BACKOFF_MAX_S, chunk_bytes: int | None = None) -> None:
        super().__init__()
        if url is None:
            url = config.get("redis_url")  # checked there: a bad AOTCACHE_REDIS_URL raises ConfigError naming it
        else:
            try:
                url = config.parse_redis_url(url)
            except ValueError as exc:
                raise CacheError(f"invalid Redis URL {_redacted(url)!r}: expected {exc}") from None
        if not url:
            raise CacheError("RedisCache needs a URL: pass url=... or set AOTCACHE_REDIS_URL "
                             "(e.g. redis://localhost:6379/0)")
        timeout = config.get("redis_timeout") if timeout is None else float(timeout)
        if timeout <= 0:
            raise CacheError(f"Redis timeout must be a positive number of seconds, got {timeout!r}; "
                             "set AOTCACHE_REDIS_TIMEOUT (e.g. 0.25)")
        ttl = config.get("redis_ttl") if ttl is None else int(ttl)
        if ttl < 0:
            raise CacheError(f"Redis TTL must be >= 0 seconds (0 = never expire), got {ttl!r}")
        if not prefix or any(char.isspace() or char in "{}" for char in prefix):
            raise CacheError(f"Redis key prefix must be a non-empty string without spaces or braces, got {prefix!r}")
        chunk_bytes = config.get("redis_chunk_bytes") if chunk_bytes is None else int(chunk_bytes)
        if chunk_bytes < 1024:
            raise CacheError(f"Redis chunk size must be at least 1 KiB, got {chunk_bytes!r}; "
                             "set AOTCACHE_REDIS_CHUNK_BYTES (e.g. 4MiB)")
        self.chunk_bytes = chunk_bytes
        self.url = url
        self.where = _redacted(url)
        self.prefix = prefix
        self.timeout = timeout
        self.ttl = ttl
        self._secret = secret if secret is not None else config.get("secret")
        self.compress_min_bytes = (config.get("compress_min_bytes") if compress_min_bytes is None
                                   else int(compress_min_bytes))
        self._breaker = _Backoff(backoff_initial_s, backoff_max_s)
        self._entry_prefix = f"{prefix}:v{frame.FRAME_VERSION}:"
        self._chunk_prefix = f"{prefix}:chunk:v{frame.FRAME_VERSION}:"
        self.cluster = urlsplit(url).scheme in CLUSTER_SCHEMES
        if self.cluster:
            try:
                port = urlsplit(url).port
            except ValueError:
                port = None
            if not urlsplit(url).hostname or port is None:
                raise CacheError(f"invalid Redis Cluster URL {self.where!r}: give one node as host:port; "
                                 "set AOTCACHE_REDIS_URL=redis+cluster://host:6379")
            self._pool = None
            self._cluster_client: Any = None
            self._cluster_guard = threading.Lock()
            self._client = None  # created on first use (NOTE [cluster URLs])
            return
        try:
            # NOTE [no hidden retries]
            # redis-py >= 6 retries failed commands 3 times with exponential back-off by default; a hung server
            # would then cost several timeouts per call. Retries are off: the back-off above is the policy.
            # (A pooled socket left stale by a Redis restart is still fine: the pool notices the EOF when it
            # hands the connection out, and reconnects.)
            self._pool = redis_py.ConnectionPool.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                health_check_interval=0)
        except ValueError as exc:
            raise CacheError(f"invalid Redis URL {self.where!r}: {exc}; expected e.g. redis://host:6379/0") from exc
        self._client = redis_py.Redis(connection_pool=self._pool)
        self._register_scripts(self._client)

    def _register_scripts(self, client: Any) -> None:
        self._release_script = client.register_script(_RELEASE_LOCK_LUA)
        self._refresh_script = client.register_script(_REFRESH_LOCK_LUA)
        self._delete_if_unchanged = client.register_script(_DELETE_IF_UNCHANGED_LUA)

    def _connect_cluster(self) -> Any:
        """The Redis Cluster client, created on first use (raises the client's errors when the cluster is down)."""
        with self._cluster_guard:
            if self._client is None:
                from redis.cluster import RedisCluster

                scheme, _, rest = self.url.partition("+cluster")
                client = RedisCluster.from_url(
                    scheme + rest, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                    retry=Retry(NoBackoff(), 1), require_full_coverage=False, health_check_interval=0)
                self._register_scripts(client)
                self._client = client
            return self._client

    # ------------------------------------------------------------------------------------------------
    # Plumbing
    # ------------------------------------------------------------------------------------------------

    def entry_name(self, key: Any) -> str:
        """The Redis key that holds ``key``'s entry (or its manifest, see NOTE [chunked entries])."""
        return self._entry_name(encode_key(key), key)

    def hash_tag(self, key: Any) -> str:
        """The hash tag shared by ``key``'s entry, its chunks and its group's locks (NOTE [hash tags])."""
        return _tag(group_of(key, encode_key(key)))

    @property
    def skipped(self) -> int:
        """Commands not sent because Redis was in a back-off window (gets among them count as misses)."""
        return self._breaker.skipped

    def _entry_name(self, encoded: bytes, key: Any) -> str:
        # sha256 of the encoded key is interface.key_digest(key); computed here to pickle the key only once.
        return f"{self._entry_prefix}{{{_tag(group_of(key, encoded))}}}:{hashlib.sha256(encoded).hexdigest()}"

    def _chunk_names(self, entry_name: str, upload: str, count: int) -> list[str]:
        suffix = entry_name[len(self._entry_prefix):]  # {tag}:<digest>
        return [f"{self._chunk_prefix}{suffix}:{upload}:{index}" for index in range(count)]

    def _run(self, operation: str, command: Callable[[redis_py.Redis], T]) -> T | object:
        """Run one Redis command under the fault policy: its result, or ``_SKIPPED`` / ``_FAILED``."""
        if not self._breaker.try_enter():
            return _SKIPPED
        try:
            client = self._client if self._client is not None else self._connect_cluster()
            result = command(client)
        except _UNAVAILABLE_ERRORS + (redis_py.exceptions.RedisClusterException,) as exc:
            window = self._breaker.record_failure()
            self.stats.add(errors=1)
            handle_fault(f"redis:unavailable:{self.where}",
                         f"Redis at {self.where} is unavailable ({operation}); not retried for {window:g} s", exc)
            return _FAILED
        except redis_py.exceptions.RedisError as exc:
            # The server answered (e.g. OOM, READONLY replica): a fault, but no reason to stop talking to it.
            self._breaker.record_success()
            self.stats.add(errors=1)
            handle_fault(f"redis:error:{self.where}:{operation}", f"Redis at {self.where} refused {operation}", exc)
            return _FAILED
        self._breaker.record_success()
        return result

    def _maintenance(self, operation: str, command: Callable[[redis_py.Redis], T]) -> T:
        """Run a maintenance command (listing, clearing): faults are raised, not degraded."""
        try:
            client = self._client if self._client is not None else self._connect_cluster()
            return command(client)
        except (redis_py.exceptions.RedisError, redis_py.exceptions.RedisClusterException) as exc:
            raise CacheError(f"cannot {operation} Redis at {self.where}: {exc} (is the server running? "
                             "check AOTCACHE_REDIS_URL)") from exc

    # ------------------------------------------------------------------------------------------------
    # Cache contract
    # ------------------------------------------------------------------------------------------------

    def contains(self, key: Any) -> bool | None:
        """Whether ``key`` has an entry (one ``EXISTS``; no value is read); None when Redis failed."""
        name = self.entry_name(key)
        found = self._run("exists", lambda client: client.exists(name))
        return None if found is _SKIPPED or found is _FAILED else bool(found)

    def get(self, key: Any) -> Any | None:
        """The value for ``key``, or None on a miss or a fault.

        :raises CacheError: the key is not picklable.
        """
        return self.lookup(key).value

    def lookup(self, key: Any) -> Lookup[Any]:
        """Hit, miss, or error (Redis unavailable; a corrupt entry, deleted; an entry of another secret, kept).

        :raises CacheError: the key is not picklable.
        :raises aotcache.logs.CacheFault: a fault in strict mode.
        """
        encoded = encode_key(key)
        name = self._entry_name(encoded, key)
        started = time.perf_counter()
        try:
            blob = stored = self._run("get", lambda client: client.get(name))
            if blob is _SKIPPED or blob is _FAILED:
                self.stats.add(misses=1)
                reason = "backing off" if blob is _SKIPPED else "command failed"
                return Lookup(LookupStatus.ERROR, tier=self.name, error=f"Redis unavailable ({reason})")
            if blob is None:
                self.stats.add(misses=1)
                return Lookup(LookupStatus.MISS, tier=self.name)
            assert isinstance(blob, bytes)
            if blob.startswith(_MANIFEST_MAGIC):
                blob = self._read_chunks(name, stored)
                if blob is _SKIPPED or blob is _FAILED:
                    self.stats.add(misses=1)
                    return Lookup(LookupStatus.ERROR, tier=self.name, error="Redis unavailable (reading chunks)")
                if isinstance(blob, str):
                    self.stats.add(misses=1, errors=1, corrupt=1, bytes_read=len(stored))
                    self._run("delete", lambda client: self._delete_if_unchanged(
                        keys=[name], args=[hashlib.sha1(stored).hexdigest()], client=client))
                    self._discard(self._manifest_chunks(name, stored))
                    handle_fault(f"redis:corrupt:{blob}",
                                 f"rejected a chunked Redis entry ({blob}) at {self.where} key {name}; deleted it")
                    return Lookup(LookupStatus.ERROR, tier=self.name, error=f"rejected entry: {blob}")
            assert isinstance(blob, bytes)
            try:
                value = frame.decode_value(blob, secret=self._secret, expected_key=encoded)
            except frame.FrameError as exc:
                if not exc.corrupt:  # whole, but not verifiable with our secret: keep it for its writers
                    self.stats.add(misses=1, unverified=1, bytes_read=len(blob))
                    frame.report_secret_mismatch(self.where, exc)
                    return Lookup(LookupStatus.ERROR, tier=self.name, error=f"unverified entry: {exc}")
                self.stats.add(misses=1, errors=1, corrupt=1, bytes_read=len(blob))
                self._run("delete", lambda client: self._delete_if_unchanged(
                    keys=[name], args=[hashlib.sha1(stored).hexdigest()], client=client))
                self._discard(self._manifest_chunks(name, stored))
                handle_fault(f"redis:corrupt:{exc.reason}",
                             f"rejected a Redis entry ({exc.reason}) at {self.where} key {name}; deleted it", exc)
                return Lookup(LookupStatus.ERROR, tier=self.name, error=f"rejected entry: {exc}")
            self.stats.add(hits=1, bytes_read=len(blob))
            return Lookup(LookupStatus.HIT, value, tier=self.name)
        finally:
            self.stats.add(get_seconds=time.perf_counter() - started)

    def insert(self, key: Any, value: Any) -> bool:
        """Store ``value`` unless the key exists (``SET NX``, with ``EX`` when a TTL is set).

        True if stored; False if the key existed or Redis failed (a counted fault).

        :raises CacheError: the key or value is not picklable, or the value is None.
        """
        encoded = encode_key(key)
        if value is None:
            raise CacheError("cannot cache None: get() returns None for a miss; wrap the value instead")
        try:
            blob = frame.encode(encoded, value, secret=self._secret, compress_min_bytes=self.compress_min_bytes)
        except TypeError as exc:
            raise CacheError(f"cannot store the value for key {display_key(encoded)!r} in Redis: {exc}") from exc
        name = self._entry_name(encoded, key)
        started = time.perf_counter()
        try:
            if len(blob) > self.chunk_bytes:
                return self._insert_chunked(name, blob)
            stored = self._run("insert", lambda client: client.set(name, blob, nx=True, ex=self.ttl or None))
            if stored is _SKIPPED or stored is _FAILED:
                return False
            if not stored:
                self.stats.add(insert_conflicts=1)
                return False
            self.stats.add(inserts=1, bytes_written=len(blob))
            return True
        finally:
            self.stats.add(insert_seconds=time.perf_counter() - started)

    # NOTE [chunked entries]

    def _read_chunks(self, name: str, manifest: bytes) -> bytes | str | object:
        """The frame bytes a manifest describes; a reason string when the entry is bad; ``_SKIPPED`` /
        ``_FAILED`` when Redis failed while reading."""
        try:
            info = json.loads(manifest[len(_MANIFEST_MAGIC):])
            upload, sizes, checksums = info["upload"], info["sizes"], info["xxh3"]
            if (not isinstance(upload, str) or not isinstance(sizes, list) or not isinstance(checksums, list)
                    or len(sizes) != len(checksums) or not sizes):
                raise ValueError("fields")
        except (ValueError, KeyError, TypeError):
            return "malformed manifest"
        pieces = []
        for chunk_name, size, checksum in zip(self._chunk_names(name, upload, len(sizes)), sizes, checksums):
            piece = self._run("get chunk", lambda client, chunk_name=chunk_name: client.get(chunk_name))
            if piece is _SKIPPED or piece is _FAILED:
                return piece
            if piece is None:
                return "missing chunk"
            assert isinstance(piece, bytes)
            if len(piece) != size or xxhash.xxh3_64_intdigest(piece) != checksum:
                return "chunk mismatch"
            pieces.append(piece)
        return b"".join(pieces)

    def _insert_chunked(self, name: str, blob: bytes) -> bool:
        """Insert a large frame as chunks plus a manifest written last (``SET NX``); see ``insert``."""
        exists = self._run("insert", lambda client: client.exists(name))
        if exists is _SKIPPED or exists is _FAILED:
            return False
        if exists:  # checked first so that a lost race rarely uploads the whole value for nothing
            self.stats.add(insert_conflicts=1)
            return False
        view = memoryview(blob)
        pieces = [view[start:start + self.chunk_bytes] for start in range(0, len(blob), self.chunk_bytes)]
        upload = secrets.token_hex(8)
        names = self._chunk_names(name, upload, len(pieces))
        for chunk_name, piece in zip(names, pieces):
            written = self._run("insert chunk", lambda client, chunk_name=chunk_name, piece=piece: client.set(
                chunk_name, bytes(piece), ex=_PROVISIONAL_CHUNK_TTL_S))
            if written is _SKIPPED or written is _FAILED:
                self._discard(names)
                return False
        manifest = _MANIFEST_MAGIC + json.dumps({
            "upload": upload, "sizes": [len(piece) for piece in pieces],
            "xxh3": [xxhash.xxh3_64_intdigest(piece) for piece in pieces]}).encode()
        stored = self._run("insert", lambda client: client.set(name, manifest, nx=True, ex=self.ttl or None))
        if stored is _SKIPPED or stored is _FAILED or not stored:
            self._discard(names)
            if stored is not _SKIPPED and stored is not _FAILED:
                self.stats.add(insert_conflicts=1)
            return False

        def keep(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for chunk_name in names:
                if self.ttl:
                    pipe.expire(chunk_name, self.ttl + _CHUNK_TTL_MARGIN_S)
                else:
                    pipe.persist(chunk_name)
            return pipe.execute()

        self._run("insert chunk lifetime", keep)  # on failure the chunks expire: a later miss, never a wrong hit
        self.stats.add(inserts=1, bytes_written=len(blob))
        return True

    def _discard(self, names: list[str]) -> None:
        if names:
            self._run("discard chunks", lambda client: client.delete(*names))

    def _manifest_chunks(self, name: str | bytes, value: bytes | None) -> list[str]:
        """The chunk keys named by ``value`` if it is a manifest (none for a plain entry or a malformed one)."""
        if not value or not value.startswith(_MANIFEST_MAGIC):
            return []
        try:
            info = json.loads(value[len(_MANIFEST_MAGIC):])
            name = name.decode() if isinstance(name, bytes) else name
            return self._chunk_names(name, info["upload"], len(info["sizes"]))
        except (ValueError, KeyError, TypeError):
            return []

    def _chunks_of(self, client: Any, name: str | bytes) -> list[str]:
        """The chunk keys of the entry at ``name`` (none for a plain entry or a missing one)."""
        return self._manifest_chunks(name, client.get(name))

    def delete(self, key: Any) -> bool:
        """Remove ``key``'s entry (with its chunks); True if one was removed.

        :raises CacheError: Redis is unavailable.
        """
        name = self.entry_name(key)

        def remove(client: Any) -> int:
            chunks = self._chunks_of(client, name)
            removed = client.delete(name)
            if chunks:
                client.delete(*chunks)
            return removed

        return bool(self._maintenance("delete", remove))

    def _scan_names(self, prefix: str | None = None) -> Iterator[bytes]:
        pattern = _escape_glob(prefix or self._entry_prefix) + "*"
        yield from self._maintenance("list", lambda client: list(client.scan_iter(match=pattern, count=500)))

    def clear(self) -> int:
        """Remove every entry under this prefix, chunks included (locks excluded); the number of entries removed.

        :raises CacheError: Redis is unavailable.
        """
        names = list(self._scan_names())
        removed = 0
        for start in range(0, len(names), 500):
            batch = names[start:start + 500]
            removed += self._maintenance("clear", lambda client: client.unlink(*batch))
        chunks = list(self._scan_names(self._chunk_prefix))
        for start in range(0, len(chunks), 500):
            batch = chunks[start:start + 500]
            self._maintenance("clear", lambda client: client.unlink(*batch))
        return removed

    def entries(self) -> Iterator[EntryInfo]:
        """Every entry under this prefix. ``created`` is 0.0 (Redis keeps no creation time).

        NOTE [listing touches entries]: the key is read from each entry's header with GETRANGE, which
        refreshes Redis's own LRU clock for that entry; the idle time is read before that.

        :raises CacheError: Redis is unavailable.
        """
        names = list(self._scan_names())
        head_bytes = frame.HEADER_SIZE + frame.SIGNATURE_SIZE + 1024
        now = time.time()
        for start in range(0, len(names), 200):
            batch = names[start:start + 200]

            def fetch(client: redis_py.Redis, batch: list[bytes] = batch) -> list[Any]:
                pipe = client.pipeline(transaction=False)
                for name in batch:
                    pipe.object("idletime", name)
                    pipe.strlen(name)
                    pipe.getrange(name, 0, head_bytes - 1)
                return pipe.execute(raise_on_error=False)

            replies = self._maintenance("list", fetch)
            for index, name in enumerate(batch):
                idle, size, head = replies[3 * index:3 * index + 3]
                if not size or isinstance(size, Exception) or isinstance(head, Exception):
                    continue  # expired or deleted while listing
                idle_s = idle if isinstance(idle, int) else 0
                if head.startswith(_MANIFEST_MAGIC):
                    size, head = self._maintenance("list", lambda client, name=name: self._chunked_head(
                        client, name, head_bytes))
                yield EntryInfo(digest=name.decode().rsplit(":", 1)[-1], key=self._key_from_head(head),
                                size=int(size), created=0.0, last_access=now - idle_s, tier=self.name)

    def _chunked_head(self, client: Any, name: bytes, head_bytes: int) -> tuple[int, bytes]:
        """Total size and first bytes of a chunked entry (0 and no bytes if it vanished or is malformed)."""
        value = client.get(name) or b""
        try:
            info = json.loads(value[len(_MANIFEST_MAGIC):])
            first = self._chunk_names(name.decode(), info["upload"], 1)[0]
            return sum(info["sizes"]), client.getrange(first, 0, head_bytes - 1) or b""
        except (ValueError, KeyError, TypeError, IndexError):
            return 0, b""

    @staticmethod
    def _key_from_head(head: bytes) -> str:
        try:
            header = frame.read_header(head)
        except frame.FrameError as exc:
            return f"<unreadable entry: {exc.reason}>"
        key_end = header.body_offset + header.key_length
        if key_end > len(head):
            return f"<key of {header.key_length} bytes>"
        return display_key(head[header.body_offset:key_end])

    def total_bytes(self) -> int:
        """Bytes held by this prefix's entries (values as stored, framing included).

        :raises CacheError: Redis is unavailable.
        """
        return sum(info.size for info in self.entries())

    # ------------------------------------------------------------------------------------------------
    # Health, locks, lifetime
    # ------------------------------------------------------------------------------------------------

    def ping(self) -> bool:
        """True if Redis answers now (ignores and does not change the back-off)."""
        try:
            client = self._client if self._client is not None else self._connect_cluster()
            return bool(client.ping())
        except (redis_py.exceptions.RedisError, redis_py.exceptions.RedisClusterException):
            return False

    def describe(self) -> dict[str, Any]:
        """Settings and health, for ``aotcache info`` (the URL without credentials)."""
        return {"url": self.where, "prefix": self.prefix, "timeout_s": self.timeout, "ttl_s": self.ttl,
                "signed": bool(self._secret), "compress_min_bytes": self.compress_min_bytes,
                "skipped": self.skipped, **self._breaker.state()}

    def lock(self, name: str, expire_s: float = 60.0, *, timeout: float = 0.0, poll_s: float = 0.05,
             group: str | None = None) -> RedisLock:
        """A lock named ``name`` in this prefix: ``with cache.lock(name, 30, timeout=5) as held: ...``.

        ``held`` is False when the lock could not be taken within ``timeout`` seconds or Redis failed.
        A holder that dies releases it when ``expire_s`` runs out. ``group`` (a store-key group, e.g.
        ``aot/<digest>``) puts the lock on the Cluster node of that group's entries (NOTE [hash tags]).
        """
        return RedisLock(self, name, expire_s, timeout=timeout, poll_s=poll_s, group=group)

    def close(self) -> None:
        """Close the connection pool (or the cluster client)."""
        if self._pool is not None:
            self._pool.disconnect()
        elif self._client is not None:
            self._client.close()


class RedisLock:
    """A mutex in Redis for single-flight work across processes and machines (``SET NX PX`` + token).

    The lock key holds a random token; release and refresh are compare-and-delete / compare-and-expire Lua
    scripts, so a holder whose lock expired never releases someone else's. Faults make ``acquire`` return
    False (counted in the cache's ``stats.errors``). Used as a context manager, it yields whether it is held.
    """

    def __init__(self, cache: RedisCache, name: str, expire_s: float, *, timeout: float = 0.0,
                 poll_s: float = 0.05, group: str | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"lock name must be a non-empty string, got {name!r}")
        if not expire_s > 0:
            raise ValueError(f"lock expire_s must be positive seconds (a dead holder releases after it), "
                             f"got {expire_s!r}")
        self.cache = cache
        self.name = name
        tag = _tag((group if group is not None else name).encode("utf-8", "surrogatepass"))
        self.redis_key = f"{cache.prefix}:lock:{{{tag}}}:{name}"
        self.expire_s = float(expire_s)
        self.timeout = float(timeout)
        self.poll_s = poll_s
        self._token: str | None = None

    @property
    def held(self) -> bool:
        """True between a successful acquire and release (the lock may still have expired in Redis)."""
        return self._token is not None

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds (default: the one given at creation)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            taken = self.try_acquire()
            if taken is not False:  # taken now, or Redis failed (no point waiting)
                return bool(taken)
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)

    def try_acquire(self) -> bool | None:
        """One attempt: True if taken now, False if someone holds it, None if Redis failed (a counted fault)."""
        if self._token is not None:
            raise RuntimeError(f"lock {self.name!r} is already held by this RedisLock object")
        token = secrets.token_hex(16)
        expire_ms = max(1, int(self.expire_s * 1000))
        taken = self.cache._run("lock", lambda client: client.set(self.redis_key, token, nx=True, px=expire_ms))
        if taken is _SKIPPED or taken is _FAILED:
            return None
        if taken:
            self._token = token
            return True
        return False

    def holder(self) -> str | None:
        """The current holder's token (None when free or Redis failed): a new token means a new holder."""
        token = self.cache._run("lock holder", lambda client: client.get(self.redis_key))
        return token.decode() if isinstance(token, bytes) else None

    def refresh(self, expire_s: float | None = None) -> bool:
        """Push the expiry ``expire_s`` (default: the original) into the future; False if no longer ours."""
        if self._token is None:
            return False
        expire_ms = max(1, int((expire_s or self.expire_s) * 1000))
        token = self._token
        result = self.cache._run("lock refresh", lambda client: self.cache._refresh_script(
            keys=[self.redis_key], args=[token, expire_ms], client=client))
        return result not in (_SKIPPED, _FAILED) and bool(result)

    def release(self) -> bool:
        """Release the lock; True if it was still ours (False if it had expired or Redis failed)."""
        if self._token is None:
            return False
        token, self._token = self._token, None
        result = self.cache._run("lock release", lambda client: self.cache._release_script(
            keys=[self.redis_key], args=[token], client=client))
        return result not in (_SKIPPED, _FAILED) and bool(result)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
