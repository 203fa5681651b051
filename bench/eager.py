"""Benchmark of the per-op precompiled kernel cache (``aotcache.eager``).

Measures, for add / gelu / mm at a small and a medium size:
  * per-call time of the stock eager kernel, of a dispatched precompiled kernel (hit), and of a dispatched
    miss (the override's cost when no entry matches), best of several repeats;
  * time to load an op's kernels in a fresh process (``enable(op, preload=True)``: index read + dlopen),
    and the first call after it.
Results go to ``bench/results/eager.json`` and a table with ratios is printed.

Usage: ``python bench/eager.py [--cache-dir DIR] [--repeats 5] [--number 2000]``. The first run compiles
6 kernels with AOTInductor (~10 s each here); later runs with the same ``--cache-dir`` reuse them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

CASES = {
    # name: (op name, python expression building the args from `torch`, the eager call to time)
    "add small": ("aten::add.Tensor", "(torch.randn(16, 16), torch.randn(16, 16))", "torch.add(*args)"),
    "add medium": ("aten::add.Tensor", "(torch.randn(512, 512), torch.randn(512, 512))", "torch.add(*args)"),
    "gelu small": ("aten::gelu.default", "(torch.randn(256),)", "torch.nn.functional.gelu(*args)"),
    "gelu medium": ("aten::gelu.default", "(torch.randn(512, 512),)", "torch.nn.functional.gelu(*args)"),
    "mm small": ("aten::mm.default", "(torch.randn(16, 16), torch.randn(16, 16))", "torch.mm(*args)"),
    "mm medium": ("aten::mm.default", "(torch.randn(256, 256), torch.randn(256, 256))", "torch.mm(*args)"),
}

LOAD_SCRIPT = r"""
import json, sys, time
started = time.perf_counter()
import torch, aotcache.eager as eager
imported = time.perf_counter()
ops = eager.enable([sys.argv[1]], preload=True)
loaded = time.perf_counter()
args = eval(sys.argv[2], {"torch": torch})
first = time.perf_counter()
eval(sys.argv[3], {"torch": torch, "args": args})
done = time.perf_counter()
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported, "first_call_s": done - first,
                  "kernels_loaded": eager.stats()["kernels_loaded"], "hits": eager.stats()["hits"],
                  "inductor_imported": "torch._inductor" in sys.modules}))
"""


def best_us(statement: str, namespace: dict, number: int, repeats: int) -> float:
    return min(timeit.repeat(statement, number=number, repeat=repeats, globals=namespace)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="cache dir to (re)use; default: a fresh temp dir")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--number", type=int, default=2000, help="calls per repeat (small sizes)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "eager.json"))
    options = parser.parse_args()

    cache_dir = Path(options.cache_dir or tempfile.mkdtemp(prefix="aotcache-bench-eager-"))
    os.environ["AOTCACHE_CACHE_DIR"] = str(cache_dir)

    import torch

    import aotcache.eager as eager

    torch.manual_seed(0)
    rows = []
    for name, (op_name, args_expr, call) in CASES.items():
        args = eval(args_expr, {"torch": torch})
        started = time.perf_counter()
        result = eager.precompile(op_name, args)
        compile_s = time.perf_counter() - started if result.status == "compiled" else None
        number = options.number if "small" in name else max(options.number // 20, 20)
        namespace = {"torch": torch, "args": args}
        stock_us = best_us(call, namespace, number, options.repeats)
        miss_args = tuple(arg.t().contiguous().t() if arg.dim() == 2 else arg.double() for arg in args)
        with eager.enabled([op_name]):
            eager.reset_stats()
            hit_us = best_us(call, namespace, number, options.repeats)
            hits = eager.stats()["hits"]
            miss_us = best_us(call, {"torch": torch, "args": miss_args}, number, options.repeats)
        stock_miss_us = best_us(call, {"torch": torch, "args": miss_args}, number, options.repeats)
        assert hits == number * options.repeats, f"{name}: expected every timed call to hit, got {hits}"
        load = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, op_name, args_expr, call],
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                              check=True)
        load_info = json.loads(load.stdout.strip().splitlines()[-1])
        rows.append({"case": name, "op": op_name, "stock_us": stock_us, "hit_us": hit_us,
                     "hit_over_stock": hit_us / stock_us, "miss_us": miss_us, "stock_miss_args_us": stock_miss_us,
                     "miss_overhead_us": miss_us - stock_miss_us, "compile_s": compile_s,
                     "fresh_process": load_info})
        print(f"{name}: done", file=sys.stderr)

    report = {
        "benchmark": "aotcache.eager per-call overhead and load time",
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "repeats": options.repeats, "cache_dir": str(cache_dir), "rows": rows,
    }
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    header = (f"{'case':<12} {'stock us':>9} {'hit us':>9} {'hit/stock':>9} {'miss +us':>9} "
              f"{'load ms':>8} {'1st call ms':>11} {'compile s':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        fresh = row["fresh_process"]
        compile_text = f"{row['compile_s']:.1f}" if row["compile_s"] is not None else "cached"
        print(f"{row['case']:<12} {row['stock_us']:>9.1f} {row['hit_us']:>9.1f} {row['hit_over_stock']:>9.2f} "
              f"{row['miss_overhead_us']:>9.1f} {fresh['load_s'] * 1e3:>8.1f} {fresh['first_call_s'] * 1e3:>11.2f} "
              f"{compile_text:>9}")
    print(f"\nresults written to {out}")


if __name__ == "__main__":
    main()
