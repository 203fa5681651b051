"""Cold-compile profile: where a first training step's compile time goes, aotcache next to torch.compile.

Every run is a fresh Python process with an empty aotcache store (``AOTCACHE_CACHE_DIR``), an empty
``TORCHINDUCTOR_CACHE_DIR`` (and ``TRITON_CACHE_DIR`` on a GPU) and ``OMP_NUM_THREADS=1`` (NOTE [threads] in
``warmstart.py``). It times wrapping the model plus its first training step (forward, loss, backward) for:

* ``ours``: ``aotcache.aot_module(model, fw_compiler="inductor")``; stage times from aotcache's compile stages
  (NOTE [Stage times] in ``aotcache/progress.py``);
* ``tc``: ``torch.compile(model)``;
* ``ours_nowarm`` (only with ``--sides``): ``ours`` with ``TORCH_WARM_POOL=0``: Inductor's compile worker pool is
  not started early, as before NOTE [warming the compile workers]; the same as ``ours`` on the CPU.

Both sides' Inductor work is split with PyTorch's own compile timers (``torch._dynamo.utils
.compilation_time_metrics``, recorded by ``dynamo_timed``), which time the same Inductor functions on both sides:
lowering (``GraphLowering.run``), code generation (``GraphLowering.codegen``, which on the CPU includes the
vector-ISA probe, timed on its own here), and loading the generated module, which compiles its kernels
(``PyCodeCache.load_by_key_path``; ``async_compile.wait`` is the wait for the worker pool).
Counts show duplicated work: Inductor compiles (``compile_fx_inner``), C++ kernel builds, Triton kernels
compiled serially in the main process (``async_compile.precompile``: no worker pool ready) and whether the
worker pool was started.

Usage: ``python bench/cold_profile.py [--models transformer_encoder,llama_tiny] [--reps 1] [--device cpu]``;
results go to ``bench/results/cold_profile.json`` (``cold_profile_cuda.json`` with ``--device cuda``) and a
printed table (stage -> seconds, ours vs torch.compile). With ``--reps`` > 1 the sides are interleaved and the
run with the median first step is kept per side.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.abc
import importlib.machinery
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "cold_profile.json"
CUDA_RESULTS_PATH = REPO_ROOT / "bench" / "results" / "cold_profile_cuda.json"
MODELS = ["transformer_encoder", "llama_tiny"]
SIDES = ["ours", "tc"]
# ours_nowarm: ours with TORCH_WARM_POOL=0, so Inductor's worker pool is not started early (NOTE [warming the
# compile workers] in aotcache/compilers/inductor.py): the behaviour before that fix, to compare on a GPU
ALL_SIDES = [*SIDES, "ours_nowarm"]

# (row key, label in the table): "fw."/"bw." rows split the forward/backward compile the same way on both sides
ROWS = [
    ("first_step", "first step"), ("compile_total", "compile total"), ("dynamo_trace", "dynamo trace"),
    ("key_capture", "capture for the key"), ("key_lookup", "key + lookup"),
    ("decomposed_capture", "capture (decompositions)"), ("joint_passes", "joint graph passes"),
    ("partition", "partition"),
    ("forward", "forward compile"), ("fw.lowering", "  lowering"), ("fw.codegen", "  codegen"),
    ("fw.load", "  load + kernel compile"), ("fw.pool_wait", "    wait for kernel compiles"),
    ("backward", "backward compile"), ("bw.lowering", "  lowering"), ("bw.codegen", "  codegen"),
    ("bw.load", "  load + kernel compile"), ("bw.pool_wait", "    wait for kernel compiles"),
    ("vec_isa_probe", "vector-ISA probe (in codegen)"), ("store", "store"), ("other", "other"),
]
_INDUCTOR_ROWS = {"lowering": "GraphLowering.run", "codegen": "GraphLowering.codegen",
                  "load": "PyCodeCache.load_by_key_path", "pool_wait": "async_compile.wait"}


# ----------------------------------------------------------------------------------------------------
# The child: one cold first step in this fresh process
# ----------------------------------------------------------------------------------------------------


class _TimeVecIsaProbe(importlib.abc.MetaPathFinder):
    """Times Inductor's vector-ISA probe (``cpu_vec_isa.valid_vec_isa_list``: compiles and runs small programs
    on the CPU) by wrapping it when Inductor imports the module, so nothing is imported early."""

    MODULE = "torch._inductor.cpu_vec_isa"

    def __init__(self) -> None:
        self.seconds = 0.0

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, probe = spec.loader, self

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                original = module.valid_vec_isa_list

                def timed() -> Any:
                    started = time.perf_counter()
                    try:
                        return original()
                    finally:
                        probe.seconds += time.perf_counter() - started

                timed.cache_clear = getattr(original, "cache_clear", None)  # type: ignore[attr-defined]
                module.valid_vec_isa_list = timed

        spec.loader = _Loader()
        return spec


def _split(metrics: dict[str, list[float]], name: str, index: int) -> float | None:
    values = metrics.get(name, [])
    return values[index] if index < len(values) else None


def run_child(side: str, model_name: str) -> dict[str, Any]:
    """Wrap the model, run its first training step and return the times (see the module docstring)."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    sys.path.insert(0, str(REPO_ROOT))
    probe = _TimeVecIsaProbe()
    sys.meta_path.insert(0, probe)
    import torch

    from tests.aot.zoo import training_loss
    from warmstart import build_model

    device = os.environ.get("COLD_PROFILE_DEVICE", "cpu")
    model, inputs = build_model(model_name, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    stages: list[dict[str, float]] = []
    started = time.perf_counter()
    if side == "tc":
        wrapped = torch.compile(model)
        training_loss(wrapped(*inputs)).backward()
    else:
        import aotcache
        from aotcache.progress import collecting_stages

        with collecting_stages() as stages:
            wrapped = aotcache.aot_module(model, fw_compiler="inductor")
            training_loss(wrapped(*inputs)).backward()
    sync()
    first = time.perf_counter() - started
    started = time.perf_counter()
    training_loss(wrapped(*inputs)).backward()
    sync()
    second = time.perf_counter() - started

    from torch._dynamo.utils import compilation_time_metrics, counters

    metrics = {name: list(values) for name, values in compilation_time_metrics.items()}
    result: dict[str, Any] = {"first_s": first, "second_s": second, "vec_isa_probe_s": probe.seconds,
                              "stages": stages, "inductor_metrics": {k: sum(v) for k, v in metrics.items()},
                              "counts": {"inductor_compiles": len(metrics.get("compile_fx_inner", [])),
                                         "cpp_builds": len(metrics.get("compile_file", [])),
                                         "triton_serial_compiles": len(metrics.get("async_compile.precompile", [])),
                                         "triton_async_misses": int(counters["inductor"]["async_compile_cache_miss"]),
                                         "fx_graph_cache_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
                                         "fx_graph_cache_misses": int(counters["inductor"]["fxgraph_cache_miss"])}}
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.async_compile import AsyncCompile

        result["counts"]["compile_threads"] = inductor_config.compile_threads
        result["counts"]["worker_pool_started"] = AsyncCompile.process_pool.cache_info().currsize > 0
    except (ImportError, AttributeError):
        pass
    if side.startswith("ours"):
        from aotcache.autograd_cache.cache import default_cache

        counters_ours = default_cache().stats()
        result["cache"] = {k: counters_ours[k] for k in ("hit", "miss", "bypass", "saved")}
        result["cache"]["bypass_reasons"] = counters_ours["bypass_reasons"]
        fallbacks = {k: v for k, v in default_cache().counters.items() if "fallback" in k}
        result["cache"].update(fallbacks)
    result["rows"] = _rows(side, result, metrics)
    return result


def _rows(side: str, result: dict[str, Any], metrics: dict[str, list[float]]) -> dict[str, float | None]:
    """The table's rows for one side, in seconds (None: the side has no such stage)."""
    def total(name: str) -> float | None:
        return sum(metrics[name]) if name in metrics else None

    rows: dict[str, float | None] = {key: None for key, _ in ROWS}
    rows["first_step"] = result["first_s"]
    for prefix, index in (("fw.", 0), ("bw.", 1)):  # forward graph first, then backward, on both sides
        for row, name in _INDUCTOR_ROWS.items():
            rows[prefix + row] = _split(metrics, name, index)
    rows["vec_isa_probe"] = result["vec_isa_probe_s"] or None
    if side.startswith("ours"):
        stages: dict[str, float] = {}
        for compile_stages in result["stages"]:
            for name, seconds in compile_stages.items():
                stages[name] = stages.get(name, 0.0) + seconds
        rows["compile_total"] = stages.get("total")
        rows["key_capture"] = stages.get("capture")
        rows["key_lookup"] = stages.get("key", 0.0) + stages.get("lookup", 0.0)
        rows["decomposed_capture"] = stages.get("decomposed capture")
        rows["partition"] = stages.get("partition")
        rows["forward"] = stages.get("compile forward")
        rows["backward"] = stages.get("compile backward")
        rows["store"] = stages.get("store")
        covered = sum(seconds for name, seconds in stages.items() if name != "total")
        rows["other"] = None if "total" not in stages else stages["total"] - covered
    else:
        compile_inner, user_compiler = total("_compile.compile_inner"), total("OutputGraph.call_user_compiler")
        backward = total("compile_fx.<locals>.bw_compiler")
        rows["compile_total"] = None if compile_inner is None else compile_inner + (backward or 0.0)
        rows["dynamo_trace"] = None if compile_inner is None or user_compiler is None else compile_inner - user_compiler
        rows["decomposed_capture"] = (total("aot_collect_metadata") or 0.0) + (total("aot_trace_joint_graph") or 0.0)
        rows["joint_passes"] = total("_recursive_joint_graph_passes")
        rows["partition"] = total("min_cut_rematerialization_partition")
        rows["forward"] = total("compile_fx.<locals>.fw_compiler_base")
        rows["backward"] = backward
        if rows["compile_total"] is not None:
            covered = sum(rows[name] or 0.0 for name in ("dynamo_trace", "decomposed_capture", "joint_passes",
                                                         "partition", "forward", "backward"))
            rows["other"] = rows["compile_total"] - covered
    return rows


# ----------------------------------------------------------------------------------------------------
# The parent: fresh processes, private caches, the table
# ----------------------------------------------------------------------------------------------------


def _run_fresh(side: str, model: str, root: Path, timeout: float, threads: int, device: str) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{side}-{model}-", dir=root))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for name in [n for n in env if n.startswith("AOTCACHE_")]:
        del env[name]
    env["AOTCACHE_CACHE_DIR"] = str(run_dir / "aotcache")
    env["AOTCACHE_TIERS"] = "memory,disk"
    env["TORCHINDUCTOR_CACHE_DIR"] = str(run_dir / "inductor")
    env["TRITON_CACHE_DIR"] = str(run_dir / "triton")
    env["COLD_PROFILE_DEVICE"] = device
    if side == "ours_nowarm":
        env["TORCH_WARM_POOL"] = "0"
    # NOTE [bytecode, not a prefix]: installed packages come with bytecode; a PYTHONPYCACHEPREFIX would hide
    # torch's, and the first process of a run would compile the bytecode of every torch module it imports
    # lazily (seconds for Dynamo and Inductor), charged to whichever side runs first. So no prefix: torch's
    # own __pycache__ is read, and aotcache's, which main() writes beside its sources before the runs.
    env.pop("PYTHONPYCACHEPREFIX", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from warmstart import run_json_child

    return run_json_child(Path(__file__), ["--child", side, "--model", model], env, timeout)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(models: dict[str, dict[str, Any]]) -> None:
    """Per model: stage -> seconds, one column per side (ours, torch.compile, ...), and the counts."""
    titles = {"ours": "ours", "tc": "torch.compile", "ours_nowarm": "ours, no warm-up"}
    for model, sides in models.items():
        names = [side for side in ALL_SIDES if side in sides]
        print(f"\n{model}: cold first training step, seconds (aot_module inductor vs torch.compile)")
        for side in names:
            if "error" in sides[side]:
                print(f"  {side}: {sides[side]['error']}")
        print(f"  {'stage':<30}" + "".join(f"{titles[side]:>18}" for side in names))
        for key, label in ROWS:
            values = [sides[side].get("rows", {}).get(key) for side in names]
            if all(value is None for value in values):
                continue
            print(f"  {label:<30}" + "".join(f"{_fmt(value):>18}" for value in values))
        first_tc = sides.get("tc", {}).get("first_s")
        if first_tc:
            print(f"  {'first step / torch.compile':<30}" + "".join(
                f"{(sides[side].get('first_s') or float('nan')) / first_tc:>18.2f}" for side in names))
        for name in ("inductor_compiles", "cpp_builds", "triton_serial_compiles", "triton_async_misses",
                     "worker_pool_started"):
            print(f"  {'count: ' + name:<30}" + "".join(
                f"{str(sides[side].get('counts', {}).get(name, '-')):>18}" for side in names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, default {','.join(MODELS)}")
    parser.add_argument("--sides", default=",".join(SIDES),
                        help=f"comma-separated subset of {','.join(ALL_SIDES)} (default ours,tc)")
    parser.add_argument("--reps", type=int, default=1, help="fresh runs per side (interleaved); median kept")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per fresh process")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (0: leave unset)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output", type=Path, default=None,
                        help="results JSON (default bench/results/cold_profile.json, cold_profile_cuda.json on cuda)")
    parser.add_argument("--label", default=None, help="a note stored with the results (e.g. the commit measured)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.model)))
        return 0
    models, sides = args.models.split(","), args.sides.split(",")
    unknown = [s for s in sides if s not in ALL_SIDES]
    if unknown:
        parser.error(f"unknown side(s) {unknown}; choose from {', '.join(ALL_SIDES)}")
    output = args.output or (CUDA_RESULTS_PATH if args.device == "cuda" else RESULTS_PATH)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO_ROOT).stdout.strip()
    import torch

    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()

    def write() -> None:
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "commit": commit, "label": args.label, "device": args.device,
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                              "python": platform.python_version()},
                  "omp_num_threads": args.threads, "reps": args.reps, "models": results,
                  "total_s": time.perf_counter() - started}
        if args.device == "cuda" and torch.cuda.is_available():
            report["gpu"] = torch.cuda.get_device_name(0)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")

    import compileall

    for folder in ("aotcache", "tests/aot", "bench"):  # NOTE [bytecode, not a prefix]
        compileall.compile_dir(str(REPO_ROOT / folder), quiet=1)
    with tempfile.TemporaryDirectory(prefix="aotcache-coldprof-") as temp:
        for model in models:
            runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
            for rep in range(args.reps):
                for side in sides if rep % 2 == 0 else list(reversed(sides)):
                    run = _run_fresh(side, model, Path(temp), args.timeout, args.threads, args.device)
                    runs[side].append(run)
                    print(f"{model:>20} {side:>5} rep {rep}: "
                          f"{run.get('error') or format(run['first_s'], '.2f') + ' s'}", flush=True)
            results[model] = {}
            for side, side_runs in runs.items():
                good = [run for run in side_runs if "error" not in run]
                if not good:
                    results[model][side] = side_runs[-1]
                    continue
                middle = statistics.median_low([run["first_s"] for run in good])
                chosen = next(run for run in good if run["first_s"] == middle)
                chosen["all_first_s"] = [run.get("first_s") for run in side_runs]
                results[model][side] = chosen
            write()
    print_table(results)
    write()
    print(f"\nwrote {output} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
