"""Stale-result battery: programs that change in the middle of a run, eager vs compiled, at every step.

Each scenario trains or evaluates a small model for a few steps and changes the program between steps
(freezing, hooks, parametrizations, swapped submodules, dtype / layout changes, autocast, backend flags,
checkpointing, optimizer variants, input layouts, transformers config switches and live edits, Python attributes
of parameters, torch modes around a step, function-level state). It records every output,
gradient, parameter after each optimizer step and module buffer, and runs once per way:

- ``eager``: the model itself (the reference);
- ``compile``: ``aotcache.compile(model, compiler="nop")``;
- ``aot``: ``aotcache.aot_module(model, "nop")`` (scenarios marked ``aot``);
- ``dynamo``: ``torch.compile(model, backend=aotcache_backend with compiler="nop")`` (scenarios marked
  ``dynamo``);
- ``warm``: ``aotcache.compile`` again in a fresh subprocess with the same ``AOTCACHE_CACHE_DIR`` (the
  compiled graphs come from the cache written by ``compile``, which runs in a fresh subprocess too, so that
  no state left by the other ways' runs changes its keys).

A way passes a scenario when every record has eager's structure, dtype and values (tolerance: rtol 1e-4,
atol 1e-5; bfloat16 / half 1e-2); ``exact`` says whether all were bit-identical. ``traces`` is the number of
graphs captured (``num_compiles``) and ``fallbacks`` the fallback decisions: a count that grows with the steps
where the program does not change would be a perf cliff.

    python bench/stale_battery.py                 # all scenarios, all ways (a few minutes on 2 cores)
    python bench/stale_battery.py --only freeze,hooks_forward --ways eager,compile

Writes ``bench/results/stale_battery.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------------


class Ctx:
    """What a scenario sees: ``wrap(module)`` (the way under test) and ``rec(label, value)``."""

    def __init__(self, way: str) -> None:
        self.way = way
        self.records: list[tuple[str, Any]] = []
        self.wrapped: list[Any] = []

    def wrap(self, module: nn.Module) -> Any:
        import aotcache

        if self.way == "eager":
            out = module
        elif self.way in ("compile", "warm"):
            out = aotcache.compile(module, compiler="nop")
        elif self.way == "aot":
            out = aotcache.aot_module(module, "nop")
        elif self.way == "dynamo":  # the nop compiler: Inductor's bf16 reductions round otherwise than eager's
            out = torch.compile(module, backend=functools.partial(aotcache.aotcache_backend, compiler="nop"))
        else:
            raise ValueError(self.way)
        self.wrapped.append(out)
        return out

    def rec(self, label: str, value: Any) -> None:
        for i, (suffix, leaf) in enumerate(_flatten(value)):
            self.records.append((f"{label}{suffix}", leaf))

    def rec_grads(self, label: str, module: nn.Module) -> None:
        for name, p in module.named_parameters():
            self.rec(f"{label}.grad.{name}", p.grad)

    def rec_state(self, label: str, module: nn.Module) -> None:
        for name, t in module.state_dict(keep_vars=True).items():
            self.rec(f"{label}.{name}", t)

    def traces(self) -> int:
        total = 0
        for w in self.wrapped:
            compiled = getattr(w, "compiled", None)
            total += getattr(compiled, "num_compiles", 0) or 0
        return total


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, torch.Tensor):
        v = value.detach()
        return [(prefix, ("tensor", str(v.dtype), tuple(v.shape), v.requires_grad if value.is_leaf else
                          value.requires_grad, v.clone()))]
    if value is None or isinstance(value, (bool, int, float, str)):
        return [(prefix, ("value", value))]
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        items = value.items() if isinstance(value, dict) else dict(value).items()
        out = [(prefix + ".keys", ("value", repr(list(k for k, _ in items))))]
        for k, v in (value.items() if isinstance(value, dict) else dict(value).items()):
            out += _flatten(v, f"{prefix}.{k}")
        return out
    if isinstance(value, (tuple, list)):
        out = [(prefix + ".len", ("value", len(value)))]
        for i, v in enumerate(value):
            out += _flatten(v, f"{prefix}[{i}]")
        return out
    layers = getattr(value, "layers", None)
    if layers is not None:  # a transformers Cache
        out = [(prefix + ".type", ("value", type(value).__name__))]
        for i, layer in enumerate(layers):
            out += _flatten((getattr(layer, "keys", None), getattr(layer, "values", None)), f"{prefix}.layer{i}")
        return out
    return [(prefix, ("value", f"<{type(value).__name__}>"))]


def compare(ref: list, got: list) -> tuple[bool, bool, str]:
    """(ok, exact, first problem) of ``got`` against ``ref``."""
    if [k for k, _ in ref] != [k for k, _ in got]:
        rk, gk = [k for k, _ in ref], [k for k, _ in got]
        i = next((i for i, (a, b) in enumerate(zip(rk, gk)) if a != b), min(len(rk), len(gk)))
        return False, False, f"records differ at #{i}: {rk[i:i + 1]} vs {gk[i:i + 1]} ({len(rk)} vs {len(gk)})"
    exact = True
    for (label, a), (_, b) in zip(ref, got):
        if a[0] != b[0]:
            return False, False, f"{label}: {a[0]} vs {b[0]}"
        if a[0] == "value":
            if a[1] != b[1] and not (isinstance(a[1], float) and a[1] != a[1] and b[1] != b[1]):
                return False, False, f"{label}: {a[1]!r} vs {b[1]!r}"
            continue
        if a[1:4] != b[1:4]:
            return False, False, f"{label}: dtype/shape/requires_grad {a[1:4]} vs {b[1:4]}"
        x, y = a[4], b[4]
        if x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex()):
            if not torch.equal(x, y):
                return False, False, f"{label}: integer values differ"
            continue
        same_nans = torch.equal(x.isnan(), y.isnan())  # NaN where eager has NaN (a loss over no tokens) is exact
        if torch.equal(x, y) or (same_nans and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0))):
            continue
        exact = False
        tol = (1e-2, 1e-2) if x.dtype in (torch.bfloat16, torch.float16) else (1e-4, 1e-5)
        if not torch.allclose(x.double(), y.double(), rtol=tol[0], atol=tol[1], equal_nan=True):
            diff = (x.double() - y.double()).abs().max().item()
            return False, False, f"{label}: max abs diff {diff:.3g}"
    return True, exact, ""


# ----------------------------------------------------------------------------------------------------
# Models and steps
# ----------------------------------------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class MLP(nn.Module):
    def __init__(self, d: int = 8, h: int = 16, o: int = 4, p: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = nn.GELU()
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(h, h)
        self.fc3 = nn.Linear(h, o)

    def forward(self, x):
        return self.fc3(self.drop(self.act(self.fc2(self.act(self.fc1(x))))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


def mlp(**kw) -> MLP:
    torch.manual_seed(0)
    return MLP(**kw)


def batch(step: int, n: int = 6, d: int = 8, o: int = 4):
    g = gen(100 + step)
    return torch.randn(n, d, generator=g), torch.randint(0, o, (n,), generator=g)


def train_step(ctx: Ctx, model, opt, step: int, label: str = "", x=None, y=None, base=None) -> None:
    """Forward, cross-entropy, backward, record grads, optimizer step, record parameters."""
    if x is None:
        x, y = batch(step)
    torch.manual_seed(1000 + step)  # dropout draws
    out = model(x)
    loss = nn.functional.cross_entropy(out.float(), y)
    ctx.rec(f"s{step}{label}.out", out)
    loss.backward()
    ctx.rec_grads(f"s{step}{label}", base if base is not None else model)
    opt.step()
    opt.zero_grad()
    ctx.rec_state(f"s{step}{label}.state", base if base is not None else model)


# ----------------------------------------------------------------------------------------------------
# Scenarios: each takes a Ctx; SCENARIOS maps name -> (function, ways besides eager/compile/warm)
# ----------------------------------------------------------------------------------------------------

SCENARIOS: dict[str, tuple[Callable[[Ctx], None], tuple[str, ...]]] = {}
MAX_TRACES: dict[str, int] = {}  # scenarios whose traces per way are bounded: more is a perf cliff ("CLIFF")


def scenario(*ways: str, max_traces: int | None = None):
    def register(fn):
        SCENARIOS[fn.__name__] = (fn, ways)
        if max_traces is not None:
            MAX_TRACES[fn.__name__] = max_traces
        return fn
    return register


@scenario("aot", "dynamo")
def freeze(ctx: Ctx) -> None:
    """requires_grad_(False) on a layer mid-training, later back on (optimizer holds all parameters)."""
    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(7):
        if step == 2:
            model.fc1.requires_grad_(False)
        if step == 3:
            model.fc3.weight.requires_grad_(False)
        if step == 5:
            model.fc1.requires_grad_(True)
            model.fc3.weight.requires_grad_(True)
        train_step(ctx, model, opt, step, base=base)


@scenario("aot", "dynamo")
def eval_train_dropout(ctx: Ctx) -> None:
    """model.eval() / model.train() toggles with dropout on; eval passes under no_grad."""
    base = mlp(p=0.3)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step % 2:
            model.eval()
            with torch.no_grad():
                ctx.rec(f"s{step}.eval", model(batch(step)[0]))
            model.train()
        train_step(ctx, model, opt, step, base=base)
        ctx.rec(f"s{step}.training", [m.training for m in base.modules()])


@scenario("aot")
def dropout_p(ctx: Ctx) -> None:
    """The dropout probability changed on the module between steps (p is a module attribute)."""
    base = mlp(p=0.5)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, p in enumerate([0.5, 0.0, 0.2, 0.5, 1.0]):
        model.drop.p = p
        train_step(ctx, model, opt, step, base=base)
    base.drop.inplace = True
    train_step(ctx, model, opt, 9, base=base)


@scenario("aot", "dynamo")
def grad_modes(ctx: Ctx) -> None:
    """no_grad / inference_mode / enable_grad inside no_grad / set_grad_enabled(False) eval passes."""
    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(ctx, model, opt, 0, base=base)
    x = batch(1)[0]
    with torch.no_grad():
        ctx.rec("nograd", model(x))
    with torch.inference_mode():
        out = model(x)
        ctx.rec("inference", out)
        ctx.rec("inference.is_inference", out.is_inference())
        xi = torch.randn(4, 8, generator=gen(7))
        ctx.rec("inference_tensor_in", model(xi))
    with torch.no_grad():
        with torch.enable_grad():
            out = model(x)
            ctx.rec("enable_in_nograd", out)
            out.sum().backward()
    ctx.rec_grads("enable_in_nograd", base)
    opt.zero_grad()
    torch.set_grad_enabled(False)
    try:
        for i in range(3):
            ctx.rec(f"eval_pass{i}", model(batch(10 + i)[0]))
    finally:
        torch.set_grad_enabled(True)
    train_step(ctx, model, opt, 2, base=base)
    with torch.inference_mode(False):
        train_step(ctx, model, opt, 3, base=base)


@scenario("aot", "dynamo")
def hooks_forward(ctx: Ctx) -> None:
    """Forward hooks and pre-hooks registered and removed on submodules between steps."""
    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handles = []
    for step in range(7):
        if step == 1:
            handles.append(model.fc2.register_forward_hook(lambda m, i, o: o * 2))
        if step == 2:
            handles.append(model.fc1.register_forward_pre_hook(lambda m, args: (args[0] + 1,)))
        if step == 3:
            handles.append(model.fc3.register_forward_hook(lambda m, a, k, o: o - k.get("z", 0), with_kwargs=True))
        if step == 4:
            handles.pop(0).remove()
        if step == 5:
            for h in handles:
                h.remove()
            handles.clear()
        if step == 6:
            handles.append(model.act.register_forward_hook(lambda m, i, o: o.clamp(max=0.5), prepend=True))
        train_step(ctx, model, opt, step, base=base)


@scenario("aot")
def hooks_backward(ctx: Ctx) -> None:
    """Full backward hooks, backward pre-hooks, the old register_backward_hook, tensor hooks on parameters."""
    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list = []
    h = []
    for step in range(7):
        if step == 1:
            h.append(model.fc2.register_full_backward_hook(lambda m, gi, go: (gi[0] * 3,)))
        if step == 2:
            h.append(model.fc3.register_full_backward_pre_hook(lambda m, go: (go[0] * 0.5,)))
        if step == 3:
            h.append(base.fc1.weight.register_hook(lambda g: g * 10))
        if step == 4:
            h.append(model.fc2.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].sum().item())))
        if step == 5:
            for hh in h:
                hh.remove()
            h.clear()
        if step == 6:
            with __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore")
                h.append(model.fc3.register_backward_hook(lambda m, gi, go: tuple(
                    None if g is None else g * 2 for g in gi)))
        train_step(ctx, model, opt, step, base=base)
    ctx.rec("seen", torch.tensor(seen))


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


@scenario("aot", "dynamo")
def parametrize(ctx: Ctx) -> None:
    """torch.nn.utils.parametrize added mid-run, then removed (leave_parametrized)."""
    from torch.nn.utils import parametrize as P

    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step == 2:
            P.register_parametrization(base.fc2, "weight", Symmetric())
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if step == 4:
            P.remove_parametrizations(base.fc2, "weight", leave_parametrized=True)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(ctx, model, opt, step, base=base)
        ctx.rec(f"s{step}.fc2.weight", base.fc2.weight)


@scenario("aot")
def weight_norm(ctx: Ctx) -> None:
    """parametrizations.weight_norm and the old nn.utils.weight_norm (a forward pre-hook) added mid-run."""
    import warnings

    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step == 2:
            torch.nn.utils.parametrizations.weight_norm(base.fc2)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if step == 4:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.nn.utils.weight_norm(base.fc3)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(ctx, model, opt, step, base=base)


@scenario("aot")
def spectral_norm(ctx: Ctx) -> None:
    """spectral_norm (power iteration updates buffers in training forwards), both APIs, added mid-run; eval."""
    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(7):
        if step == 2:
            torch.nn.utils.parametrizations.spectral_norm(base.fc2)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if step == 4:
            torch.nn.utils.spectral_norm(base.fc3)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if step == 6:
            model.eval()
        train_step(ctx, model, opt, step, base=base)


@scenario("aot", "dynamo")
def swap_submodule(ctx: Ctx) -> None:
    """model.act = nn.Identity(); model.fc2 replaced by a new Linear; a child deleted and put back."""
    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step == 2:
            model.act = nn.Identity()
        if step == 3:
            torch.manual_seed(5)
            model.fc2 = nn.Linear(16, 16)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if step == 4:
            model.act = nn.Tanh()
        if step == 5:
            model.drop = nn.Dropout(0.0)
        train_step(ctx, model, opt, step, base=base)


@scenario("aot")
def replace_parameter(ctx: Ctx) -> None:
    """A parameter object replaced (same shape, other shape), a bias set to None, a buffer registered."""
    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step == 1:
            model.fc1.weight = nn.Parameter(torch.randn(16, 8, generator=gen(3)))
        if step == 2:
            base.fc2.bias = None
        if step == 3:
            base.fc3.weight = nn.Parameter(torch.randn(4, 16, generator=gen(4)), requires_grad=False)
        if step == 4:
            base.fc1.weight.data = torch.randn(16, 8, generator=gen(5))  # .data swap keeps the object
        if step == 5:
            base.fc3.weight = nn.Parameter(base.fc3.weight.detach().t().contiguous().t())  # other strides
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(ctx, model, opt, step, base=base)


@scenario("aot")
def load_state(ctx: Ctx) -> None:
    """load_state_dict of other weights (copy), then with assign=True (new parameter objects)."""
    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = mlp()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.5)
    for step in range(5):
        if step == 1:
            model.load_state_dict(other.state_dict())
        if step == 3:
            sd = {k: v.clone() * 2 for k, v in other.state_dict().items()}
            base.load_state_dict(sd, assign=True)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(ctx, model, opt, step, base=base)


@scenario("aot", "dynamo")
def dtype_switch(ctx: Ctx) -> None:
    """model.to(bfloat16) / .half() / .double() / .float() mid-run, inputs following."""
    base = mlp()
    model = ctx.wrap(base)
    for step, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]):
        if dtype == torch.float16:
            model.half()
        elif dtype == torch.float64:
            model.double()
        else:
            model.to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = batch(step)
        train_step(ctx, model, opt, step, x=x.to(dtype), y=y, base=base)


@scenario("aot")
def channels_last(ctx: Ctx) -> None:
    """A conv net moved to channels_last mid-run (and back), inputs in both layouts; BatchNorm buffers."""
    torch.manual_seed(0)
    base = ConvNet()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        g = gen(step)
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        if step == 2:
            model.to(memory_format=torch.channels_last)
        if step in (3, 4):
            x = x.contiguous(memory_format=torch.channels_last)
        if step == 5:
            model.to(memory_format=torch.contiguous_format)
        train_step(ctx, model, opt, step, x=x, y=y, base=base)
        ctx.rec(f"s{step}.conv.stride", list(base.conv.weight.stride()))


@scenario("aot", "dynamo")
def autocast(ctx: Ctx) -> None:
    """torch.autocast("cpu", bfloat16) entered and exited between steps; a nested autocast(enabled=False)."""
    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step in (1, 2, 4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if step == 4:
                    with torch.autocast("cpu", enabled=False):
                        train_step(ctx, model, opt, step, base=base)
                else:
                    train_step(ctx, model, opt, step, base=base)
        else:
            train_step(ctx, model, opt, step, base=base)
    with torch.autocast("cpu", dtype=torch.float16):
        ctx.rec("fp16_autocast", model(batch(9)[0]))


@scenario("aot")
def backend_flags(ctx: Ctx) -> None:
    """set_flush_denormal, use_deterministic_algorithms, mkldnn / matmul precision flips, default dtype."""
    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tiny = torch.full((6, 8), 1e-39)  # denormal floats
    try:
        for step in range(6):
            if step == 1:
                torch.set_flush_denormal(True)
            if step == 2:
                torch.use_deterministic_algorithms(True)
            if step == 3:
                torch.backends.mkldnn.enabled = False
                torch.set_flush_denormal(False)
            if step == 4:
                torch.set_float32_matmul_precision("medium")
            x, y = batch(step)
            train_step(ctx, model, opt, step, x=x * 1e-38 + tiny, y=y, base=base)
            with torch.no_grad():
                ctx.rec(f"s{step}.tiny", model(tiny))
    finally:
        torch.set_flush_denormal(False)
        torch.use_deterministic_algorithms(False)
        torch.backends.mkldnn.enabled = True
        torch.set_float32_matmul_precision("highest")


class MakesTensors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + torch.ones(4) * 0.1 + torch.arange(4.0) / 3


@scenario("aot")
def default_dtype(ctx: Ctx) -> None:
    """torch.set_default_dtype(float64) between calls (forward creates tensors with factory functions)."""
    torch.manual_seed(0)
    base = MakesTensors()
    model = ctx.wrap(base)
    x = torch.randn(3, 4, generator=gen(0))
    try:
        for step, dt in enumerate([torch.float32, torch.float64, torch.float32, torch.float64]):
            torch.set_default_dtype(dt)
            out = model(x)
            ctx.rec(f"s{step}", out)
            out.sum().backward()
            ctx.rec_grads(f"s{step}", base)
    finally:
        torch.set_default_dtype(torch.float32)


class Ckpt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = mlp(d=8, h=16, o=8)
        self.head = nn.Linear(8, 4)
        self.ckpt: bool | None = None  # None: off; else use_reentrant

    def forward(self, x):
        if self.ckpt is None:
            h = self.block(x)
        else:
            h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.ckpt)
        return self.head(h)


@scenario("aot")
def checkpoint(ctx: Ctx) -> None:
    """torch.utils.checkpoint turned on mid-run, use_reentrant False then True, with an input needing grad."""
    torch.manual_seed(0)
    base = Ckpt()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, mode in enumerate([None, False, False, True, True, None]):
        base.ckpt = mode
        x, y = batch(step)
        if step == 4:
            x.requires_grad_(True)
        train_step(ctx, model, opt, step, x=x, y=y, base=base)
        ctx.rec(f"s{step}.xgrad", x.grad)


def tiny_llama(**overrides):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config)


def tiny_bert(**overrides):
    import transformers

    torch.manual_seed(0)
    settings = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **overrides}
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3, **settings)
    return transformers.BertForSequenceClassification(config)


@scenario()
def hf_grad_checkpointing(ctx: Ctx) -> None:
    """A transformers Llama trained with gradient_checkpointing_enable() turned on mid-run (both reentrant
    settings), then off."""
    base = tiny_llama()
    base.train()
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(6):
        if step == 2:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if step == 3:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        if step == 5:
            model.gradient_checkpointing_disable()
        ids = torch.randint(3, 64, (2, 8), generator=gen(step))
        out = model(input_ids=ids, labels=ids, use_cache=False)
        ctx.rec(f"s{step}.loss", out.loss)
        out.loss.backward()
        ctx.rec_grads(f"s{step}", base)
        opt.step()
        opt.zero_grad()
    ctx.rec_state("final", base)


@scenario("aot", "dynamo")
def optimizers(ctx: Ctx) -> None:
    """Gradient accumulation, zero_grad(set_to_none=False), foreach / fused Adam(W), clip_grad_norm_,
    GradScaler loss scaling, an optimizer switched mid-run."""
    base = mlp()
    model = ctx.wrap(base)
    opts = [torch.optim.Adam(model.parameters(), lr=1e-2, foreach=True),
            torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
            torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, foreach=False)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(6):
        opt = opts[step % 3]
        for micro in range(2):
            x, y = batch(10 * step + micro)
            loss = nn.functional.cross_entropy(model(x), y) / 2
            ctx.rec(f"s{step}.{micro}.loss", loss)
            (scaler.scale(loss) if step >= 3 else loss).backward()
        ctx.rec_grads(f"s{step}", base)
        if step >= 3:
            scaler.unscale_(opt)
        ctx.rec(f"s{step}.norm", torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=True))
        if step >= 3:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=step % 2 == 1)
        ctx.rec_state(f"s{step}.state", base)


class TakesAnything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, mask=None, bias=None, scale=1.0):
        h = self.fc(x.float()) * scale
        if mask is not None:
            h = h * mask
        if bias is not None:
            h = h + bias
        return h + x.float().mean()


@scenario("aot")
def input_kinds(ctx: Ctx) -> None:
    """Input dtypes, non-contiguous / transposed / expanded / sliced inputs, requires_grad flips, int vs bool
    vs float masks, None vs tensor optional arguments, keywords vs positional, float constants."""
    torch.manual_seed(0)
    base = TakesAnything()
    model = ctx.wrap(base)
    big = torch.randn(20, 30, generator=gen(1))
    x = big[:6, :8].contiguous()
    mask_f = (torch.arange(24).reshape(6, 4) % 3 != 0).float()
    cases = [
        ("contig", (x,), {}),
        ("float64", (x.double(),), {}),
        ("int64", ((x * 10).long(),), {}),
        ("bf16", (x.bfloat16(),), {}),
        ("transposed", (big[:8, :6].t(),), {}),
        ("slice", (big[3:9, 5:13],), {}),
        ("strided", (big[::3, ::3][:6, :8],), {}),
        ("expanded", (big[0, :8].expand(6, 8),), {}),
        ("mask_bool", (x, mask_f.bool()), {}),
        ("mask_int", (x, mask_f.long()), {}),
        ("mask_float", (x, mask_f), {}),
        ("mask_kw", (x,), {"mask": mask_f.bool()}),
        ("bias_none", (x, None, None), {}),
        ("bias_tensor", (x, None, torch.ones(4))),
        ("bias_kw_scale", (x,), {"bias": torch.ones(4), "scale": 2.0}),
        ("scale3", (x,), {"scale": 3.0}),
        ("scale_neg0", (x,), {"scale": -0.0}),
        ("scale_int", (x,), {"scale": 2}),
        ("scale_tensor", (x,), {"scale": torch.tensor(2.5)}),
        ("contig_again", (x,), {}),
    ]
    for name, args, *kw in cases:
        kwargs = kw[0] if kw else {}
        out = model(*args, **kwargs)
        ctx.rec(name, out)
        out.float().sum().backward()
        ctx.rec_grads(name, base)
        base.zero_grad()
    for step, rg in enumerate([True, False, True]):
        xi = x.clone().requires_grad_(rg)
        out = model(xi, mask_f)
        ctx.rec(f"rg{step}", out)
        out.sum().backward()
        ctx.rec(f"rg{step}.xgrad", xi.grad)
        ctx.rec_grads(f"rg{step}", base)
        base.zero_grad()
    xv = big[:6, :8].clone().requires_grad_(True)
    view = xv[:, ::2].t()  # a non-leaf view needing grad
    out = model(view.t().repeat(1, 2))
    out.sum().backward()
    ctx.rec("view.xgrad", xv.grad)


def _flags_calls(model, ids):
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return [
        ("plain", {"input_ids": ids}),
        ("use_cache_false", {"input_ids": ids, "use_cache": False}),
        ("attentions", {"input_ids": ids, "output_attentions": True, "use_cache": False}),
        ("hidden", {"input_ids": ids, "output_hidden_states": True, "use_cache": False}),
        ("tuple", {"input_ids": ids, "return_dict": False, "use_cache": False}),
        ("mask", {"input_ids": ids, "attention_mask": mask, "use_cache": False}),
        ("mask_bool", {"input_ids": ids, "attention_mask": mask.bool(), "use_cache": False}),
        ("plain_again", {"input_ids": ids}),
    ]


@scenario("aot")
def hf_flags(ctx: Ctx) -> None:
    """A transformers Llama (eval): use_cache / output_attentions / output_hidden_states / return_dict per
    call, then the same switches through model.config, then set_attn_implementation("sdpa") and back."""
    base = tiny_llama().eval()
    model = ctx.wrap(base)
    ids = torch.randint(3, 64, (2, 7), generator=gen(0))
    with torch.no_grad():
        for name, kwargs in _flags_calls(model, ids):
            ctx.rec(name, model(**kwargs))
        model.config.use_cache = False
        ctx.rec("config.use_cache", model(input_ids=ids))
        model.config.output_hidden_states = True
        ctx.rec("config.hidden", model(input_ids=ids))
        model.config.output_attentions = True
        ctx.rec("config.attentions", model(input_ids=ids))
        # (model.config.return_dict = False breaks eager Llama in transformers 5.x: not tried)
        model.config.output_attentions = False
        model.config.output_hidden_states = False
        model.config.use_cache = True
        ctx.rec("config.back", model(input_ids=ids))
        if hasattr(base, "set_attn_implementation"):
            model.set_attn_implementation("sdpa")
        else:
            base.config._attn_implementation = "sdpa"
        ctx.rec("sdpa", model(input_ids=ids, use_cache=False))
        ctx.rec("sdpa.attn", base.config._attn_implementation)
        if hasattr(base, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            base.config._attn_implementation = "eager"
        ctx.rec("eager_again", model(input_ids=ids, use_cache=False, output_attentions=True))
        model.config.tie_word_embeddings = True  # not read by forward: results unchanged
        ctx.rec("unrelated_edit", model(input_ids=ids, use_cache=False))


@scenario("aot")
def hf_train_config(ctx: Ctx) -> None:
    """A transformers BERT classifier trained while model.config.problem_type changes (the loss changes) and
    train()/eval() toggles."""
    base = tiny_bert()
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(6):
        g = gen(step)
        ids = torch.randint(3, 64, (4, 8), generator=g)
        labels = torch.randint(0, 3, (4,), generator=g)
        if step == 2:
            model.config.problem_type = "multi_label_classification"
        if step == 4:
            model.config.problem_type = "regression"
            model.config.num_labels = 3
        if model.config.problem_type == "multi_label_classification":
            labels = nn.functional.one_hot(labels, 3).float()
        elif model.config.problem_type == "regression":
            labels = labels.float()[:, None].expand(4, 3).contiguous()
        out = model(input_ids=ids, labels=labels)
        ctx.rec(f"s{step}", out)
        out.loss.backward()
        ctx.rec_grads(f"s{step}", base)
        opt.step()
        opt.zero_grad()
        if step == 3:
            model.eval()
            with torch.no_grad():
                ctx.rec("eval", model(input_ids=ids))
            model.train()


@scenario("aot", "dynamo")
def batchnorm_modes(ctx: Ctx) -> None:
    """BatchNorm: train-mode forwards under no_grad (running stats still update), momentum=None (cumulative
    average) set mid-run, track_running_stats toggled, eval passes."""
    torch.manual_seed(0)
    base = ConvNet()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        g = gen(step)
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        if step == 1:
            with torch.no_grad():
                ctx.rec("s1.nograd_train", model(x))
        if step == 2:
            model.bn.momentum = None
        if step == 3:
            model.bn.track_running_stats = False
        if step == 4:
            model.bn.track_running_stats = True
            model.bn.momentum = 0.5
        train_step(ctx, model, opt, step, x=x, y=y, base=base)
        if step == 5:
            model.eval()
            ctx.rec("eval", model(x))


class Embeds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8, max_norm=1.0)
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


@scenario("aot")
def embedding_max_norm(ctx: Ctx) -> None:
    """nn.Embedding(max_norm=...) renormalizes its weight rows in place in forward; max_norm changed mid-run,
    padding_idx set."""
    torch.manual_seed(0)
    base = Embeds()
    with torch.no_grad():
        base.emb.weight.mul_(3)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(5):
        g = gen(step)
        ids, y = torch.randint(0, 16, (4, 5), generator=g), torch.randint(0, 4, (4,), generator=g)
        if step == 2:
            model.emb.max_norm = 0.5
        if step == 3:
            model.emb.max_norm = None
        if step == 4:
            model.emb.padding_idx = 0
        train_step(ctx, model, opt, step, x=ids, y=y, base=base)


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("shift", torch.zeros(4))
        self.register_buffer("gate", None)

    def forward(self, x):
        h = self.fc(x) + self.shift
        if self.gate is not None:
            h = h * self.gate
        extra = getattr(self, "late", None)
        return h if extra is None else h - extra


@scenario("aot", "dynamo")
def buffers(ctx: Ctx) -> None:
    """Buffers changed in place by the user, re-assigned (new object, other shape via broadcasting), a None
    buffer set, a non-persistent buffer registered mid-run and read with getattr, a buffer deleted."""
    torch.manual_seed(0)
    base = WithBuffers()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(7):
        if step == 1:
            base.shift.add_(0.5)
        if step == 2:
            base.shift = torch.full((4,), -1.0)
        if step == 3:
            base.gate = torch.tensor([1.0, 0.0, 2.0, 1.0])
        if step == 4:
            base.register_buffer("late", torch.ones(1, 4), persistent=False)
        if step == 5:
            base.shift = torch.full((1, 4), 3.0)
        if step == 6:
            del base.late
            base.gate = None
        train_step(ctx, model, opt, step, base=base)


@scenario("aot")
def frozen_model_input_grads(ctx: Ctx) -> None:
    """model.requires_grad_(False) (a frozen model) with inputs requiring grad: saliency / adversarial steps
    (gradients w.r.t. the input only), then unfrozen; a submodule in eval while the rest trains."""
    base = mlp(p=0.2)
    model = ctx.wrap(base)
    model.requires_grad_(False)
    x = batch(0)[0]
    for step in range(3):
        xa = x.clone().requires_grad_(True)
        torch.manual_seed(step)
        out = model(xa)
        out.logsumexp(1).sum().backward()
        ctx.rec(f"adv{step}.xgrad", xa.grad)
        x = x + 0.1 * xa.grad.sign()
    ctx.rec_grads("frozen", base)
    model.requires_grad_(True)
    model.drop.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        train_step(ctx, model, opt, step, base=base)
    model.drop.train()
    train_step(ctx, model, opt, 3, base=base)


@scenario("aot")
def double_backward(ctx: Ctx) -> None:
    """A gradient penalty (WGAN-GP): torch.autograd.grad(..., create_graph=True) of the output w.r.t. the
    input, its norm in the loss, backward through it; then a plain step; torch.autograd.functional.jacobian."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        x = batch(step)[0].requires_grad_(True)
        out = model(x)
        if step % 2 == 0:
            (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
            penalty = ((g.norm(2, dim=1) - 1) ** 2).mean()
            ctx.rec(f"s{step}.penalty", penalty)
            loss = out.mean() + 10 * penalty
        else:
            loss = out.mean()
        loss.backward()
        ctx.rec_grads(f"s{step}", base)
        opt.step()
        opt.zero_grad()
    ctx.rec("jacobian", torch.autograd.functional.jacobian(lambda t: model(t), batch(9)[0][:2]))


class MutatesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, buf):
        buf.add_(1)  # an in-place update of an input (a running count, a KV slot)
        return self.fc(x) + buf.sum()


@scenario("aot")
def input_mutation_views(ctx: Ctx) -> None:
    """forward updates an input in place; the input is a slice / a transposed view / a column of a larger
    tensor, which eager updates through the view."""
    torch.manual_seed(0)
    base = MutatesInput()
    model = ctx.wrap(base)
    big = torch.zeros(6, 6)
    x = batch(0)[0]
    for step, view in enumerate([lambda: big[0], lambda: big[1:3, 2:4], lambda: big.t()[2],
                                 lambda: big[:, 5], lambda: big[0]]):
        out = model(x, view())
        out.sum().backward()
        ctx.rec(f"s{step}.out", out)
        ctx.rec(f"s{step}.big", big)
        ctx.rec_grads(f"s{step}", base)


@scenario()
def hf_dropout_resize(ctx: Ctx) -> None:
    """A transformers BERT classifier with dropout on (same seeds: the same masks), set_input_embeddings mid-run
    (a new, larger embedding module), an attention-mask dtype change, eval passes."""
    base = tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(5):
        g = gen(step)
        ids = torch.randint(3, 64, (4, 8), generator=g)
        labels = torch.randint(0, 3, (4,), generator=g)
        mask = torch.ones(4, 8, dtype=torch.long)
        mask[:, 6:] = 0
        if step == 2:
            torch.manual_seed(7)
            model.set_input_embeddings(nn.Embedding(80, 32, padding_idx=0))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if step == 3:
            mask = mask.bool()
        torch.manual_seed(50 + step)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        ctx.rec(f"s{step}", out)
        out.loss.backward()
        ctx.rec_grads(f"s{step}", base)
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        ctx.rec("eval", model(input_ids=ids, attention_mask=mask))


@scenario("aot")
def hf_generate(ctx: Ctx) -> None:
    """Greedy generate through the wrapper with the KV cache on, off (per call and through
    generation_config), output_scores, then after one training step (the weights changed)."""
    base = tiny_llama().eval()
    model = ctx.wrap(base)
    prompt = torch.randint(3, 64, (2, 5), generator=gen(3))
    with torch.no_grad():
        ctx.rec("cache", model.generate(prompt, max_new_tokens=4, do_sample=False))
        ctx.rec("nocache", model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False))
        out = model.generate(prompt, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        ctx.rec("scores", (out.sequences, out.scores))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(input_ids=prompt, labels=prompt).loss
    loss.backward()
    opt.step()
    model.eval()
    model.generation_config.use_cache = False
    with torch.no_grad():
        ctx.rec("after_step", model.generate(prompt, max_new_tokens=4, do_sample=False))


@scenario("aot", "dynamo")
def prune(ctx: Ctx) -> None:
    """torch.nn.utils.prune (a forward pre-hook that sets module.weight = weight_orig * mask at every call)
    applied mid-run, a second pruning on another layer, then prune.remove."""
    import torch.nn.utils.prune as P

    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step == 1:
            P.l1_unstructured(base.fc2, "weight", amount=0.5)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if step == 3:
            torch.manual_seed(3)
            P.random_unstructured(base.fc1, "weight", amount=0.3)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if step == 4:
            P.remove(base.fc2, "weight")
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(ctx, model, opt, step, base=base)


class HookObject:
    """A forward hook with state of its own (a callable object), changed between calls."""

    def __init__(self) -> None:
        self.scale = 2.0
        self.on = True

    def __call__(self, module, inputs, output):
        return output * self.scale if self.on else output


def _shift(module, inputs, output, amount):
    return output + amount


@scenario("aot")
def hook_state(ctx: Ctx) -> None:
    """Hooks whose own state changes between steps: a callable object's attributes, a functools.partial's
    keywords; a Python attribute of the model read by forward through a hook."""
    base = mlp()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = HookObject()
    base.fc2.register_forward_hook(hook)
    partial = functools.partial(_shift, amount=1.0)
    for step in range(6):
        if step == 1:
            hook.scale = 3.0
        if step == 2:
            hook.on = False
        if step == 3:
            base.fc1.register_forward_hook(partial)
        if step == 4:
            partial.keywords["amount"] = 5.0
        if step == 5:
            hook.on = True
        train_step(ctx, model, opt, step, base=base)


@scenario("aot", max_traces=3)
def float_schedule(ctx: Ctx) -> None:
    """A Python float argument annealed every step (a temperature): results are eager's, and the float is a
    symbol from its second value (two traces; more is a perf cliff: the table says "CLIFF" past max_traces)."""
    torch.manual_seed(0)
    base = TakesAnything()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(8):
        x, y = batch(step)
        out = model(x, scale=0.9 ** step)
        ctx.rec(f"s{step}.out", out)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
        opt.zero_grad()
    ctx.rec_state("final", base)


class OptionalParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.body(x)
        extra = getattr(self, "extra_shift", None)
        if extra is not None:
            h = h + extra
        if not self.training:
            h = h * 0.5
        return self.head(h)


@scenario("aot")
def wrapper_api(ctx: Ctx) -> None:
    """Module API used on the compiled model itself: a buffer registered and a head replaced with
    register_buffer / add_module, ``model.training = False`` set directly, a feature extractor built from
    ``list(model.children())[:-1]``, ``model.apply(init)`` re-initializing weights."""
    torch.manual_seed(0)
    base = OptionalParts()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step == 1:
            model.register_buffer("extra_shift", torch.full((8,), 0.5))
        if step == 2:
            torch.manual_seed(2)
            model.add_module("head", nn.Linear(8, 4))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if step == 3:
            model.training = False
        if step == 4:
            model.training = True

            def init(m):
                if isinstance(m, nn.Linear):
                    nn.init.constant_(m.bias, 0.1)

            model.apply(init)
        train_step(ctx, model, opt, step, base=base)
    features = nn.Sequential(*list(model.children())[:-1])
    ctx.rec("features", features(batch(9)[0]))
    ctx.rec("children", [name for name, _ in model.named_children()])


class QuantScaled(nn.Module):
    """Reads Python attributes of its parameter and buffer (a quantization tool's scale, a flag)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.register_buffer("shift", torch.full((4,), 0.25))
        self.shift.active = True

    def forward(self, x):
        w = self.fc1.weight
        h = torch.relu(nn.functional.linear(x, w * getattr(w, "quant_scale", 1.0), self.fc1.bias))
        out = self.fc2(h)
        return out + self.shift if getattr(self.shift, "active", True) else out


@scenario("aot", "dynamo")
def tensor_attributes(ctx: Ctx) -> None:
    """Python attributes of a parameter and a buffer, read by forward, added / changed / removed between steps
    (``getattr(w, "quant_scale", 1.0)``; ``self.shift.active``)."""
    torch.manual_seed(0)
    base = QuantScaled()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step == 1:
            base.fc1.weight.quant_scale = 0.5
        if step == 2:
            base.shift.active = False
        if step == 3:
            base.fc1.weight.quant_scale = 0.25
        if step == 4:
            del base.fc1.weight.quant_scale
            base.shift.active = True
        train_step(ctx, model, opt, step, base=base)


class DoublesLinear(torch.overrides.TorchFunctionMode):
    """A torch function mode of the user's own that changes what F.linear returns."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out * 2 if func is nn.functional.linear else out


class HalvesAddmm(torch.utils._python_dispatch.TorchDispatchMode):
    """A torch dispatch mode that changes what aten.addmm returns."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out * 0.5 if func is torch.ops.aten.addmm.default else out


@scenario("aot")
def torch_modes(ctx: Ctx) -> None:
    """Torch modes entered around single steps: a function mode, a dispatch mode, a device context (factory calls
    in forward), nothing; each step as eager under the same mode."""
    torch.manual_seed(0)
    base = MakesTensors()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    modes = [None, DoublesLinear, None, HalvesAddmm, lambda: torch.device("cpu"), DoublesLinear, None]
    for step, mode in enumerate(modes):
        x = torch.randn(3, 4, generator=gen(step))
        with mode() if mode is not None else contextlib.nullcontext():
            out = model(x)
            ctx.rec(f"s{step}", out)
            out.sum().backward()
        ctx.rec_grads(f"s{step}", base)
        opt.step()
        opt.zero_grad()


def _tiny_llama_classifier():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, num_labels=3)
    config._attn_implementation = "eager"
    return transformers.LlamaForSequenceClassification(config)


@scenario("aot")
def hf_live_edits(ctx: Ctx) -> None:
    """A transformers Llama classifier edited between steps as users do on a live model: config.pad_token_id
    (forward reads it to find the last token), a norm's variance_epsilon, an attention layer's scaling,
    set_attn_implementation("sdpa"), an MLP's act_fn swapped, output_hidden_states through the config."""
    import transformers.activations

    base = _tiny_llama_classifier()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.tensor([[5, 6, 7, 9, 9, 9], [5, 9, 9, 9, 9, 9]])
    labels = torch.tensor([0, 2])
    for step in range(7):
        if step == 1:
            model.config.pad_token_id = 9
        if step == 2:
            base.model.norm.variance_epsilon = 0.5
        if step == 3:
            base.model.layers[0].self_attn.scaling = 0.1
        if step == 4:
            if hasattr(base, "set_attn_implementation"):
                model.set_attn_implementation("sdpa")
            else:
                base.config._attn_implementation = "sdpa"
        if step == 5:
            base.model.layers[0].mlp.act_fn = transformers.activations.ACT2FN["gelu"]
        if step == 6:
            model.config.output_hidden_states = True
        out = model(input_ids=ids, labels=labels)
        ctx.rec(f"s{step}", out)
        out.loss.backward()
        ctx.rec_grads(f"s{step}", base)
        opt.step()
        opt.zero_grad()


@scenario("aot")
def hf_resize_untie(ctx: Ctx) -> None:
    """A transformers Llama with tied embeddings: resize_token_embeddings (new, tied, larger modules) mid-run,
    then the head untied (a new Parameter); eval passes."""
    base = tiny_llama(tie_word_embeddings=True).eval()
    model = ctx.wrap(base)
    ids = torch.randint(3, 64, (2, 7), generator=gen(0))
    with torch.no_grad():
        ctx.rec("tied", model(input_ids=ids, use_cache=False).logits)
        torch.manual_seed(1)
        model.resize_token_embeddings(72)
        ctx.rec("resized", model(input_ids=ids, use_cache=False).logits)
        base.lm_head.weight = nn.Parameter(base.model.embed_tokens.weight.detach().clone() * 2)
        ctx.rec("untied", model(input_ids=ids, use_cache=False).logits)
        base.model.embed_tokens.weight.mul_(0.5)  # the untied embedding changes alone
        ctx.rec("untied_changed", model(input_ids=ids, use_cache=False).logits)


def _scale_by(x, k=[2.0]):  # noqa: B006 - a mutable default on purpose: it is mutated between steps
    return x * k[0]


def _scale_kw(x, *, k=2.0):
    return x * k


def _passthrough(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class FunctionStateBase(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.act = functools.partial(nn.functional.leaky_relu, negative_slope=0.1)

    @_passthrough
    def post(self, h):
        return h * 2

    def forward(self, x):
        return self.post(_scale_kw(_scale_by(self.act(self.fc(x)))))


class FunctionState(FunctionStateBase):
    pass


@scenario("aot")
def function_state(ctx: Ctx) -> None:
    """Function-level changes between steps: a mutable default argument mutated, a keyword-only default changed
    in ``__kwdefaults__``, a decorator's closure cell swapped, a parent class method patched, a
    ``functools.partial`` reset in place (``__setstate__``); each put back at the end."""
    torch.manual_seed(0)
    base = FunctionState()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cell = FunctionStateBase.__dict__["post"].__closure__[0]
    original_post, original_fn = FunctionStateBase.__dict__["post"], cell.cell_contents
    try:
        for step in range(6):
            if step == 1:
                _scale_by.__defaults__[0][0] = 5.0
            if step == 2:
                _scale_kw.__kwdefaults__["k"] = 0.5
            if step == 3:
                cell.cell_contents = lambda self, h: h * -1
            if step == 4:
                FunctionStateBase.post = lambda self, h: h + 1
            if step == 5:
                base.act.__setstate__((nn.functional.leaky_relu, (), {"negative_slope": 0.7}, None))
            train_step(ctx, model, opt, step, base=base)
    finally:
        _scale_by.__defaults__[0][0] = 2.0
        _scale_kw.__kwdefaults__["k"] = 2.0
        cell.cell_contents = original_fn
        FunctionStateBase.post = original_post


_BATTERY_SCALE = contextvars.ContextVar("battery_scale", default=1.0)
_BATTERY_LOCAL = threading.local()


class LibraryReads(nn.Module):
    """Reads torch functions through their modules, a tensor method, a context variable and a thread-local."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)
        h = torch.sigmoid(h) + nn.functional.gelu(h) + h.sigmoid()
        return self.fc2(h) * _BATTERY_SCALE.get() + getattr(_BATTERY_LOCAL, "shift", 0.0)


def _unpatch_tensor_sigmoid() -> None:
    if "sigmoid" in vars(torch.Tensor):  # set on torch.Tensor, it shadows TensorBase's C method
        del torch.Tensor.sigmoid


@scenario("aot")
def library_rebinding(ctx: Ctx) -> None:
    """torch's own functions rebound to other torch functions between steps (``torch.sigmoid = torch.tanh``,
    ``F.gelu = F.silu``, ``torch.Tensor.sigmoid = torch.Tensor.tanh``), a context variable set and a thread-local
    attribute changed; each put back (session 16: the first three and the context variable were stale results
    in-process, the first three false cache hits in a warm process)."""
    torch.manual_seed(0)
    base = LibraryReads()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    originals = (torch.sigmoid, nn.functional.gelu)
    token = _BATTERY_SCALE.set(1.0)
    _BATTERY_LOCAL.shift = 0.0
    try:
        for step in range(7):
            torch.sigmoid, nn.functional.gelu = originals
            _unpatch_tensor_sigmoid()
            if step == 1:
                torch.sigmoid = torch.tanh
            if step == 2:
                torch.Tensor.sigmoid = torch.Tensor.tanh
            if step == 3:
                nn.functional.gelu = nn.functional.silu
            if step == 4:
                _BATTERY_SCALE.set(3.0)
            if step == 5:
                _BATTERY_LOCAL.shift = 0.5
            train_step(ctx, model, opt, step, base=base)
    finally:
        torch.sigmoid, nn.functional.gelu = originals
        _unpatch_tensor_sigmoid()
        _BATTERY_SCALE.reset(token)
        _BATTERY_LOCAL.shift = 0.0


class SignedZeroScale(nn.Module):
    """Scales its features by a float setting whose sign of zero shows in the result (``atan2`` picks +pi or -pi)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.k = 0.0

    def forward(self, x, s=1.0):
        h = self.lin(x)
        zero = torch.zeros_like(h) * self.k * s  # the sign of k * s
        return h + torch.atan2(zero, -torch.ones_like(h))


@scenario("aot", "dynamo")
def float_zero_sign(ctx: Ctx) -> None:
    """A float attribute and a float argument flipped between 0.0 and -0.0 (equal by ``==``, another result):
    session 19 found torch.compile's guards (``==``) reusing the other zero's graph through the backend."""
    torch.manual_seed(0)
    base = SignedZeroScale()
    model = ctx.wrap(base)
    for step, (k, s) in enumerate([(0.0, 1.0), (-0.0, 1.0), (0.0, 1.0), (1.0, 0.0), (1.0, -0.0), (-0.0, -0.0)]):
        base.k = k
        x, _ = batch(step)
        ctx.rec(f"s{step}.out", model(x, s))


@scenario("dynamo")
def specialize_on(ctx: Ctx) -> None:
    """A batch dimension marked dynamic with ``specialize_on=[size == 8]`` (Dynamo compiles the graph again for
    size 8), called at 8 and other sizes; the result reads the size (session 19: such a compile could be stored
    under the general graph's key)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 4)
    model = ctx.wrap(base)

    def run(x):
        return model(x) * x.shape[0]

    for step, rows in enumerate([5, 8, 3, 8, 5]):
        x = torch.randn(rows, 8)
        if ctx.way == "dynamo":
            torch._dynamo.mark_dynamic(x, 0, specialize_on=[lambda size: size == 8])
        ctx.rec(f"s{step}.out", run(x))


_BATTERY_ENV = os.environ  # the environment as a value (NOTE [The environment as a value])


class ProcessWideReads(MLP):
    """An MLP whose forward reads a numpy array, the environment through an alias and a module looked up by
    name (session 20)."""

    def __init__(self) -> None:
        super().__init__()
        import numpy as np

        self.scales = np.array([1.0, 2.0])

    def forward(self, x):
        import importlib

        shift = 0.5 if "AOTCACHE_BATTERY_SHIFT" in _BATTERY_ENV else 0.0
        gain = importlib.import_module("aotcache_battery_settings").GAIN
        return super().forward(x) * float(self.scales[0]) * gain + shift


@scenario("aot")  # not "dynamo": torch.compile itself keeps its graph when a global hook is added (torch 2.13)
def process_wide(ctx: Ctx) -> None:
    """Process-wide state changed between training steps: a global module forward hook registered and removed,
    a numpy array attribute changed in place, an environment variable read through an alias of ``os.environ``,
    an attribute of a module the forward looks up with ``importlib.import_module`` (session 20: the hook ran
    once more around the wrapper, the others were stale results)."""
    import types

    settings = types.ModuleType("aotcache_battery_settings")
    settings.GAIN = 1.0
    sys.modules[settings.__name__] = settings
    os.environ.pop("AOTCACHE_BATTERY_SHIFT", None)
    torch.manual_seed(0)
    base = ProcessWideReads()
    model = ctx.wrap(base)
    opt = torch.optim.SGD(base.parameters(), lr=0.1)
    handle = None
    try:
        for step in range(8):
            if step == 1:
                handle = torch.nn.modules.module.register_module_forward_hook(
                    lambda module, inputs, output: output * 2 if isinstance(module, nn.Linear) else None)
            elif step == 2:
                handle.remove()
                handle = None
            elif step == 3:
                base.scales[0] = 3.0
            elif step == 4:
                os.environ["AOTCACHE_BATTERY_SHIFT"] = "1"
            elif step == 5:
                settings.GAIN = 0.5
            elif step == 6:
                os.environ.pop("AOTCACHE_BATTERY_SHIFT")
            train_step(ctx, model, opt, step, base=base)
    finally:
        if handle is not None:
            handle.remove()
        os.environ.pop("AOTCACHE_BATTERY_SHIFT", None)
        sys.modules.pop(settings.__name__, None)


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------


def run_one(name: str, way: str) -> dict:
    """Run scenario ``name`` the ``way``; the records, or the error, with trace and fallback counts."""
    from aotcache.aot.fallback import fallback_counts
    from aotcache.autograd_cache.cache import default_cache

    fn = SCENARIOS[name][0]
    ctx = Ctx(way)
    before_fb = sum(fallback_counts().values())
    stats_before = default_cache().stats()
    torch.manual_seed(0)
    start = time.perf_counter()
    error = None
    try:
        fn(ctx)
    except Exception as exc:  # noqa: BLE001 - a scenario's failure is a result
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if os.environ.get("BATTERY_TRACEBACK"):
            traceback.print_exc()
    stats = default_cache().stats()
    torch._dynamo.reset() if way == "dynamo" else None
    return {"records": ctx.records, "error": error, "traces": ctx.traces(),
            "fallbacks": sum(fallback_counts().values()) - before_fb,
            "hits": stats["hit"] - stats_before["hit"], "compiles": stats["compile"] - stats_before["compile"],
            "seconds": time.perf_counter() - start}


def worker(names: list[str], way: str, out_path: str) -> None:
    results = {name: run_one(name, way) for name in names}
    torch.save(results, out_path)


# Mismatches that are torch.compile's own behaviour, not aotcache's (each has a test: see docs/models.md,
# "Stale-result battery").
KNOWN = {
    ("hooks_forward", "dynamo"): "torch.compile's default skip_nnmodule_hook_guards: a submodule hook registered "
                                 "after Dynamo traced is not run (aotcache's own Dynamo routes turn the guards on)",
    ("checkpoint", "compile"): "reentrant checkpoint without inputs requiring grad: eager leaves the parameters' "
                               ".grad None, torch.compile (the Dynamo way) computes them (xfail test)",
    ("checkpoint", "warm"): "as checkpoint/compile",
}


def _in_subprocess(way: str, names: list[str], cache_dir: str) -> dict:
    """Run ``names`` the ``way`` in a fresh process with this cache dir; its results."""
    path = os.path.join(cache_dir, f"{way}_results.pt")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--only", ",".join(names),
                           "--worker", way, path], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the {way} worker failed")
    return torch.load(path, weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--ways", default="eager,compile,aot,dynamo,warm")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "stale_battery.json"))
    parser.add_argument("--worker", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    if args.worker:
        worker(names, *args.worker)
        return
    ways = [w for w in args.ways.split(",") if w]
    cache_dir = os.environ.get("AOTCACHE_CACHE_DIR") or tempfile.mkdtemp(prefix="stale_battery_")
    os.environ["AOTCACHE_CACHE_DIR"] = cache_dir
    os.environ.setdefault("AOTCACHE_PROGRESS", "0")
    os.environ.setdefault("AOTCACHE_TIERS", "memory,disk")
    # Several scenarios (input_kinds, hf_flags) trace a signature more than the default recompile limit (8) on
    # purpose: past it calls run eagerly, which checks nothing about stale graphs. The limit has its own tests.
    os.environ.setdefault("AOTCACHE_RECOMPILE_LIMIT", "0")
    table: dict[str, dict] = {}
    eager = {name: run_one(name, "eager") for name in names}
    for name in names:
        table[name] = {"eager": {"error": eager[name]["error"], "records": len(eager[name]["records"])}}
    for way in ways:
        if way == "eager":
            continue
        todo = [n for n in names if way in ("compile", "warm") or way in SCENARIOS[n][1]]
        if way in ("compile", "warm"):  # fresh processes: cold (fills the cache dir), then warm
            results = _in_subprocess(way, todo, cache_dir)
        else:
            results = {n: run_one(n, way) for n in todo}
        for name, got in results.items():
            ref = eager[name]
            if got["error"] or ref["error"]:
                ok = got["error"] == ref["error"]
                exact, problem = ok, got["error"] or ""
                if ref["error"] and not ok:
                    problem = f"eager raised {ref['error']}; {way}: {got['error']}"
            else:
                ok, exact, problem = compare(ref["records"], got["records"])
            limit = MAX_TRACES.get(name)
            if ok and limit is not None and got["traces"] > limit:
                ok, problem = False, f"perf cliff: {got['traces']} traces, at most {limit} expected"
            known = KNOWN.get((name, way)) if not ok else None
            table[name][way] = {"ok": ok, "exact": exact, "problem": problem, "known": known, "traces": got["traces"],
                                "fallbacks": got["fallbacks"], "hits": got["hits"], "compiles": got["compiles"],
                                "seconds": round(got["seconds"], 2)}
    print_table(table, ways)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "scenarios": table}, f, indent=1, sort_keys=True)
    print(f"wrote {args.out}")
    if any((not cell.get("ok", True) and not cell.get("known")) or (w == "eager" and cell["error"])
           for row in table.values() for w, cell in row.items()):
        sys.exit(1)


def print_table(table: dict, ways: list[str]) -> None:
    ways = [w for w in ways if w != "eager"]
    header = f"{'scenario':<22}" + "".join(f"{w:>22}" for w in ways)
    print(header)
    print("-" * len(header))
    for name, row in table.items():
        cells = []
        for w in ways:
            cell = row.get(w)
            if cell is None:
                cells.append(f"{'-':>22}")
                continue
            mark = ("exact" if cell["exact"] else "close") if cell["ok"] else ("known" if cell["known"] else "FAIL")
            if cell["problem"].startswith("perf cliff"):
                mark = "cliff" if cell["known"] else "CLIFF"
            if row["eager"]["error"]:
                mark = "EAGER-ERR"  # the scenario itself is broken
            extra = f"t{cell['traces']}" + (f" f{cell['fallbacks']}" if cell["fallbacks"] else "")
            if w == "warm":
                extra += f" h{cell['hits']} c{cell['compiles']}"
            cells.append(f"{mark + ' ' + extra:>22}")
        print(f"{name:<22}" + "".join(cells))
    for name, row in table.items():
        if row["eager"]["error"]:
            print(f"  {name} [eager]: {row['eager']['error']}")
        for w, cell in row.items():
            if w != "eager" and not cell.get("ok", True):
                print(f"  {name} [{w}]: {cell['problem']}" + (f" (known: {cell['known']})" if cell["known"] else ""))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
