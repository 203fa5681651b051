"""Warm starts of Dynamo graphs with symbolic sizes through ``torch.compile(backend="aotcache")``: cache counters.

    python bench/backend_dynamic_warm.py             # tiny Llama and GPT-2 (transformers), nop compiler

Each model trains through the backend in fresh processes sharing one cache directory: a cold run over some
(batch, length) pairs, a warm run over the same, and a run over other pairs in another order. Dynamic entries
carry the guards they were compiled under (NOTE [Prior guards of a Dynamo entry]); the counts show whether that
costs warm hits (entries fragmenting over the key's slots). Prints hit / guard_miss / compile per run and the
number of entries with guards; writes bench/results/backend_dynamic_warm.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = {  # model -> the (batch, length) pairs of each fresh process, in order
    "llama": [[[2, 8], [2, 16], [2, 24], [2, 32]], [[2, 8], [2, 16], [2, 24], [2, 32]],
              [[2, 24], [2, 40], [2, 8], [2, 16]]],
    "gpt2": [[[2, 8], [2, 16], [3, 24], [4, 12]], [[2, 8], [2, 16], [3, 24], [4, 12]],
             [[5, 20], [2, 8], [3, 9], [2, 16]]],
}

CHILD = """
import json, sys, torch, transformers
from aotcache.autograd_cache.cache import default_cache
torch.manual_seed(0)
if sys.argv[1] == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256))
else:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                                                 n_positions=256))
compiled = torch.compile(model, backend="aotcache", options={"compiler": "nop"})
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for batch, length in json.loads(sys.argv[2]):
    ids = torch.randint(0, 128, (batch, length))
    compiled(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
stats = default_cache().stats()
entries = default_cache().list_entries()
print(json.dumps({**{k: stats[k] for k in ("hit", "guard_miss", "compile", "bypass", "load_error")},
                  "entries": len(entries), "guarded": sum(1 for e in entries if e.manifest.get("guards"))}))
"""


def main() -> None:
    results = {}
    for model, runs in RUNS.items():
        with tempfile.TemporaryDirectory() as cache_dir:
            env = {**os.environ, "AOTCACHE_CACHE_DIR": cache_dir,
                   "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            rows = []
            for pairs in runs:
                proc = subprocess.run([sys.executable, "-c", CHILD, model, json.dumps(pairs)], env=env,
                                      capture_output=True, text=True, check=True, timeout=900)
                row = {"pairs": pairs, **json.loads(proc.stdout.strip().splitlines()[-1])}
                print(model, json.dumps(row))
                rows.append(row)
            results[model] = rows
    out = REPO / "bench" / "results" / "backend_dynamic_warm.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
