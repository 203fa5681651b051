"""Cold-capture cost of the torch-function mode that traces tensor checks (NOTE [Tensor checks in a capture]).

    python bench/tensor_check_mode.py                       # bert, gpt2, llama, resnet; 6 rounds (~12 min here)
    python bench/tensor_check_mode.py --models bert --rounds 3

The first call (capture + nop compile, cache off, torch's fake-tensor cache emptied) of a fresh
``aot_module`` wrapper, inference and training, static and dynamic, with the capture's tensor-check handling as
it ships (``shipped``: NOTE [Cost of the tensor-check mode] in aotcache/aot/tensor_checks.py), as session 14
shipped it (``whole``: the mode on for the whole capture, every backward node hooked) and left out (``off``: the
capture's hooks replaced by empty ones, which no user can do; a model without tensor checks captures the same
graph every way). The sides rotate over ``--rounds`` rounds (each first in turn), so that background load hits
all alike; the table gives the median CPU time (process time, steadier on a shared machine than wall-clock) of
each side and the medians of the per-round ratios to ``off`` and their geometric mean over the cases, the ratio of
the minimum CPU times (load only ever adds), and how many times one capture goes through the mode's handler (a
count load does not change). One intra-op thread. Results go to bench/results/tensor_check_mode.json.
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


SIDES = ("shipped", "whole", "off")


@contextlib.contextmanager
def tensor_checks(side: str):
    """The capture's tensor-check handling as it ships (``shipped``: the mode on while the function and the
    backward nodes that run its Python run), as session 14 shipped it (``whole``: the mode on for the whole
    capture and every backward node), or left out (``off``)."""
    capture = importlib.import_module("aotcache.aot.capture")  # the package exports a function of that name
    tensor_checks = importlib.import_module("aotcache.aot.tensor_checks")
    if side == "shipped":
        yield
        return
    saved = (capture.tensor_checks_in_graph, capture.tensor_checks_in_backward, capture.checking_tensors,
             tensor_checks._runs_python)
    capture.checking_tensors = lambda fn: fn
    if side == "whole":
        @contextlib.contextmanager
        def whole_capture():
            with saved[0](), tensor_checks._TensorChecksAsAssertions():
                yield

        capture.tensor_checks_in_graph = whole_capture
        tensor_checks._runs_python = lambda node: True
    else:
        capture.tensor_checks_in_graph = contextlib.nullcontext
        capture.tensor_checks_in_backward = lambda nodes: contextlib.nullcontext()
    try:
        yield
    finally:
        (capture.tensor_checks_in_graph, capture.tensor_checks_in_backward, capture.checking_tensors,
         tensor_checks._runs_python) = saved


def first_call_cpu(name: str, train: bool, dynamic: bool, side: str) -> float:
    """CPU seconds of the first call of a fresh wrapper (capture + nop compile), fake-tensor cache emptied."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from aotcache import aot_module

    torch.manual_seed(0)
    model, inputs = make_model(name)
    wrapped = aot_module(model.train(train), "nop", dynamic=dynamic, cache=False)
    FakeTensorMode.cache.clear()
    gc.collect()
    with tensor_checks(side), torch.set_grad_enabled(train):
        cpu = time.process_time()
        out: Any = wrapped(inputs)
        if train:
            (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
        return time.process_time() - cpu


def handler_calls(name: str, train: bool, dynamic: bool, side: str) -> int:
    """How many times a first call goes through the mode's handler (not timed: the count does not depend on
    load)."""
    tensor_checks = importlib.import_module("aotcache.aot.tensor_checks")
    handler = tensor_checks._TensorChecksAsAssertions.__torch_function__
    calls = 0

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return handler(self, *args, **kwargs)

    tensor_checks._TensorChecksAsAssertions.__torch_function__ = counting
    try:
        first_call_cpu(name, train, dynamic, side)
    finally:
        tensor_checks._TensorChecksAsAssertions.__torch_function__ = handler
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert,gpt2,llama,resnet")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tensor_check_mode.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    print(f"{'case':24} {'shipped':>8} {'whole':>8} {'off':>8} {'shipped/off':>12} {'whole/off':>10} "
          f"{'min s/o':>8} {'min w/o':>8} {'calls s':>8} {'calls w':>8}")
    for name in args.models.split(","):
        first_call_cpu(name, False, False, "shipped")  # imports and one-time setup out of the way
        for train in (False, True):
            for dynamic in (False, True):
                case = f"{name} {'train' if train else 'infer'} {'dynamic' if dynamic else 'static'}"
                times: dict[str, list[float]] = {side: [] for side in SIDES}
                ratios: dict[str, list[float]] = {side: [] for side in SIDES[:2]}
                first_call_cpu(name, train, dynamic, "off")  # the case's one-time costs out of the first round
                for r in range(args.rounds):
                    order = SIDES[r % 3:] + SIDES[:r % 3]  # each side first in turn
                    this_round = {side: first_call_cpu(name, train, dynamic, side) for side in order}
                    for side, seconds in this_round.items():
                        times[side].append(seconds)
                    for side in ratios:
                        ratios[side].append(this_round[side] / this_round["off"])
                row = {**{f"{side}_cpu_s": round(statistics.median(times[side]), 3) for side in SIDES},
                       **{f"min_{side}_over_off": round(min(times[side]) / min(times["off"]), 3) for side in ratios},
                       **{f"{side}_handler_calls": handler_calls(name, train, dynamic, side) for side in ratios},
                       **{f"{side}_over_off": round(statistics.median(ratios[side]), 3) for side in ratios},
                       **{f"{side}_ratios": [round(x, 3) for x in ratios[side]] for side in ratios}}
                results[case] = row
                print(f"{case:24} {row['shipped_cpu_s']:8.3f} {row['whole_cpu_s']:8.3f} {row['off_cpu_s']:8.3f} "
                      f"{row['shipped_over_off']:12.3f} {row['whole_over_off']:10.3f} "
                      f"{row['min_shipped_over_off']:8.3f} {row['min_whole_over_off']:8.3f} "
                      f"{row['shipped_handler_calls']:8d} {row['whole_handler_calls']:8d}", flush=True)
    rows = list(results.values())
    for side in SIDES[:2]:  # one figure per side: the geometric mean over the cases of their median ratios
        results[f"geomean_{side}_over_off"] = round(statistics.geometric_mean(
            [row[f"{side}_over_off"] for row in rows]), 3)
    print(f"geometric mean over the cases: shipped/off {results['geomean_shipped_over_off']}, "
          f"whole/off {results['geomean_whole_over_off']}")
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
