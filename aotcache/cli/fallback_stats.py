"""The capture fallback's part of ``aotcache stats``: call signatures that could not be captured whole, by reason.

The journal section ``fallback`` (NOTE [Capture fallback] in aotcache/aot/fallback.py) holds one counter per
decision: ``partial:<reason>`` (run through torch.compile, regions compiled by aotcache), ``eager:<reason>``
(run eagerly) and ``region`` (a region between graph breaks that ran eagerly too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from aotcache.cli import output
from aotcache.cli.stats import StatsSection

__all__ = ["FALLBACK_STATS_SECTION", "collect_fallback_stats", "render_fallback_stats"]

_JOURNAL_SECTION = "fallback"  # == aotcache.aot.fallback.JOURNAL_SECTION (not imported: the CLI avoids torch)


def collect_fallback_stats(sections: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """JSON-ready totals: ``{"by_reason": {"partial:data_dependent": n, ...}, "total": n}``."""
    counts = sections.get("") or {}
    by_reason = {name: int(value) for name, value in sorted(counts.items(), key=lambda item: (-item[1], item[0]))}
    return {"by_reason": by_reason, "total": sum(by_reason.values())}


def render_fallback_stats(data: Mapping[str, Any]) -> None:
    """Draw the fallback decisions per reason (nothing when there were none)."""
    if not data["by_reason"]:
        return
    rows = []
    for name, count in data["by_reason"].items():
        how, _, reason = name.partition(":")
        rows.append((how, reason or "-", count))
    output.print_table("Capture fallbacks (all processes)",
                       ("ran as", "reason", "count"), rows, numeric=("count",))
    click.echo("  partial: torch.compile graph breaks, regions compiled by aotcache; eager: ran as written")


FALLBACK_STATS_SECTION = StatsSection("fallback", _JOURNAL_SECTION, collect_fallback_stats, render_fallback_stats)
