"""Warm-start benchmark: what a fresh process pays for its first training step, compiled vs eager.

Every figure is measured in its own fresh Python process (``--child``), so nothing is shared in memory:

* ``eager``: the first training step (forward, loss, backward) of the eager model.
* ``tc_cold`` / ``tc_warm``: ``torch.compile(model)`` first step with a private, empty
  ``TORCHINDUCTOR_CACHE_DIR``, then again in a new process with that directory hot (all its caches warm).
* ``aot_cold`` / ``aot_warm``: ``aotcache.aot_module(model, fw_compiler="aoti")`` with a private cache dir:
  the cold process compiles and stores, the warm one loads (fingerprint -> entry -> dlopen).
* ``aot_inductor_cold``: the same with ``fw_compiler="inductor"`` (the cold-compile comparison).
* ``backend_cold`` / ``backend_warm``: ``torch.compile(model, backend=aotcache_backend)`` with the aoti
  compiler (``--backend-compiler``): Dynamo still traces, aotcache's cache replaces compiling.
* ``dynamo_floor``: ``torch.compile(model, backend="eager")``: Dynamo's import and trace with a backend that
  does nothing. No ``torch.compile`` backend can start faster; ``backend_warm`` minus this is what aotcache adds.

The *overhead* of a mode is its first step minus eager's first step. Goals (ratios within one run):
``aot_warm`` overhead <= 1/10 of ``tc_warm``'s; ``backend_warm`` <= 1/2 of ``tc_warm``'s;
``aot_inductor_cold`` first step <= 1.2x ``tc_cold``'s. Reported beside them: ``dynamo_floor_vs_tc_warm`` (the
lowest ``backend_warm_vs_tc_warm`` any backend can reach) and ``backend_over_floor_s`` (aotcache's own part).

NOTE [threads]
Every side runs with the same ``OMP_NUM_THREADS`` (default 1). On a loaded 2-core machine, OpenMP regions of
generated C++ kernels (Inductor's and AOTInductor's) with 2 threads spin-wait on a descheduled thread: a
step that takes 1 ms with one thread took 0.35 s with two while other jobs ran. ``--threads 0`` leaves it unset.

NOTE [GPU runs]
``--device cuda`` moves every model and input to the GPU (timings end with a ``torch.cuda.synchronize()``),
adds ``aot_inductor_warm`` and the 2-layer transformers Llama (``llama_tiny``, hidden 128), and gives every
aotcache warm process (``aot_warm``, ``aot_inductor_warm``, ``backend_warm``) an empty
``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR``, as on a new machine: only aotcache's entries carry over.
torch.compile's warm side keeps its own caches hot. Each warm aotcache row reports ``triton_cache_dirs``: the
kernel directories in its Triton cache after the step (the ones aotcache restored; more would mean Triton
compiled). Extra ratios: ``aot_inductor_warm_vs_tc_warm`` (goal 0.25) and ``steady_vs_tc`` (second step of
``aot_warm`` over ``tc_warm``'s, goal 1.0). Results go to ``bench/results/warmstart_cuda.json`` with the
device, torch and Triton versions.

Usage: ``python bench/warmstart.py [--models mlp,gpt2_tiny] [--quick] [--device cuda]``; results go to
``bench/results/warmstart.json`` (``warmstart_cuda.json`` with ``--device cuda``) and a printed table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "warmstart.json"
CUDA_RESULTS_PATH = REPO_ROOT / "bench" / "results" / "warmstart_cuda.json"
MODELS = ["mlp", "cnn_bn", "transformer_encoder", "gpt2_tiny"]
CUDA_MODELS = [*MODELS, "llama_tiny"]  # NOTE [GPU runs]
QUICK_MODELS = ["mlp", "transformer_encoder"]
# (mode, cache directory it uses: "tc" for the Inductor cache of torch.compile, "aot"/"aot_inductor"/"backend")
MODES = [("eager", None), ("tc_cold", "tc"), ("tc_warm", "tc"), ("aot_cold", "aot"), ("aot_warm", "aot"),
         ("aot_inductor_cold", "aot_inductor"), ("backend_cold", "backend"), ("backend_warm", "backend"),
         ("dynamo_floor", None)]
QUICK_MODES = ["eager", "tc_cold", "tc_warm", "aot_cold", "aot_warm", "backend_cold", "backend_warm", "dynamo_floor"]
CUDA_MODES = [("aot_inductor_warm", "aot_inductor")]  # added with --device cuda (NOTE [GPU runs])
FRESH_CACHE_MODES = ("aot_warm", "aot_inductor_warm", "backend_warm")  # empty Inductor/Triton caches on a GPU
GOALS = {"aot_warm_vs_tc_warm": 0.1, "backend_warm_vs_tc_warm": 0.5, "aot_inductor_cold_vs_tc_cold": 1.2}
CUDA_GOALS = {**GOALS, "aot_inductor_warm_vs_tc_warm": 0.25, "steady_vs_tc": 1.0}


def build_llama_tiny() -> tuple[Any, tuple[Any, ...]]:
    """transformers ``LlamaForCausalLM``, 2 layers, hidden 128 (random weights, no download): ``(loss, logits)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    class TinyLlama(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                                 num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
                                 max_position_embeddings=128, use_cache=False)
            config._attn_implementation = "eager"
            self.model = LlamaForCausalLM(config)

        def forward(self, input_ids: Any, attention_mask: Any, labels: Any) -> tuple[Any, Any]:
            # an explicit all-ones mask: see NOTE [explicit attention mask] in tests/aot/zoo.py
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                             return_dict=True)
            return out.loss, out.logits

    torch.manual_seed(0)
    input_ids = torch.randint(0, 1000, (2, 32))
    return TinyLlama(), (input_ids, torch.ones_like(input_ids), input_ids.clone())


def build_model(name: str, device: str = "cpu") -> tuple[Any, tuple[Any, ...]]:
    """A bench model (zoo entry, or ``llama_tiny``) and its inputs, on ``device``."""
    import torch

    from tests.aot.zoo import get_entry

    model, inputs = build_llama_tiny() if name == "llama_tiny" else get_entry(name).build()
    if device != "cpu":
        model = model.to(device)
        inputs = tuple(value.to(device).detach().requires_grad_(value.requires_grad)
                       if isinstance(value, torch.Tensor) else value for value in inputs)
    return model, inputs


# ----------------------------------------------------------------------------------------------------
# The child: one first step in this (fresh) process
# ----------------------------------------------------------------------------------------------------


def _wrap(mode: str, model: Any) -> Any:
    if mode == "eager":
        return model
    import torch

    if mode.startswith("tc_"):
        return torch.compile(model)
    if mode == "dynamo_floor":
        return torch.compile(model, backend="eager")
    if mode.startswith("backend_"):
        import functools

        from aotcache.backend import aotcache_backend

        compiler = os.environ.get("WARMSTART_BACKEND_COMPILER", "aoti")
        return torch.compile(model, backend=functools.partial(aotcache_backend, compiler=compiler))
    import aotcache

    compiler = "inductor" if mode.startswith("aot_inductor") else "aoti"
    return aotcache.aot_module(model, fw_compiler=compiler)


def run_child(mode: str, model_name: str) -> dict[str, Any]:
    """Build the model, then time wrapping + the first training step (+ a second one for reference)."""
    sys.path.insert(0, os.environ.get("WARMSTART_SOURCE", str(REPO_ROOT)))
    import torch

    from tests.aot.zoo import training_loss

    device = os.environ.get("WARMSTART_DEVICE", "cpu")
    model, inputs = build_model(model_name, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()  # model and inputs are on the device before the clock starts
    started = time.perf_counter()
    wrapped = _wrap(mode, model)
    training_loss(wrapped(*inputs)).backward()
    sync()
    first = time.perf_counter() - started
    started = time.perf_counter()
    training_loss(wrapped(*inputs)).backward()
    sync()
    second = time.perf_counter() - started
    result: dict[str, Any] = {"first_s": first, "second_s": second,
                              "inductor_imported": "torch._inductor" in sys.modules}
    if mode.startswith(("aot_", "backend_")):
        from aotcache.autograd_cache.cache import default_cache

        counters = default_cache().stats()
        extra = {k: v for k, v in default_cache().counters.items() if k.startswith("fingerprint")}
        result["cache"] = {**{k: counters[k] for k in ("hit", "miss", "bypass", "saved")}, **extra,
                           "bypass_reasons": counters["bypass_reasons"]}
        default_cache().journal and default_cache().journal.flush()
    del torch
    return result


def measure_fingerprint_costs(models: list[str], reps: int = 3) -> dict[str, dict[str, Any]]:
    """Per model: the call fingerprint (cheap key) vs a full capture of the training call (min over reps)."""
    sys.path.insert(0, str(REPO_ROOT))
    from torch.utils import _pytree as pytree

    from aotcache.aot.api import AOTOptions
    from aotcache.aot.capture import capture
    from aotcache.autograd_cache.fingerprint import fingerprint_module_call

    results: dict[str, dict[str, Any]] = {}
    for name in models:
        model, inputs = build_model(name)
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        flat, spec = pytree.tree_flatten(((params, buffers, *inputs), {}))
        options = AOTOptions(fw_compiler="aoti")

        def flat_fn(*values: Any) -> Any:
            (p, b, *args), kwargs = pytree.tree_unflatten(list(values), spec)
            import torch

            return torch.func.functional_call(model, {**p, **b}, tuple(args), kwargs)

        fingerprint_times, capture_times, fingerprint = [], [], None
        for _ in range(reps):
            started = time.perf_counter()
            fingerprint = fingerprint_module_call(model, flat, spec, options)
            fingerprint_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            capture(flat_fn, flat, decompositions=None, dynamic=False)
            capture_times.append(time.perf_counter() - started)
        results[name] = {"fingerprint_s": min(fingerprint_times), "capture_s": min(capture_times),
                         "trusted": fingerprint.trusted, "reason": fingerprint.reason}
        print(f"{name:>20} fingerprint {results[name]['fingerprint_s'] * 1e3:7.1f} ms   capture "
              f"{results[name]['capture_s'] * 1e3:7.1f} ms   trusted={fingerprint.trusted}", flush=True)
    return results


# ----------------------------------------------------------------------------------------------------
# The parent: fresh processes, private cache directories, the table
# ----------------------------------------------------------------------------------------------------


def snapshot_sources(target: Path) -> Path:
    """Copy aotcache and the model zoo to ``target``: the processes of one run see the same code.

    NOTE [source snapshot] aotcache's own source digest is part of every key, and this checkout is shared
    with other engineers: an edit between the cold and the warm process would turn the warm one into a miss.
    """
    shutil.copytree(REPO_ROOT / "aotcache", target / "aotcache",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (target / "tests" / "aot").mkdir(parents=True)
    for name in ("tests/__init__.py", "tests/aot/__init__.py", "tests/aot/zoo.py"):
        if (REPO_ROOT / name).exists():  # tests/ may be a namespace package
            shutil.copy2(REPO_ROOT / name, target / name)
    import compileall

    compileall.compile_dir(str(target), quiet=1)  # NOTE [bytecode]
    return target


def run_json_child(script: Path, arguments: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run ``script`` with ``arguments`` in a fresh process; its last stdout line (JSON) plus ``wall_s``, or
    ``{"error": <the last error line>, "wall_s": ...}`` when it fails. Shared by the fresh-process benches."""
    command = [sys.executable, str(Path(script).resolve()), *arguments]
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["failed"]
        errors = [line for line in lines if "Error" in line or "Exception" in line]
        return {"error": (errors or lines)[-1][:300], "wall_s": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def _run_fresh(mode: str, model: str, dirs: dict[str, Path], timeout: float, threads: int,
               backend_compiler: str, device: str = "cpu") -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(dirs["source"]) + os.pathsep + env.get("PYTHONPATH", "")
    env["WARMSTART_SOURCE"] = str(dirs["source"])
    for name in [n for n in env if n.startswith("AOTCACHE_")]:
        del env[name]
    env["AOTCACHE_CACHE_DIR"] = str(dirs["aot_root"] / mode.rsplit("_", 1)[0])
    env["AOTCACHE_TIERS"] = "memory,disk"
    env["TORCHINDUCTOR_CACHE_DIR"] = str(dirs["inductor"] / mode.rsplit("_", 1)[0])
    env.pop("TRITON_CACHE_DIR", None)  # default: under TORCHINDUCTOR_CACHE_DIR, so torch.compile's stays hot
    fresh_triton = None
    if device != "cpu" and mode in FRESH_CACHE_MODES:  # NOTE [GPU runs]: a new machine's empty caches
        env["TORCHINDUCTOR_CACHE_DIR"] = str(dirs["inductor"] / f"empty-{mode}")
        fresh_triton = dirs["inductor"] / f"empty-triton-{mode}"
        env["TRITON_CACHE_DIR"] = str(fresh_triton)
    env["WARMSTART_DEVICE"] = device
    env["WARMSTART_BACKEND_COMPILER"] = backend_compiler
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # NOTE [bytecode]: a user's installed package has .pyc files; without them every process would compile
    # aotcache's sources again (~0.2 s). The snapshot is byte-compiled once before the runs (snapshot_sources),
    # beside its sources, never in the checkout; processes read it even under PYTHONDONTWRITEBYTECODE. No
    # PYTHONPYCACHEPREFIX: it hides torch's own __pycache__, and the first process of a run then compiled the
    # bytecode of every torch module it imports lazily (Dynamo, Inductor: seconds), charged to tc_cold, the
    # first compiling row (an earlier version did that).
    env.pop("PYTHONPYCACHEPREFIX", None)
    result = run_json_child(Path(__file__), ["--child", mode, "--model", model], env, timeout)
    if "error" in result:
        return result
    if fresh_triton is not None:
        result["triton_cache_dirs"] = len([p for p in fresh_triton.iterdir() if p.is_dir()]) \
            if fresh_triton.is_dir() else 0
    return result


def _ratios(row: dict[str, Any]) -> dict[str, float | None]:
    def first(mode: str) -> float | None:
        value = row.get(mode, {})
        return value.get("first_s") if isinstance(value, dict) else None

    eager = first("eager")

    def overhead(mode: str) -> float | None:
        value = first(mode)
        return None if value is None or eager is None else max(value - eager, 1e-4)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b <= 0 else a / b

    def second(mode: str) -> float | None:
        value = row.get(mode, {})
        return value.get("second_s") if isinstance(value, dict) else None

    backend, floor = overhead("backend_warm"), overhead("dynamo_floor")
    extra = {}
    if "aot_inductor_warm" in row:  # NOTE [GPU runs]
        extra = {"aot_inductor_warm_vs_tc_warm": ratio(overhead("aot_inductor_warm"), overhead("tc_warm")),
                 "steady_vs_tc": ratio(second("aot_warm"), second("tc_warm"))}
    return {**extra, "aot_warm_vs_tc_warm": ratio(overhead("aot_warm"), overhead("tc_warm")),
            "backend_warm_vs_tc_warm": ratio(backend, overhead("tc_warm")),
            "aot_inductor_cold_vs_tc_cold": ratio(first("aot_inductor_cold"), first("tc_cold")),
            "dynamo_floor_vs_tc_warm": ratio(floor, overhead("tc_warm")),
            "backend_over_floor_s": None if backend is None or floor is None else backend - floor}


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        if "error" in value:
            return "ERR"
        value = value.get("first_s")
    return "-" if value is None else f"{value:.3f}"


def print_table(rows: dict[str, dict[str, Any]], modes: list[str], goals: dict[str, float] = GOALS) -> None:
    extras = ("dynamo_floor_vs_tc_warm", "backend_over_floor_s")
    header = ["model", *[f"{m} (s)" for m in modes], *[f"{k} (goal {v})" for k, v in goals.items()], *extras]
    lines = [header]
    for model, row in rows.items():
        ratios = row.get("ratios", {})
        lines.append([model, *[_fmt(row.get(m)) for m in modes],
                      *["-" if ratios.get(k) is None else f"{ratios[k]:.3f} {'ok' if ratios[k] <= goals[k] else 'MISS'}"
                        for k in goals],
                      *["-" if ratios.get(k) is None else f"{ratios[k]:.3f}" for k in extras]])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(line, widths)))


def _triton_version() -> str | None:
    from importlib import metadata

    for name in ("triton", "pytorch-triton"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--modes", default=None, help="comma-separated subset of the modes (eager always runs)")
    parser.add_argument("--quick", action="store_true", help=f"models {','.join(QUICK_MODELS)}, no inductor cold")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per fresh process")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every measured process (0: leave it unset); see NOTE [threads]")
    parser.add_argument("--backend-compiler", choices=("aoti", "inductor", "nop"), default="aoti",
                        help="aotcache compiler of the torch.compile backend rows (default aoti)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where models run; cuda: see NOTE [GPU runs] (empty caches on aotcache's warm side)")
    parser.add_argument("--output", type=Path, default=None,
                        help="results JSON (default bench/results/warmstart.json, warmstart_cuda.json for cuda)")
    parser.add_argument("--fingerprint-only", action="store_true",
                        help="only measure the call fingerprint against a capture (seconds, in this process)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.model)))
        return 0
    if args.fingerprint_only:
        measure_fingerprint_costs(args.models.split(",") if args.models else MODELS)
        return 0
    cuda = args.device == "cuda"
    known_models = CUDA_MODELS if cuda else MODELS
    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else known_models)
    unknown = [m for m in models if m not in known_models]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(known_models)}")
    known_modes = [mode for mode, _ in (MODES + CUDA_MODES if cuda else MODES)]
    modes = QUICK_MODES if args.quick else known_modes
    if cuda and args.quick:
        modes = [*modes, "aot_inductor_warm"]
    if args.modes:
        modes = ["eager", *[m for m in args.modes.split(",") if m != "eager"]]
        unknown_modes = [m for m in modes if m not in known_modes]
        if unknown_modes:
            parser.error(f"unknown mode(s) {unknown_modes}; choose from {', '.join(known_modes)}")
    if cuda:
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: this torch sees no CUDA device")
    goals = CUDA_GOALS if cuda else GOALS
    output = args.output or (CUDA_RESULTS_PATH if cuda else RESULTS_PATH)
    rows: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    import torch

    def write_report(fingerprint_costs: dict[str, Any] | None) -> dict[str, Any]:
        """Write what is measured so far (``partial`` until the end: a run cut short still leaves its rows)."""
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                              "python": platform.python_version()},
                  "goals": goals, "quick": bool(args.quick), "omp_num_threads": args.threads,
                  "fingerprint_vs_capture": fingerprint_costs,
                  "backend_compiler": args.backend_compiler, "modes": modes, "models": rows,
                  "total_s": time.perf_counter() - started}
        if fingerprint_costs is None:
            report["partial"] = True
        if cuda:
            report.update(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=_triton_version())
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        return report

    with tempfile.TemporaryDirectory(prefix="aotcache-warmstart-") as temp:
        source = snapshot_sources(Path(temp) / "source")
        for model in models:
            dirs = {"aot_root": Path(temp) / model / "aotcache", "inductor": Path(temp) / model / "inductor",
                    "source": source}
            row: dict[str, Any] = {}
            rows[model] = row
            for mode in modes:
                row[mode] = _run_fresh(mode, model, dirs, args.timeout, args.threads, args.backend_compiler,
                                       args.device)
                print(f"{model:>20} {mode:>18}: {_fmt(row[mode])} s"
                      + (f"  ({row[mode]['error']})" if "error" in row[mode] else ""), flush=True)
                row["ratios"] = _ratios(row)
                write_report(None)
            shutil.rmtree(Path(temp) / model, ignore_errors=True)
    print()
    print_table(rows, modes, goals)
    print("\nCall fingerprint vs capture (training call, in one process, min over 3):")
    report = write_report(measure_fingerprint_costs(models))
    print(f"\nwrote {output} in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
