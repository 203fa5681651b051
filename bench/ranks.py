"""Ranks benchmark: one compile per job, with torchrun ranks sharing one Redis (or a 3-node Redis Cluster).

Each rank is its own "machine" (its own ``AOTCACHE_CACHE_DIR``), all share one Redis; the model is a small
transformer (``nn.TransformerEncoderLayer``, d_model 64, 2 heads, + a linear head), trained for one step.
Per compiler (``nop`` / ``aoti`` / ``inductor``) and rank count, jobs in this order:

* ``cold``: an empty Redis; every rank misses, one compiles each graph, the others wait and load.
* ``single_warm``: one process, a new cache dir, the same Redis: the warm first step of one process.
* ``warm``: all ranks, new cache dirs, the same Redis: every rank loads from Redis.
* ``torch_compile``: plain ``torch.compile(model)`` on every rank, each with an empty private Inductor cache
  (only with ``--torch-compile``; the nop compiler has no torch.compile counterpart).

Per job: compiles (summed over ranks), the spread between the first and last rank's end of first step
(after a barrier before the step), the slowest first step, bytes fetched from Redis, time waited on locks.
Then ``dead_holder``: plain processes (not torchrun: torchrun would tear the job down) on their own cache
dirs; the first one's compiler hangs, three survivors start, the holder is killed with SIGKILL, and the
delay until a survivor starts compiling is reported with the survivors' compile count.
``--cluster`` repeats everything with a 3-node Redis Cluster (``redis+cluster://``). ``--large`` measures a
100 MB entry on a server started with ``--proto-max-bulk-len 32mb``: insert time, N concurrent reader
processes' aggregate throughput, a small-GET client's latency meanwhile (idle vs busy), Redis memory.

Goals: compiles per job = distinct graphs of one process (2 here: forward and backward); the cold job's
spread <= one load (the single warm step); warm job's slowest step <= single warm + 0.5 s; a dead holder
replaced within the lease (5 s) plus one compile.

Usage: ``python bench/ranks.py [--compilers nop,aoti] [--ranks 4,16] [--cluster] [--torch-compile]``;
results go to ``bench/results/ranks.json`` and a printed table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "ranks.json"
sys.path.insert(0, str(REPO))

from tests.conftest import RedisClusterServers, RedisServer  # noqa: E402  (one way to start servers)


# ----------------------------------------------------------------------------------------------------
# Private Redis servers
# ----------------------------------------------------------------------------------------------------


def _cli(port: int, *args: str) -> str:
    """``redis-cli -p port args...``'s output."""
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30).stdout


def _server(workdir: Path, *extra: str) -> RedisServer:
    """A started redis-server on a free loopback port, no persistence (the tests' fixture class)."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(workdir, extra)
    server.start()
    return server


class Redis:
    """One server (``nodes=1``) or a Redis Cluster of ``nodes`` masters."""

    def __init__(self, workdir: Path, nodes: int = 1) -> None:
        self.nodes = nodes
        if nodes == 1:
            self.servers = [_server(workdir)]
            return
        cluster = RedisClusterServers(workdir, nodes)
        cluster.start()
        self.servers = cluster.servers

    @property
    def url(self) -> str:
        port = self.servers[0].port
        return f"redis://127.0.0.1:{port}/0" if self.nodes == 1 else f"redis+cluster://127.0.0.1:{port}"

    def flush(self) -> None:
        for server in self.servers:
            _cli(server.port, "flushall")

    def used_memory(self) -> int:
        total = 0
        for server in self.servers:
            for line in _cli(server.port, "info", "memory").splitlines():
                if line.startswith("used_memory:"):
                    total += int(line.split(":")[1])
        return total

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


# ----------------------------------------------------------------------------------------------------
# Children
# ----------------------------------------------------------------------------------------------------


def _model_and_input() -> tuple[Any, Any]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(64, 2, dim_feedforward=128, dropout=0.0, batch_first=True),
                          nn.Linear(64, 8))
    return model, torch.randn(4, 16, 64)


def slow_compiler(gm: Any, example_inputs: Any) -> Any:
    """The nop compiler after ``BENCH_COMPILE_SLEEP`` seconds, marking its start (dead-holder runs)."""
    from aotcache.compilers.nop import nop_compiler

    with open(os.environ["BENCH_MARK"], "a") as mark:
        mark.write(f"{time.time()}\n")
    time.sleep(float(os.environ["BENCH_COMPILE_SLEEP"]))
    return nop_compiler(gm, example_inputs)


def rank_child(args: argparse.Namespace) -> None:
    """One torchrun rank: barrier, one training step, its timings and cache counters to ``--out``."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    os.environ["AOTCACHE_CACHE_DIR"] = str(Path(args.cache_root) / f"rank{rank}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.cache_root) / f"inductor{rank}")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    model, x = _model_and_input()
    if args.mode == "torch_compile":
        compiled = torch.compile(model)
    else:
        from aotcache import aot_module

        compiled = aot_module(model, fw_compiler=args.compiler)
    if distributed:
        dist.barrier()
    started = time.time()
    loss = compiled(x).pow(2).mean()
    loss.backward()
    ended = time.time()
    stats: dict[str, Any] = {}
    if args.mode != "torch_compile":
        from aotcache.autograd_cache.cache import default_cache

        stats = default_cache().stats()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "start": started, "end": ended, "first_step_s": ended - started, "loss": loss.item(),
         "stats": stats}))
    if distributed:
        dist.destroy_process_group()


def holder_child(args: argparse.Namespace) -> None:
    """A dead-holder participant: one training step with the slow compiler, counters to ``--out``."""
    from aotcache import aot_module
    from aotcache.autograd_cache.cache import default_cache

    model, x = _model_and_input()
    compiled = aot_module(model, fw_compiler=slow_compiler)
    print("ready", flush=True)
    loss = compiled(x).pow(2).mean()
    loss.backward()
    Path(args.out).write_text(json.dumps({"end": time.time(), "loss": loss.item(), "stats": default_cache().stats()}))


# ----------------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------------


def _env(redis_url: str | None, threads: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AOTCACHE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    if redis_url:
        env["AOTCACHE_REDIS_URL"] = redis_url
    return env


def run_job(name: str, ranks: int, mode: str, compiler: str, redis_url: str, workdir: Path,
            threads: int) -> dict[str, Any]:
    """A torchrun job of ``ranks`` ranks, each with a new cache dir; per-job figures."""
    out = workdir / f"{name}-out"
    out.mkdir(parents=True)
    cache_root = workdir / f"{name}-caches"
    env = _env(redis_url, threads)
    env["AOTCACHE_JOB_ID"] = name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(Path(__file__).resolve()), "--rank-child", "--mode", mode, "--compiler", compiler,
               "--out", str(out), "--cache-root", str(cache_root)]
    started = time.time()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.time() - started
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    rows = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    ends = [row["end"] for row in rows]
    stats = [row["stats"] for row in rows]
    compiler_ranks = [row for row in rows if row["stats"].get("compile")]
    return {
        "ranks": len(rows), "wall_s": round(wall, 2),
        "compiles": sum(s.get("compile", 0) for s in stats) if mode != "torch_compile" else None,
        "compiling_ranks": len(compiler_ranks),
        "spread_s": round(max(ends) - min(ends), 3),
        "last_after_compiler_s": (round(max(ends) - max(row["end"] for row in compiler_ranks), 3)
                                  if compiler_ranks else None),
        "slowest_first_step_s": round(max(row["first_step_s"] for row in rows), 3),
        "fastest_first_step_s": round(min(row["first_step_s"] for row in rows), 3),
        "bytes_fetched": sum(s.get("bytes_fetched", 0) for s in stats),
        "remote_hits": sum(s.get("remote_hit", 0) for s in stats),
        "lock_wait_s": round(sum(s.get("lock_wait_s", 0) for s in stats), 2),
        "lock_timeouts": sum(s.get("lock_timeout", 0) for s in stats),
        "same_loss": len({round(row["loss"], 6) for row in rows}) == 1,
    }


LARGE_READER = """
import sys, time
from aotcache.store.redis import RedisCache
cache = RedisCache(sys.argv[1], prefix="large", timeout=30)
start_at, rounds = float(sys.argv[2]), int(sys.argv[3])
while time.time() < start_at:
    time.sleep(0.005)
started, size = time.time(), 0
for _ in range(rounds):
    size += len(cache.get("aot/large/0"))
print(size, time.time() - started, flush=True)
"""


def run_large(workdir: Path, readers: int, size_mb: int = 100, whole: bool = False) -> dict[str, Any]:
    """A chunked ``size_mb`` entry on a server capped at 32 MB per request, read by ``readers`` processes;
    ``whole``: the same entry as one value on an uncapped server (the layout before chunking), for comparison."""
    import statistics

    from aotcache.store.redis import RedisCache

    server = _server(workdir / "large", *(() if whole else ("--proto-max-bulk-len", "32mb")))
    url = f"redis://127.0.0.1:{server.port}/0"
    try:
        value = os.urandom(size_mb * 1024 * 1024)
        cache = RedisCache(url, prefix="large", timeout=30, chunk_bytes=2 * len(value) if whole else None)
        started = time.perf_counter()
        stored = cache.insert("aot/large/0", value)
        insert_s = time.perf_counter() - started
        probe = RedisCache(url, prefix="probe")
        probe.insert("small", b"s")

        def latencies(seconds: float) -> list[float]:
            found, end = [], time.monotonic() + seconds
            while time.monotonic() < end:
                began = time.perf_counter()
                probe.get("small")
                found.append(time.perf_counter() - began)
                time.sleep(0.002)
            return found

        idle = latencies(2.0)
        start_at = time.time() + 3
        procs = [subprocess.Popen([sys.executable, "-c", LARGE_READER, url, str(start_at), "3"],
                                  env=_env(None, 1), stdout=subprocess.PIPE, text=True) for _ in range(readers)]
        time.sleep(max(0.0, start_at - time.time()))
        busy: list[float] = []
        while any(proc.poll() is None for proc in procs):
            busy.extend(latencies(0.5))
        outs = [proc.communicate()[0].split() for proc in procs]
        total = sum(int(out[0]) for out in outs)
        wall = max(float(out[1]) for out in outs)

        def pct(values: list[float], q: float) -> float:
            return round(1000 * sorted(values)[min(len(values) - 1, int(q * len(values)))], 2)

        return {"size_mb": size_mb, "layout": "whole" if whole else "chunked", "stored": stored,
                "insert_s": round(insert_s, 2), "readers": readers,
                "read_mb_per_s": round(total / wall / 2**20, 1), "reads": 3 * readers,
                "probe_idle_ms_p50": pct(idle, 0.5), "probe_idle_ms_p99": pct(idle, 0.99),
                "probe_busy_ms_p50": pct(busy, 0.5), "probe_busy_ms_p99": pct(busy, 0.99),
                "probe_busy_ms_max": round(1000 * max(busy), 2), "probe_busy_samples": len(busy),
                "probe_errors": probe.stats.errors, "probe_mean_ms": round(1000 * statistics.mean(busy), 2),
                "redis_used_memory": int(next(line.split(":")[1] for line in _cli(
                    server.port, "info", "memory").splitlines() if line.startswith("used_memory:")))}
    finally:
        server.stop()


def run_dead_holder(redis_url: str, workdir: Path, threads: int, compile_sleep: float) -> dict[str, Any]:
    """Kill -9 the compiling process; how soon a survivor compiles, and how many compile."""
    env = _env(redis_url, threads)

    def start(name: str, sleep_s: float) -> subprocess.Popen:
        child_env = {**env, "AOTCACHE_CACHE_DIR": str(workdir / f"dead-{name}"), "BENCH_COMPILE_SLEEP": str(sleep_s),
                     "BENCH_MARK": str(workdir / f"dead-{name}.mark")}
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--holder-child", "--out",
                                 str(workdir / f"dead-{name}.json")], env=child_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    holder = start("holder", 3600)
    survivors: list[subprocess.Popen] = []
    try:
        holder.stdout.readline()
        ready = time.time()
        while not (workdir / "dead-holder.mark").exists():
            if holder.poll() is not None:
                return {"error": holder.stderr.read()[-2000:]}
            time.sleep(0.05)
        trace_s = time.time() - ready  # from "ready" to the compile: the capture a survivor does too
        survivors = [start(f"s{i}", compile_sleep) for i in range(3)]
        for proc in survivors:
            proc.stdout.readline()
        time.sleep(2 * trace_s + 2)  # the survivors have traced and wait on the live holder
        holder.send_signal(signal.SIGKILL)
        killed = time.time()
        holder.wait(timeout=30)
        for proc in survivors:
            proc.wait(timeout=600)
    finally:
        for proc in [holder, *survivors]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    marks = [float(line) for i in range(3) if (workdir / f"dead-s{i}.mark").exists()
             for line in (workdir / f"dead-s{i}.mark").read_text().split()]
    results = [json.loads((workdir / f"dead-s{i}.json").read_text()) for i in range(3)
               if (workdir / f"dead-s{i}.json").exists()]
    return {
        "survivors_ok": len(results),
        "survivor_compiles": sum(r["stats"].get("compile", 0) for r in results),
        "replaced_after_s": round(min(marks) - killed, 2) if marks else None,
        "compile_s": round(max((r["stats"].get("compile_s", 0) for r in results), default=0), 2),
        "last_survivor_done_after_kill_s": round(max(r["end"] for r in results) - killed, 2) if results else None,
        "lock_timeouts": sum(r["stats"].get("lock_timeout", 0) for r in results),
        "same_loss": len({round(r["loss"], 6) for r in results}) == 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compilers", default="nop")
    parser.add_argument("--ranks", default="4,16")
    parser.add_argument("--cluster", action="store_true", help="also run with a 3-node Redis Cluster")
    parser.add_argument("--torch-compile", action="store_true", help="also run plain torch.compile jobs")
    parser.add_argument("--dead-holder-sleep", type=float, default=2.0,
                        help="seconds the survivors' compiler sleeps per graph in the dead-holder run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--large", default="", help="reader counts for the 100 MB entry run, e.g. 1,4,8")
    parser.add_argument("--skip-jobs", action="store_true", help="only the --large run")
    parser.add_argument("--rank-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--holder-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="aotcache", help=argparse.SUPPRESS)
    parser.add_argument("--compiler", default="nop", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cache-root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_child:
        return rank_child(args)
    if args.holder_child:
        return holder_child(args)
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed: run `bash scripts/setup.sh`")
    results: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "cpus": os.cpu_count(), "threads": args.threads, "runs": []}
    stores = [] if args.skip_jobs else [("redis", 1)] + ([("cluster3", 3)] if args.cluster else [])
    if args.skip_jobs and RESULTS.exists():  # keep the jobs of an earlier run
        results["runs"] = [run for run in json.loads(RESULTS.read_text()).get("runs", []) if "large" not in run]
    with tempfile.TemporaryDirectory(prefix="aotcache-ranks-") as tmp:
        for readers in [int(n) for n in args.large.split(",") if n]:
            for whole in (False, True):
                store = "redis-whole" if whole else "redis-capped-32mb"
                results["runs"].append({"store": store, "large": run_large(Path(tmp) / f"l{readers}{whole}", readers,
                                                                           whole=whole)})
                print("large", store, results["runs"][-1]["large"], flush=True)
                _save(results)
        for store, nodes in stores:
            redis = Redis(Path(tmp) / store, nodes)
            try:
                for compiler in args.compilers.split(","):
                    for ranks in [int(r) for r in args.ranks.split(",")]:
                        if compiler != "nop" and ranks > 4:
                            continue  # real compilers: 4 ranks only (2 shared cores)
                        redis.flush()
                        workdir = Path(tmp) / f"{store}-{compiler}-{ranks}"
                        run: dict[str, Any] = {"store": store, "compiler": compiler, "ranks": ranks, "jobs": {}}
                        for job, job_ranks, mode in (("cold", ranks, "aotcache"), ("single_warm", 1, "aotcache"),
                                                     ("warm", ranks, "aotcache")):
                            run["jobs"][job] = run_job(job, job_ranks, mode, compiler, redis.url, workdir,
                                                       args.threads)
                            print(store, compiler, ranks, job, run["jobs"][job], flush=True)
                        run["redis_used_memory"] = redis.used_memory()
                        if args.torch_compile and compiler != "nop":
                            run["jobs"]["torch_compile"] = run_job("torch_compile", ranks, "torch_compile", compiler,
                                                                   None, workdir, args.threads)
                            print(store, compiler, ranks, "torch_compile", run["jobs"]["torch_compile"], flush=True)
                        results["runs"].append(run)
                        _save(results)
                redis.flush()
                dead_dir = Path(tmp) / f"{store}-dead"
                dead_dir.mkdir()
                results["runs"].append({"store": store, "dead_holder": run_dead_holder(
                    redis.url, dead_dir, args.threads, args.dead_holder_sleep)})
                print(store, "dead_holder", results["runs"][-1]["dead_holder"], flush=True)
                _save(results)
            finally:
                redis.stop()
    _save(results)
    print_table(results)


def _save(results: dict[str, Any]) -> None:
    """Write what is measured so far (a long run that fails late keeps its earlier jobs)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'store':9} {'compiler':8} {'ranks':>5} {'job':13} {'compiles':>8} {'spread s':>8} "
          f"{'slowest s':>9} {'fetched':>10} {'wait s':>7}")
    for run in results["runs"]:
        if "large" in run:
            large = run["large"]
            print(f"{run['store']:17} {large['size_mb']} MB entry, {large['readers']} readers: "
                  f"{large['read_mb_per_s']} MB/s in all; small GET p50/p99 {large['probe_idle_ms_p50']}/"
                  f"{large['probe_idle_ms_p99']} ms idle, {large['probe_busy_ms_p50']}/{large['probe_busy_ms_p99']} "
                  f"ms busy (max {large['probe_busy_ms_max']}); Redis {large['redis_used_memory'] / 2**20:.0f} MiB")
            continue
        if "dead_holder" in run:
            dead = run["dead_holder"]
            print(f"{run['store']:9} dead holder: replaced after {dead.get('replaced_after_s')} s, survivors compiled "
                  f"{dead.get('survivor_compiles')} time(s), last done {dead.get('last_survivor_done_after_kill_s')} s "
                  f"after the kill, lock timeouts {dead.get('lock_timeouts')}")
            continue
        for job, row in run["jobs"].items():
            if "error" in row:
                print(f"{run['store']:9} {run['compiler']:8} {run['ranks']:>5} {job:13} ERROR")
                continue
            compiles = "-" if row["compiles"] is None else row["compiles"]
            print(f"{run['store']:9} {run['compiler']:8} {run['ranks']:>5} {job:13} {compiles:>8} "
                  f"{row['spread_s']:>8.3f} {row['slowest_first_step_s']:>9.3f} {row['bytes_fetched']:>10} "
                  f"{row['lock_wait_s']:>7.2f}")


if __name__ == "__main__":
    main()
