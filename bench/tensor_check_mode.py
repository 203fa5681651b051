"""Cold-capture cost of the torch-function mode that traces tensor checks (NOTE [Tensor checks in a capture]).

    python bench/tensor_check_mode.py                       # bert, gpt2, llama, resnet; 5 rounds (~6 min here)
    python bench/tensor_check_mode.py --models bert --rounds 3

The first call (capture + nop compile, cache off, torch's fake-tensor cache emptied) of a fresh
``aot_module`` wrapper, inference and training, static and dynamic, with the capture's tensor-check handling as
it ships (``on``) and with it left out (``off``: the capture's two context managers replaced by empty ones, which
no user can do; a model without tensor checks captures the same graph either way). The sides alternate
on-off / off-on over ``--rounds`` rounds, so that background load hits both alike; the table gives the median CPU
time (process time, steadier on a shared machine than wall-clock) of each side and the median of the per-round
ratios on / off. One intra-op thread. Results go to bench/results/tensor_check_mode.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


class _Block(nn.Module):
    """A ResNet basic block (two 3x3 conv-BN, a residual, a strided 1x1 projection when the shape changes)."""

    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out)
        self.conv2, self.bn2 = nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out)
        self.down = (nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                     if stride != 1 or inp != out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


def _resnet() -> nn.Module:
    """The layout of torchvision's resnet18 (8 basic blocks, 20 convolutions), narrow (16..128 channels)."""
    widths, layers, inp = [16, 32, 64, 128], [], 16
    for i, width in enumerate(widths):
        layers += [_Block(inp, width, 1 if i == 0 else 2), _Block(width, width, 1)]
        inp = width
    return nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inp, 10))


def make_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A tiny random model (no download) and an input for it."""
    ids = torch.randint(0, 1000, (2, 16))
    if name == "bert":
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, vocab_size=1000)), ids
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128)), ids
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)), ids
    if name == "resnet":
        return _resnet(), torch.randn(2, 3, 64, 64)
    raise SystemExit(f"unknown model {name!r}: choose from bert, gpt2, llama, resnet")


@contextlib.contextmanager
def tensor_checks(on: bool):
    """The capture's tensor-check handling as it ships, or left out (the ``off`` side)."""
    capture = importlib.import_module("aotcache.aot.capture")  # the package exports a function of that name
    if on:
        yield
        return
    saved = capture.tensor_checks_in_graph, capture.tensor_checks_in_backward
    capture.tensor_checks_in_graph = contextlib.nullcontext
    capture.tensor_checks_in_backward = lambda nodes: contextlib.nullcontext()
    try:
        yield
    finally:
        capture.tensor_checks_in_graph, capture.tensor_checks_in_backward = saved


def first_call_cpu(name: str, train: bool, dynamic: bool, on: bool) -> float:
    """CPU seconds of the first call of a fresh wrapper (capture + nop compile), fake-tensor cache emptied."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from aotcache import aot_module

    torch.manual_seed(0)
    model, inputs = make_model(name)
    wrapped = aot_module(model.train(train), "nop", dynamic=dynamic, cache=False)
    FakeTensorMode.cache.clear()
    gc.collect()
    with tensor_checks(on), torch.set_grad_enabled(train):
        cpu = time.process_time()
        out: Any = wrapped(inputs)
        if train:
            (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
        return time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert,gpt2,llama,resnet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tensor_check_mode.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    print(f"{'case':28} {'on (s)':>8} {'off (s)':>8} {'on/off':>7}  per-round ratios")
    for name in args.models.split(","):
        first_call_cpu(name, False, False, True)  # imports and one-time setup out of the way
        for train in (False, True):
            for dynamic in (False, True):
                case = f"{name} {'train' if train else 'infer'} {'dynamic' if dynamic else 'static'}"
                times: dict[bool, list[float]] = {True: [], False: []}
                ratios = []
                for r in range(args.rounds):
                    order = (True, False) if r % 2 == 0 else (False, True)
                    this_round = {on: first_call_cpu(name, train, dynamic, on) for on in order}
                    for on, seconds in this_round.items():
                        times[on].append(seconds)
                    ratios.append(this_round[True] / this_round[False])
                row = {"on_cpu_s": round(statistics.median(times[True]), 3),
                       "off_cpu_s": round(statistics.median(times[False]), 3),
                       "ratio": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios]}
                results[case] = row
                print(f"{case:28} {row['on_cpu_s']:8.3f} {row['off_cpu_s']:8.3f} {row['ratio']:7.3f}  "
                      f"{row['ratios']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
