"""Benchmark the store tiers against diskcache and PyTorch's ``torch._inductor.cache.OnDiskCache``.

For values of 1 KB, 100 KB and 10 MB, in one and in two concurrent processes, each backend gets ``insert``
(insert-once of distinct keys; diskcache's equivalent is ``Cache.add``) then ``get`` (hits of those keys).
Backends: our ``memory`` (InMemoryCache), ``disk`` (OnDiskCache), ``redis`` (RedisCache against a private
redis-server started on a free loopback port and stopped after), ``diskcache`` (diskcache.Cache, the
Python reference) and ``torch`` (torch._inductor.cache.OnDiskCache, when this torch has it).

Reported per case: p50 / p99 / mean latency per call and aggregate throughput (two processes: total calls
over the slower process's phase time, phases started together on a barrier). Each case runs ``--repeat``
times (5 for a full run), the backends interleaved, and the repetition with the lowest median latency is kept:
the machine is shared, and the least disturbed run is the best estimate of each backend's own cost. Ratios ``disk/diskcache``
are median-latency ratios (lower is better; goal: <= 1 for >= 100 KB, <= 2 for 1 KB); the JSON also has
mean-latency ratios, which on a shared machine carry other processes' interference.
Values are random bytes, stored uncompressed and unsigned by every backend (ours get
``compress_min_bytes=0`` and ``secret=""``; diskcache and torch never compress): like is compared with like.
Our disk tier stores values whose frame is under 32 KiB as rows of one SQLite database (as diskcache does
under its own 32 KB ``min_file_size``) and larger ones as one file each.

Results go to ``bench/results/store.json`` and a printed table.
Usage: ``python bench/store.py [--quick] [--backends memory,disk,redis,diskcache,torch] [--sizes 1KB,100KB]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

RESULTS_PATH = REPO_ROOT / "bench" / "results" / "store.json"
ALL_BACKENDS = ("memory", "disk", "redis", "diskcache", "torch")
SIZES = {"1KB": 1024, "100KB": 100 * 1024, "10MB": 10 * 1024 * 1024}
# Calls per process per phase: (full run, --quick).
COUNTS = {"1KB": (1200, 300), "100KB": (250, 80), "10MB": (24, 4)}


# ----------------------------------------------------------------------------------------------------
# A private redis-server
# ----------------------------------------------------------------------------------------------------


class PrivateRedis:
    """redis-server on a free 127.0.0.1 port, no persistence; ``stop()`` kills it."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `bash scripts/setup.sh`")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(b"FLUSHALL\r\n")
            conn.recv(16)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------------------
# Backends: each is (insert(key, value) -> bool, get(key) -> value | None, close())
# ----------------------------------------------------------------------------------------------------


def torch_on_disk_cache_class() -> tuple[Any, str | None]:
    """PyTorch's OnDiskCache class, or (None, why not)."""
    try:
        from torch._inductor.cache import OnDiskCache as TorchOnDiskCache
    except ImportError as exc:
        return None, f"torch._inductor.cache.OnDiskCache is not available in this torch: {exc}"
    return TorchOnDiskCache, None


def open_backend(kind: str, location: str) -> tuple[Any, Any, Any]:
    """A fresh backend of ``kind`` under ``location`` (a directory, or a Redis URL + '|' + prefix)."""
    if kind == "memory":
        from aotcache.store.memory import InMemoryCache

        cache = InMemoryCache()
        return cache.insert, cache.get, cache.close
    if kind == "disk":
        from aotcache.store.disk import OnDiskCache

        cache = OnDiskCache("bench", base_dir=location, max_bytes=0, secret="", compress_min_bytes=0)
        return cache.insert, cache.get, cache.close
    if kind == "redis":
        from aotcache.store.redis import RedisCache

        url, prefix = location.split("|")
        cache = RedisCache(url, prefix=prefix, timeout=5.0, secret="", compress_min_bytes=0)
        return cache.insert, cache.get, cache.close
    if kind == "diskcache":
        import diskcache

        cache = diskcache.Cache(location)
        return cache.add, cache.get, cache.close
    if kind == "torch":
        cls, why_not = torch_on_disk_cache_class()
        if cls is None:
            raise RuntimeError(why_not)
        cache = cls("bench")
        cache.__dict__["base_dir"] = Path(location)  # base_dir is a cached_property: point it at our dir
        return cache.insert, cache.get, lambda: None
    raise ValueError(f"unknown backend {kind!r}; use some of {', '.join(ALL_BACKENDS)}")


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def worker(kind: str, location: str, size: int, count: int, worker_index: int, barrier: Any, results: Any) -> None:
    """One process: warm up (``count // 2`` inserts and gets of other keys), then time ``count`` inserts and
    ``count`` gets of fresh keys, each phase started on the barrier."""
    try:
        insert, get, close = open_backend(kind, location)
        value = os.urandom(size)
        for index in range(max(2, count // 2)):  # a cache in use: directories exist, files are cached
            insert(f"warm-{worker_index}-{index}", value)
            get(f"warm-{worker_index}-{index}")
        keys = [f"key-{worker_index}-{index}" for index in range(count)]
        phases = {}
        for phase in ("insert", "get"):
            latencies = []
            barrier.wait(timeout=300)
            phase_start = time.perf_counter()
            for key in keys:
                start = time.perf_counter()
                if phase == "insert":
                    ok = insert(key, value)
                else:
                    ok = get(key) is not None
                latencies.append(time.perf_counter() - start)
                if not ok:
                    raise RuntimeError(f"{kind} {phase} of {key} failed")
            phases[phase] = {"latencies": latencies, "wall": time.perf_counter() - phase_start}
        close()
        results.put((worker_index, phases, None))
    except BaseException:  # report any failure to the parent instead of hanging it on the barrier
        barrier.abort()
        results.put((worker_index, None, traceback.format_exc()))


def run_case(kind: str, size_name: str, procs: int, count: int, workdir: Path, redis: PrivateRedis | None
             ) -> list[dict[str, Any]]:
    """Run one (backend, size, process count) case in fresh forked processes; rows for insert and get."""
    location = str(workdir / f"{kind}-{size_name}-{procs}-{uuid.uuid4().hex[:6]}")
    if kind == "redis":
        assert redis is not None
        redis.flush()
        location = f"{redis.url}|bench-{uuid.uuid4().hex[:6]}"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(procs)
    results = context.Queue()
    workers = [context.Process(target=worker, args=(kind, location, SIZES[size_name], count, index, barrier,
                                                    results)) for index in range(procs)]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=600) for _ in workers]
    for process in workers:
        process.join(timeout=60)
    errors = [error for _, _, error in outcomes if error]
    if errors:
        raise RuntimeError(f"{kind} {size_name} x{procs} failed:\n{errors[0]}")
    if kind != "redis":
        shutil.rmtree(location, ignore_errors=True)
    rows = []
    for phase in ("insert", "get"):
        latencies = sorted(lat for _, phases, _ in outcomes for lat in phases[phase]["latencies"])
        wall = max(phases[phase]["wall"] for _, phases, _ in outcomes)
        calls = len(latencies)
        rows.append({
            "backend": kind, "size": size_name, "bytes": SIZES[size_name], "procs": procs, "op": phase,
            "calls": calls, "p50_us": percentile(latencies, 0.5) * 1e6, "p99_us": percentile(latencies, 0.99) * 1e6,
            "mean_us": statistics.fmean(latencies) * 1e6, "ops_per_s": calls / wall,
            "mb_per_s": calls * SIZES[size_name] / wall / 1e6,
        })
    return rows


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def ratios(rows: list[dict[str, Any]], statistic: str = "p50_us") -> dict[str, dict[str, float]]:
    """Latency ratios disk/diskcache of ``statistic`` per size, op and process count (lower is better)."""
    index = {(row["backend"], row["size"], row["procs"], row["op"]): row for row in rows}
    found: dict[str, dict[str, float]] = {}
    for size in SIZES:
        for procs in (1, 2):
            for op in ("insert", "get"):
                ours, reference = index.get(("disk", size, procs, op)), index.get(("diskcache", size, procs, op))
                if ours and reference:
                    found.setdefault(size, {})[f"{op}_x{procs}"] = ours[statistic] / reference[statistic]
    return found


def format_us(value: float) -> str:
    return f"{value / 1000:.1f}ms" if value >= 10_000 else f"{value:.0f}us"


def print_table(rows: list[dict[str, Any]], found_ratios: dict[str, dict[str, float]], notes: list[str]) -> None:
    index = {(row["backend"], row["size"], row["procs"], row["op"]): row for row in rows}
    backends = [kind for kind in ALL_BACKENDS if any(row["backend"] == kind for row in rows)]
    header = (f"{'size':>6} {'backend':>10} | {'insert p50':>10} {'p99':>8} {'get p50':>9} {'p99':>8} | "
              f"{'ins/s x1':>9} {'ins/s x2':>9} {'get/s x1':>9} {'get/s x2':>9}")
    print(header)
    print("-" * len(header))
    for size in SIZES:
        for kind in backends:
            one_insert, one_get = index.get((kind, size, 1, "insert")), index.get((kind, size, 1, "get"))
            two_insert, two_get = index.get((kind, size, 2, "insert")), index.get((kind, size, 2, "get"))
            if not one_insert:
                continue

            def rate(row: dict[str, Any] | None) -> str:
                return f"{row['ops_per_s']:9.0f}" if row else f"{'-':>9}"

            print(f"{size:>6} {kind:>10} | {format_us(one_insert['p50_us']):>10} {format_us(one_insert['p99_us']):>8} "
                  f"{format_us(one_get['p50_us']):>9} {format_us(one_get['p99_us']):>8} | "
                  f"{rate(one_insert)} {rate(two_insert)} {rate(one_get)} {rate(two_get)}")
    if found_ratios:
        print("\ndisk/diskcache median-latency ratio (lower is better; goal <= 1 for >= 100KB, <= 2 for 1KB):")
        for size, by_case in found_ratios.items():
            cases = "  ".join(f"{case} {value:.2f}" for case, value in by_case.items())
            goal = 2.0 if SIZES[size] < 100 * 1024 else 1.0
            verdict = "meets goal" if max(by_case.values()) <= goal else "MISSES goal"
            print(f"  {size:>6}: {cases}  ({verdict})")
    for note in notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per case (a smoke run)")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS), help="comma-separated subset")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of 1KB,100KB,10MB")
    parser.add_argument("--procs", default="1,2", help="process counts to run, e.g. 1 or 1,2")
    parser.add_argument("--repeat", type=int, default=None, help="runs per case, best kept (default 5; 1 quick)")
    parser.add_argument("--output", default=str(RESULTS_PATH), help="where to write the JSON results")
    args = parser.parse_args(argv)
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    sizes = [name.strip() for name in args.sizes.split(",") if name.strip()]
    proc_counts = [int(text) for text in args.procs.split(",")]
    unknown = [name for name in backends if name not in ALL_BACKENDS] + [name for name in sizes if name not in SIZES]
    if unknown:
        parser.error(f"unknown backend or size: {', '.join(unknown)}")

    notes: list[str] = [
        "no compression on either side: disk and redis run with compress_min_bytes=0 (and unsigned, secret=''); "
        "diskcache and torch never compress",
        "disk stores frames under 32 KiB as SQLite rows (WAL, synchronous=NORMAL), larger ones as files; "
        "diskcache: SQLite rows under 32 KB, files above",
        "disk get also records LRU recency for an entry not accessed in the last second (a utime for a file, an "
        "UPDATE for a row); diskcache's default policy (least-recently-stored) records none",
    ]
    if "torch" in backends:
        # probed in a subprocess: every case runs in processes forked from this one, and a parent holding
        # torch (~1 GB of mappings) changes their memory behaviour for every backend alike
        probe = subprocess.run([sys.executable, "-c", "import torch\nfrom torch._inductor.cache import OnDiskCache"
                                "\nprint(torch.__version__)"], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            notes.append("torch._inductor.cache.OnDiskCache is not available: "
                         + (probe.stderr.strip().splitlines() or ["import failed"])[-1])
            backends.remove("torch")
        else:
            notes.append(f"torch backend: torch._inductor.cache.OnDiskCache from torch {probe.stdout.strip()} "
                         "(pickles values, one file lock per 4 hex digits of the key hash)")

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="aotcache-bench-store-"))
    redis = PrivateRedis(workdir) if "redis" in backends else None
    repeat = args.repeat or (1 if args.quick else 5)
    best: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    try:
        for size in sizes:
            count = COUNTS[size][1 if args.quick else 0]
            for procs in proc_counts:
                for attempt in range(repeat):
                    for kind in backends:
                        for row in run_case(kind, size, procs, count, workdir, redis):
                            case = (kind, size, procs, row["op"])
                            if case not in best or row["p50_us"] < best[case]["p50_us"]:
                                best[case] = row
                        print(f"  done {kind:>10} {size:>6} x{procs} (run {attempt + 1}/{repeat})",
                              file=sys.stderr, flush=True)
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    rows = list(best.values())
    found_ratios = ratios(rows)
    print_table(rows, found_ratios, notes)
    print(f"\n(total {elapsed:.0f} s{', quick' if args.quick else ''})")

    import diskcache

    document = {
        "benchmark": "store",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "diskcache": diskcache.__version__},
        "quick": args.quick,
        "repeat": repeat,
        "calls_per_process": {size: COUNTS[size][1 if args.quick else 0] for size in sizes},
        "seconds": elapsed,
        "results": rows,
        "ratios_disk_over_diskcache": found_ratios,
        "ratios_disk_over_diskcache_mean": ratios(rows, "mean_us"),
        "notes": notes,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_suffix(".json.tmp")
    temp.write_text(json.dumps(document, indent=1))
    os.replace(temp, output)
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
