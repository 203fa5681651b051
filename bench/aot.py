"""Benchmark aotcache's AOT Autograd against PyTorch's (functorch.compile) and torch.compile on the model zoo.

Measured per model, side by side in one process:

* ``trace``: cold trace + partition + nop-compile time of the first training step (forward + backward) of a
  freshly wrapped module, ours (``aotcache.aot_module``) vs PyTorch's ``functorch.compile.aot_module``, with
  the nop compiler on both sides, for ``default_partition`` and the min-cut partitioner (min over reps).
* ``saved``: bytes of the tensors saved for backward by each partitioner, measured the same way on both sides:
  the backward graph's non-tangent placeholders (their ``meta["val"]`` sizes), recorded by the bw compiler.
* ``step``: steady-state training step time (forward, loss, backward) with the Inductor compiler and the
  min-cut partitioner, ours vs ``torch.compile`` (default backend), plus eager; the medians of interleaved runs
  (and their minimums, ``min_ms``: on a shared machine the least disturbed steps).
* ``cold``: cold compile time (first training step, fresh Inductor cache, aotcache's cache disabled) for each
  of our compilers (nop, inductor, aoti) and for torch.compile.

Ratios are ours / reference (lower is better). Results go to ``bench/results/aot.json`` and a printed table.
Usage: ``python bench/aot.py [--models mlp,gpt2_tiny] [--quick] [--compilers nop,inductor,aoti] [--steps 200]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from tests.aot.zoo import BENCH_MODELS, ZOO, get_entry, training_loss  # noqa: E402

RESULTS_PATH = REPO_ROOT / "bench" / "results" / "aot.json"


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def saved_bytes_of_backward(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """(bytes, count) of the tensors a backward graph receives besides its tangents: the saved activations."""
    total, count = 0, 0
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.name.startswith("tangents"):
            continue
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            total += int(value.numel()) * value.element_size()
            count += 1
    return total, count


class BackwardRecorder:
    """Compiler wrapper recording the saved-activation bytes of every backward graph it compiles."""

    def __init__(self, inner: Callable) -> None:
        self.inner = inner
        self.saved: list[tuple[int, int]] = []

    def backward_compiler(self) -> Callable:
        def compile_backward(gm, example_inputs):
            self.saved.append(saved_bytes_of_backward(gm))
            return self.inner(gm, example_inputs)

        if hasattr(self.inner, "decompositions"):
            compile_backward.decompositions = self.inner.decompositions
        return compile_backward


def training_step(model: Callable, inputs: tuple[Any, ...], params: list[torch.Tensor]) -> None:
    """One forward + loss + backward; gradients reset to None first so every step does the same work."""
    for param in params:
        param.grad = None
    loss = training_loss(model(*inputs))
    loss.backward()


def fresh_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return copy.deepcopy(inputs)


@contextlib.contextmanager
def fresh_compile_caches(scratch: Path) -> Iterator[None]:
    """Empty Inductor caches (disk and memory) and an empty aotcache cache dir: a cold compile."""
    from torch._inductor.utils import fresh_cache

    cache_dir = Path(tempfile.mkdtemp(dir=scratch, prefix="aotcache-"))
    previous = os.environ.get("AOTCACHE_CACHE_DIR")
    os.environ["AOTCACHE_CACHE_DIR"] = str(cache_dir)
    try:
        torch._dynamo.reset()
        with fresh_cache(dir=str(scratch), delete=False):
            yield
    finally:
        if previous is None:
            os.environ.pop("AOTCACHE_CACHE_DIR", None)
        else:
            os.environ["AOTCACHE_CACHE_DIR"] = previous


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def guarded(record: dict, key: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; an exception is recorded under ``key`` as an error instead of ending the run."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - a failing measurement is a result to report, not a crash
        record[key] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        traceback.print_exc(limit=3, file=sys.stderr)
        return None


def ratio(ours: Any, reference: Any) -> float | None:
    """ours / reference, or None where either side has no number (missing or an error record)."""
    if not isinstance(ours, (int, float)) or not isinstance(reference, (int, float)) or reference == 0:
        return None
    return round(ours / reference, 3)


# ----------------------------------------------------------------------------------------------------
# Sides
# ----------------------------------------------------------------------------------------------------


def ours_api() -> dict[str, Any]:
    import aotcache
    from aotcache.compilers import get_compiler

    return {
        "aot_module": aotcache.aot_module,
        "partitions": {"default": aotcache.default_partition, "min_cut": aotcache.min_cut_rematerialization_partition},
        "nop": get_compiler("nop"),
    }


def reference_api() -> dict[str, Any]:
    from functorch.compile import aot_module, default_partition, min_cut_rematerialization_partition, nop

    return {
        "aot_module": aot_module,
        "partitions": {"default": default_partition, "min_cut": min_cut_rematerialization_partition},
        "nop": nop,
    }


def trace_once(api: dict[str, Any], model_name: str, partition: str) -> dict[str, float | int]:
    """First training step of a freshly wrapped model with the nop compiler: time and saved bytes."""
    model, inputs = get_entry(model_name).build()
    recorder = BackwardRecorder(api["nop"])
    wrapped = api["aot_module"](model, fw_compiler=api["nop"], bw_compiler=recorder.backward_compiler(),
                                partition_fn=api["partitions"][partition])
    params = list(model.parameters())
    seconds = timed(lambda: training_step(wrapped, fresh_inputs(inputs), params))
    saved_bytes = sum(b for b, _ in recorder.saved)
    saved_count = sum(c for _, c in recorder.saved)
    return {"seconds": seconds, "saved_bytes": saved_bytes, "saved_tensors": saved_count}


def bench_trace(model_name: str, reps: int, scratch: Path, record: dict) -> None:
    sides = {"ours": ours_api(), "pytorch": reference_api()}
    for partition in ("default", "min_cut"):
        results: dict[str, list[dict]] = {"ours": [], "pytorch": []}
        for _ in range(reps):
            for side, api in sides.items():  # interleaved so load from other processes hits both alike
                with fresh_compile_caches(scratch):
                    outcome = guarded(record, f"trace_{partition}_{side}", lambda: trace_once(api, model_name,
                                                                                              partition))
                if outcome is not None:
                    results[side].append(outcome)
        entry: dict[str, Any] = {}
        for side, runs in results.items():
            if runs:
                entry[side] = {"seconds": round(min(r["seconds"] for r in runs), 4),
                               "saved_bytes": runs[0]["saved_bytes"], "saved_tensors": runs[0]["saved_tensors"]}
        if "ours" in entry and "pytorch" in entry:
            entry["time_ratio"] = ratio(entry["ours"]["seconds"], entry["pytorch"]["seconds"])
            entry["saved_bytes_ratio"] = ratio(entry["ours"]["saved_bytes"], entry["pytorch"]["saved_bytes"])
        record[f"trace_{partition}"] = {**record.get(f"trace_{partition}", {}), **entry}


def bench_compile_and_step(model_name: str, compilers: list[str], steps: int, scratch: Path, record: dict) -> None:
    """Cold compile per compiler, then steady-state step times of ours (inductor) vs torch.compile vs eager."""
    import aotcache
    from aotcache.compilers import get_compiler

    entry = get_entry(model_name)
    runners: dict[str, tuple[Callable, tuple, list]] = {}

    eager_model, inputs = entry.build()
    runners["eager"] = (eager_model, inputs, list(eager_model.parameters()))
    training_step(eager_model, fresh_inputs(inputs), runners["eager"][2])

    cold: dict[str, Any] = {}
    for compiler_name in compilers:
        def compile_ours(compiler_name: str = compiler_name) -> tuple[Callable, tuple, list]:
            model, model_inputs = entry.build()
            compiler = get_compiler(compiler_name)
            wrapped = aotcache.aot_module(model, fw_compiler=compiler, bw_compiler=compiler,
                                          partition_fn=aotcache.min_cut_rematerialization_partition)
            params = list(model.parameters())
            with fresh_compile_caches(scratch):
                cold[f"ours_{compiler_name}"] = round(
                    timed(lambda: training_step(wrapped, fresh_inputs(model_inputs), params)), 3)
            return wrapped, model_inputs, params

        runner = guarded(cold, f"ours_{compiler_name}", compile_ours)
        if runner is not None and compiler_name == "inductor":
            runners["ours_inductor"] = runner

    def compile_reference() -> tuple[Callable, tuple, list]:
        model, model_inputs = entry.build()
        compiled = torch.compile(model)
        params = list(model.parameters())
        with fresh_compile_caches(scratch):
            cold["torch_compile"] = round(timed(lambda: training_step(compiled, fresh_inputs(model_inputs),
                                                                      params)), 3)
        return compiled, model_inputs, params

    reference = guarded(cold, "torch_compile", compile_reference)
    if reference is not None:
        runners["torch_compile"] = reference
    if "ours_inductor" in cold and "torch_compile" in cold:
        cold["inductor_ratio"] = ratio(cold["ours_inductor"], cold["torch_compile"])
    record["cold_compile_seconds"] = cold

    # warm-up, then interleaved timing: each round runs every side once (fresh input copies made outside)
    timings: dict[str, list[float]] = {name: [] for name in runners}
    for name, (model, model_inputs, params) in runners.items():
        for _ in range(3):
            training_step(model, fresh_inputs(model_inputs), params)
    for _ in range(steps):
        for name, (model, model_inputs, params) in runners.items():
            step_inputs = fresh_inputs(model_inputs)
            timings[name].append(timed(lambda: training_step(model, step_inputs, params)))
    medians = {name: round(statistics.median(values) * 1e3, 4) for name, values in timings.items() if values}
    minimums = {name: round(min(values) * 1e3, 4) for name, values in timings.items() if values}
    step: dict[str, Any] = {"median_ms": medians, "min_ms": minimums}
    step["ours_vs_torch_compile"] = ratio(medians.get("ours_inductor"), medians.get("torch_compile"))
    # the least disturbed step of each side: a second reading where other jobs share the cores
    step["ours_vs_torch_compile_min"] = ratio(minimums.get("ours_inductor"), minimums.get("torch_compile"))
    record["step_inductor"] = step


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, dict) and "error" in value:
        return "ERR"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"


def print_table(results: dict[str, Any]) -> None:
    header = ["model", "trace ours s", "trace pt s", "ratio", "mincut ours s", "mincut pt s", "ratio",
              "saved ours KiB", "saved pt KiB", "ratio", "step ours ms", "step tc ms", "step eager ms", "ratio",
              "cold nop s", "cold ind s", "cold aoti s", "cold tc s"]
    rows = [header]
    for model, record in results["models"].items():
        default = record.get("trace_default", {})
        min_cut = record.get("trace_min_cut", {})
        step = record.get("step_inductor", {}).get("median_ms", {})
        cold = record.get("cold_compile_seconds", {})

        def kib(side: str) -> str:
            saved = min_cut.get(side, {}).get("saved_bytes")
            return "-" if saved is None else f"{saved / 1024:.1f}"

        rows.append([
            model,
            _fmt(default.get("ours", {}).get("seconds")), _fmt(default.get("pytorch", {}).get("seconds")),
            _fmt(default.get("time_ratio")),
            _fmt(min_cut.get("ours", {}).get("seconds")), _fmt(min_cut.get("pytorch", {}).get("seconds")),
            _fmt(min_cut.get("time_ratio")),
            kib("ours"), kib("pytorch"), _fmt(min_cut.get("saved_bytes_ratio")),
            _fmt(step.get("ours_inductor")), _fmt(step.get("torch_compile")), _fmt(step.get("eager")),
            _fmt(record.get("step_inductor", {}).get("ours_vs_torch_compile")),
            _fmt(cold.get("ours_nop")), _fmt(cold.get("ours_inductor")), _fmt(cold.get("ours_aoti")),
            _fmt(cold.get("torch_compile")),
        ])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print("\nratios are ours / reference (trace, saved: PyTorch's functorch.compile.aot_module with nop; "
          "step: torch.compile default); lower is better. ERR: see bench/results/aot.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None,
                        help=f"comma-separated zoo models (default: {','.join(BENCH_MODELS)}; quick: mlp,cnn_bn)")
    parser.add_argument("--quick", action="store_true", help="fewer models, repetitions and steps")
    parser.add_argument("--compilers", default="nop,inductor,aoti",
                        help="our compilers to cold-compile with (default nop,inductor,aoti)")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH, help="JSON results path")
    parser.add_argument("--steps", type=int, default=None,
                        help="interleaved steady-state steps per side (default 30; quick 10): more on a loaded machine")
    args = parser.parse_args(argv)

    models = args.models.split(",") if args.models else (["mlp", "cnn_bn"] if args.quick else BENCH_MODELS)
    unknown = [m for m in models if m not in ZOO]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(ZOO)}")
    compilers = [c for c in args.compilers.split(",") if c]
    reps, steps = (1, 10) if args.quick else (3, 30)
    steps = args.steps or steps

    warnings.filterwarnings("ignore")
    # NOTE [benchmarking compiles, not cache hits]
    # aotcache's own cache is disabled and every compile gets fresh Inductor caches, so each "cold" figure
    # is a real compile on both sides.
    os.environ["AOTCACHE_ENABLED"] = "0"
    scratch = Path(tempfile.mkdtemp(prefix="aotcache-bench-"))
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "quick": args.quick,
            "reps": reps, "steps": steps, "compilers": compilers,
        },
        "models": {},
    }
    started = time.perf_counter()
    try:
        # warm-up: the first trace of a process pays lazy imports on both sides; not counted
        for api in (ours_api(), reference_api()):
            for partition in ("default", "min_cut"):
                guarded({}, "warmup", lambda: trace_once(api, "mlp", partition))
        for model_name in models:
            record: dict[str, Any] = {"description": get_entry(model_name).description}
            results["models"][model_name] = record
            print(f"[aot bench] {model_name}: trace/partition", file=sys.stderr, flush=True)
            bench_trace(model_name, reps, scratch, record)
            print(f"[aot bench] {model_name}: compile + steady state", file=sys.stderr, flush=True)
            bench_compile_and_step(model_name, compilers, steps, scratch, record)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["meta"]["total_seconds"] = round(time.perf_counter() - started, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(args.out)
    print_table(results)
    print(f"\nwrote {args.out.relative_to(REPO_ROOT) if args.out.is_relative_to(REPO_ROOT) else args.out} "
          f"in {results['meta']['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
