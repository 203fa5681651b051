"""Shared output helpers for the ``aotcache`` command: tables for people, JSON for scripts.

Every subcommand builds plain data (dicts and lists) first, then hands it to :func:`emit`, which either
prints it as JSON (``--json``: valid JSON on stdout and nothing else) or calls a renderer that draws
rich tables. Keeping the data step separate is what makes ``--json`` and the tables agree.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click

__all__ = [
    "console",
    "emit",
    "make_table",
    "print_table",
    "format_bytes",
    "format_age",
    "format_timestamp",
    "to_jsonable",
    "short_json",
]


def console():
    """A rich console on the current ``sys.stdout`` (looked up at call time, so click's CliRunner captures it)."""
    from rich.console import Console  # imported lazily: --json output never needs rich

    return Console(file=sys.stdout, soft_wrap=False, highlight=False)


def to_jsonable(value: Any) -> Any:
    """Convert paths, tuples, sets and non-finite floats into JSON-friendly values (recursively)."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(item) for item in items]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def emit(data: Any, render: Callable[[Any], None], *, as_json: bool) -> None:
    """Print ``data`` as JSON on stdout when ``as_json``, else call ``render(data)`` to draw it for people."""
    if as_json:
        click.echo(json.dumps(to_jsonable(data), indent=2, sort_keys=False))
    else:
        render(data)


def make_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
               numeric: Iterable[str] = ()):
    """A rich Table with ``columns`` (those named in ``numeric`` right-aligned) and stringified ``rows``."""
    from rich.table import Table
    from rich.text import Text

    right = set(numeric)
    table = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", overflow="fold")
    for row in rows:
        # Text, not str: cells are data (keys, JSON with brackets), never rich markup
        table.add_row(*(Text("" if cell is None else str(cell)) for cell in row))
    return table


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
                numeric: Iterable[str] = ()) -> None:
    """Build a table with :func:`make_table` and print it on stdout."""
    console().print(make_table(title, columns, rows, numeric=numeric))


def format_bytes(size: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; binary units, one decimal past bytes."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_age(timestamp: float | None, *, now: float | None = None) -> str:
    """How long ago ``timestamp`` (unix seconds) was, e.g. ``"5s ago"``, ``"3h ago"``, ``"2d ago"``."""
    if not timestamp:
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - timestamp)
    for limit, divisor, unit in ((60, 1, "s"), (3600, 60, "m"), (86400, 3600, "h")):
        if seconds < limit:
            return f"{int(seconds // divisor)}{unit} ago"
    return f"{int(seconds // 86400)}d ago"


def format_timestamp(timestamp: float | None) -> str | None:
    """ISO-8601 local time of a unix timestamp (for JSON output), or None."""
    if not timestamp:
        return None
    return _dt.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def short_json(value: Any, limit: int = 100) -> str:
    """Compact JSON of ``value`` (strings as they are), cut to ``limit`` characters with ``...``."""
    text = value if isinstance(value, str) else json.dumps(to_jsonable(value), sort_keys=True,
                                                           separators=(",", ":"))
    return text if len(text) <= limit else text[:max(limit - 3, 1)] + "..."
