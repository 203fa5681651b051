"""InMemoryCache: contract, LRU bound, thread safety, seeding from an env var and from a file."""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from aotcache.store.interface import CacheError, LookupStatus, key_digest
from aotcache.store.memory import InMemoryCache, value_size
from tests.conftest import run_python


def test_get_insert_never_overwrites():
    cache = InMemoryCache()
    assert cache.get("k") is None
    assert cache.insert("k", b"first") is True
    assert cache.insert("k", b"second") is False
    assert cache.get("k") == b"first"
    assert "k" in cache and "other" not in cache
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.inserts, stats.insert_conflicts) == (2, 2, 1, 1)
    assert stats.get_seconds > 0 and stats.insert_seconds > 0


def test_keys_are_identified_by_their_encoding():
    cache = InMemoryCache()
    assert cache.insert(1, "int")
    assert cache.insert(1.0, "float")  # equal in a dict, distinct encodings: distinct keys in every tier
    assert cache.insert("1", "str") and cache.insert(b"1", "bytes")
    assert cache.insert(["unhashable", {"but": "picklable"}], "list")
    assert [cache.get(k) for k in (1, 1.0, "1", b"1")] == ["int", "float", "str", "bytes"]
    assert cache.get(["unhashable", {"but": "picklable"}]) == "list"


def test_misuse_raises_cache_error():
    cache = InMemoryCache()
    with pytest.raises(CacheError, match="not picklable"):
        cache.insert(lambda: 0, b"v")
    with pytest.raises(CacheError, match="not picklable"):
        cache.get(threading.Lock())
    with pytest.raises(CacheError, match="None"):
        cache.insert("k", None)
    with pytest.raises(CacheError, match="max_bytes"):
        InMemoryCache(max_bytes=-1)
    bounded = InMemoryCache(max_bytes=100)
    with pytest.raises(CacheError, match="not picklable"):
        bounded.insert("k", threading.Lock())  # a bound needs the value's size
    assert issubclass(CacheError, ValueError)


def test_lookup_statuses_and_values_are_shared():
    cache = InMemoryCache()
    value = {"mutable": [1]}
    cache.insert("k", value)
    hit = cache.lookup("k")
    assert hit.hit and hit.status is LookupStatus.HIT and hit.tier == "memory" and hit.value is value
    miss = cache.lookup("nope")
    assert miss.status is LookupStatus.MISS and miss.value is None


def test_value_size():
    assert value_size(b"x" * 10) == 10
    assert value_size(bytearray(7)) == 7
    assert value_size(memoryview(b"abc")) == 3
    assert value_size({"a": 1}) == len(pickle.dumps({"a": 1}, protocol=5))


def test_lru_bound_evicts_least_recently_used():
    cache = InMemoryCache(max_bytes=300)
    for name in "abc":
        assert cache.insert(name, name.encode() * 100)
    assert cache.total_bytes() == 300
    assert cache.get("a") is not None  # a is now the most recently used
    assert cache.insert("d", b"d" * 100)  # evicts b, the least recently used
    assert cache.get("b") is None
    assert [cache.get(k) is not None for k in "acd"] == [True, True, True]
    assert cache.total_bytes() == 300 and len(cache) == 3
    assert cache.stats.evictions == 1
    assert cache.insert("big", b"x" * 301) is False  # larger than the bound: not stored
    assert cache.get("big") is None and len(cache) == 3
    assert cache.insert("e", b"e" * 250)  # evicts as many as needed
    assert cache.total_bytes() <= 300
    assert cache.get("e") == b"e" * 250


def test_delete_clear_entries():
    cache = InMemoryCache(max_bytes=10_000)
    cache.insert("a", b"12345")
    cache.insert(("t", 1), [1, 2, 3])
    infos = {info.key: info for info in cache.entries()}
    assert set(infos) == {"a", "<pickled key, %d bytes>" % len(pickle.dumps(("t", 1), protocol=4))}
    assert infos["a"].size == 5 and infos["a"].digest == key_digest("a") and infos["a"].tier == "memory"
    assert infos["a"].created <= infos["a"].last_access
    assert cache.total_bytes() == 5 + value_size([1, 2, 3])
    assert cache.delete("a") is True and cache.delete("a") is False
    assert cache.get("a") is None and cache.total_bytes() == value_size([1, 2, 3])
    assert cache.clear() == 1 and len(cache) == 0 and cache.total_bytes() == 0
    unbounded = InMemoryCache()
    unbounded.insert("x", {"k": "v"})
    assert unbounded.total_bytes() == value_size({"k": "v"})  # measured lazily


def test_threads_racing_on_the_same_keys_one_insert_wins():
    cache = InMemoryCache(max_bytes=1 << 30)
    wins = []
    barrier = threading.Barrier(8)

    def worker(worker_id):
        barrier.wait()
        for index in range(200):
            if cache.insert(f"k{index}", (worker_id, index)):
                wins.append(index)
            value = cache.get(f"k{index}")
            assert value is not None and value[1] == index

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == list(range(200))
    assert cache.stats.inserts == 200 and cache.stats.insert_conflicts == 7 * 200


def test_async_variants():
    cache = InMemoryCache()
    with ThreadPoolExecutor(2) as executor:
        assert cache.insert_async("k", b"v", executor).result() is True
        assert cache.insert_async("k", b"w", executor).result() is False
        assert cache.get_async("k", executor).result() == b"v"
        assert cache.get_async("missing", executor).result() is None


# ----------------------------------------------------------------------------------------------------
# from_env_var
# ----------------------------------------------------------------------------------------------------


def test_from_env_var_round_trip_with_separators_inside_literals(monkeypatch):
    mapping = {"a;b,c": b"x;y,z", ("t", 1): {"n": "q'uo\"te"}, 3: [1, 2]}
    pairs = [InMemoryCache.env_var_value({key: value}) for key, value in mapping.items()]
    monkeypatch.setenv("SEED", "  ;" + " ; ".join(pairs) + " ;; ")
    assert InMemoryCache.env_var_value(mapping) == ";".join(pairs)
    cache = InMemoryCache.from_env_var("SEED")
    assert cache.stats.hits == 0 and cache.stats.inserts == 0  # seeding is not counted as use
    assert {key: cache.get(key) for key in mapping} == mapping
    assert len(cache) == 3


def test_from_env_var_hand_written_pairs(monkeypatch):
    key, value = pickle.dumps("key"), pickle.dumps(42)
    monkeypatch.setenv("SEED", f"{key!r} , {value!r};{key!r},{value!r}")  # the same pair twice is fine
    assert InMemoryCache.from_env_var("SEED").get("key") == 42


def test_from_env_var_unset_or_empty_gives_empty_cache(monkeypatch):
    monkeypatch.delenv("SEED", raising=False)
    assert len(InMemoryCache.from_env_var("SEED")) == 0
    monkeypatch.setenv("SEED", " ; ")
    assert len(InMemoryCache.from_env_var("SEED")) == 0


@pytest.mark.parametrize("text, message", [
    ("b'\\x80\\x04K\\x01.'", "exactly one comma"),
    ("b'\\x80\\x04K\\x01.',b'\\x80\\x04K\\x01.',b'x'", "exactly one comma"),
    ("not_a_literal,b'\\x80\\x04K\\x01.'", "not a Python bytes literal"),
    ("'text',b'\\x80\\x04K\\x01.'", "expected a bytes literal"),
    ("b'\\x80\\x04K\\x01.',b'garbage'", "do not unpickle"),
])
def test_from_env_var_malformed_pairs_name_the_pair(monkeypatch, text, message):
    good = InMemoryCache.env_var_value({"ok": 1})
    monkeypatch.setenv("SEED", f"{good};{text}")
    with pytest.raises(CacheError, match=message) as info:
        InMemoryCache.from_env_var("SEED")
    assert "SEED pair 2" in str(info.value)


def test_from_env_var_conflicting_values(monkeypatch):
    monkeypatch.setenv("SEED", InMemoryCache.env_var_value({"k": 1}) + ";" + InMemoryCache.env_var_value({"k": 2}))
    with pytest.raises(CacheError, match="two different values"):
        InMemoryCache.from_env_var("SEED")


def test_from_env_var_key_identity_ignores_pickle_protocol(monkeypatch):
    first = f"{pickle.dumps('k', protocol=2)!r},{pickle.dumps(1)!r}"
    second = f"{pickle.dumps('k', protocol=5)!r},{pickle.dumps(2)!r}"
    monkeypatch.setenv("SEED", f"{first};{second}")
    with pytest.raises(CacheError, match="two different values"):
        InMemoryCache.from_env_var("SEED")


# ----------------------------------------------------------------------------------------------------
# from_file_path
# ----------------------------------------------------------------------------------------------------


def test_from_file_path(tmp_path):
    path = tmp_path / "seed.pkl"
    assert len(InMemoryCache.from_file_path(path)) == 0  # missing file: empty
    path.write_bytes(pickle.dumps({"a": b"1", ("b", 2): [3]}))
    cache = InMemoryCache.from_file_path(path, max_bytes=1000)
    assert cache.get("a") == b"1" and cache.get(("b", 2)) == [3] and cache.max_bytes == 1000


def test_from_file_path_errors(tmp_path):
    not_dict = tmp_path / "list.pkl"
    not_dict.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CacheError, match="holds a list, expected a dict"):
        InMemoryCache.from_file_path(not_dict)
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x05not a pickle")
    with pytest.raises(CacheError, match="does not unpickle"):
        InMemoryCache.from_file_path(garbage)
    with pytest.raises(CacheError, match="cannot read"):
        InMemoryCache.from_file_path(tmp_path)  # a directory
    none_value = tmp_path / "none.pkl"
    none_value.write_bytes(pickle.dumps({"k": None}))
    with pytest.raises(CacheError, match="none.pkl"):
        InMemoryCache.from_file_path(none_value)


def test_store_imports_no_torch():
    proc = run_python("import sys, aotcache.store.memory, aotcache.store.disk, aotcache.store.eviction\n"
                      "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    assert proc.stdout.strip() == "[]"


def test_pytorch_compatible_names():
    """PyTorch's torch/_inductor/cache.py names: Key / Value type variables, ``InMemoryCache._cache``."""
    import pickle

    from aotcache import store

    assert {"InMemoryCache", "OnDiskCache", "TieredCache", "Key", "Value"} <= set(dir(store))
    assert store.Key.__constraints__ and bytes in store.Value.__constraints__
    cache = store.InMemoryCache()
    cache.insert("s", 1)
    cache.insert(("t", 2), b"v")
    cache.insert(b"raw", [1])
    snapshot = cache._cache
    assert snapshot == {"s": 1, ("t", 2): b"v", b"raw": [1]}
    assert pickle.loads(pickle.dumps(snapshot)) == snapshot
