"""The `aotcache` command: info / stats / ls / prune / clear on caches filled by real OnDiskCache inserts."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from aotcache.cli import cli
from aotcache.cli.info import options_markdown
from aotcache.store.disk import OnDiskCache
from aotcache.store.factory import open_tiers
from aotcache.store.journal import StatsJournal, default_journal_path
from tests.conftest import REPO_ROOT, run_python
from tests.store.test_disk import age_entries

ENTRY_VALUES = {f"key-{index}": bytes([index]) * (1000 * (index + 1)) for index in range(4)}


def invoke(*args: str, input: str | None = None):
    """Run the command in-process; stdout and stderr are kept apart so that --json output can be parsed."""
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def invoke_json(*args: str):
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def populated(isolated_cache_dir):
    """Entries in two disk namespaces: four of 1-4 kB in ``default``, one in ``graphs``."""
    default = OnDiskCache("default")
    for key, value in ENTRY_VALUES.items():
        assert default.insert(key, value)
    default.close()
    graphs = OnDiskCache("graphs")
    assert graphs.insert(("graph", 1), {"code": "x" * 100})
    graphs.close()
    return isolated_cache_dir


def command_path() -> list[str]:
    """The installed console script next to this interpreter (editable install), else ``python -m``."""
    script = Path(sys.executable).with_name("aotcache")
    return [str(script)] if script.exists() else [sys.executable, "-m", "aotcache.cli"]


# ----------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------


def test_info_json_reports_dirs_tiers_config_and_versions(populated):
    data = invoke_json("info")
    assert data["paths"]["cache_dir"] == str(populated)
    import torch

    # torch.__version__ with its local tag (2.14.1+cu130), which PyPI's CUDA wheels' metadata lacks
    assert data["versions"]["torch"] == torch.__version__
    assert data["versions"]["aotcache"] == importlib.metadata.version("aotcache")
    assert data["versions"]["python"].count(".") == 2
    disk = next(row for row in data["tiers"] if row["tier"] == "disk")
    assert disk["namespaces"] == ["default", "graphs"]
    assert disk["entries"] == 5
    redis = next(row for row in data["tiers"] if row["tier"] == "redis")
    assert redis["active"] is False  # no redis_url configured
    config_rows = {row["name"]: row for row in data["config"]}
    assert config_rows["cache_dir"]["source"] == "env"
    assert config_rows["max_bytes"]["source"] == "default"


def test_info_tables_and_secret_redacted(populated, monkeypatch):
    monkeypatch.setenv("AOTCACHE_SECRET", "hunter2")
    result = invoke("info")
    assert result.exit_code == 0, result.stderr
    for title in ("Versions", "Paths", "Tiers", "Configuration in effect"):
        assert title in result.stdout
    assert "hunter2" not in result.stdout
    assert "<set>" in result.stdout


def test_global_cache_dir_and_redis_url_override_the_environment(populated, tmp_path):
    other = tmp_path / "other-cache"
    cache = OnDiskCache("elsewhere", other / "store" / "elsewhere")
    assert cache.insert("only-here", b"1234")
    data = invoke_json("--cache-dir", str(other), "ls")
    assert [entry["key"] for entry in data["entries"]] == ["only-here"]
    info = invoke_json("--cache-dir", str(other), "--redis-url", "redis://127.0.0.1:1/0", "info")
    config_rows = {row["name"]: row for row in info["config"]}
    assert config_rows["cache_dir"] == {**config_rows["cache_dir"], "value": str(other), "source": "override"}
    assert config_rows["redis_url"]["value"] == "redis://127.0.0.1:1/0"
    redis = next(row for row in info["tiers"] if row["tier"] == "redis")
    assert redis["reachable"] is False  # nothing listens on port 1: reported, not a crash


def test_store_subcommands_do_not_import_torch(populated):
    # A fresh interpreter: run every store subcommand, then check that torch was never imported.
    code = """
import sys
from click.testing import CliRunner
from aotcache.cli import cli
for args in (["info"], ["stats"], ["ls"], ["prune", "--max-bytes", "1MB"], ["clear", "--yes"], ["info", "--json"]):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (args, result.output)
print("torch imported:", "torch" in sys.modules)
"""
    proc = run_python(code)
    assert "torch imported: False" in proc.stdout


def test_docs_options_table_matches_the_registry():
    text = (REPO_ROOT / "docs" / "store.md").read_text(encoding="utf-8")
    assert options_markdown() in text, "regenerate the table in docs/store.md from aotcache.cli.info.options_markdown()"


# ----------------------------------------------------------------------------------------------------
# stats
# ----------------------------------------------------------------------------------------------------


def test_stats_shows_journal_counters_per_tier_and_reset(isolated_cache_dir):
    journal = StatsJournal(default_journal_path())
    cache = open_tiers("memory,disk", namespace="default", journal=journal)
    assert cache.insert("a", b"x" * 500)
    assert cache.get("a") == b"x" * 500  # memory hit
    assert cache.get("missing") is None  # a miss in both tiers
    cache.close()
    assert journal.flush()

    data = invoke_json("stats")
    assert list(data["tiers"]) == ["memory", "disk"]  # fastest first
    assert data["tiers"]["memory"]["hits"] == 1
    assert data["tiers"]["memory"]["misses"] == 1
    assert data["tiers"]["disk"]["misses"] == 1
    assert data["tiers"]["disk"]["inserts"] == 1
    assert data["tiers"]["memory"]["hit_rate"] == 0.5
    occupancy = {(row["tier"], row["namespace"]): row for row in data["occupancy"]}
    assert occupancy["disk", "default"]["entries"] == 1

    human = invoke("stats")
    assert human.exit_code == 0
    assert "Tier counters" in human.stdout and "Stored now" in human.stdout

    reset = invoke_json("stats", "--reset")
    assert reset["tiers"] == {}
    assert not default_journal_path().exists()


def test_stats_shows_sections_no_one_claimed(isolated_cache_dir):
    journal = StatsJournal(default_journal_path())
    journal.add("graphcache:bypass", {"unsafe_op": 3})
    assert journal.flush()
    data = invoke_json("stats")
    assert data["other"] == {"graphcache:bypass": {"unsafe_op": 3}}
    assert "unsafe_op" in invoke("stats").stdout


# ----------------------------------------------------------------------------------------------------
# ls
# ----------------------------------------------------------------------------------------------------


def test_ls_lists_every_namespace_with_sizes(populated):
    data = invoke_json("ls", "--sort", "size")
    assert data["total_entries"] == 5
    keys = [entry["key"] for entry in data["entries"]]
    assert keys[:4] == ["key-3", "key-2", "key-1", "key-0"]  # largest first
    assert {entry["namespace"] for entry in data["entries"]} == {"default", "graphs"}
    sizes = [entry["size"] for entry in data["entries"]]
    assert data["total_bytes"] == sum(sizes)
    assert all(entry["size"] > len(ENTRY_VALUES.get(entry["key"], b"")) for entry in data["entries"])

    only_graphs = invoke_json("ls", "--namespace", "graphs")
    assert [entry["namespace"] for entry in only_graphs["entries"]] == ["graphs"]
    assert invoke_json("ls", "--namespace", "nothing-here")["entries"] == []
    assert len(invoke_json("ls", "--limit", "2")["entries"]) == 2

    human = invoke("ls")
    assert "key-3" in human.stdout and "5 entries" in human.stdout


# ----------------------------------------------------------------------------------------------------
# prune
# ----------------------------------------------------------------------------------------------------


def test_prune_keeps_the_most_recently_used_entries(isolated_cache_dir):
    cache = OnDiskCache("default", max_bytes=0)
    keys = [f"entry-{index}" for index in range(6)]
    for key in reversed(keys):  # inserted in the opposite order of use
        assert cache.insert(key, os.urandom(1000))
    age_entries(cache, 60)  # written a minute ago: reads are recorded (at most once a second per entry)
    for key in keys:  # now used in order: entry-5 is the most recently used
        assert cache.get(key) is not None
    entry_size = cache.total_bytes() // 6
    bound = entry_size * 3 + entry_size // 2

    dry = invoke_json("prune", "--max-bytes", str(bound), "--dry-run")
    assert dry["removed_entries"] == 3 and len(invoke_json("ls")["entries"]) == 6

    data = invoke_json("prune", "--max-bytes", str(bound))
    assert data["removed_entries"] == 3
    assert [entry["key"] for entry in data["removed"]] == ["entry-0", "entry-1", "entry-2"]
    remaining = sorted(entry["key"] for entry in invoke_json("ls")["entries"])
    assert remaining == ["entry-3", "entry-4", "entry-5"]
    assert OnDiskCache("default").total_bytes() <= bound
    assert data["bytes_after"] <= bound


def test_prune_uses_one_lru_order_across_namespaces_and_forms(isolated_cache_dir):
    """Small entries (rows) in one namespace, large ones (files) in another, used alternately."""
    rows, files = OnDiskCache("rows", max_bytes=0), OnDiskCache("files", max_bytes=0)
    for index in range(4):
        assert rows.insert(f"row-{index}", os.urandom(1000)) and files.insert(f"file-{index}", os.urandom(40_000))
    for cache in (rows, files):
        age_entries(cache, 60)
        cache.close()
    order = ["row-0", "file-0", "row-1", "file-1", "row-2", "file-2", "row-3", "file-3"]  # oldest use first
    for key in order:
        assert (rows if key.startswith("row") else files).get(key) is not None
        time.sleep(0.002)
    sizes = {entry["key"]: entry["size"] for entry in invoke_json("ls")["entries"]}
    assert sizes["row-0"] < 32 * 1024 <= sizes["file-0"]  # both forms are listed
    bound = sum(sizes[key] for key in order[3:])  # room for the five most recently used

    dry = invoke_json("prune", "--max-bytes", str(bound), "--dry-run")
    assert [entry["key"] for entry in dry["removed"]] == order[:3] and dry["bytes_after"] == bound
    data = invoke_json("prune", "--max-bytes", str(bound))
    assert [entry["key"] for entry in data["removed"]] == order[:3]
    assert data["entries_before"] == 8 and data["bytes_after"] == bound
    assert sorted(entry["key"] for entry in invoke_json("ls")["entries"]) == sorted(order[3:])
    assert rows.total_bytes() + files.total_bytes() == bound
    assert rows._usage.approximate_total() == rows.total_bytes()  # counters resynced by the prune
    assert files._usage.approximate_total() == files.total_bytes()


def test_prune_counts_and_removes_libraries_of_replaced_aoti_entries(isolated_cache_dir):
    """Issue 13 item 11: libraries materialized for AOTInductor entries that were since replaced stayed in
    aoti_libs/ forever, outside max_bytes. They count in the bound, in one LRU order with the entries."""
    from aotcache.compilers.aoti_lib import library_path

    cache = OnDiskCache("aot", max_bytes=0)
    replaced = library_path(b"\x7fELF library of a replaced entry" * 1000)
    assert cache.insert("entry", os.urandom(5000))
    age_entries(cache, 30)
    os.utime(replaced, (time.time() - 120, time.time() - 120))  # last loaded two minutes ago
    assert cache.get("entry") is not None
    current = library_path(b"\x7fELF library of the current entry" * 1000)
    os.utime(current, (time.time() - 120, time.time() - 120))
    assert library_path(b"\x7fELF library of the current entry" * 1000) == current  # a reuse refreshes it
    assert replaced.parent.name == "aoti_libs" and replaced.exists()

    occupancy = {row["namespace"]: row for row in invoke_json("stats")["occupancy"]}
    assert occupancy["aoti_libs"]["bytes"] == replaced.stat().st_size + current.stat().st_size
    bound = cache.total_bytes() + current.stat().st_size
    data = invoke_json("prune", "--max-bytes", str(bound))
    assert [entry["key"] for entry in data["removed"]] == [f"aoti_libs/{replaced.name}"]
    assert not replaced.exists() and current.exists() and cache.get("entry") is not None
    assert data["bytes_after"] == bound and data["entries_before"] == 3


def test_prune_accepts_units_and_rejects_bad_sizes(populated):
    kept = invoke("prune", "--max-bytes", "1MB")
    assert kept.exit_code == 0 and "Removed 0 of 5 entries" in kept.stdout
    bad = invoke("prune", "--max-bytes", "ten")
    assert bad.exit_code == 2
    assert "--max-bytes 'ten' is not valid" in bad.stderr and "byte count" in bad.stderr
    zero = invoke("prune", "--max-bytes", "0")
    assert zero.exit_code == 1 and "aotcache clear" in zero.stderr
    assert invoke_json("ls")["total_entries"] == 5


def test_prune_defaults_to_the_configured_bound(populated, monkeypatch):
    monkeypatch.setenv("AOTCACHE_MAX_BYTES", "4kB")
    data = invoke_json("prune")
    assert data["max_bytes"] == 4000
    assert data["bytes_after"] <= 4000 and data["removed_entries"] >= 3


# ----------------------------------------------------------------------------------------------------
# clear
# ----------------------------------------------------------------------------------------------------


def test_clear_refuses_without_yes_when_not_interactive(populated):
    result = invoke("clear", input="y\n")  # stdin is not a terminal: no prompt, even with input available
    assert result.exit_code == 1
    assert "refusing to clear" in result.stderr and "--yes" in result.stderr
    assert result.stdout == ""
    assert invoke_json("ls")["total_entries"] == 5


def test_clear_with_yes_empties_every_namespace(populated):
    data = invoke_json("clear", "--yes")
    assert data["removed"] == 5
    assert {row["tier"]: row["removed"] for row in data["tiers"]} == {"disk/default": 4, "disk/graphs": 1}
    assert invoke_json("ls")["total_entries"] == 0
    assert OnDiskCache("default").get("key-0") is None


def test_clear_one_namespace(populated):
    result = invoke("clear", "--yes", "-n", "graphs")
    assert result.exit_code == 0 and "Cleared disk/graphs: 1 entries removed." in result.stdout
    assert {entry["namespace"] for entry in invoke_json("ls")["entries"]} == {"default"}


def test_clear_redis_needs_a_configured_redis(populated):
    result = invoke("clear", "--tier", "redis", "--yes")
    assert result.exit_code == 1 and "AOTCACHE_REDIS_URL" in result.stderr


@pytest.mark.redis
def test_redis_tier_listing_stats_and_clear(populated, redis_server, monkeypatch):
    monkeypatch.setenv("AOTCACHE_REDIS_URL", redis_server.url)
    cache = open_tiers("redis", namespace="shared")
    assert cache.insert("remote-key", b"r" * 2000)
    cache.close()
    listed = invoke_json("ls", "--tier", "redis")
    assert [(entry["tier"], entry["namespace"], entry["key"]) for entry in listed["entries"]] == [
        ("redis", "shared", "remote-key")]
    occupancy = {(row["tier"], row["namespace"]): row for row in invoke_json("stats")["occupancy"]}
    assert occupancy["redis", "shared"]["entries"] == 1
    assert invoke_json("info")["tiers"][2]["reachable"] is True

    assert invoke("clear", "--yes").exit_code == 0  # the default clears the local disk only
    assert invoke_json("ls", "--tier", "redis")["total_entries"] == 1
    cleared = invoke_json("clear", "--tier", "redis", "--yes")
    assert cleared["removed"] == 1
    assert invoke_json("ls", "--tier", "all")["total_entries"] == 0


def test_unreachable_redis_is_a_clear_error_not_a_traceback(populated):
    result = invoke("--redis-url", "redis://127.0.0.1:1/0", "ls", "--tier", "redis")
    assert result.exit_code == 1
    assert result.stderr.startswith("aotcache: error: cannot list Redis at 127.0.0.1:1")
    stats = invoke_json("--redis-url", "redis://127.0.0.1:1/0", "stats")
    assert any(row["tier"] == "redis" and "cannot list Redis" in row["error"] for row in stats["occupancy"])


# ----------------------------------------------------------------------------------------------------
# configuration errors and real processes
# ----------------------------------------------------------------------------------------------------


def test_bad_env_var_is_one_line_exit_2(populated, monkeypatch):
    monkeypatch.setenv("AOTCACHE_MAX_BYTES", "ten")
    result = invoke("stats")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("aotcache: error: AOTCACHE_MAX_BYTES='ten' is not valid")
    # --cache-dir overrides a bad AOTCACHE_CACHE_DIR for the invocation
    monkeypatch.delenv("AOTCACHE_MAX_BYTES")
    monkeypatch.setenv("AOTCACHE_CACHE_DIR", "   ")
    assert invoke("ls").exit_code == 2
    assert invoke("--cache-dir", str(populated), "ls").exit_code == 0


@pytest.mark.parametrize("url", ["notaurl", "http://host:6379/0", "redis://:6379/0", "redis://host:port/0",
                                 "redis://host:6379/zero"])
def test_malformed_redis_url_is_one_line_naming_the_variable_and_the_form(populated, url):
    """Issue 13 item 11: `AOTCACHE_REDIS_URL=notaurl aotcache stats` / `ls --tier all` printed a traceback."""
    command = command_path()
    for args in (["stats"], ["ls", "--tier", "all"]):
        proc = subprocess.run([*command, *args], env=dict(os.environ, AOTCACHE_REDIS_URL=url),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"aotcache: error: AOTCACHE_REDIS_URL={url!r} is not valid")
        assert "redis://host:port/db" in proc.stderr and proc.stderr.count("\n") == 1


def test_malformed_redis_url_in_the_library_names_the_variable(monkeypatch):
    from aotcache.config import ConfigError
    from aotcache.store.factory import open_tiers
    from aotcache.store.interface import CacheError
    from aotcache.store.redis import RedisCache

    monkeypatch.setenv("AOTCACHE_REDIS_URL", "notaurl")
    with pytest.raises(ConfigError, match=r"AOTCACHE_REDIS_URL='notaurl' .*redis://host:port/db"):
        open_tiers(namespace="aot")
    with pytest.raises(CacheError, match=r"invalid Redis URL .*redis://host:port/db"):
        RedisCache("redis://host:port/0")


def test_unknown_env_var_is_a_warning(populated, monkeypatch):
    monkeypatch.setenv("AOTCACHE_MAX_BYTE", "1GB")
    data = invoke("ls", "--json")
    assert data.exit_code == 0
    assert "AOTCACHE_MAX_BYTE is not an aotcache option" in data.stderr
    json.loads(data.stdout)


def test_installed_command_in_real_processes(populated):
    env = dict(os.environ)
    command = command_path()

    listed = subprocess.run([*command, "ls", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["total_entries"] == 5

    stats = subprocess.run([*command, "--json", "stats"], env=env, capture_output=True, text=True, timeout=120)
    assert stats.returncode == 0, stats.stderr
    assert {row["namespace"] for row in json.loads(stats.stdout)["occupancy"]} == {"default", "graphs"}

    refused = subprocess.run([*command, "clear"], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1 and "refusing to clear" in refused.stderr

    bad = subprocess.run([*command, "info"], env=dict(env, AOTCACHE_STRICT="maybe"), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert "AOTCACHE_STRICT" in bad.stderr and "Traceback" not in bad.stderr

    cleared = subprocess.run([*command, "clear", "--yes"], env=env, capture_output=True, text=True, timeout=120)
    assert cleared.returncode == 0, cleared.stderr
    assert OnDiskCache("default").total_bytes() == 0
