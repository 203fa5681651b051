"""Where a first dynamic capture spends its time, next to a static one (issue 13: first dynamic capture <= 3x).

    python bench/dynamic_profile.py                       # bert and gpt2, training step, nop compiler
    python bench/dynamic_profile.py --models bert --infer --top 30

For each model of ``bench/dynamic.py``: the CPU seconds of the first call of a fresh wrapper (capture + nop
compile, cache off), static and ``dynamic=True`` interleaved (median of --rounds); then one capture of each under
cProfile, reporting counts that do not depend on load (aten ops recorded by make_fx, fake-tensor dispatches and
fake kernels run, functional wrappers made, SymNodes made, symbolic size operations traced by the proxy mode) and
the self time of the dynamic capture grouped by where the code lives, with its top functions. cProfile inflates
code made of many small calls (the symbolic arithmetic) against the rest: read its shares as an order, and the CPU
seconds (taken without the profiler) as the cost. Results go to bench/results/dynamic_profile.json.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import time
from pathlib import Path

import torch

from dynamic import make_model

# where a function's file lives -> group (first match wins); the rest is "other"
GROUPS = (
    ("symbolic ints (SymNode, ShapeEnv, recording)",
     ("fx/experimental/sym_node.py", "fx/experimental/symbolic_shapes.py", "fx/experimental/recording.py",
      "torch/__init__.py")),
    ("sympy", ("sympy/",)),
    ("fake tensors and meta kernels", ("_subclasses/fake_", "_meta_registrations.py", "_subclasses/meta_utils.py")),
    ("decompositions, refs, prims", ("_decomp/", "_refs/", "_prims/", "_prims_common/")),
    ("functionalization", ("_subclasses/functional_tensor.py",)),
    ("make_fx proxy tracing, fx graph", ("fx/experimental/proxy_tensor.py", "torch/fx/", "utils/_thunk.py")),
    ("pytree", ("utils/_pytree.py",)),
    ("dispatch, modes, ops", ("torch/_ops.py", "utils/_python_dispatch.py", "torch/overrides.py", "_library/")),
    ("autograd", ("torch/autograd/",)),
    ("model code (transformers, nn)", ("transformers/", "torch/nn/")),
    ("aotcache", ("aotcache/",)),
    ("logging", ("logging/",)),
    ("builtins (isinstance, getattr, ...)", ("~",)),
)

# function name -> what its call count says (matched on the function name and the end of its file)
COUNTS = {
    "aten ops recorded (proxy_call)": ("proxy_tensor.py", "proxy_call"),
    "fake-tensor dispatches": ("fake_tensor.py", "dispatch"),
    "fake kernels run (cache off or miss)": ("fake_tensor.py", "_dispatch_impl"),
    "functional wrappers made": ("functional_tensor.py", "__new__"),
    "SymNodes made": ("sym_node.py", "__init__"),
    "size operations traced (__sym_dispatch__)": ("proxy_tensor.py", "__sym_dispatch__"),
}


def first_call(name: str, dynamic: bool, train: bool, profile: cProfile.Profile | None = None,
               cold: bool = False) -> float:
    """CPU seconds of the first call (capture + nop compile) of a fresh wrapper, cache off; ``cold``: torch's
    process-wide fake-tensor cache emptied first (as in bench/dynamic.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from aotcache import aot_module

    torch.manual_seed(0)
    wrapped = aot_module(make_model(name).train(train), "nop", dynamic=dynamic, cache=False)
    ids = torch.randint(0, 1000, (2, 16))
    if cold:
        FakeTensorMode.cache.clear()
    gc.collect()
    started = time.process_time()
    if profile is not None:
        profile.enable()
    if train:
        wrapped(ids)[0].float().sum().backward()
    else:
        with torch.no_grad():
            wrapped(ids)
    if profile is not None:
        profile.disable()
    return time.process_time() - started


def counts(stats: dict) -> dict[str, int]:
    found = dict.fromkeys(COUNTS, 0)
    for (path, _, function), (_, calls, *_rest) in stats.items():
        for label, (file_end, name) in COUNTS.items():
            if function == name and path.endswith(file_end):
                found[label] += calls
    return found


def group_of(path: str) -> str:
    path = path.replace("\\", "/")
    for label, parts in GROUPS:
        if any(part in path for part in parts):
            return label
    return "other"


def profile_model(name: str, train: bool, rounds: int, top: int) -> dict:
    first_call(name, False, train)  # imports and one-time setup (the ShapeEnv's) out of the way
    first_call(name, True, train)
    static, cold, dynamic = [], [], []
    for _ in range(rounds):
        static.append(first_call(name, False, train))
        cold.append(first_call(name, False, train, cold=True))
        dynamic.append(first_call(name, True, train))
    profiles = {}
    for label, is_dynamic, is_cold in (("static", False, False), ("cold static", False, True),
                                       ("dynamic", True, False)):
        profile = cProfile.Profile()
        first_call(name, is_dynamic, train, profile, cold=is_cold)
        profiles[label] = pstats.Stats(profile).stats
    stats = profiles["dynamic"]
    total = sum(entry[2] for entry in stats.values())
    groups: dict[str, float] = {}
    for (path, _, _), entry in stats.items():
        groups[group_of(path)] = groups.get(group_of(path), 0.0) + entry[2]
    functions = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return {
        "static_cpu_s": round(statistics.median(static), 3),
        "cold_static_cpu_s": round(statistics.median(cold), 3),
        "dynamic_cpu_s": round(statistics.median(dynamic), 3),
        "ratio_cpu": round(statistics.median(dynamic) / statistics.median(static), 2),
        "cold_ratio_cpu": round(statistics.median(dynamic) / statistics.median(cold), 2),
        "counts": {label: {kind: counts(profiles[kind])[label] for kind in profiles} for label in COUNTS},
        "self_time_share": {label: round(seconds / total, 3)
                            for label, seconds in sorted(groups.items(), key=lambda item: -item[1])},
        "top_self_time": [{"function": f"{path.split('site-packages/')[-1]}:{line}({function})",
                           "calls": entry[1], "share": round(entry[2] / total, 3)}
                          for (path, line, function), entry in functions],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert,gpt2")
    parser.add_argument("--infer", action="store_true", help="inference (no_grad) instead of a training step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name in args.models.split(","):
        result = results[name] = profile_model(name, not args.infer, args.rounds, args.top)
        print(f"\n{name} ({'inference' if args.infer else 'training step'}), CPU s: static {result['static_cpu_s']}, "
              f"cold static {result['cold_static_cpu_s']}, dynamic {result['dynamic_cpu_s']} "
              f"({result['ratio_cpu']}x static, {result['cold_ratio_cpu']}x cold static)")
        print(f"  {'':45} {'static':>8} {'cold':>8} {'dynamic':>8}")
        for label, by_kind in result["counts"].items():
            print(f"  {label:45} " + " ".join(f"{count:8d}" for count in by_kind.values()))
        print("  self time of the dynamic capture (cProfile), by group:")
        for label, share in result["self_time_share"].items():
            print(f"    {share:6.1%}  {label}")
        print("  top functions by self time:")
        for row in result["top_self_time"]:
            print(f"    {row['share']:6.1%} {row['calls']:8d}  {row['function']}")
    out = Path(__file__).parent / "results" / "dynamic_profile.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"mode": "inference" if args.infer else "training", **results}, indent=1) + "\n",
                   encoding="utf-8")


if __name__ == "__main__":
    main()
