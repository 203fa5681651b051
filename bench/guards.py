"""Per-call cost of the in-process program guards (NOTE [Program guards]) on the hot path, side by side.

For each model (default: the zoo's ``cnn_bn``, as in ``bench/aot.py``), an ``aot_module`` with the nop
compiler is called once, then its compiled runtime is replaced by a stub so that only the dispatch is timed
(ModuleState, the guard check, the hot signature match). Interleaved rounds of ``--calls`` calls with the
program guards checked and with ``ProgramGuards.holds`` short-cut to ``True`` (what the hot path cost before
the guards); the minimum per round is reported, with the number of recorded guards and the walk time.
Usage: ``python bench/guards.py [--models cnn_bn,gpt2_tiny] [--calls 2000] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import aotcache  # noqa: E402
from aotcache.autograd_cache import program_guards  # noqa: E402
from tests.aot.zoo import get_entry  # noqa: E402


class _Stub:
    def __init__(self, metadata):
        self.metadata = metadata

    def __call__(self, *args):
        return None


def measure(name: str, calls: int, rounds: int) -> dict:
    model, inputs = get_entry(name).build()
    compiled = aotcache.aot_module(model, "nop", cache=False)
    with torch.no_grad():
        compiled(*inputs)
        for _, hot_signatures in compiled.compiled._programs.values():
            for seen in hot_signatures._by_structure.values():
                for hot in seen:
                    hot.runtime = _Stub(hot.runtime.metadata)
        program = next(iter(compiled.compiled._programs.values()))[0]
        started = time.perf_counter()
        program_guards.watch_program(model, model)
        walk_s = time.perf_counter() - started
        checked_holds = program_guards.ProgramGuards.holds

        def run(check: bool) -> float:
            program_guards.ProgramGuards.holds = checked_holds if check else (lambda self: True)
            started = time.perf_counter()
            for _ in range(calls):
                compiled(*inputs)
            return (time.perf_counter() - started) / calls * 1e6

        on, off = [], []
        try:
            for _ in range(rounds):
                off.append(run(False))
                on.append(run(True))
        finally:
            program_guards.ProgramGuards.holds = checked_holds
        started = time.perf_counter()
        for _ in range(calls):
            program.guards.holds()
        holds_us = (time.perf_counter() - started) / calls * 1e6
    walks = compiled.compiled.num_program_walks
    return {"without_guards_us": min(off), "with_guards_us": min(on), "holds_us": holds_us,
            "guards": len(program.guards), "walk_ms": walk_s * 1e3, "walks": walks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn_bn")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    for name in args.models.split(","):
        row = measure(name, args.calls, args.rounds)
        print(f"{name:>20} per call: without guards {row['without_guards_us']:6.1f} us, with guards "
              f"{row['with_guards_us']:6.1f} us (ratio {row['with_guards_us'] / row['without_guards_us']:.2f}); "
              f"holds() {row['holds_us']:.1f} us for {row['guards']} guards; walk {row['walk_ms']:.1f} ms; "
              f"walks {row['walks']}", flush=True)


if __name__ == "__main__":
    main()
