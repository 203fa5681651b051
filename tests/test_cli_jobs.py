"""``aotcache stats`` per job (NOTE [job counters]): compiles, remote hits, bytes fetched, lock waits."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from aotcache.cli import cli
from tests.conftest import run_python

RUN = """
import torch
from aotcache.aot import aot_function
from aotcache.compilers.nop import nop_compiler
f = aot_function(lambda x, w: (x * w).sin().sum(), nop_compiler)
f(torch.ones(3), torch.ones(3, requires_grad=True)).backward()
"""


@pytest.mark.redis
def test_stats_show_each_job_compiles_and_remote_fetches(tmp_path, redis_server, monkeypatch):
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    base = {"AOTCACHE_REDIS_URL": redis_server.url}
    run_python(RUN, env={**base, "AOTCACHE_CACHE_DIR": str(machine_a), "AOTCACHE_JOB_ID": "cold-job"})
    # torchrun's run id names the job when AOTCACHE_JOB_ID is unset; a new machine fetches from Redis
    run_python(RUN, env={**base, "AOTCACHE_CACHE_DIR": str(machine_b), "TORCHELASTIC_RUN_ID": "warm-job"})
    run_python(RUN, env={**base, "AOTCACHE_CACHE_DIR": str(machine_b), "TORCHELASTIC_RUN_ID": "warm-job"})
    monkeypatch.setenv("AOTCACHE_CACHE_DIR", str(machine_a))
    cold = json.loads(CliRunner().invoke(cli, ["stats", "--json"], catch_exceptions=False).output)["jobs"]
    assert cold["cold-job"]["compile"] == 1 and cold["cold-job"]["remote_hit"] == 0
    monkeypatch.setenv("AOTCACHE_CACHE_DIR", str(machine_b))
    result = CliRunner().invoke(cli, ["stats"], catch_exceptions=False, env={"COLUMNS": "200"})
    assert "Jobs" in result.output and "warm-job" in result.output
    warm = json.loads(CliRunner().invoke(cli, ["stats", "--json"], catch_exceptions=False).output)["jobs"]
    assert set(warm) == {"warm-job"}
    # the first process of machine b fetched from Redis; the second one found the entry on b's disk
    assert warm["warm-job"]["compile"] == 0 and warm["warm-job"]["hit"] == 2
    assert warm["warm-job"]["remote_hit"] == 1 and warm["warm-job"]["bytes_fetched"] > 0
    assert warm["warm-job"]["time_saved_s"] > 0
