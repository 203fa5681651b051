"""The options registry: env parsing, strict errors, scoped overrides, read at use."""

from __future__ import annotations

from pathlib import Path

import pytest

from aotcache import config


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("AOTCACHE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert config.get("cache_dir") == tmp_path / ".cache" / "aotcache"
    assert config.get("strict") is False
    assert config.get("redis_url") is None
    assert config.get("max_bytes") > 0
    monkeypatch.delenv("AOTCACHE_REDIS_TIMEOUT")  # set for every test (NOTE [Redis timeouts under load])
    assert config.get("redis_timeout") == 0.25


def test_every_test_and_the_processes_it_starts_get_a_load_proof_redis_timeout():
    """NOTE [Redis timeouts under load] in tests/conftest.py: set in the environment (inherited by subprocesses),
    not by ``config.patch`` (which a fresh process never sees)."""
    import os

    assert os.environ["AOTCACHE_REDIS_TIMEOUT"] == "5" and config.get("redis_timeout") == 5.0


def test_env_read_at_use(monkeypatch):
    monkeypatch.setenv("AOTCACHE_MAX_BYTES", "2GiB")
    assert config.get("max_bytes") == 2 * 1024**3
    monkeypatch.setenv("AOTCACHE_MAX_BYTES", "500MB")
    assert config.get("max_bytes") == 500_000_000


@pytest.mark.parametrize("text,expected", [("0", False), ("false", False), ("FALSE", False), ("no", False),
                                           ("off", False), ("", False), ("1", True), ("true", True),
                                           ("Yes", True), ("on", True)])
def test_bool_parsing(monkeypatch, text, expected):
    monkeypatch.setenv("AOTCACHE_STRICT", text)
    assert config.get("strict") is expected


@pytest.mark.parametrize("name,var,value,fragment", [
    ("max_bytes", "AOTCACHE_MAX_BYTES", "ten", "byte count"),
    ("max_bytes", "AOTCACHE_MAX_BYTES", "10XB", "byte count"),
    ("strict", "AOTCACHE_STRICT", "maybe", "boolean"),
    ("redis_timeout", "AOTCACHE_REDIS_TIMEOUT", "fast", "seconds"),
    ("redis_timeout", "AOTCACHE_REDIS_TIMEOUT", "-1", "non-negative"),
    ("redis_ttl", "AOTCACHE_REDIS_TTL", "1h", "integer"),
    ("log_level", "AOTCACHE_LOG_LEVEL", "loud", "debug, info"),
    ("tiers", "AOTCACHE_TIERS", "memory,tape", "tiers"),
    ("lock_timeout", "AOTCACHE_LOCK_TIMEOUT", "soon", "seconds"),
    ("compress_min_bytes", "AOTCACHE_COMPRESS_MIN_BYTES", "-5", "byte count"),
    ("enabled", "AOTCACHE_ENABLED", "2", "boolean"),
    ("cache_dir", "AOTCACHE_CACHE_DIR", "  ", "directory"),
])
def test_bad_env_values_name_the_variable(monkeypatch, name, var, value, fragment):
    monkeypatch.setenv(var, value)
    with pytest.raises(config.ConfigError) as info:
        config.get(name)
    assert var in str(info.value)
    assert fragment in str(info.value)


def test_every_option_rejects_garbage_with_its_name(monkeypatch):
    """No option silently accepts a value that does not parse (free-form strings excepted)."""
    free_form = {"redis_url", "secret", "cache_dir"}
    for name, option in config.options().items():
        if name in free_form:
            continue
        monkeypatch.setenv(option.env_var, "%%garbage%%")
        with pytest.raises(config.ConfigError, match=option.env_var):
            config.get(name)
        monkeypatch.delenv(option.env_var)


def test_patch_scopes_and_nests(monkeypatch):
    monkeypatch.setenv("AOTCACHE_MAX_BYTES", "100")
    with config.patch(max_bytes=200):
        assert config.get("max_bytes") == 200
        with config.patch({"max_bytes": "1KiB", "strict": True}):
            assert config.get("max_bytes") == 1024
            assert config.get("strict") is True
        assert config.get("max_bytes") == 200
        assert config.get("strict") is False
    assert config.get("max_bytes") == 100


def test_patch_as_decorator():
    @config.patch(strict=True)
    def inner():
        return config.get("strict")

    assert inner() is True
    assert config.get("strict") is False


def test_patch_path_and_bad_values(tmp_path):
    with config.patch(cache_dir=str(tmp_path)):
        assert config.get("cache_dir") == Path(tmp_path)
    with pytest.raises(config.ConfigError, match="max_bytes"):
        config.patch(max_bytes="lots")
    with pytest.raises(config.ConfigError, match="unknown aotcache option"):
        config.patch(no_such_option=1)
    with pytest.raises(config.ConfigError, match="unknown aotcache option"):
        config.get("no_such_option")


def test_validate_environment_reports_unknown(monkeypatch):
    monkeypatch.setenv("AOTCACHE_MAX_BYTS", "1")
    with pytest.raises(config.ConfigError, match="AOTCACHE_MAX_BYTS is not an aotcache option"):
        config.validate_environment()


def test_describe_hides_secret(monkeypatch):
    monkeypatch.setenv("AOTCACHE_SECRET", "hunter2")
    rows = {row["name"]: row for row in config.describe()}
    assert rows["secret"]["value"] == "<set>"
    assert rows["secret"]["source"] == "env"
    assert rows["cache_dir"]["source"] == "env"


def test_an_unknown_variable_names_the_option_meant(monkeypatch):
    """A guessed name (the cache dir as AOTCACHE_DIR) was ignored silently; it is named, with the option."""
    monkeypatch.setenv("AOTCACHE_DIR", "/tmp/somewhere")
    monkeypatch.setenv("AOTCACHE_REDIS", "redis://x")
    problems = config.unknown_env_vars()
    assert "AOTCACHE_DIR is not an aotcache option (did you mean AOTCACHE_CACHE_DIR?)" in problems
    assert any("AOTCACHE_REDIS is not" in p and "AOTCACHE_REDIS_URL" in p for p in problems)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1, -0.5, None, True, "inf", "soon"])
def test_a_patched_trace_wait_is_checked_as_the_variable_is(value):
    """NOTE [How long a call waits for another thread's trace]: a typed ``config.patch(trace_wait_s=...)`` passed
    unchecked, so ``inf`` made the contended capture's wait raise OverflowError (``Condition.wait``), a trace failure
    that sent the model to the fallback; ``nan`` never gave up (its deadline compares false) and spun; ``None`` raised
    TypeError there. Each is a ConfigError when patched, as the variable's text is."""
    with pytest.raises(config.ConfigError, match="trace_wait_s"):
        config.patch(trace_wait_s=value)


@pytest.mark.parametrize("value, seconds", [(0, 0.0), (2.5, 2.5), (60, 60.0), ("0.5", 0.5)])
def test_a_patched_trace_wait_in_range_is_taken(value, seconds):
    with config.patch(trace_wait_s=value):
        assert config.get("trace_wait_s") == seconds and type(config.get("trace_wait_s")) is float
