"""Multi-process jobs on gloo (CPU): ranks sharing a cache dir get their own rank's results, warm and cold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.aot.test_training_loops import _gloo_teardown_abort
from tests.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# A forward that reads its place in the job: the capture bakes rank and world size into the graph.
_RANK_DEPENDENT = r'''
import json, os, torch, torch.distributed as dist
from torch import nn
import aotcache
from aotcache.autograd_cache.cache import default_cache

class ScaledByRank(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x):
        return self.linear(x) * (dist.get_rank() + 1) + dist.get_world_size()

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = ScaledByRank()
compiled = aotcache.compile(model, compiler="nop")
x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))  # the same input on every rank
with torch.no_grad():
    got, want = compiled(x), model(x)
counters = default_cache().counters
print("RESULT " + json.dumps({"equal": torch.equal(got, want), "route": compiled.route,
                              **{name: counters.get(name, 0) for name in ("compile", "fingerprint_hit")}}), flush=True)
dist.barrier()  # NOTE [gloo teardown aborts]
dist.destroy_process_group()
'''


def run_gloo_job(script: str, cache_dir, world_size: int = 2, timeout: float = 180) -> list[dict]:
    """Run ``script`` as ``world_size`` gloo ranks (torchrun's environment variables) sharing ``cache_dir``; each
    rank's RESULT line as a dict, in rank order. Retried once for gloo's teardown abort only (NOTE [gloo teardown
    aborts] in test_training_loops.py)."""
    def run() -> tuple[list[int], list[tuple[str, str]]]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world_size),
               "AOTCACHE_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
        ranks = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in range(world_size)]
        try:
            outputs = [rank.communicate(timeout=timeout) for rank in ranks]
        finally:
            for rank in ranks:  # a rank left waiting on a dead peer's collective
                if rank.poll() is None:
                    rank.kill()
                    rank.communicate()
        for number, (rank, (out, err)) in enumerate(zip(ranks, outputs)):
            if rank.returncode != 0:
                print(f"rank {number} exited with {rank.returncode}; stdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}")
        return [rank.returncode for rank in ranks], outputs

    codes, outputs = run()
    if any(codes) and _gloo_teardown_abort(codes, outputs):
        print("RETRIED: gloo's teardown abort after every rank printed its result")
        codes, outputs = run()
    assert not any(codes)
    return [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
            for out, _ in outputs]


def test_a_warm_rank_runs_its_own_ranks_graph_not_the_alias_another_rank_recorded(tmp_path):
    """Found: with a forward reading ``dist.get_rank()``, a warm rank 1 found the call-fingerprint alias rank 0
    had recorded (the fingerprint saw equal code on both ranks) and ran rank 0's graph: rank 0's values on rank 1,
    no error. The default group's rank and world size are now part of the fingerprint (NOTE [The process group in
    the fingerprint] in aot/ambient.py); each rank warm-starts from its own alias, without a trace."""
    cold = run_gloo_job(_RANK_DEPENDENT, tmp_path / "cache")
    warm = run_gloo_job(_RANK_DEPENDENT, tmp_path / "cache")
    assert [rank["equal"] for rank in cold + warm] == [True] * 4
    assert [rank["route"] for rank in cold + warm] == ["aot"] * 4
    assert [rank["compile"] for rank in cold] == [1, 1]  # two graphs: each rank's own constants
    assert [(rank["compile"], rank["fingerprint_hit"]) for rank in warm] == [(0, 1), (0, 1)]
