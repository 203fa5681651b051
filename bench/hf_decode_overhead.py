"""Per-token cost of greedy KV-cache decoding through ``aotcache.compile`` (nop) against eager: what a server pays.

For each architecture (tiny random models of ``bench/hf_tiny.py``), in a fresh process: the steady time per
generated token (the slope between 8 and 40 new tokens, best of several samples) of the eager model and of
the compiled one, and of the latter the time spent in the compiled graphs themselves (``CompiledRuntime``
calls). ``wrapper`` = compiled - graphs - (eager - eager forwards): what aotcache adds per forward call (the
signature, guards, cache-object flattening and write-back).

``--baseline PATH`` measures another source tree (e.g. ``git archive <commit> aotcache | tar -x -C PATH``)
side by side, rounds interleaved (the machine is shared: compare ratios, not absolute times).

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
import json, sys, time
sys.path.insert(0, {source!r}); sys.path.insert(1, {bench!r})
import torch, transformers
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
import aotcache
import aotcache.aot.runtime as rt
from hf_tiny import build

arch, head = {arch!r}, {head!r}
eager = build(arch, head).eval()
model = aotcache.compile(build(arch, head).eval(), compiler="nop")
if eager.config.is_encoder_decoder and eager.generation_config.decoder_start_token_id is None:
    for m in (eager, model):
        m.generation_config.decoder_start_token_id = m.config.pad_token_id
ids = torch.randint(3, eager.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
spent = [0.0]
original = rt.CompiledRuntime.__call__

def timed(self, *args):
    start = time.perf_counter()
    try:
        return original(self, *args)
    finally:
        spent[0] += time.perf_counter() - start

rt.CompiledRuntime.__call__ = timed
forward_s = [0.0]
eager_forward = eager.forward

def timed_forward(*args, **kwargs):
    start = time.perf_counter()
    try:
        return eager_forward(*args, **kwargs)
    finally:
        forward_s[0] += time.perf_counter() - start

eager.forward = timed_forward

def run(m, n):
    spent[0] = forward_s[0] = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        m.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - start, spent[0], forward_s[0]

for m in (eager, model):
    run(m, 40)
best = {{}}
for _ in range(7):
    for name, m in (("eager", eager), ("compiled", model)):
        long, long_graph, long_fwd = run(m, 40)
        short, short_graph, short_fwd = run(m, 8)
        sample = ((long - short) / 32, (long_graph - short_graph) / 32, (long_fwd - short_fwd) / 32)
        if name not in best or sample[0] < best[name][0]:
            best[name] = sample
eager_s, _, eager_fwd = best["eager"]
compiled_s, graph_s, _ = best["compiled"]
print("RESULT " + json.dumps({{"eager_us": eager_s * 1e6, "compiled_us": compiled_s * 1e6, "graph_us": graph_s * 1e6,
                              "eager_forward_us": eager_fwd * 1e6,
                              "wrapper_us": (compiled_s - graph_s - (eager_s - eager_fwd)) * 1e6}}))
"""


def measure(source: str, arch: str) -> dict:
    code = MEASURE.format(source=source, bench=str(REPO_ROOT / "bench"), arch=arch, head=HEADS.get(arch, "ForCausalLM"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": source,
           "AOTCACHE_CACHE_DIR": tempfile.mkdtemp(prefix="hf_decode_overhead_")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{arch} under {source}: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(lines[-1][7:])


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
                if sample["compiled_us"] - sample["graph_us"] < kept["compiled_us"] - kept["graph_us"]:
                    best[(arch, side)] = sample
    print(f"{'arch':<8}{'side':<10}{'eager us/token':>15}{'compiled':>10}{'graphs':>9}{'wrapper':>9}{'ratio':>7}")
    for (arch, side), r in best.items():
        print(f"{arch:<8}{side:<10}{r['eager_us']:>15.0f}{r['compiled_us']:>10.0f}{r['graph_us']:>9.0f}"
              f"{r['wrapper_us']:>9.0f}{r['compiled_us'] / r['eager_us']:>7.2f}")


if __name__ == "__main__":
    main()
