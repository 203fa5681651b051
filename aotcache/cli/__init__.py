"""The ``aotcache`` command line: inspect and maintain the cache (``aotcache --help``).

Layout: :mod:`~aotcache.cli.app` (the click group, global options, error policy),
:mod:`~aotcache.cli.output` (tables and JSON), one module per family of subcommands (:mod:`~aotcache.cli.info`,
:mod:`~aotcache.cli.stats`, :mod:`~aotcache.cli.maintenance`; the compiled-graph cache's
:mod:`~aotcache.cli.graphs`, :mod:`~aotcache.cli.bundles` and :mod:`~aotcache.cli.graph_stats`; the per-op
kernel cache's :mod:`~aotcache.cli.eager`). A new subcommand is a click command in its own module, added to
the group below. See NOTE [fast start] in app.py: no module here imports torch at import time; only
``explain``, ``import`` and the ``eager`` subcommands import it when they run.
"""

from __future__ import annotations

from aotcache.cli.app import cli
from aotcache.cli.bundles import export_cmd, import_cmd
from aotcache.cli.eager import eager
from aotcache.cli.fallback_stats import FALLBACK_STATS_SECTION
from aotcache.cli.graph_stats import GRAPH_STATS_SECTION
from aotcache.cli.graphs import explain, graphs, show
from aotcache.cli.job_stats import JOB_STATS_SECTION
from aotcache.cli.info import info
from aotcache.cli.maintenance import clear, ls, prune
from aotcache.cli.stats import register_stats_section, stats

__all__ = ["cli", "main"]

for _command in (info, stats, ls, prune, clear, graphs, show, explain, export_cmd, import_cmd, eager):
    cli.add_command(_command)
register_stats_section(GRAPH_STATS_SECTION)
register_stats_section(JOB_STATS_SECTION)
register_stats_section(FALLBACK_STATS_SECTION)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``aotcache`` console script; exits with the command's status."""
    cli.main(args=args, prog_name="aotcache")
