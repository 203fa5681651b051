"""Step time of a model that aotcache cannot capture whole: partial compilation vs eager and torch.compile.

The model branches on a tensor value (``if h.mean() > 0.1``: ``bool(tensor)``) and selects with a boolean
mask (``h[h > 0.5]``: ``nonzero``), so ``aot_module`` falls back (NOTE [Capture fallback] in
aotcache/aot/fallback.py): Dynamo breaks the graph at those two points and aotcache compiles the regions in
between. Sides, timed interleaved (each round runs every side once) after a warm-up:

* ``eager``: the module as written;
* ``torch_compile``: ``torch.compile(model)`` (default Inductor backend);
* ``aotcache_<compiler>``: ``aotcache.aot_module(model, <compiler>)`` (partial compilation);
* ``aotcache_eager_fallback``: ``on_capture_error="eager"``, i.e. the whole call runs eagerly.

One training step is forward + loss + backward. Writes ``bench/results/partial.json`` and prints a table::

    python bench/partial.py                       # nop and inductor, 200 steps
    python bench/partial.py --compilers nop --steps 50
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "partial.json"


class GatedMLP(nn.Module):
    """Three linear layers with a data-dependent branch and a boolean-mask selection between them."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)
        self.l3 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.l1(x)).relu()
        if h.mean() > 0.1:  # bool(tensor): a graph break
            h = h * 1.5
        picked = h[h > 0.5]  # boolean indexing: a data-dependent shape
        h = torch.nn.functional.gelu(self.l2(h))
        return self.l3(h).square().mean() + picked.sum() * 1e-3


def _step(model: Any, x: torch.Tensor) -> None:
    loss = model(x)
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compilers", default="nop,inductor")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: less noise on a shared box)")
    parser.add_argument("--out", default=str(RESULTS))
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    logging.getLogger("aotcache").setLevel(logging.ERROR)

    import aotcache
    from aotcache import config

    torch.manual_seed(0)
    base = GatedMLP(options.width)
    x = torch.randn(options.batch, options.width)
    sides: dict[str, Any] = {"eager": copy.deepcopy(base), "torch_compile": torch.compile(copy.deepcopy(base))}
    compile_s: dict[str, float] = {}
    with config.patch(enabled=False):  # measure compiles, not cache hits from an earlier run
        for name in [c for c in options.compilers.split(",") if c]:
            sides[f"aotcache_{name}"] = aotcache.aot_module(copy.deepcopy(base), name, cache=False)
        sides["aotcache_eager_fallback"] = aotcache.aot_module(copy.deepcopy(base), "nop", cache=False,
                                                              on_capture_error="eager")
        for name, model in sides.items():
            started = time.perf_counter()
            _step(model, x)
            compile_s[name] = round(time.perf_counter() - started, 3)
        for model in sides.values():  # warm-up
            for _ in range(5):
                _step(model, x)
        timings: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(options.steps):
            for name, model in sides.items():
                started = time.perf_counter()
                _step(model, x)
                timings[name].append(time.perf_counter() - started)
    medians = {name: round(statistics.median(values) * 1e3, 4) for name, values in timings.items()}
    kinds = {}
    for name, model in sides.items():
        if name.startswith("aotcache"):
            entries = [r for rs in model.compiled._entries.values() for r in rs]
            kinds[name] = sorted({getattr(r, "kind", "compiled") for r in entries})
    result = {"meta": {"torch": torch.__version__, "steps": options.steps, "width": options.width,
                       "batch": options.batch, "date": time.strftime("%Y-%m-%d %H:%M"),
                       "threads": torch.get_num_threads()},
              "median_step_ms": medians, "first_step_s": compile_s, "runtime_kind": kinds,
              "vs_eager": {name: round(value / medians["eager"], 3) for name, value in medians.items()},
              "vs_torch_compile": {name: round(value / medians["torch_compile"], 3)
                                   for name, value in medians.items()}}
    path = Path(options.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{'side':<26}{'step ms':>9}{'vs eager':>10}{'vs t.c.':>9}{'first step s':>14}  runtime")
    for name in sides:
        print(f"{name:<26}{medians[name]:>9.3f}{result['vs_eager'][name]:>10.3f}"
              f"{result['vs_torch_compile'][name]:>9.3f}{compile_s[name]:>14.3f}  {','.join(kinds.get(name, []))}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
