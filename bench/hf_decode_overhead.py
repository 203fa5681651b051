"""Per-token cost of greedy KV-cache decoding through ``aotcache.compile`` (nop) against eager: what a server pays.

For each architecture (tiny random models of ``bench/hf_tiny.py``), in a fresh process, greedy ``generate`` of 40
tokens, eager and compiled, several times; per forward call, in this process's CPU time (the machine is shared):
the eager forward, the compiled call (the wrapper's ``forward``) and, of that, the compiled graphs themselves
(``CompiledRuntime`` calls). ``wrapper`` = compiled call - graphs: what aotcache adds to every generated token
(the signature, guards, cache-object flattening and write-back). Best sample of 7 (least wrapper time).

``--baseline PATH`` measures another source tree (e.g. ``git archive <commit> aotcache | tar -x -C PATH``)
side by side, rounds interleaved.

    PYTHONPATH=$PWD python bench/hf_decode_overhead.py [--archs Llama GPT2 Bart] [--baseline PATH] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HEADS = {"GPT2": "LMHeadModel", "Bart": "ForConditionalGeneration", "T5": "ForConditionalGeneration"}

MEASURE = r"""
import functools, json, sys, time
sys.path.insert(0, {source!r}); sys.path.insert(1, {bench!r})
import torch, transformers
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
import aotcache
import aotcache.aot.runtime as rt
import aotcache.compile_api as compile_api
from hf_tiny import build

clock = time.process_time  # this process's CPU time: the machine is shared
spent = {{"call": 0.0, "graph": 0.0, "eager": 0.0, "calls": 0, "eager_calls": 0}}

def timing(fn, name, count=None):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += clock() - start
            if count:
                spent[count] += 1
    return timed

rt.CompiledRuntime.__call__ = timing(rt.CompiledRuntime.__call__, "graph")
compile_api.CompiledModule.forward = timing(compile_api.CompiledModule.forward, "call", "calls")
arch, head = {arch!r}, {head!r}
eager = build(arch, head).eval()
model = aotcache.compile(build(arch, head).eval(), compiler="nop")
eager.forward = timing(eager.forward, "eager", "eager_calls")
if eager.config.is_encoder_decoder and eager.generation_config.decoder_start_token_id is None:
    for m in (eager, model):
        m.generation_config.decoder_start_token_id = m.config.pad_token_id
ids = torch.randint(3, eager.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))

def run(m):
    with torch.no_grad():
        m.generate(input_ids=ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)

run(eager); run(model)
best = None
for _ in range(7):
    for key in spent:
        spent[key] = 0
    run(eager); run(model)
    sample = {{"eager_forward_us": spent["eager"] / spent["eager_calls"] * 1e6,
               "compiled_call_us": spent["call"] / spent["calls"] * 1e6,
               "graph_us": spent["graph"] / spent["calls"] * 1e6}}
    sample["wrapper_us"] = sample["compiled_call_us"] - sample["graph_us"]
    if best is None or sample["wrapper_us"] < best["wrapper_us"]:
        best = sample
print("RESULT " + json.dumps(best))
"""


def run_measurement(code: str, source: str, label: str, timeout: int = 600) -> dict:
    """Run one measuring script in a fresh process on ``source`` (its own cache dir) and parse its RESULT line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": source,
           "AOTCACHE_CACHE_DIR": tempfile.mkdtemp(prefix="hf_decode_")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{label} under {source}: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(lines[-1][7:])


def measure(source: str, arch: str) -> dict:
    code = MEASURE.format(source=source, bench=str(REPO_ROOT / "bench"), arch=arch, head=HEADS.get(arch, "ForCausalLM"))
    return run_measurement(code, source, arch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="*", default=["Llama", "GPT2", "Bart"])
    parser.add_argument("--baseline", help="another source tree, measured side by side")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sides = {"this": str(REPO_ROOT)} | ({"baseline": str(Path(args.baseline).resolve())} if args.baseline else {})
    best: dict = {}
    for _ in range(args.rounds):
        for arch in args.archs:
            for side, source in sides.items():
                sample = measure(source, arch)
                kept = best.setdefault((arch, side), sample)
                if sample["wrapper_us"] < kept["wrapper_us"]:
                    best[(arch, side)] = sample
    print(f"{'arch':<8}{'side':<10}{'eager forward':>14}{'compiled call':>14}{'graphs':>8}{'wrapper':>8}{'ratio':>7}"
          "   (CPU us per forward call)")
    for (arch, side), r in sorted(best.items()):
        print(f"{arch:<8}{side:<10}{r['eager_forward_us']:>14.0f}{r['compiled_call_us']:>14.0f}{r['graph_us']:>8.0f}"
              f"{r['wrapper_us']:>8.0f}{r['compiled_call_us'] / r['eager_forward_us']:>7.2f}")


if __name__ == "__main__":
    main()
