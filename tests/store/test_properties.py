"""Property tests: the memory and disk tiers behave like a dict model (hypothesis state machines).

The disk machines use two handles on one directory, as two processes would: one stores small values as
rows of the small-entry pack (the default), the other as files (``small_max_bytes=0``), so the model also
checks that the two forms of a key never disagree.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from aotcache.store import frame
from aotcache.store.disk import SMALL_MAX_BYTES, OnDiskCache
from aotcache.store.interface import encode_key
from aotcache.store.memory import InMemoryCache, value_size
from tests.store.test_disk import replace_stored_frame, stored_frame

#: The two handles of a disk machine: rows for small values, and files only.
HANDLE_THRESHOLDS = (SMALL_MAX_BYTES, 0)

# A small key pool so that rules collide often; 1 / 1.0 / True and "1" / b"1" are all distinct keys.
KEYS = st.sampled_from(["a", "b", "1", b"1", 1, 1.0, True, ("t", 1), ("t", 2), frozenset({3}), None, ""])
VALUES = st.one_of(
    st.binary(max_size=300),
    st.integers(),
    st.text(max_size=50),
    st.lists(st.integers(), max_size=20),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=5),
)
SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _stored_form(value):
    """What a tier returns for ``value``: bytes-like values come back as bytes from disk."""
    return bytes(value) if isinstance(value, (bytearray, memoryview)) else value


class MemoryMatchesDict(RuleBasedStateMachine):
    """An unbounded InMemoryCache against a plain dict keyed by the encoded key."""

    def __init__(self):
        super().__init__()
        self.cache = InMemoryCache()
        self.model: dict[bytes, object] = {}

    @rule(key=KEYS, value=VALUES)
    def insert(self, key, value):
        expected = encode_key(key) not in self.model
        assert self.cache.insert(key, value) is expected
        self.model.setdefault(encode_key(key), value)

    @rule(key=KEYS)
    def get(self, key):
        assert self.cache.get(key) == self.model.get(encode_key(key))

    @rule(key=KEYS)
    def delete(self, key):
        assert self.cache.delete(key) is (self.model.pop(encode_key(key), None) is not None)

    @rule()
    def clear(self):
        assert self.cache.clear() == len(self.model)
        self.model.clear()

    @invariant()
    def same_size(self):
        assert len(self.cache) == len(self.model)


class BoundedMemoryMatchesLRUModel(RuleBasedStateMachine):
    """A bounded InMemoryCache against an exact LRU model (OrderedDict of encoded key -> (value, size))."""

    MAX_BYTES = 600

    def __init__(self):
        super().__init__()
        self.cache = InMemoryCache(max_bytes=self.MAX_BYTES)
        self.model: OrderedDict[bytes, tuple[object, int]] = OrderedDict()

    @rule(key=KEYS, value=VALUES)
    def insert(self, key, value):
        encoded, size = encode_key(key), value_size(value)
        expected = encoded not in self.model and size <= self.MAX_BYTES
        assert self.cache.insert(key, value) is expected
        if expected:
            self.model[encoded] = (value, size)
            while sum(size for _, size in self.model.values()) > self.MAX_BYTES:
                self.model.popitem(last=False)

    @rule(key=KEYS)
    def get(self, key):
        encoded = encode_key(key)
        expected = self.model.get(encoded)
        assert self.cache.get(key) == (expected[0] if expected else None)
        if expected:
            self.model.move_to_end(encoded)

    @invariant()
    def bound_and_contents(self):
        assert self.cache.total_bytes() == sum(size for _, size in self.model.values()) <= self.MAX_BYTES
        assert len(self.cache) == len(self.model)


class DiskMatchesDict(RuleBasedStateMachine):
    """An unbounded OnDiskCache (two handles on one directory, as two processes would have) against a dict."""

    def __init__(self):
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="aotcache-prop-"))
        self.caches = [OnDiskCache("prop", self.directory, max_bytes=0, secret="", compress_min_bytes=64,
                                   small_max_bytes=threshold) for threshold in HANDLE_THRESHOLDS]
        self.model: dict[bytes, object] = {}

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    @rule(which=st.integers(0, 1), key=KEYS, value=VALUES)
    def insert(self, which, key, value):
        expected = encode_key(key) not in self.model
        assert self.caches[which].insert(key, value) is expected
        self.model.setdefault(encode_key(key), _stored_form(value))

    @rule(which=st.integers(0, 1), key=KEYS)
    def get(self, which, key):
        assert self.caches[which].get(key) == self.model.get(encode_key(key))

    @rule(which=st.integers(0, 1), key=KEYS)
    def delete(self, which, key):
        assert self.caches[which].delete(key) is (self.model.pop(encode_key(key), None) is not None)

    @rule(key=KEYS, cut=st.integers(0, 200), reader=st.integers(0, 1))
    def damage_entry(self, key, cut, reader):
        """Truncate an entry (a file, or a row's frame): the next get is a miss, and the model forgets it."""
        encoded = encode_key(key)
        if encoded not in self.model:
            return
        blob = stored_frame(self.caches[0], key)  # asserts the key is in exactly one form
        replace_stored_frame(self.caches[0], key, blob[: min(cut, len(blob) - 1)])
        assert self.caches[reader].get(key) is None
        assert stored_frame(self.caches[0], key) is None  # removed, whichever form it had
        del self.model[encoded]

    @precondition(lambda self: self.model)
    @rule()
    def clear(self):
        assert self.caches[0].clear() == len(self.model)
        self.model.clear()

    @invariant()
    def listing_matches(self):
        infos = list(self.caches[0].entries())
        assert len(infos) == len(self.model) == len(self.caches[1])
        assert self.caches[0].total_bytes() == sum(info.size for info in infos)
        for cache in self.caches:
            assert cache.stats.errors == cache.stats.corrupt  # the only faults are the damage we did


class BoundedDiskStaysWithinBound(RuleBasedStateMachine):
    """A bounded OnDiskCache: what it returns is always right, and it never holds more than its bound."""

    MAX_BYTES = 2_000

    def __init__(self):
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="aotcache-prop-"))
        self.caches = [OnDiskCache("prop", self.directory, max_bytes=self.MAX_BYTES, secret="", compress_min_bytes=0,
                                   small_max_bytes=threshold) for threshold in HANDLE_THRESHOLDS]
        self.model: dict[bytes, object] = {}  # every value ever stored (entries may be evicted since)

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    @rule(which=st.integers(0, 1), key=KEYS, value=VALUES)
    def insert(self, which, key, value):
        cache = self.caches[which]
        encoded = encode_key(key)
        size = sum(len(part) for part in frame.encode_parts(encoded, value))
        stored = cache.insert(key, value)
        if stored:
            self.model[encoded] = _stored_form(value)
        elif size > self.MAX_BYTES:
            assert cache.get(key) == self.model.get(encoded) or cache.get(key) is None
        else:
            assert cache.get(key) is not None  # a False from a fitting value means the key is present

    @rule(which=st.integers(0, 1), key=KEYS)
    def get(self, which, key):
        got = self.caches[which].get(key)
        assert got is None or got == self.model[encode_key(key)]

    @invariant()
    def within_bound(self):
        for cache in self.caches:
            cache._usage.flush()  # each handle's pending usage count, as close() at exit would flush it
        assert self.caches[0].total_bytes() <= self.MAX_BYTES
        assert all(cache.stats.errors == 0 for cache in self.caches)


TestMemoryMatchesDict = MemoryMatchesDict.TestCase
TestMemoryMatchesDict.settings = SETTINGS
TestBoundedMemoryMatchesLRUModel = BoundedMemoryMatchesLRUModel.TestCase
TestBoundedMemoryMatchesLRUModel.settings = SETTINGS
TestDiskMatchesDict = DiskMatchesDict.TestCase
TestDiskMatchesDict.settings = SETTINGS
TestBoundedDiskStaysWithinBound = BoundedDiskStaysWithinBound.TestCase
TestBoundedDiskStaysWithinBound.settings = SETTINGS
