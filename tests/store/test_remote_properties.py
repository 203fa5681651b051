"""Property tests: RedisCache and TieredCache([memory, disk, redis]) behave like an insert-once dict."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import redis as redis_py
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aotcache.store.disk import OnDiskCache
from aotcache.store.interface import encode_key
from aotcache.store.memory import InMemoryCache
from aotcache.store.redis import RedisCache
from aotcache.store.tiered import TieredCache

pytestmark = pytest.mark.redis


keys = st.one_of(
    st.text(max_size=4),
    st.binary(max_size=4),
    st.integers(min_value=-3, max_value=3),
    st.tuples(st.integers(min_value=0, max_value=2), st.text(max_size=2)),
)
values = st.one_of(st.binary(max_size=64), st.integers(), st.lists(st.text(max_size=3), max_size=3))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), keys, values),
        st.tuples(st.just("get"), keys),
        st.tuples(st.just("delete"), keys),
        st.tuples(st.just("corrupt"), keys),
        st.tuples(st.just("drop_memory"),),
    ),
    max_size=30,
)

_SETTINGS = settings(max_examples=25, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _model_key(key):
    return encode_key(key)  # the store's key identity (1 and "1" differ; equal tuples are one key)


@_SETTINGS
@given(ops=operations)
def test_redis_cache_matches_an_insert_once_dict(redis_server, ops):
    cache = RedisCache(redis_server.url, prefix=f"prop-{uuid.uuid4().hex}")
    raw = redis_py.Redis.from_url(redis_server.url)
    model: dict[bytes, object] = {}
    try:
        for op in ops:
            if _apply_to_cache_and_model(cache, op, model):
                continue
            if op[0] == "corrupt":
                name = cache.entry_name(op[1])
                if raw.exists(name):
                    raw.setrange(name, 20, b"\xde\xad")  # inside the checksum field
                    assert cache.get(op[1]) is None  # rejected and deleted
                    model.pop(_model_key(op[1]), None)
        assert {info.digest for info in cache.entries()} == {
            cache.entry_name(key).rsplit(":", 1)[1] for key in _original_keys(ops, model)}
    finally:
        cache.clear()
        cache.close()
        raw.close()


def _apply_to_cache_and_model(cache, op, model) -> bool:
    """Run an insert, get or delete ``op`` on ``cache`` and the insert-once dict ``model``, asserting they
    agree; False for other ops (the caller's own)."""
    if op[0] == "insert":
        _, key, value = op
        expected = _model_key(key) not in model
        assert cache.insert(key, value) is expected
        model.setdefault(_model_key(key), value)
    elif op[0] == "get":
        assert cache.get(op[1]) == model.get(_model_key(op[1]))
    elif op[0] == "delete":
        assert cache.delete(op[1]) is (model.pop(_model_key(op[1]), None) is not None)
    else:
        return False
    return True


def _original_keys(ops, model):
    """The keys of ``model`` as first given in ``ops`` (the model stores encoded keys)."""
    found = {}
    for op in ops:
        if len(op) > 1 and _model_key(op[1]) in model:
            found.setdefault(_model_key(op[1]), op[1])
    return list(found.values())


@_SETTINGS
@given(ops=operations)
def test_tiered_cache_matches_an_insert_once_dict(redis_server, ops):
    directory = Path(tempfile.mkdtemp(prefix="aotcache-prop-"))
    memory = InMemoryCache()
    disk = OnDiskCache("prop", base_dir=directory)
    remote = RedisCache(redis_server.url, prefix=f"prop-{uuid.uuid4().hex}")
    tiered = TieredCache([memory, disk, remote])
    raw = redis_py.Redis.from_url(redis_server.url)
    model: dict[bytes, object] = {}
    try:
        for op in ops:
            if _apply_to_cache_and_model(tiered, op, model):
                continue
            if op[0] == "corrupt":
                # A corrupt remote copy never changes what the stack answers: faster tiers or a miss.
                name = remote.entry_name(op[1])
                if raw.exists(name):
                    raw.setrange(name, 20, b"\xde\xad")
                assert tiered.get(op[1]) == model.get(_model_key(op[1]))
            elif op[0] == "drop_memory":
                memory.clear()  # the next get is answered by disk (or Redis) and backfills memory
        for key in _original_keys(ops, model):
            assert tiered.get(key) == model[_model_key(key)]
            assert memory.get(key) == model[_model_key(key)]
    finally:
        remote.clear()
        tiered.close()
        raw.close()
        shutil.rmtree(directory, ignore_errors=True)
