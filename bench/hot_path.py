"""Per-call overhead of a compiled module: what aotcache adds to every call on top of the compiled graphs.

For each model of the zoo, with the nop compiler, in training mode (grad enabled, forward only), the best time
of ``compiled(*inputs)`` and of the same compiled runtime called directly with the flat arguments; the difference
is the hot path (signature match, module state, reuse guards: NOTE [Hot path] in aotcache/aot/hot_path.py).

``--baseline PATH`` measures another source tree (e.g. a ``git worktree`` of an older commit) side by side: both
sides run in fresh processes, interleaved round by round, and the table shows the ratio of the best times (min over samples and rounds: the machine is shared).
Results go to ``bench/results/hot_path.json``. Usage: ``python bench/hot_path.py [--baseline PATH] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "hot_path.json"
MODELS = ("mlp", "cnn_bn", "transformer_encoder", "gpt2_tiny")

# Runs in a fresh process with the source tree under test first on sys.path; prints {model: [call_us, direct_us]}.
MEASURE = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(1, {repo!r})
from tests.aot.zoo import get_entry
import aotcache

def best_us(fn, calls):
    samples = []
    for _ in range(15):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return min(samples)  # the least disturbed sample: other jobs share these cores

out = {{}}
for name in {models!r}:
    model, inputs = get_entry(name).build()
    compiled = aotcache.aot_module(model, "nop", cache=False)
    for _ in range(3):
        compiled(*inputs)
    params, buffers = compiled._state.current()[:2]
    flat = [*params.values(), *buffers.values(), *inputs]
    (runtime,) = [r for runtimes in compiled.compiled._entries.values() for r in runtimes]
    call_us = best_us(lambda: compiled(*inputs), 100)
    direct_us = best_us(lambda: runtime(*flat), 100)
    # the hot path alone: the same calls with the compiled runtime swapped for one that does nothing
    class Idle:
        metadata = runtime.metadata
        def __call__(self, *args):
            return None
    for hots in compiled.compiled._hot._by_structure.values():
        for hot in hots:
            hot.runtime = Idle()
    out[name] = [call_us, direct_us, best_us(lambda: compiled(*inputs), 1000)]
print(json.dumps(out))
"""


def measure(source: Path, models: list[str]) -> dict[str, list[float]]:
    """One fresh process measuring ``source``'s aotcache."""
    code = MEASURE.format(repo=str(REPO_ROOT), models=models)
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as cache_dir:
        env["AOTCACHE_CACHE_DIR"] = cache_dir
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=source,
                              check=False)
    if proc.returncode != 0:
        raise SystemExit(f"measuring {source} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another source tree to measure side by side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    sides = {"current": REPO_ROOT}
    if args.baseline:
        sides["baseline"] = args.baseline.resolve()
    rounds: dict[str, list[dict]] = {side: [] for side in sides}
    for index in range(args.rounds):
        for side, source in sides.items():
            print(f"[hot path] round {index + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
            rounds[side].append(measure(source, models))
    results: dict[str, dict] = {}
    for model in models:
        row: dict[str, float | None] = {}
        for side in sides:
            row[f"{side}_call_us"] = min(r[model][0] for r in rounds[side])
            row[f"{side}_direct_us"] = min(r[model][1] for r in rounds[side])
            row[f"{side}_overhead_us"] = min(r[model][2] for r in rounds[side])
        if "baseline" in sides:
            row["overhead_ratio"] = row["current_overhead_us"] / max(row["baseline_overhead_us"], 1e-9)
            row["call_ratio"] = row["current_call_us"] / row["baseline_call_us"]
        results[model] = row
    record = {"benchmark": "aotcache per-call hot path (nop compiler, training-mode forward)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "baseline": str(args.baseline) if args.baseline else None, "rounds": args.rounds, "models": results}
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(record, indent=2) + "\n")
    header = ["model", "call us", "direct us", "overhead us"]
    if "baseline" in sides:
        header += ["baseline call us", "baseline overhead us", "overhead ratio", "call ratio"]
    print(" | ".join(header))
    for model, row in results.items():
        cells = [model, f"{row['current_call_us']:.1f}", f"{row['current_direct_us']:.1f}",
                 f"{row['current_overhead_us']:.1f}"]
        if "baseline" in sides:
            cells += [f"{row['baseline_call_us']:.1f}", f"{row['baseline_overhead_us']:.1f}",
                      f"{row['overhead_ratio']:.2f}", f"{row['call_ratio']:.2f}"]
        print(" | ".join(cells))
    print(f"results: {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
