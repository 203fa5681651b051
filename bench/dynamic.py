"""Dynamic shapes: per-call overhead and first-capture cost of dynamic=True next to static (issue 13 item 1).

    python bench/dynamic.py                  # bert and gpt2 (transformers, tiny random configs), nop compiler
    python bench/dynamic.py --models bert --calls 50

Per call: the median time of a warm call (sequence length 16, inference) of the same model wrapped three
ways -- dynamic=False, dynamic=True, dynamic=None (automatic, after lengths 16 and 20 were seen) -- and of
eager, interleaved so that background load hits all alike. First capture: the first call (capture + nop
compile, cache off) of a fresh wrapper, static before and after the dynamic one (their mean is the
reference); the median over --rounds rounds of the wall-clock ratio and of the CPU-time ratio (process time,
steadier on a shared machine). ``auto``: the same for the default dynamic=None, whose first dynamic capture is
the call with a new sequence length (only that dimension symbolic). ``cold``: static and dynamic (CPU-time ratio)
with torch's process-wide fake-tensor cache emptied before the call, as for shapes a process has not captured
before; the other static figures find every op of their earlier rounds in it (a symbolic trace never does:
NOTE [Symbolic fake-tensor cache] in aotcache/aot/trace_environment.py). One intra-op thread. Results go to
bench/results/dynamic.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from typing import Any

import torch


def make_model(name: str) -> torch.nn.Module:
    if name == "bert":
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, vocab_size=1000))
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128))


def per_call(name: str, calls: int) -> dict[str, float]:
    from aotcache import aot_module

    torch.manual_seed(0)
    model = make_model(name).eval()
    variants = {label: aot_module(model, "nop", dynamic=dynamic, cache=False)
                for label, dynamic in (("static", False), ("dynamic", True), ("auto", None))}
    short, longer = torch.randint(0, 1000, (2, 16)), torch.randint(0, 1000, (2, 20))
    times: dict[str, list[float]] = {label: [] for label in (*variants, "eager")}
    with torch.no_grad():
        for wrapped in variants.values():
            for ids in (short, longer, short, longer):
                wrapped(ids)
        for _ in range(calls):
            for label, target in (*variants.items(), ("eager", model)):
                started = time.perf_counter()
                target(short)
                times[label].append(time.perf_counter() - started)
    medians = {label: statistics.median(values) * 1000 for label, values in times.items()}
    return {**{f"{label}_ms": round(value, 3) for label, value in medians.items()},
            "dynamic_over_static": round(medians["dynamic"] / medians["static"], 2),
            "auto_over_static": round(medians["auto"] / medians["static"], 2)}


def first_capture(name: str, rounds: int) -> dict[str, float]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from aotcache import aot_module

    ids = torch.randint(0, 1000, (2, 16))

    def call(wrapped: Any, inputs: torch.Tensor, train: bool) -> None:
        if train:
            wrapped(inputs)[0].float().sum().backward()
        else:
            with torch.no_grad():
                wrapped(inputs)

    def first_call(dynamic: bool | None, train: bool, cold: bool = False) -> tuple[float, float]:
        """Wall-clock and CPU seconds of the first call of a fresh wrapper; with ``dynamic=None`` (automatic),
        of the call whose new sequence length makes that dimension dynamic (the first dynamic capture).
        ``cold``: torch's process-wide fake-tensor cache emptied first, as in a process that has not captured
        these shapes before (otherwise a static capture finds every op of its earlier rounds there)."""
        torch.manual_seed(0)
        wrapped = aot_module(make_model(name).train(train), "nop", dynamic=dynamic, cache=False)
        inputs = ids
        if dynamic is None:
            call(wrapped, ids, train)  # static, as the default does first
            inputs = torch.randint(0, 1000, (2, 20))
        if cold:
            FakeTensorMode.cache.clear()
        gc.collect()  # the garbage of the previous capture is not this one's cost (it was up to 2x a static one)
        started, cpu = time.perf_counter(), time.process_time()
        call(wrapped, inputs, train)
        return time.perf_counter() - started, time.process_time() - cpu

    first_call(False, False)  # imports and one-time setup out of the way (the ShapeEnv's: in per_call)
    result = {}
    for train in (False, True):
        kind = "train" if train else "infer"
        statics, dynamics, ratios, cpu_ratios, autos, auto_ratios = [], [], [], [], [], []
        cold_statics, cold_ratios = [], []
        for _ in range(rounds):  # static before and after each dynamic one, so that load changes hit both
            before, dynamic, auto = first_call(False, train), first_call(True, train), first_call(None, train)
            after = first_call(False, train)
            cold_static, cold_dynamic = first_call(False, train, cold=True), first_call(True, train, cold=True)
            static = [(b + a) / 2 for b, a in zip(before, after)]
            statics.append(static[0])
            dynamics.append(dynamic[0])
            autos.append(auto[0])
            ratios.append(dynamic[0] / static[0])
            cpu_ratios.append(dynamic[1] / static[1])
            auto_ratios.append(auto[0] / static[0])
            cold_statics.append(cold_static[0])
            cold_ratios.append(cold_dynamic[1] / cold_static[1])
        result.update({f"{kind}_static_s": round(statistics.median(statics), 2),
                       f"{kind}_dynamic_s": round(statistics.median(dynamics), 2),
                       f"{kind}_ratio": round(statistics.median(ratios), 2),
                       f"{kind}_ratio_cpu": round(statistics.median(cpu_ratios), 2),
                       f"{kind}_auto_dynamic_s": round(statistics.median(autos), 2),
                       f"{kind}_auto_ratio": round(statistics.median(auto_ratios), 2),
                       f"{kind}_cold_static_s": round(statistics.median(cold_statics), 2),
                       f"{kind}_cold_ratio_cpu": round(statistics.median(cold_ratios), 2)})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert,gpt2")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="first captures: rounds of static, dynamic, static")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name in args.models.split(","):
        results[name] = {"per_call": per_call(name, args.calls), "first_capture": first_capture(name, args.rounds)}
        print(name, json.dumps(results[name]))
    out = Path(__file__).parent / "results" / "dynamic.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
