"""The compiled-graph cache's part of ``aotcache stats``: hits, misses, bypass reasons, time saved.

Registered (by :mod:`aotcache.cli`) with :func:`aotcache.cli.stats.register_stats_section` for the journal sections the cache writes
(see NOTE [counters] in aotcache/autograd_cache/cache.py): ``autograd`` (counters), ``autograd:bypass``
(one counter per bypass reason), ``autograd:fingerprint_fallback`` (one per fallback reason) and
``autograd:compiler_fallback`` (one per compiler fallback, NOTE [compiler fallback] in
aotcache/compilers/fallback.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from aotcache.cli import output
from aotcache.cli.stats import StatsSection

__all__ = ["GRAPH_STATS_SECTION", "collect_graph_stats", "render_graph_stats"]

_JOURNAL_PREFIX = "autograd"  # claims "autograd", "autograd:bypass", "autograd:*_fallback"

# (label, counter, formatter) of the counter table, in display order; counters not listed are shown after.
_ROWS: tuple[tuple[str, str, str], ...] = (
    ("hits", "hit", "count"),
    ("misses", "miss", "count"),
    ("guard misses (entry exists, guards fail)", "guard_miss", "count"),
    ("hit rate", "hit_rate", "rate"),
    ("bypasses (graph not cacheable)", "bypass", "count"),
    ("load errors (unusable entry, recompiled)", "load_error", "count"),
    ("store errors (tier faults)", "store_error", "count"),
    ("entries saved", "saved", "count"),
    ("not saved (all slots taken)", "not_saved", "count"),
    ("compiles", "compile", "count"),
    ("compile time", "compile_s", "seconds"),
    ("time saved by hits", "time_saved_s", "seconds"),
    ("fingerprint hits (no capture)", "fingerprint_hit", "count"),
    ("fingerprint misses", "fingerprint_miss", "count"),
    ("fingerprint fallbacks", "fingerprint_fallback", "count"),
    ("calls that change their own state (no alias)", "fingerprint_state_changed", "count"),
    ("calls that change their own state (recorded to replay)", "fingerprint_state_recorded", "count"),
    ("warm starts that replayed a state change (no capture)", "fingerprint_replay", "count"),
    ("recorded state changes not replayed (traced)", "fingerprint_replay_refused", "count"),
    ("compiler fallbacks (compiled by the next compiler)", "compiler_fallback", "count"),
    ("hits from a remote tier (Redis)", "remote_hit", "count"),
    ("bytes fetched from a remote tier", "bytes_fetched", "bytes"),
    ("waits for another compile", "lock_wait", "count"),
    ("time waited for another compile", "lock_wait_s", "seconds"),
    ("lock timeouts", "lock_timeout", "count"),
)


def _sorted_reasons(counts: Mapping[str, float]) -> dict[str, int]:
    return {reason: int(count) for reason, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))}


def collect_graph_stats(sections: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """JSON-ready totals from the claimed journal sections (names with ``autograd`` stripped)."""
    counters = {name: value for name, value in sorted((sections.get("") or {}).items())}
    looked_up = counters.get("hit", 0) + counters.get("miss", 0) + counters.get("guard_miss", 0)
    return {
        "counters": counters,
        "lookups": looked_up,
        "hit_rate": round(counters.get("hit", 0) / looked_up, 4) if looked_up else None,
        "time_saved_s": counters.get("time_saved_s", 0.0),
        "compile_s": counters.get("compile_s", 0.0),
        "bypass_reasons": _sorted_reasons(sections.get(":bypass") or {}),
        "fingerprint_fallback_reasons": _sorted_reasons(sections.get(":fingerprint_fallback") or {}),
        "compiler_fallback_reasons": _sorted_reasons(sections.get(":compiler_fallback") or {}),
        "other_sections": {f"{_JOURNAL_PREFIX}{name}": dict(counts) for name, counts in sorted(sections.items())
                           if name not in ("", ":bypass", ":fingerprint_fallback", ":compiler_fallback")},
    }


def _format(kind: str, value: Any) -> str:
    if kind == "rate":
        return "-" if value is None else f"{value:.0%}"
    if kind == "seconds":
        return f"{float(value or 0.0):.3f} s"
    if kind == "bytes":
        return output.format_bytes(value or 0)
    return str(int(value or 0))


def render_graph_stats(data: Mapping[str, Any]) -> None:
    """Draw the compiled-graph cache's counters and reasons (``aotcache stats``)."""
    counters = data["counters"]
    if not counters and not data["bypass_reasons"]:
        click.echo("Compiled-graph cache: nothing recorded yet (jobs record it in the stats journal as they run).")
        return
    values = {**counters, "hit_rate": data["hit_rate"]}
    known = {counter for _, counter, _ in _ROWS}
    rows = [(label, _format(kind, values.get(counter, 0))) for label, counter, kind in _ROWS
            if counter in ("hit", "miss", "hit_rate") or values.get(counter)]
    rows += [(name, _format("seconds" if name.endswith("_s") else "count", value))
             for name, value in counters.items() if name not in known and value]
    output.print_table("Compiled-graph cache (all processes)", ("counter", "value"), rows,
                       numeric=("value",))
    for title, reasons in (("Not cached: bypass reasons", data["bypass_reasons"]),
                           ("Fingerprint fallbacks: reasons", data["fingerprint_fallback_reasons"]),
                           ("Compiler fallbacks: reasons", data["compiler_fallback_reasons"])):
        if reasons:
            output.print_table(title, ("reason", "count"), list(reasons.items()), numeric=("count",))
    for name, counts in data["other_sections"].items():
        output.print_table(name, ("counter", "value"), sorted(counts.items()), numeric=("value",))


GRAPH_STATS_SECTION = StatsSection("autograd", _JOURNAL_PREFIX, collect_graph_stats, render_graph_stats)
