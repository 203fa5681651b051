"""Per-job counters in ``aotcache stats``: compiles, remote hits, bytes fetched, lock waits, time saved.

The compiled-graph cache writes them to journal sections ``job:<job id>`` (NOTE [job counters] in
aotcache/autograd_cache/cache.py); the job id is AOTCACHE_JOB_ID, else torchrun's TORCHELASTIC_RUN_ID.
"""

from __future__ import annotations

from collections.abc import Mapping

import click

from aotcache.cli import output
from aotcache.cli.stats import StatsSection
from aotcache.store.journal import JOB_SECTION_PREFIX

__all__ = ["JOB_STATS_SECTION", "collect_job_stats", "render_job_stats"]

_FIELDS = ("compile", "hit", "remote_hit", "bytes_fetched", "lock_wait_s", "compile_s", "time_saved_s")


def collect_job_stats(sections: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{job id: {counter: value}}`` from the claimed ``job:`` sections (prefix stripped), by job id."""
    return {job: {name: counts.get(name, 0) for name in _FIELDS} for job, counts in sorted(sections.items())}


def render_job_stats(jobs: Mapping[str, Mapping[str, float]]) -> None:
    """One row per job (only when some process ran with a job id): compiles, hits, of which from a remote
    tier, bytes fetched from it, seconds waited on others' compiles, seconds compiling, seconds saved."""
    if not jobs:
        click.echo("Jobs: none recorded (set AOTCACHE_JOB_ID, or run under torchrun, to count per job).")
        return
    rows = [(job, int(c["compile"]), int(c["hit"]), int(c["remote_hit"]), output.format_bytes(c["bytes_fetched"]),
             f"{c['lock_wait_s']:.1f} s", f"{c['compile_s']:.1f} s", f"{c['time_saved_s']:.1f} s")
            for job, c in jobs.items()]
    columns = ("job", "compiles", "hits", "remote", "fetched", "waited", "compiling", "saved")
    output.print_table("Jobs (all processes of this cache dir)", columns, rows, numeric=columns[1:])


JOB_STATS_SECTION = StatsSection("jobs", JOB_SECTION_PREFIX, collect_job_stats, render_job_stats)
