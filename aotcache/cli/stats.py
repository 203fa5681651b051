"""``aotcache stats``: cumulative counters from the stats journal, per tier, plus what each tier holds now.

The journal (``<cache_dir>/stats.json``, see :mod:`aotcache.store.journal`) holds counters by section.
Each :class:`StatsSection` claims the journal sections whose name starts with its prefix and renders them;
sections nobody claims are still shown, generically, under "other counters". A later component adds its
section (e.g. hit / miss / bypass reasons of the graph cache) with :func:`register_stats_section`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import click

from aotcache import config
from aotcache.cli import output
from aotcache.cli.app import CliError, json_option, state

__all__ = ["StatsSection", "register_stats_section", "stats_sections", "stats", "collect_stats",
           "render_tier_table", "tier_rows_from_journal"]

Counters = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class StatsSection:
    """One part of ``aotcache stats``: the journal sections it claims, their JSON form, and a renderer.

    ``collect`` gets the claimed journal sections with ``prefix`` stripped from their names and returns
    JSON-ready data (stored under ``name`` in ``--json`` output); ``render`` draws that data for people.
    """

    name: str
    prefix: str
    collect: Callable[[Counters], Any]
    render: Callable[[Any], None]


# (label, counter name in the journal, formatter) of the rows of the tier table.
_TIER_ROWS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("hits", "hits", lambda value: str(int(value))),
    ("misses", "misses", lambda value: str(int(value))),
    ("hit rate", "hit_rate", lambda value: "-" if value is None else f"{value:.0%}"),
    ("inserts", "inserts", lambda value: str(int(value))),
    ("  of which backfills", "backfills", lambda value: str(int(value))),
    ("insert conflicts", "insert_conflicts", lambda value: str(int(value))),
    ("evictions", "evictions", lambda value: str(int(value))),
    ("errors (faults)", "errors", lambda value: str(int(value))),
    ("  of which corrupt", "corrupt", lambda value: str(int(value))),
    ("other secret (kept)", "unverified", lambda value: str(int(value))),
    ("bytes read", "bytes_read", output.format_bytes),
    ("bytes written", "bytes_written", output.format_bytes),
    ("time in get", "get_seconds", lambda value: f"{value:.3f} s"),
    ("time in insert", "insert_seconds", lambda value: f"{value:.3f} s"),
)


def tier_rows_from_journal(sections: Counters) -> dict[str, dict[str, Any]]:
    """Journal ``tier:<label>`` sections (prefix stripped) as table rows, fastest tier first, with hit rates."""
    rows = {}
    speed_order = {"memory": 0, "disk": 1, "redis": 2}  # fastest first, like the tiers themselves
    for label, counts in sorted(sections.items(), key=lambda item: (speed_order.get(item[0].split("#")[0], 3),
                                                                      item[0])):
        row: dict[str, Any] = dict(counts)
        rate = _hit_rate(row)
        row["hit_rate"] = None if rate is None else round(rate, 4)
        rows[label] = row
    return rows


def _render_tiers(rows: dict[str, dict[str, float]]) -> None:
    if not rows:
        click.echo("Tier counters: none recorded yet (jobs record them in the stats journal as they run).")
        return
    render_tier_table("Tier counters (cumulative, all processes)", rows)


def render_tier_table(title: str, rows: Mapping[str, Mapping[str, Any]]) -> None:
    """Per-tier counters (``TieredCache.stats_by_tier()`` or journal rows) as a table, one column per tier."""
    labels = list(rows)
    table_rows = []
    for label, counter, show in _TIER_ROWS:
        if counter == "hit_rate":
            values = [_hit_rate(rows[tier]) for tier in labels]
        else:
            values = [rows[tier].get(counter, 0) for tier in labels]
        table_rows.append((label, *(show(value) for value in values)))
    output.print_table(title, ("counter", *labels), table_rows, numeric=labels)


def _hit_rate(row: Mapping[str, Any]) -> float | None:
    looked_up = row.get("hits", 0) + row.get("misses", 0)
    return row.get("hits", 0) / looked_up if looked_up else None


_SECTIONS: list[StatsSection] = [StatsSection("tiers", "tier:", tier_rows_from_journal, _render_tiers)]


def register_stats_section(section: StatsSection) -> None:
    """Add (or replace, by name) a section of ``aotcache stats``; shown after the existing ones."""
    _SECTIONS[:] = [existing for existing in _SECTIONS if existing.name != section.name]
    _SECTIONS.append(section)


def stats_sections() -> list[StatsSection]:
    """The registered sections, in display order."""
    return list(_SECTIONS)


def _occupancy() -> list[dict[str, Any]]:
    """What each persistent tier holds now, per namespace (Redis: an error row when unreachable)."""
    from aotcache.cli import stores
    from aotcache.store.interface import CacheError

    rows: list[dict[str, Any]] = []
    for handle in stores.open_disk_tiers():
        rows.append({"tier": "disk", "namespace": handle.namespace, "entries": len(handle.cache),
                     "bytes": handle.cache.total_bytes(), "max_bytes": handle.cache.max_bytes})
    from aotcache.store import derived_files

    libraries = derived_files.entries()
    if libraries:  # counted in the disk bound by `aotcache prune` (NOTE [derived files in the bound])
        rows.append({"tier": "disk", "namespace": derived_files.LIBRARY_DIR, "entries": len(libraries),
                     "bytes": sum(info.size for info in libraries), "max_bytes": config.get("max_bytes")})
    try:
        redis_handles = stores.open_redis_tiers()
        for handle in redis_handles:
            listed = list(handle.cache.entries())
            rows.append({"tier": "redis", "namespace": handle.namespace, "entries": len(listed),
                         "bytes": sum(info.size for info in listed), "max_bytes": None})
        stores.close_all(redis_handles)
    except CacheError as exc:
        rows.append({"tier": "redis", "namespace": None, "entries": None, "bytes": None, "max_bytes": None,
                     "error": str(exc)})
    return rows


def collect_stats() -> dict[str, Any]:
    """Everything ``aotcache stats`` shows, as plain data."""
    from aotcache.store.journal import StatsJournal, default_journal_path

    path = default_journal_path()
    journal_sections = StatsJournal(path).read(include_pending=False)
    data: dict[str, Any] = {"journal": path}
    claimed: set[str] = set()
    for section in _SECTIONS:
        mine = {name[len(section.prefix):]: counts for name, counts in journal_sections.items()
                if name.startswith(section.prefix)}
        claimed.update(section.prefix + name for name in mine)
        data[section.name] = section.collect(mine)
    data["other"] = {name: counts for name, counts in sorted(journal_sections.items()) if name not in claimed}
    data["occupancy"] = _occupancy()
    return data


def _render(data: dict[str, Any]) -> None:
    click.echo(f"Stats journal: {data['journal']}")
    for section in _SECTIONS:
        section.render(data[section.name])
    if data["other"]:
        rows = [(name, counter, value) for name, counts in data["other"].items()
                for counter, value in sorted(counts.items())]
        output.print_table("Other counters", ("section", "counter", "value"), rows, numeric=("value",))
    rows = []
    for row in data["occupancy"]:
        if row.get("error"):
            rows.append((row["tier"], "-", "-", "-", "-", row["error"]))
            continue
        bound = output.format_bytes(row["max_bytes"]) if row["max_bytes"] else "-"
        rows.append((row["tier"], row["namespace"], row["entries"], output.format_bytes(row["bytes"]), bound, ""))
    if rows:
        output.print_table("Stored now", ("tier", "namespace", "entries", "size", "bound", "note"), rows,
                           numeric=("entries", "size", "bound"))
    else:
        click.echo("Stored now: nothing (no disk namespace exists yet, no Redis configured).")


@click.command()
@click.option("--reset", is_flag=True, help="Forget the cumulative counters (entries are kept).")
@json_option
def stats(reset: bool) -> None:
    """Show cumulative hit / miss / insert / eviction / error counters per tier, and what each tier holds."""
    if reset:
        from aotcache.store.interface import CacheError
        from aotcache.store.journal import StatsJournal, default_journal_path

        try:
            StatsJournal(default_journal_path()).reset()
        except CacheError as exc:
            raise CliError(str(exc)) from None
    output.emit(collect_stats(), _render, as_json=state().as_json)
