"""The main demo: ``python -m aotcache.demo`` trains a small transformers Llama through aotcache, cold then warm.

Each phase runs in its own fresh Python process, with private cache directories (a temporary directory,
or ``--cache-dir``):

1. ``eager``: a few SGD steps of the plain model (the reference losses, and eager's first-step time), then
   greedy decoding of a few tokens with a KV cache (the reference tokens);
2. ``torch.compile`` cold (empty ``TORCHINDUCTOR_CACHE_DIR``), then warm (its caches hot, new process);
3. ``aotcache`` cold: ``aotcache.compile(model, compiler="aoti")`` captures, compiles and stores the graphs
   (live progress on a terminal), then decodes with a KV cache through the same wrapper (``generate``);
4. ``aotcache`` warm: a new process loads them (call fingerprint -> entry -> AOTInductor libraries);

then prints a table (first step, overhead over eager's first step, the rest of the steps, the final loss,
whether the decoded tokens equal eager's, whether ``torch._inductor`` was imported) and the cache counters.
``--store`` runs the store demo instead (tiers, corruption, eviction: :mod:`aotcache.demo_store`). A few
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "PHASES", "build_model"]

# phase -> (label, cache sub-directory of its compiler: phases sharing one see each other's caches)
PHASES = {
    "eager": ("eager", "eager"),
    "tc_cold": ("torch.compile cold", "torch_compile"),
    "tc_warm": ("torch.compile warm", "torch_compile"),
    "aot_cold": ("aotcache cold", "aotcache"),
    "aot_warm": ("aotcache warm", "aotcache"),
}
_LOSS_TOLERANCE = 1e-3
_LEARNING_RATE = 0.05
_NEW_TOKENS = 3  # the prompt's forward, then two single-token steps with the cache


def build_model() -> tuple[Any, Any, Any]:
    """The demo's model (a 2-layer transformers Llama with random weights: no download), a batch of token
    ids and a prompt to decode from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    input_ids = torch.randint(3, 256, (4, 32))
    prompt = torch.randint(3, 256, (1, 8))
    return model, input_ids, prompt


# ----------------------------------------------------------------------------------------------------
# One phase, in a fresh process
# ----------------------------------------------------------------------------------------------------


def _wrap(phase: str, model: Any, compiler: str) -> Any:
    if phase == "eager":
        return model
    if phase.startswith("tc_"):
        import torch

        return torch.compile(model)
    import aotcache

    return aotcache.compile(model, compiler=compiler)


def run_phase(phase: str, steps: int, compiler: str) -> dict[str, Any]:
    """Train ``steps`` SGD steps (time of wrapping + the first step, and of the remaining steps), then (eager
    and aotcache) decode ``_NEW_TOKENS`` tokens greedily with a KV cache."""
    import warnings

    import torch

    # torch's own deprecation notice, printed by AOTInductor's export of each graph: noise on the demo's terminal
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    model, input_ids, prompt = build_model()
    parameters = list(model.parameters())
    losses = []
    started = time.perf_counter()
    wrapped = _wrap(phase, model, compiler)
    step_times = []
    for _ in range(steps):
        loss = wrapped(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        # NOTE [plain SGD]: constructing torch.optim.SGD imports torch._dynamo and torch._inductor (~1.3 s),
        # which would hide what a warm start costs; the update is written out instead.
        with torch.no_grad():
            for parameter in parameters:
                if parameter.grad is not None:
                    parameter.sub_(_LEARNING_RATE * parameter.grad)
                    parameter.grad = None
        losses.append(loss.detach().item())
        step_times.append(time.perf_counter() - started)
        started = time.perf_counter()
    result: dict[str, Any] = {"first_s": step_times[0], "rest_s": sum(step_times[1:]), "losses": losses,
                              "inductor_imported": "torch._inductor" in sys.modules, "tokens": None}
    if not phase.startswith("tc_"):
        # greedy decoding with a KV cache (DynamicCache in and out of every compiled call), through the wrapper
        wrapped.eval()
        started = time.perf_counter()
        tokens = wrapped.generate(prompt, max_new_tokens=_NEW_TOKENS, min_new_tokens=_NEW_TOKENS, do_sample=False)
        result["decode_s"] = time.perf_counter() - started
        result["tokens"] = tokens[0, prompt.shape[1]:].tolist()
    if phase.startswith("aot_"):
        from aotcache.autograd_cache.cache import default_cache

        result["route"] = wrapped.route
        cache = default_cache()
        result["counters"] = {name: value for name, value in cache.counters.items() if value}
        if cache.journal is not None:
            cache.journal.flush()
    return result


# ----------------------------------------------------------------------------------------------------
# The parent: fresh processes, the table
# ----------------------------------------------------------------------------------------------------


def _snapshot_package(target: Path) -> Path:
    """Copy the aotcache package under ``target``; every phase imports that copy.

    NOTE [source snapshot] aotcache's own source digest is part of every key: in a development checkout
    that changes while the demo runs, the warm phase would otherwise miss. An installed package never changes.
    """
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(Path(__file__).resolve().parent, target / "aotcache",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _run_fresh(phase: str, cache_root: Path, steps: int, compiler: str, threads: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AOTCACHE_")}
    env["PYTHONPATH"] = str(cache_root / "source") + os.pathsep + env.get("PYTHONPATH", "")
    subdir = PHASES[phase][1]
    env["AOTCACHE_CACHE_DIR"] = str(cache_root / subdir / "aotcache")
    env["AOTCACHE_TIERS"] = "memory,disk"
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / subdir / "inductor")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # NOTE [bytecode]: a user's installed package has .pyc files; with PYTHONDONTWRITEBYTECODE every process
    # would compile aotcache's sources again (~0.2 s). Bytecode goes to a private prefix, never the checkout.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(cache_root / "pycache")
    command = [sys.executable, "-m", "aotcache.demo", "--phase", phase, "--steps", str(steps),
               "--compiler", compiler]
    started = time.perf_counter()
    # aotcache's phases write to this terminal (its live compile progress); the others' logs are kept back
    stderr = None if phase.startswith("aot_") else subprocess.PIPE
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the {PHASES[phase][0]} process failed ({proc.returncode}):\n{(proc.stderr or '')[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def _print_table(results: dict[str, dict[str, Any]], steps: int) -> None:
    eager = results["eager"]
    header = ["", "first step (s)", "overhead (s)", f"next {steps - 1} steps (s)", "final loss", "same losses",
              "decode (s)", "same tokens", "Inductor imported", "process (s)"]
    rows = [header]
    for phase, result in results.items():
        same = all(abs(a - b) <= _LOSS_TOLERANCE * max(1.0, abs(b)) for a, b in zip(result["losses"],
                                                                                     eager["losses"]))
        decoded = result.get("tokens")
        same_tokens = "-" if decoded is None else "yes" if decoded == eager["tokens"] else "NO"
        decode_s = f"{result['decode_s']:.3f}" if decoded is not None else "-"
        rows.append([PHASES[phase][0], f"{result['first_s']:.3f}", f"{result['first_s'] - eager['first_s']:+.3f}",
                     f"{result['rest_s']:.3f}", f"{result['losses'][-1]:.5f}", "yes" if same else "NO",
                     decode_s, same_tokens, "yes" if result["inductor_imported"] else "no",
                     f"{result['process_s']:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _summary(results: dict[str, dict[str, Any]]) -> None:
    eager_first = results["eager"]["first_s"]
    aot_warm = results["aot_warm"]["first_s"] - eager_first
    if "tc_warm" in results:
        tc_warm = results["tc_warm"]["first_s"] - eager_first
        print(f"\nWarm-start overhead over eager's first step: aotcache {aot_warm:.3f} s, torch.compile "
              f"{tc_warm:.3f} s ({aot_warm / tc_warm if tc_warm > 0 else float('nan'):.2f}x).")
    else:
        print(f"\nWarm-start overhead over eager's first step: aotcache {aot_warm:.3f} s.")
    for phase in ("aot_cold", "aot_warm"):
        counters = results[phase].get("counters", {})
        shown = ", ".join(f"{name}={value:g}" for name, value in sorted(counters.items()))
        print(f"Cache counters, {PHASES[phase][0]}: {shown or 'none'}")
    print(f"aotcache.compile chose: {results['aot_warm'].get('route')} (the whole training step and every decoding "
          f"step captured by AOT Autograd; a model with graph breaks would go through torch.compile). Importing "
          f"transformers imports torch._inductor itself, hence 'yes' in every row.")


def _default_compiler() -> str:
    return "aoti" if any(shutil.which(name) for name in ("g++", "c++", "clang++")) else "nop"


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m aotcache.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--store", action="store_true", help="Run the store demo (tiers, corruption, eviction).")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="Keep the caches here (reused by a later run) instead of a temporary directory.")
    parser.add_argument("--steps", type=int, default=5, help="Training steps per phase (default 5).")
    parser.add_argument("--compiler", choices=("aoti", "inductor", "nop"), default=None,
                        help="aotcache's compiler (default: aoti with a C++ compiler on PATH, else nop).")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every phase (default 1: OpenMP threads spin on a busy machine).")
    parser.add_argument("--skip-torch-compile", action="store_true",
                        help="Leave out the torch.compile phases (a quicker check of aotcache alone).")
    parser.add_argument("--phase", choices=tuple(PHASES), help=argparse.SUPPRESS)  # a child process
    arguments = list(sys.argv[1:] if argv is None else argv)
    if "--store" in arguments:  # the store demo has its own options (--cache-dir, --no-redis)
        from aotcache.demo_store import main as store_main

        return store_main([argument for argument in arguments if argument != "--store"])
    args = parser.parse_args(arguments)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    compiler = args.compiler or _default_compiler()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.steps, compiler)))
        return 0
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aotcache-demo-") as temp:
        cache_root = args.cache_dir.expanduser().resolve() if args.cache_dir else Path(temp)
        print(f"aotcache demo: {args.steps} training steps of a small transformers Llama per phase, then "
              f"{_NEW_TOKENS} tokens decoded with a KV cache, each phase in a fresh process; aotcache compiler: "
              f"{compiler}; caches under {cache_root}")
        _snapshot_package(cache_root / "source")
        results: dict[str, dict[str, Any]] = {}
        for phase, (label, _) in PHASES.items():
            if args.skip_torch_compile and phase.startswith("tc_"):
                continue
            print(f"  running {label} ...", flush=True)
            results[phase] = _run_fresh(phase, cache_root, args.steps, compiler, args.threads)
        print()
        _print_table(results, args.steps)
        _summary(results)
    print(f"\nDemo finished in {time.perf_counter() - started:.0f} s.")
    if args.cache_dir:
        print(f"Inspect aotcache's cache with: aotcache --cache-dir {cache_root / 'aotcache' / 'aotcache'} stats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
