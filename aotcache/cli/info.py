"""``aotcache info``: directories, tiers, the configuration in effect, and versions.

NOTE [versions without imports]: torch's version comes from package metadata (``importlib.metadata``), not
from ``import torch`` (1.25 s here): ``aotcache info`` must stay instant on a machine where torch is slow
to import or broken.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Any

import click

from aotcache import config
from aotcache.cli import output
from aotcache.cli.app import json_option, state
from aotcache.cli.graph_entries import installed_torch_version

__all__ = ["info", "collect_info", "package_versions", "options_markdown"]

# Distributions whose versions matter when comparing two machines' caches (and bug reports).
_DISTRIBUTIONS = ("aotcache", "torch", "redis", "filelock", "zstandard", "click", "rich")


def package_versions() -> dict[str, str | None]:
    """Installed versions of aotcache's runtime dependencies (None when not installed); imports none of them."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = installed_torch_version()  # with its local tag (NOTE [torch's local version tag])
    return versions


def _tier_rows() -> list[dict[str, Any]]:
    """One row per configured tier: where it lives and what it holds now."""
    from aotcache.cli import stores
    from aotcache.store.disk import version_dir_name
    from aotcache.store.factory import resolve_tier_names

    enabled = config.get("enabled")
    rows: list[dict[str, Any]] = []
    for name in resolve_tier_names():
        row: dict[str, Any] = {"tier": name, "active": enabled}
        if name == "memory":
            row["location"] = "inside each process"
        elif name == "disk":
            handles = stores.open_disk_tiers()
            row["location"] = str(stores.store_dir())
            row["format_dir"] = version_dir_name()
            row["namespaces"] = [handle.namespace for handle in handles]
            row["max_bytes_per_namespace"] = config.get("max_bytes")
            row["entries"] = sum(len(handle.cache) for handle in handles)
            row["bytes"] = sum(handle.cache.total_bytes() for handle in handles)
        elif name == "redis":
            url = config.get("redis_url")
            if not url:
                row.update(active=False, location=None, note="no redis_url set (AOTCACHE_REDIS_URL)")
            else:
                row.update(_redis_row(url))
        rows.append(row)
    return rows


def _redis_row(url: str) -> dict[str, Any]:
    from aotcache.store.interface import CacheError
    from aotcache.store.redis import RedisCache

    try:
        cache = RedisCache(url)
    except CacheError as exc:
        return {"location": url, "reachable": False, "note": str(exc)}
    try:
        described = cache.describe()
        return {"location": described["url"], "reachable": cache.ping(), "ttl_s": described["ttl_s"],
                "timeout_s": described["timeout_s"]}
    finally:
        cache.close()


def collect_info() -> dict[str, Any]:
    """Everything ``aotcache info`` shows, as plain data."""
    from aotcache.cli import stores
    from aotcache.store import frame
    from aotcache.store.journal import default_journal_path

    return {
        "versions": package_versions(),
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "platform": platform.platform(), "python_executable": sys.executable},
        "paths": {"cache_dir": config.get("cache_dir"), "store_dir": stores.store_dir(),
                  "stats_journal": default_journal_path()},
        "formats": {"frame_version": frame.FRAME_VERSION, "frame_header_bytes": frame.HEADER_SIZE},
        "tiers": _tier_rows(),
        "config": config.describe(),
    }


def _render(data: dict[str, Any]) -> None:
    console = output.console()
    rows = [(name, version or "not installed") for name, version in data["versions"].items()]
    rows.append(("platform", data["platform"]["platform"]))
    console.print(output.make_table("Versions", ("component", "version"), rows))
    console.print(output.make_table("Paths", ("what", "path"), list(data["paths"].items())))
    tier_rows = []
    for row in data["tiers"]:
        if row["tier"] == "disk":
            bound = output.format_bytes(row["max_bytes_per_namespace"])
            detail = (f"{row['entries']} entries, {output.format_bytes(row['bytes'])} in "
                      f"{len(row['namespaces'])} namespace(s); bound {bound} per namespace")
        elif row["tier"] == "redis":
            detail = row.get("note") or ("reachable" if row.get("reachable") else "NOT reachable")
        else:
            detail = "per process, not persistent"
        tier_rows.append((row["tier"], "yes" if row["active"] else "no", row.get("location") or "-", detail))
    console.print(output.make_table("Tiers (fastest first)", ("tier", "active", "location", "state"), tier_rows))
    config_rows = [(item["name"], _show_value(item["value"]), item["source"]) for item in data["config"]]
    table = output.make_table("Configuration in effect", ("option", "value", "source"), config_rows)
    table.caption = "Each option is set by AOTCACHE_<OPTION> (e.g. AOTCACHE_MAX_BYTES=5GiB); see docs/store.md."
    console.print(table)


def _show_value(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, (tuple, list)):
        return ",".join(str(item) for item in value)
    return str(value)


@click.command()
@json_option
def info() -> None:
    """Show directories, tiers, the configuration in effect and versions."""
    output.emit(collect_info(), _render, as_json=state().as_json)


def options_markdown() -> str:
    """The options table of docs/store.md, generated from the registry (a test keeps the two in sync)."""
    lines = ["| option | env var | default | accepted | meaning |", "|---|---|---|---|---|"]
    for name, option in sorted(config.options().items()):
        if name == "cache_dir":
            default = "`$XDG_CACHE_HOME/aotcache` or `~/.cache/aotcache`"
        else:
            default = f"`{_show_value(option.default_value())}`"
        lines.append(f"| `{name}` | `{option.env_var}` | {default} | {option.form} | {option.help} |")
    return "\n".join(lines) + "\n"
