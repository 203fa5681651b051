"""Where aotcache's time goes in one KV-cache decoding step: the step replayed with its graph's work taken out.

For each architecture (tiny random models of ``bench/hf_tiny.py``; ``--layers N`` for deeper ones), in a fresh
process: greedy ``generate`` through ``aotcache.compile`` (nop) warms the graphs, the 20th forward call of one more
``generate`` is recorded (its arguments, cache included), and every compiled graph is swapped for one returning
its first outputs again. Calling the model with the recorded arguments then runs everything aotcache does around
a graph (the checks, the call record, output rebuilding, the cache write-back) and nothing of the graph: the
cache keeps one length, so every call is the same step. Each part is then timed alone (``timeit``, best of 15
repeats): this process's CPU time per call in microseconds (a shared machine: compare the sides of one run).

``step`` is the whole compiled call; the other rows are parts of it (``find`` holds ``find.*``, ``runtime`` holds
``runtime.rebuild``). ``--baseline PATH`` measures another source tree (``git archive <commit> aotcache | tar -x -C
PATH``) too, processes interleaved, the best of ``--rounds`` kept per row.

    PYTHONPATH=$PWD python bench/hf_decode_parts.py [--archs Llama GPT2 Bart] [--layers 16] [--baseline PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_decode_overhead import HEADS, run_measurement

REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS = ("step", "module_state", "program_guards", "find", "find.structure", "find.signature", "find.tensors",
        "find.guards", "runtime", "runtime.rebuild", "write_back")

MEASURE = r"""
import copy, json, sys, time, timeit
sys.path.insert(0, {source!r}); sys.path.insert(1, {bench!r})
import torch, transformers
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
import aotcache
import aotcache.aot.api as api
import aotcache.aot.module as module
import aotcache.aot.runtime as rt
from aotcache.aot.call_hot_path import call_key
from hf_tiny import build

layers = {layers!r}
overrides = dict(num_hidden_layers=layers, n_layer=layers, decoder_layers=layers, encoder_layers=layers) if layers else {{}}
model = aotcache.compile(build({arch!r}, {head!r}, **overrides).eval(), compiler="nop")
if model.config.is_encoder_decoder and model.generation_config.decoder_start_token_id is None:
    model.generation_config.decoder_start_token_id = model.config.pad_token_id
ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))

def generate():
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)

generate(); generate()
calls = []
structured = api.AOTFunction.call_structured

def recording(self, structure, flat, args, kwargs, extra=None):
    calls.append((copy.deepcopy(args), copy.deepcopy(kwargs)) if len(calls) == 20 else None)
    return structured(self, structure, flat, args, kwargs, extra)

api.AOTFunction.call_structured = recording
generate()
api.AOTFunction.call_structured = structured
args, kwargs = calls[20]
user_args = args[2:]  # (the module's parameters and buffers come first)
for runtime in [r for rs in model.compiled._entries.values() for r in rs if isinstance(r, rt.CompiledRuntime)]:
    def replay(*graph_args, _graph=runtime.forward, _outputs=[]):
        if not _outputs:
            _outputs.append(list(_graph(*graph_args)))
        return _outputs[0]
    runtime.forward = replay

with torch.no_grad():
    for _ in range(5):
        model(*user_args, **kwargs)
    function, state = model.compiled, model._state
    params, buffers, names, settings = state.current()
    program = function._programs[settings][0]
    records = function._calls_by_digest[program.digest]
    tree = ((params, buffers, *user_args), kwargs)
    key = call_key(settings, tree[0], kwargs)
    record, flat = records.find(key, tree, function._guards_hold)
    runtime = record.runtime
    graph_args = [flat[position] for position in runtime._positions]
    rebuilt = runtime._build_outputs(graph_args, list(runtime.forward(*graph_args)))
    output = runtime(*flat)
    passed = module.find_cache_arguments(user_args, kwargs)
    parts = {{
        "step": lambda: model(*user_args, **kwargs),
        "module_state": state.current,
        "program_guards": program.holds,
        "find": lambda: records.find(key, tree, function._guards_hold),
        "find.structure": lambda: record.plan(tree),
        "find.signature": lambda: record.matches(flat),
        "find.tensors": lambda: record._hot.matches(list(record._take_tensors(flat))),
        "find.guards": lambda: record.guards_hold(flat, function._guards_hold),
        "runtime": lambda: runtime(*flat),
        "runtime.rebuild": lambda: runtime.out_structure.unflatten(rebuilt),
        "write_back": lambda: module.write_back_caches(passed, output),
    }}
    result = {{name: min(timeit.repeat(part, number=200, repeat=15, timer=time.process_time)) / 200 * 1e6 for name, part in parts.items()}}
result["tensors"] = len(list(record._take_tensors(flat)))
print("RESULT " + json.dumps(result))
"""


def measure(source: str, arch: str, layers: int) -> dict:
    code = MEASURE.format(source=source, bench=str(REPO_ROOT / "bench"), arch=arch, head=HEADS.get(arch, "ForCausalLM"),
                          layers=layers)
    return run_measurement(code, source, arch, timeout=900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="*", default=["Llama", "GPT2", "Bart"])
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: hf_tiny's 2)")
    parser.add_argument("--baseline", help="another source tree, measured side by side")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    sides = {"this": str(REPO_ROOT)} | ({"baseline": str(Path(args.baseline).resolve())} if args.baseline else {})
    best: dict = {}
    for _ in range(args.rounds):
        for arch in args.archs:
            for side, source in sides.items():
                sample = measure(source, arch, args.layers)
                kept = best.setdefault((arch, side), sample)
                best[(arch, side)] = {row: min(kept[row], sample[row]) for row in kept}
    print(f"{'part (us per call)':<20}" + "".join(f"{f'{arch} {side}':>16}" for arch, side in sorted(best)))
    for row in (*ROWS, "tensors"):
        print(f"{row:<20}" + "".join(f"{best[key][row]:>16.1f}" for key in sorted(best)))


if __name__ == "__main__":
    main()
