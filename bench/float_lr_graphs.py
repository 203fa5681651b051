"""Graphs Dynamo compiles over 12 single-tensor optimizer steps whose float LR a scheduler changes every step:
aotcache's backend (nop compiler, no cache) against ``aot_eager``, and how far each run's parameters are from the
other's and from eager's (a check, not a timing; NOTE [Dynamo's float inputs kept as graph inputs]).

    python bench/float_lr_graphs.py [adam adagrad adamw sgd]
"""

from __future__ import annotations

import functools
import sys

import torch
from torch._dynamo.utils import counters

from aotcache.backend import aotcache_backend

STEPS = 12


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.1, foreach=False)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=0.1, foreach=False)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, foreach=False)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False)
    raise SystemExit(f"unknown optimizer {kind!r}: use adam, adagrad, adamw or sgd")


def train(kind: str, backend) -> tuple[int, list[torch.Tensor]]:
    """Graphs compiled (``backend`` None: eager, 0) and the parameters after ``STEPS`` steps."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = _optimizer(kind, model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    step = opt.step if backend is None else torch.compile(opt.step, backend=backend)
    for i in range(STEPS):
        opt.zero_grad()
        model(torch.full((2, 4), float(i + 1))).sum().backward()
        step()
        sched.step()
    return counters["stats"]["unique_graphs"], [p.detach().clone() for p in model.parameters()]


def _largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main(kinds: list[str]) -> None:
    for kind in kinds:
        _, eager = train(kind, None)
        reference_graphs, reference = train(kind, "aot_eager")
        graphs, ours = train(kind, functools.partial(aotcache_backend, compiler="nop", cache=False))
        print(f"{kind:8s} graphs aotcache={graphs} aot_eager={reference_graphs}  "
              f"max|aotcache-aot_eager|={_largest_difference(ours, reference):.3g} "
              f"max|aotcache-eager|={_largest_difference(ours, eager):.3g} "
              f"max|aot_eager-eager|={_largest_difference(reference, eager):.3g}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["adam", "adagrad", "adamw", "sgd"])
