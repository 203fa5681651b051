"""Training-loop utilities around a compiled model, eager vs compiled, at every step.

Users wrap utilities around their model: weight averaging (``AveragedModel`` / EMA, ``update_bn``),
quantization-aware training (``prepare_qat`` / ``convert``), pruning and parametrizations, autocast with
manual loss scaling, accelerate's ``Accelerator.prepare``, ``torch.func`` over the module, deep copies and
checkpoints moved between the eager and the compiled model, DataLoader epochs with a smaller last batch.
Each case runs a few training / evaluation steps once per way and records losses, outputs, gradients,
parameters and buffers (the recording and comparison of ``bench/stale_battery.py``):

- ``eager``: the model itself (the reference);
- ``compile``: ``aotcache.compile(model, compiler="nop")``;
- ``aot``: ``aotcache.aot_module(model, "nop")`` (cases marked ``aot``);
- ``warm``: ``aotcache.compile`` in a fresh process on a cache dir that another fresh process filled running
  the same cases (``hN`` cache hits, ``cN`` compiles there): a warm start must give the same results.

A way passes a case when every record has eager's structure, dtype and values (rtol 1e-4 / atol 1e-5;
bfloat16 / half 1e-2). The table also shows the route(s) taken (``aot`` / ``dynamo`` / ``eager``), ``tN`` the
graphs captured (``num_compiles``) and ``fN`` the fallback decisions; a case with a bound on its traces fails
("CLIFF") when it traces more (a re-trace every step).

    python bench/loop_utilities.py                     # all cases, eager / compile / aot (a few minutes)
    python bench/loop_utilities.py --ways compile,aot,warm
    python bench/loop_utilities.py --only swa_ema,qat_prepare_then_compile --ways eager,compile

Writes ``bench/results/loop_utilities.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.stale_battery import Ctx as _BaseCtx  # noqa: E402
from bench.stale_battery import compare  # noqa: E402


class Ctx(_BaseCtx):
    """The stale battery's context, plus the routes the wrappers took."""

    def routes(self) -> list[str]:
        return sorted({str(getattr(w, "route", None)) for w in self.wrapped if hasattr(w, "route")})


CASES: dict[str, tuple[Callable[[Ctx], None], tuple[str, ...]]] = {}
MAX_TRACES: dict[str, int] = {}


def case(*ways: str, max_traces: int | None = None):
    def register(fn):
        CASES[fn.__name__] = (fn, ways)
        if max_traces is not None:
            MAX_TRACES[fn.__name__] = max_traces
        return fn
    return register


# ----------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class BNNet(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear: buffers that update in train mode."""

    def __init__(self, d: int = 8, h: int = 16, o: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.bn = nn.BatchNorm1d(h)
        self.fc2 = nn.Linear(h, o)

    def forward(self, x):
        return self.fc2(self.bn(self.fc1(x)).relu())


class MLP(nn.Module):
    def __init__(self, d: int = 8, h: int = 16, o: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)
        self.fc3 = nn.Linear(h, o)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


class QATNet(nn.Module):
    """Eager-mode quantization layout: QuantStub -> conv/bn/relu -> linear -> DeQuantStub."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.relu(self.bn(self.conv(x)))
        x = self.fc(torch.flatten(x, 1))
        return self.dequant(x)


def seeded(cls, *args, **kw):
    torch.manual_seed(0)
    return cls(*args, **kw)


def batch(step: int, n: int = 6, d: int = 8, o: int = 4):
    g = gen(100 + step)
    return torch.randn(n, d, generator=g), torch.randint(0, o, (n,), generator=g)


def img_batch(step: int, n: int = 4):
    g = gen(200 + step)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def step_(ctx: Ctx, model, opt, label: str, x, y, base: nn.Module, loss_scale: float = 1.0) -> torch.Tensor:
    """Forward, cross-entropy, backward; records output, loss, gradients; optimizer step; records state."""
    out = model(x)
    loss = nn.functional.cross_entropy(out.float(), y)
    ctx.rec(f"{label}.out", out)
    ctx.rec(f"{label}.loss", loss)
    (loss * loss_scale).backward()
    ctx.rec_grads(label, base)
    if opt is not None:
        opt.step()
        opt.zero_grad()
    ctx.rec_state(f"{label}.state", base)
    return loss


def loader(n: int = 22, batch_size: int = 8, d: int = 8, o: int = 4, shuffle: bool = False):
    """A DataLoader over ``n`` rows; the last batch is smaller unless ``n`` divides."""
    g = gen(7)
    data = torch.utils.data.TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, o, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=False,
                                       generator=gen(8) if shuffle else None)


# ----------------------------------------------------------------------------------------------------
# Weight averaging
# ----------------------------------------------------------------------------------------------------


@case("aot")
def swa_ema_of_compiled(ctx: Ctx) -> None:
    """AveragedModel(compiled, EMA multi_avg_fn, use_buffers=False) updated every step, evaluated, then
    update_bn over a loader; the averaged model is a deep copy of the wrapper."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

    base = seeded(BNNet)
    model = ctx.wrap(base)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
        ema.update_parameters(model)
        ctx.rec_state(f"s{step}.ema", ema)
        ema.eval()
        with torch.no_grad():
            ctx.rec(f"s{step}.ema_out", ema(batch(50)[0]))
        ema.train()
    update_bn(loader(), ema)
    ctx.rec_state("after_bn.ema", ema)
    ema.eval()
    with torch.no_grad():
        ctx.rec("final.ema_out", ema(batch(51)[0]))


@case("aot")
def swa_buffers_of_compiled(ctx: Ctx) -> None:
    """AveragedModel(compiled, use_buffers=True) (averages BatchNorm statistics too), SWALR schedule, the
    averaged model evaluated through its own forward between steps."""
    from torch.optim.swa_utils import SWALR, AveragedModel

    base = seeded(BNNet)
    model = ctx.wrap(base)
    swa = AveragedModel(model, use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = SWALR(opt, swa_lr=0.05, anneal_epochs=2)
    for step in range(5):
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
        swa.update_parameters(model)
        sched.step()
        ctx.rec_state(f"s{step}.swa", swa)
        swa.eval()
        with torch.no_grad():
            ctx.rec(f"s{step}.swa_out", swa(batch(60)[0]))
        swa.train()


@case("aot")
def swa_eager_of_compiled(ctx: Ctx) -> None:
    """The compiled model is trained, the AveragedModel holds the eager model (a copy of it): EMA of the
    compiled one's parameters, update_bn, evaluation of the eager average."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

    base = seeded(BNNet)
    ema = AveragedModel(base, multi_avg_fn=get_ema_multi_avg_fn(0.7))
    model = ctx.wrap(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(4):
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
        ema.update_parameters(model)
        ctx.rec_state(f"s{step}.ema", ema)
    update_bn(loader(), ema)
    ctx.rec_state("after_bn.ema", ema)
    ema.eval()
    with torch.no_grad():
        ctx.rec("final.ema_out", ema(batch(51)[0]))


class BreakNet(BNNet):
    """BNNet with a graph break (a branch on a tensor's value): aotcache.compile takes the Dynamo way."""

    def forward(self, x):
        out = super().forward(x)
        return out * 2 if out.sum() > 0 else out


@case("aot")
def swa_of_dynamo_routed(ctx: Ctx) -> None:
    """AveragedModel (EMA) of a compiled model that took the Dynamo way (a graph break), deep-copied after its
    first steps; both trained / evaluated."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    base = seeded(BreakNet)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step_(ctx, model, opt, "s0", *batch(0), base=base)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    for step in range(1, 4):
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
        ema.update_parameters(model)
        ctx.rec_state(f"s{step}.ema", ema)
        ema.eval()
        with torch.no_grad():
            ctx.rec(f"s{step}.ema_out", ema(batch(50 + step)[0]))
        ema.train()


@case("aot")
def ema_of_parametrized(ctx: Ctx) -> None:
    """A GAN-style generator with spectral_norm (u / v buffers updated in train mode) and weight_norm, compiled,
    with an EMA copy (AveragedModel(compiled, use_buffers=True), a deep copy of a parametrized model)."""
    from torch.nn.utils import parametrizations
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    base = seeded(MLP)
    parametrizations.spectral_norm(base.fc2)
    parametrizations.weight_norm(base.fc3)
    model = ctx.wrap(base)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.0, 0.99))
    for step in range(4):
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
        ema.update_parameters(model)
        ctx.rec_state(f"s{step}.ema", ema)
        ema.eval()
        with torch.no_grad():
            ctx.rec(f"s{step}.ema_out", ema(batch(60)[0]))
        ema.train()


@case("aot")
def swa_compiled_average(ctx: Ctx) -> None:
    """The averaged model itself compiled for evaluation (its parameters change by update_parameters, in place,
    between evaluations; update_bn resets and recomputes its BatchNorm statistics)."""
    from torch.optim.swa_utils import AveragedModel, update_bn

    base = seeded(BNNet)
    swa = AveragedModel(base)
    swa_c = ctx.wrap(swa)
    opt = torch.optim.SGD(base.parameters(), lr=0.1)
    for step in range(4):
        step_(ctx, base, opt, f"s{step}", *batch(step), base=base)
        swa.update_parameters(base)
        update_bn(loader(), swa_c)
        ctx.rec_state(f"s{step}.swa", swa)
        swa_c.eval()
        with torch.no_grad():
            ctx.rec(f"s{step}.swa_out", swa_c(batch(60)[0]))
        swa_c.train()


# ----------------------------------------------------------------------------------------------------
# Quantization-aware training
# ----------------------------------------------------------------------------------------------------


def _qat_prepare(model: nn.Module) -> nn.Module:
    from torch.ao import quantization as tq

    model.train()
    model.qconfig = tq.get_default_qat_qconfig("x86")
    tq.fuse_modules_qat(model, [["conv", "bn", "relu"]], inplace=True)
    return tq.prepare_qat(model, inplace=True)


def _qat_loop(ctx: Ctx, model, base: nn.Module, steps: int = 5) -> None:
    from torch.ao import quantization as tq

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        if step == 3:  # the usual recipe: observers off, BatchNorm statistics frozen late in training
            model.apply(tq.disable_observer)
            model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
        step_(ctx, model, opt, f"s{step}", *img_batch(step), base=base)
    model.eval()
    with torch.no_grad():
        ctx.rec("eval_fakequant", model(img_batch(9)[0]))


@case("aot", max_traces=8)
def qat_prepare_then_compile(ctx: Ctx) -> None:
    """prepare_qat (FakeQuantize observers update scale / zero_point buffers every forward), then compile,
    train, disable observers and freeze BatchNorm statistics mid-run, eval, then convert the trained model in
    place and evaluate the quantized model through the same wrapper."""
    from torch.ao import quantization as tq

    base = _qat_prepare(seeded(QATNet))
    model = ctx.wrap(base)
    _qat_loop(ctx, model, base)
    tq.convert(base, inplace=True)
    with torch.no_grad():
        ctx.rec("eval_quantized", model(img_batch(10)[0]))


@case("aot", max_traces=6)
def qat_calibrated_then_compile(ctx: Ctx) -> None:
    """prepare_qat, one eager calibration forward under no_grad (the observers take their per-channel sizes),
    then compile and train: captured whole (NOTE [Kernels that resize their arguments])."""
    base = _qat_prepare(seeded(QATNet))
    with torch.no_grad():
        ctx.rec("calibration", base(img_batch(20)[0]))
    model = ctx.wrap(base)
    _qat_loop(ctx, model, base)


@case("aot", max_traces=8)
def qat_compile_then_prepare(ctx: Ctx) -> None:
    """compile first (one float training step), then prepare_qat on the eager model mid-run (modules swapped
    for QAT modules inside the wrapped model), train on, convert a copy for inference."""
    from torch.ao import quantization as tq

    base = seeded(QATNet)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step_(ctx, model, opt, "float", *img_batch(0), base=base)
    _qat_prepare(base)
    _qat_loop(ctx, model, base)
    quantized = tq.convert(copy.deepcopy(base).eval(), inplace=False)
    with torch.no_grad():
        ctx.rec("eval_quantized", quantized(img_batch(10)[0]))


@case("aot")
def fake_quant_toggles(ctx: Ctx) -> None:
    """disable_fake_quant / enable_fake_quant between steps (a tensor flag the FakeQuantize forward branches
    on), observers left on."""
    from torch.ao import quantization as tq

    base = _qat_prepare(seeded(QATNet))
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(5):
        if step == 2:
            model.apply(tq.disable_fake_quant)
        if step == 4:
            model.apply(tq.enable_fake_quant)
        if step == 3:  # a float setting the fused kernel takes as an argument
            base.quant.activation_post_process.activation_post_process.averaging_constant = 0.5
        step_(ctx, model, opt, f"s{step}", *img_batch(step), base=base)


@case("aot")
def qat_plain_fake_quantize(ctx: Ctx) -> None:
    """QAT with the plain (unfused) FakeQuantize qconfig, whose forward branches in Python on its
    observer_enabled / fake_quant_enabled buffers; observers disabled mid-run."""
    from torch.ao import quantization as tq

    base = seeded(QATNet).train()
    base.qconfig = tq.QConfig(activation=tq.default_fake_quant, weight=tq.default_per_channel_weight_fake_quant)
    tq.prepare_qat(base, inplace=True)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        if step == 2:
            model.apply(tq.disable_observer)
        step_(ctx, model, opt, f"s{step}", *img_batch(step), base=base)


# ----------------------------------------------------------------------------------------------------
# Pruning and parametrizations
# ----------------------------------------------------------------------------------------------------


@case("aot", max_traces=6)
def iterative_pruning(ctx: Ctx) -> None:
    """global_unstructured L1 pruning of two layers repeated every other step (masks replaced, a
    PruningContainer built), then prune.remove; the masks depend on the trained weights."""
    from torch.nn.utils import prune

    base = seeded(MLP)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step in (1, 3):
            prune.global_unstructured([(base.fc1, "weight"), (base.fc2, "weight")],
                                      pruning_method=prune.L1Unstructured, amount=0.2)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)  # weight_orig replaces weight
        if step == 5:
            prune.remove(base.fc1, "weight")
            prune.remove(base.fc2, "weight")
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)


@case("aot")
def orthogonal_and_spectral(ctx: Ctx) -> None:
    """parametrizations.orthogonal on one layer and spectral_norm (u / v buffers updated by power iteration
    in train mode) on another from the start; eval passes between steps (no power iteration there)."""
    from torch.nn.utils import parametrizations

    base = seeded(MLP)
    parametrizations.orthogonal(base.fc2)
    parametrizations.spectral_norm(base.fc3)
    model = ctx.wrap(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(4):
        if step == 2:  # more power iterations per training forward
            base.fc3.parametrizations.weight[0].n_power_iterations = 3
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
        model.eval()
        with torch.no_grad():
            ctx.rec(f"s{step}.eval", model(batch(70)[0]))
        model.train()


@case("aot")
def weight_norm_cached(ctx: Ctx) -> None:
    """parametrizations.weight_norm trained, then evaluated inside parametrize.cached() (the parametrized
    weight computed once per context), then parametrize.remove_parametrizations mid-run."""
    from torch.nn.utils import parametrizations, parametrize

    base = seeded(MLP)
    parametrizations.weight_norm(base.fc1)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        if step == 3:
            parametrize.remove_parametrizations(base.fc1, "weight", leave_parametrized=True)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
        with parametrize.cached(), torch.no_grad():
            ctx.rec(f"s{step}.cached", model(batch(71)[0]))


# ----------------------------------------------------------------------------------------------------
# Mixed precision, accumulation, schedulers, dtype moves
# ----------------------------------------------------------------------------------------------------


@case("aot")
def amp_manual_scaling(ctx: Ctx) -> None:
    """bf16 autocast steps with manual loss scaling (scale, unscale, inf check, skipped step, scale update),
    clip_grad_norm_, gradient accumulation over two micro-batches with zero_grad(set_to_none=False), OneCycleLR."""
    base = seeded(BNNet)
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    scale = 2.0 ** 10
    for step in range(4):
        for micro in range(2):
            x, y = batch(10 * step + micro)
            if step == 2 and micro == 1:
                x = x * 1e30  # overflow: the step is skipped and the scale halved
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                loss = nn.functional.cross_entropy(out.float(), y) / 2
            ctx.rec(f"s{step}.{micro}.out", out)
            (loss * scale).backward()
        grads = [p.grad for p in base.parameters()]
        for g in grads:
            g.div_(scale)
        finite = all(torch.isfinite(g).all() for g in grads)
        ctx.rec(f"s{step}.finite", bool(finite))
        if finite:
            ctx.rec(f"s{step}.norm", nn.utils.clip_grad_norm_(base.parameters(), 1.0))
            opt.step()
            scale *= 2.0
        else:
            scale /= 2.0
        ctx.rec_grads(f"s{step}", base)
        sched.step()
        opt.zero_grad(set_to_none=False)
        ctx.rec_state(f"s{step}.state", base)


@case("aot")
def no_sync_accumulation(ctx: Ctx) -> None:
    """Gradient accumulation under a no_sync-style context (contextlib.nullcontext on all but the last
    micro-batch, as DDP-agnostic loops write it), clip_grad_value_, StepLR, eval each epoch under
    inference_mode."""
    base = seeded(BNNet)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for epoch in range(2):
        for step in range(3):
            x, y = batch(10 * epoch + step)
            ctx_mgr = no_sync() if step < 2 else contextlib.nullcontext()
            with ctx_mgr:
                loss = nn.functional.cross_entropy(model(x), y) / 3
                loss.backward()
            ctx.rec(f"e{epoch}.{step}.loss", loss)
        nn.utils.clip_grad_value_(base.parameters(), 0.05)
        ctx.rec_grads(f"e{epoch}", base)
        opt.step()
        opt.zero_grad()
        sched.step()
        model.eval()
        with torch.inference_mode():
            ctx.rec(f"e{epoch}.eval", model(batch(90)[0]))
        model.train()
        ctx.rec_state(f"e{epoch}.state", base)


@case("aot")
def double_then_half_eval(ctx: Ctx) -> None:
    """Training in float32, the model switched with .to(torch.float64) mid-run (a new optimizer), trained on,
    then .half() for evaluation and .float() back to train."""
    base = seeded(BNNet)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step_(ctx, model, opt, "f32", *batch(0), base=base)
    model.to(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        x, y = batch(1 + step)
        step_(ctx, model, opt, f"f64_{step}", x.double(), y, base=base)
    model.double()  # again: nothing changes
    model.half().eval()
    with torch.no_grad():
        ctx.rec("half_eval", model(batch(5)[0].half()))
    model.float().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step_(ctx, model, opt, "f32_again", *batch(6), base=base)


@case("aot")
def anomaly_mode(ctx: Ctx) -> None:
    """torch.autograd.set_detect_anomaly(True) turned on for a few steps (debugging a NaN), then off."""
    base = seeded(MLP)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        with torch.autograd.set_detect_anomaly(step in (1, 2)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step_(ctx, model, opt, f"s{step}", *batch(step), base=base)


@case("aot")
def saved_tensor_hooks(ctx: Ctx) -> None:
    """Activation offloading: training steps under torch.autograd.graph.save_on_cpu() (lossless pack / unpack
    hooks on every saved tensor), then without."""
    base = seeded(BNNet)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        with torch.autograd.graph.save_on_cpu() if step < 2 else contextlib.nullcontext():
            step_(ctx, model, opt, f"s{step}", *batch(step), base=base)


@case("aot")
def lossy_saved_tensor_hooks(ctx: Ctx) -> None:
    """Activation compression: saved_tensors_hooks that store saved tensors in bfloat16 (a lossy pack), as memory
    saving recipes do; the gradients depend on which tensors autograd saves."""

    def pack(t):
        return (t.dtype, t.to(torch.bfloat16)) if t.is_floating_point() else (None, t)

    def unpack(packed):
        dtype, t = packed
        return t if dtype is None else t.to(dtype)

    base = seeded(MLP)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            step_(ctx, model, opt, f"s{step}", *batch(step), base=base)


@case("aot")
def ao_pruning_sparsifier(ctx: Ctx) -> None:
    """torch.ao.pruning.WeightNormSparsifier: masks held by FakeSparsity parametrizations, recomputed in place by
    sparsifier.step() between training steps, then squash_mask()."""
    from torch.ao.pruning import WeightNormSparsifier

    base = seeded(MLP)
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4)
    sparsifier.prepare(base, [{"tensor_fqn": "fc1.weight"}, {"tensor_fqn": "fc2.weight"}])
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        if step in (1, 3):
            sparsifier.step()
        if step == 4:
            sparsifier.squash_mask()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)


# ----------------------------------------------------------------------------------------------------
# accelerate
# ----------------------------------------------------------------------------------------------------


def _accelerator(**kw):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True, **kw)


def _accelerate_loop(ctx: Ctx, acc, model, opt, dl, base: nn.Module, epochs: int = 2) -> None:
    for epoch in range(epochs):
        for i, (x, y) in enumerate(dl):
            with acc.accumulate(model):
                out = model(x)
                loss = nn.functional.cross_entropy(out, y)
                acc.backward(loss)
                if acc.sync_gradients:
                    ctx.rec(f"e{epoch}.{i}.norm", acc.clip_grad_norm_(model.parameters(), 1.0))
                ctx.rec(f"e{epoch}.{i}.loss", loss)
                ctx.rec_grads(f"e{epoch}.{i}", base)
                opt.step()
                opt.zero_grad()
        ctx.rec_state(f"e{epoch}.state", base)
        model.eval()
        with torch.no_grad():
            ctx.rec(f"e{epoch}.eval", model(batch(91)[0]))
        model.train()
    unwrapped = acc.unwrap_model(model)
    ctx.rec("unwrapped_is_base_or_wrapper", unwrapped is base or unwrapped is model)
    ctx.rec_state("final", acc.unwrap_model(model))


@case("aot", max_traces=4)
def accelerate_prepare_compiled(ctx: Ctx) -> None:
    """Accelerator(cpu=True, gradient_accumulation_steps=2).prepare(compiled, optimizer, dataloader):
    accelerator.backward, accumulate(), clip_grad_norm_, a smaller last batch, unwrap_model."""
    base = seeded(BNNet)
    acc = _accelerator(gradient_accumulation_steps=2)
    model, opt, dl = acc.prepare(ctx.wrap(base), torch.optim.SGD(base.parameters(), lr=0.1), loader())
    _accelerate_loop(ctx, acc, model, opt, dl, base)


@case("aot", max_traces=4)
def accelerate_prepare_then_compile(ctx: Ctx) -> None:
    """accelerate prepares the eager model, the prepared model is compiled afterwards."""
    base = seeded(BNNet)
    acc = _accelerator(gradient_accumulation_steps=2)
    prepared, opt, dl = acc.prepare(base, torch.optim.SGD(base.parameters(), lr=0.1), loader())
    model = ctx.wrap(prepared)
    _accelerate_loop(ctx, acc, model, opt, dl, base)


@case("aot", max_traces=4)
def accelerate_bf16_mixed_precision(ctx: Ctx) -> None:
    """Accelerator(cpu=True, mixed_precision="bf16").prepare(compiled, ...): accelerate sets an instance
    ``forward`` on the prepared model (autocast around the model's forward, outputs cast to fp32)."""
    base = seeded(BNNet)
    acc = _accelerator(mixed_precision="bf16")
    model, opt, dl = acc.prepare(ctx.wrap(base), torch.optim.SGD(base.parameters(), lr=0.1), loader())
    _accelerate_loop(ctx, acc, model, opt, dl, base)


# ----------------------------------------------------------------------------------------------------
# torch.func, copies, checkpoints
# ----------------------------------------------------------------------------------------------------


@case("aot")
def functional_call_params(ctx: Ctx) -> None:
    """torch.func.functional_call(compiled, params, (x,)) with other parameter tensors every step (a
    first-order MAML-style inner update), then the outer parameters trained; functional_call with buffers."""
    base = seeded(BNNet)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x, y = batch(step)
        params = dict(base.named_parameters())
        inner = nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(inner, list(params.values()))
        fast = {k: (v - 0.1 * g).detach().requires_grad_() for (k, v), g in zip(params.items(), grads)}
        ctx.rec(f"s{step}.inner", inner)
        outer_x, outer_y = batch(30 + step)
        outer = nn.functional.cross_entropy(torch.func.functional_call(model, fast, (outer_x,)), outer_y)
        ctx.rec(f"s{step}.outer", outer)
        outer_grads = torch.autograd.grad(outer, list(fast.values()))
        for p, g in zip(base.parameters(), outer_grads):
            p.grad = g
        opt.step()
        opt.zero_grad()
        ctx.rec_state(f"s{step}.state", base)
    bufs = {k: torch.zeros_like(v) if "mean" in k else v.clone() for k, v in base.named_buffers()}
    model.eval()
    with torch.no_grad():
        ctx.rec("with_buffers", torch.func.functional_call(model, bufs, (batch(80)[0],)))
        ctx.rec("plain_after", model(batch(80)[0]))


@case("aot")
def func_per_sample_grads(ctx: Ctx) -> None:
    """Per-sample gradients: torch.func.vmap(torch.func.grad(loss of functional_call(compiled, ...)))."""
    base = seeded(MLP)
    model = ctx.wrap(base)
    params = {k: v.detach() for k, v in base.named_parameters()}

    def loss_fn(p, x, y):
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    for step in range(2):
        x, y = batch(step)
        per_sample = torch.func.vmap(torch.func.grad(loss_fn), in_dims=(None, 0, 0))(params, x, y)
        ctx.rec(f"s{step}.per_sample", per_sample)


@case("aot")
def deepcopy_mid_training(ctx: Ctx) -> None:
    """copy.deepcopy(compiled) after two steps; both trained on with other data and learning rates (a
    teacher / student split), the original evaluated too."""
    base = seeded(BNNet)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
    twin = copy.deepcopy(model)
    twin_base = getattr(twin, "orig_module", twin)
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.3)
    for step in range(2, 5):
        step_(ctx, model, opt, f"a{step}", *batch(step), base=base)
        step_(ctx, twin, opt2, f"b{step}", *batch(40 + step), base=twin_base)
    for m in (model, twin):
        m.eval()
    with torch.no_grad():
        ctx.rec("eval_a", model(batch(81)[0]))
        ctx.rec("eval_b", twin(batch(81)[0]))


@case("aot")
def state_dict_roundtrip(ctx: Ctx) -> None:
    """torch.save(compiled.state_dict()) loaded into a fresh eager model, trained there, and its state dict
    loaded back into the compiled model (strict), which trains on."""
    base = seeded(BNNet)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = BNNet()
    other.load_state_dict(torch.load(buf))
    opt_other = torch.optim.SGD(other.parameters(), lr=0.1)
    step_(ctx, other, opt_other, "other", *batch(5), base=other)
    model.load_state_dict(other.state_dict())
    for step in range(2, 4):
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)


@case("aot", max_traces=4)
def dataloader_epochs(ctx: Ctx) -> None:
    """Two epochs over a shuffled DataLoader whose last batch is smaller (drop_last=False), an eval epoch
    (also with a smaller last batch) between them and after: at most 2 graphs per mode."""
    base = seeded(BNNet)
    model = ctx.wrap(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_dl, eval_dl = loader(22, 8, shuffle=True), loader(13, 5)
    for epoch in range(2):
        model.train()
        for i, (x, y) in enumerate(train_dl):
            step_(ctx, model, opt, f"e{epoch}.{i}", x, y, base=base)
        model.eval()
        with torch.no_grad():
            for i, (x, _) in enumerate(eval_dl):
                ctx.rec(f"e{epoch}.eval{i}", model(x))


class KwNet(BNNet):
    """Takes keyword batches (``model(**batch)``) and computes its loss when given labels."""

    def forward(self, inputs, labels=None):
        logits = super().forward(inputs)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"logits": logits, "loss": loss}


@case("aot", max_traces=4)
def dataloader_dict_batches(ctx: Ctx) -> None:
    """A DataLoader whose collate_fn gives dict batches, called as model(**batch) with labels (the loss in
    forward), a smaller last batch, eval without labels in between: two epochs."""
    g = gen(9)
    rows = [{"inputs": torch.randn(8, generator=g), "labels": int(torch.randint(0, 4, (), generator=g))}
            for _ in range(20)]

    def collate(items, with_labels=True):
        out = {"inputs": torch.stack([r["inputs"] for r in items])}
        if with_labels:
            out["labels"] = torch.tensor([r["labels"] for r in items])
        return out

    train_dl = torch.utils.data.DataLoader(rows, batch_size=6, collate_fn=collate)
    eval_dl = torch.utils.data.DataLoader(rows[:10], batch_size=4, collate_fn=lambda b: collate(b, False))
    base = seeded(KwNet)
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for epoch in range(2):
        model.train()
        for i, b in enumerate(train_dl):
            out = model(**b)
            ctx.rec(f"e{epoch}.{i}.out", out)
            out["loss"].backward()
            ctx.rec_grads(f"e{epoch}.{i}", base)
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            for i, b in enumerate(eval_dl):
                ctx.rec(f"e{epoch}.eval{i}", model(**b))
    ctx.rec_state("final", base)


# ----------------------------------------------------------------------------------------------------
# Real training loops of transformers models (Trainer, checkpointing, in-place compile, eval modes,
# optimizer variants, checkpoints moved between eager and compiled)
# ----------------------------------------------------------------------------------------------------


def tiny_llama_lm() -> nn.Module:
    """A 2-layer LlamaForCausalLM (hidden 32, vocab 64), eager attention, in train mode."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).train()


def tiny_bert_cls() -> nn.Module:
    """A 1-layer BertForSequenceClassification (hidden 32, vocab 64, 2 labels), dropout off."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def lm_batch(step: int, n: int = 2, t: int = 8) -> torch.Tensor:
    return torch.randint(3, 64, (n, t), generator=gen(300 + step))


class TextRows(torch.utils.data.Dataset):
    """Rows of ``input_ids`` / ``attention_mask`` / ``labels`` dicts, built in memory (no datasets library)."""

    def __init__(self, rows: int, seed: int = 0, lm: bool = False) -> None:
        g = gen(seed)
        self.ids = torch.randint(3, 64, (rows, 8), generator=g)
        if lm:  # causal LM labels: the input ids, a random tail of each row masked (-100) as padding would be
            keep = torch.arange(8) < torch.randint(3, 9, (rows, 1), generator=g)
            self.labels = torch.where(keep, self.ids, -100)
        else:
            self.labels = torch.randint(0, 2, (rows,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def _trainer(model, out_dir: str, **kw):
    from transformers import Trainer, TrainingArguments

    settings = {"max_steps": 4, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "use_cpu": True,
                "report_to": [], "logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "seed": 0,
                "disable_tqdm": True, "eval_strategy": "steps", "eval_steps": 2, "gradient_accumulation_steps": 2,
                "lr_scheduler_type": "linear", "warmup_steps": 1, "max_grad_norm": 1.0, **kw}
    args = TrainingArguments(output_dir=out_dir, **settings)
    return Trainer(model=model, args=args, train_dataset=TextRows(24), eval_dataset=TextRows(6, seed=1))


def _rec_trainer(ctx: Ctx, label: str, trainer) -> None:
    for i, entry in enumerate(trainer.state.log_history):
        for key in ("loss", "eval_loss", "grad_norm", "learning_rate"):
            if key in entry:
                ctx.rec(f"{label}.log{i}.{key}", torch.tensor(float(entry[key]), dtype=torch.float64))


def _rec_saved(ctx: Ctx, label: str, directory: str, cls) -> None:
    """The safetensors file's keys and tensors, and the model ``from_pretrained`` gives back from it."""
    from safetensors.torch import load_file

    saved = load_file(os.path.join(directory, "model.safetensors"))
    ctx.rec(f"{label}.keys", sorted(saved))
    ctx.rec(f"{label}.file", dict(sorted(saved.items())))
    ctx.rec_state(f"{label}.reloaded", cls.from_pretrained(directory))


@case("aot", max_traces=12)
def hf_trainer_compiled_model(ctx: Ctx) -> None:
    """transformers Trainer(model=compiled): 4 optimizer steps of 2 accumulated micro-batches, linear schedule
    with warmup, clipping, evaluation every 2 steps, a checkpoint every 2; then predict, save_model, the
    checkpoint and the saved model reloaded with from_pretrained, and training resumed from checkpoint-2 in a
    second Trainer over a fresh compiled model. Graphs: the classifier's first call sets config.problem_type
    (2 train), eval and its smaller last batch (2), the first checkpoint sets config.dtype / architectures (1
    train, 2 eval again), predict's batch of 1 (1); the resumed wrapper 4."""
    from transformers import BertForSequenceClassification

    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_bert_cls()
        trainer = _trainer(ctx.wrap(base), tmp)
        trainer.train()
        _rec_trainer(ctx, "train", trainer)
        ctx.rec("eval", torch.tensor(trainer.evaluate()["eval_loss"], dtype=torch.float64))
        ctx.rec("predict", torch.from_numpy(trainer.predict(TextRows(5, seed=2)).predictions))
        ctx.rec_state("final", base)
        trainer.save_model(os.path.join(tmp, "saved"))
        _rec_saved(ctx, "saved", os.path.join(tmp, "saved"), BertForSequenceClassification)
        _rec_saved(ctx, "ckpt2", os.path.join(tmp, "checkpoint-2"), BertForSequenceClassification)
        resumed_base = tiny_bert_cls()
        resumed = _trainer(ctx.wrap(resumed_base), tmp)
        resumed.train(resume_from_checkpoint=os.path.join(tmp, "checkpoint-2"))
        _rec_trainer(ctx, "resumed", resumed)
        ctx.rec_state("resumed", resumed_base)


def _trainer_causal_lm(ctx: Ctx, **args) -> None:
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_llama_lm()
        trainer = Trainer(model=ctx.wrap(base), args=TrainingArguments(
            output_dir=tmp, max_steps=3, per_device_train_batch_size=4, use_cpu=True, report_to=[], logging_steps=1,
            save_strategy="no", seed=0, disable_tqdm=True, gradient_accumulation_steps=2, **args),
            train_dataset=TextRows(24, lm=True), eval_dataset=TextRows(4, seed=1, lm=True))
        trainer.train()
        _rec_trainer(ctx, "train", trainer)
        ctx.rec("eval", torch.tensor(trainer.evaluate()["eval_loss"], dtype=torch.float64))
        ctx.rec_state("final", base)


@case("aot", max_traces=4)
def hf_trainer_causal_lm(ctx: Ctx) -> None:
    """Trainer over a Llama causal LM (labels: the input ids with a padded tail of -100, so the Trainer passes
    a different ``num_items_in_batch`` tensor to forward at every step), fused AdamW ("adamw_torch_fused"), a
    cosine schedule."""
    _trainer_causal_lm(ctx, optim="adamw_torch_fused", lr_scheduler_type="cosine")


@case("aot", max_traces=4)
def hf_trainer_gradient_checkpointing(ctx: Ctx) -> None:
    """As hf_trainer_causal_lm with TrainingArguments(gradient_checkpointing=True) (transformers' default
    checkpoint settings) and foreach AdamW."""
    _trainer_causal_lm(ctx, optim="adamw_torch", gradient_checkpointing=True)


class _ItemRows(torch.utils.data.Dataset):
    def __init__(self, rows: int, seed: int = 0) -> None:
        self.rows = TextRows(rows, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}


class BagClassifier(nn.Module):
    """A plain nn.Module for the Trainer: embedding bag -> BatchNorm -> linear, a dict with the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 2)

    def forward(self, input_ids, labels=None):
        logits = self.fc(self.bn(self.emb(input_ids).mean(1)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


@case("aot", max_traces=8)
def hf_trainer_custom_module(ctx: Ctx) -> None:
    """Trainer over a plain nn.Module (no PreTrainedModel: saved as a bare state dict), BatchNorm buffers,
    evaluation and a checkpoint every 2 steps, save_model, training resumed from checkpoint-2."""
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        def trainer(model):
            return Trainer(model=model, args=TrainingArguments(
                output_dir=tmp, max_steps=4, per_device_train_batch_size=4, use_cpu=True, report_to=[],
                logging_steps=1, save_strategy="steps", save_steps=2, seed=0, disable_tqdm=True,
                eval_strategy="steps", eval_steps=2), train_dataset=_ItemRows(16), eval_dataset=_ItemRows(6, 1))

        base = seeded(BagClassifier)
        first = trainer(ctx.wrap(base))
        first.train()
        _rec_trainer(ctx, "train", first)
        first.save_model(os.path.join(tmp, "saved"))
        saved = load_file(os.path.join(tmp, "saved", "model.safetensors"))
        ctx.rec("saved", dict(sorted(saved.items())))
        ctx.rec_state("final", base)
        resumed_base = seeded(BagClassifier)
        resumed = trainer(ctx.wrap(resumed_base))
        resumed.train(resume_from_checkpoint=os.path.join(tmp, "checkpoint-2"))
        _rec_trainer(ctx, "resumed", resumed)
        ctx.rec_state("resumed", resumed_base)


@case("aot", max_traces=4)
def hf_trainer_bf16_neftune(ctx: Ctx) -> None:
    """Trainer over a Llama with bf16=True (accelerate's CPU autocast), NEFTune noise (a forward hook the
    Trainer puts on the input embeddings for training and removes after) and label smoothing."""
    _trainer_causal_lm(ctx, bf16=True, neftune_noise_alpha=5.0, label_smoothing_factor=0.1)


@case("aot", max_traces=4)
def hf_trainer_peft_lora(ctx: Ctx) -> None:
    """Trainer over a peft LoRA Llama (q/v adapters) with gradient_checkpointing=True, use_reentrant=True (the
    Trainer then calls enable_input_require_grads()); adapter checkpoints."""
    import peft

    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        base = peft.get_peft_model(tiny_llama_lm(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                    target_modules=["q_proj", "v_proj"]))
        trainer = Trainer(model=ctx.wrap(base), args=TrainingArguments(
            output_dir=tmp, max_steps=3, per_device_train_batch_size=4, use_cpu=True, report_to=[], logging_steps=1,
            save_strategy="steps", save_steps=3, seed=0, disable_tqdm=True, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True}),
            train_dataset=TextRows(16, lm=True), eval_dataset=TextRows(4, seed=1, lm=True))
        trainer.train()
        _rec_trainer(ctx, "train", trainer)
        ctx.rec("eval", torch.tensor(trainer.evaluate()["eval_loss"], dtype=torch.float64))
        ctx.rec("files", sorted(os.listdir(os.path.join(tmp, "checkpoint-3"))))
        ctx.rec_state("final", base)


@case("aot", max_traces=4)
def checkpoint_with_dropout(ctx: Ctx) -> None:
    """Dropout inside torch.utils.checkpoint (non-reentrant) regions: the recomputation in the backward must
    use the forward's masks (eager's checkpoint replays the RNG state)."""
    base = seeded(CkptNet, False)
    for block in base.blocks:
        block.insert(2, nn.Dropout(0.3))
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(3)
    for step in range(3):
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
    model.eval()
    with torch.no_grad():
        ctx.rec("eval", model(batch(9)[0]))


@case("aot")
def fp16_grad_scaler(ctx: Ctx) -> None:
    """fp16 autocast with torch.amp.GradScaler("cpu"): scale, unscale_, clip_grad_norm_, scaler.step (a step
    skipped when the scale is too large), update."""
    base = seeded(MLP)
    model = ctx.wrap(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    for step in range(4):
        x, y = batch(step)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        loss = nn.functional.cross_entropy(out.float(), y)
        ctx.rec(f"s{step}.loss", loss)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        ctx.rec(f"s{step}.norm", torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        ctx.rec(f"s{step}.scale", torch.tensor(scaler.get_scale()))
        ctx.rec_state(f"s{step}.state", base)


@case("aot", max_traces=4)
def frozen_backbone_partial_backward(ctx: Ctx) -> None:
    """The compiled model frozen (requires_grad_(False)) as a feature extractor under an eager head, its last
    layer unfrozen mid-run; then backward(inputs=[one weight]) through it."""
    base = seeded(MLP)
    model = ctx.wrap(base)
    head = seeded(nn.Linear, 4, 3)
    base.requires_grad_(False)
    opt = torch.optim.SGD(list(head.parameters()) + list(base.fc3.parameters()), lr=0.1)
    for step in range(4):
        if step == 2:
            base.fc3.requires_grad_(True)
        x, y = batch(step)
        loss = nn.functional.cross_entropy(head(model(x)), y % 3)
        ctx.rec(f"s{step}.loss", loss)
        loss.backward()
        ctx.rec_grads(f"s{step}", base)
        ctx.rec_grads(f"s{step}.head", head)
        opt.step()
        opt.zero_grad()
    base.requires_grad_(True)
    loss = nn.functional.cross_entropy(model(batch(7)[0]), batch(7)[1])
    loss.backward(inputs=[base.fc1.weight])
    ctx.rec_grads("partial", base)


@case("aot", max_traces=8)
def varying_lengths_eval_toggles(ctx: Ctx) -> None:
    """A Llama trained on sequence lengths that change every step (8, 12, 8, 16, 5, 12, 1), each step followed by
    an evaluation of a shorter prefix under inference_mode or no_grad (automatic dynamic shapes in both modes;
    length 1 gives a NaN loss, in eager too)."""
    base = tiny_llama_lm()
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step, length in enumerate([8, 12, 8, 16, 5, 12, 1]):
        ids = torch.randint(3, 64, (2, length), generator=gen(500 + step))
        model.train()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        ctx.rec(f"s{step}.loss", out.loss)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.inference_mode() if step % 2 else torch.no_grad():
            ctx.rec(f"s{step}.eval", model(input_ids=ids[:1, :max(1, length - 2)], use_cache=False).logits)
    ctx.rec_state("final", base)


def _llama_steps(ctx: Ctx, model, base, opt, label: str, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        ids = lm_batch(step)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        ctx.rec(f"{label}{step}.loss", out.loss)
        out.loss.backward()
        ctx.rec_grads(f"{label}{step}", base)
        opt.step()
        opt.zero_grad()
    ctx.rec_state(f"{label}.state", base)


@case("aot", max_traces=6)
def hf_gradient_checkpointing(ctx: Ctx) -> None:
    """A Llama with gradient_checkpointing_enable() from the start: use_reentrant False for 2 steps, True for 2
    (transformers then makes the embeddings' output require grad), then an eval under no_grad."""
    base = tiny_llama_lm()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _llama_steps(ctx, model, base, opt, "nonre", 2)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    _llama_steps(ctx, model, base, opt, "re", 2, start=2)
    model.eval()
    with torch.no_grad():
        ctx.rec("eval", model(input_ids=lm_batch(9), use_cache=False).logits)


class CkptNet(nn.Module):
    """Two MLP blocks, each under torch.utils.checkpoint (``reentrant`` picks the implementation)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)) for _ in range(2))
        self.out = nn.Linear(16, 4)
        self.reentrant = reentrant

    def forward(self, x):
        h = self.inp(x)  # requires grad: the reentrant checkpoint's parameters get their gradients
        for block in self.blocks:
            h = h + torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.reentrant)
        return self.out(h)


@case("aot", max_traces=4)
def checkpoint_non_reentrant(ctx: Ctx) -> None:
    """torch.utils.checkpoint(use_reentrant=False) around two residual blocks: 3 steps, then eval."""
    base = seeded(CkptNet, False)
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
    model.eval()
    with torch.no_grad():
        ctx.rec("eval", model(batch(9)[0]))


@case("aot", max_traces=4)
def checkpoint_reentrant(ctx: Ctx) -> None:
    """torch.utils.checkpoint(use_reentrant=True) around two residual blocks (their input requires grad):
    3 steps, then eval."""
    base = seeded(CkptNet, True)
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        step_(ctx, model, opt, f"s{step}", *batch(step), base=base)
    model.eval()
    with torch.no_grad():
        ctx.rec("eval", model(batch(9)[0]))


@case(max_traces=4)
def module_compile_in_place(ctx: Ctx) -> None:
    """nn.Module.compile(backend="aotcache") in place (the ``compile`` way; ``eager`` leaves it), a Llama trained
    3 steps; state_dict keys unchanged, save_pretrained / from_pretrained, torch.save of the whole model."""
    import transformers

    base = tiny_llama_lm()
    if ctx.way != "eager":
        base.compile(backend="aotcache", options={"compiler": "nop"})
    opt = torch.optim.AdamW(base.parameters(), lr=1e-3)
    _llama_steps(ctx, base, base, opt, "s", 3)
    ctx.rec("keys", list(base.state_dict()))
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        ctx.rec_state("reloaded", transformers.LlamaForCausalLM.from_pretrained(tmp))
        buf = io.BytesIO()
        torch.save(base, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    loaded.eval()
    with torch.no_grad():
        ctx.rec("loaded_eval", loaded(input_ids=lm_batch(9), use_cache=False).logits)


@case("aot", max_traces=6)
def eval_modes_interleaved(ctx: Ctx) -> None:
    """A Llama trained 4 steps with an evaluation after each: no_grad in train mode (dropout off anyway),
    inference_mode in eval mode, eval()/train() toggled every step; the logits and the loss recorded."""
    base = tiny_llama_lm()
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(4):
        model.train()
        _llama_steps(ctx, model, base, opt, f"t{step}.", 1, start=step)
        ids = lm_batch(50 + step)
        if step % 2 == 0:
            model.eval()
            with torch.inference_mode():
                out = model(input_ids=ids, labels=ids, use_cache=False)
        else:
            with torch.no_grad():
                out = model(input_ids=ids, labels=ids, use_cache=False)
        ctx.rec(f"e{step}.out", (out.loss, out.logits))


@case("aot", max_traces=4)
def accumulation_optimizer_variants(ctx: Ctx) -> None:
    """A BERT classifier: 3 micro-batches per optimizer step, zero_grad(set_to_none=False), clip_grad_norm_,
    a LambdaLR warmup, foreach AdamW for two steps, then the embeddings frozen (requires_grad False) and a fused
    AdamW on the rest, then unfrozen with a new param group."""
    base = tiny_bert_cls()
    model = ctx.wrap(base)

    def epoch(opt, sched, label: str, steps: int) -> None:
        for step in range(steps):
            for micro in range(3):
                g = gen(400 + step * 3 + micro + 10 * len(label))
                ids, y = torch.randint(3, 64, (4, 8), generator=g), torch.randint(0, 2, (4,), generator=g)
                out = model(input_ids=ids, labels=y)
                ctx.rec(f"{label}{step}.{micro}.loss", out.loss)
                (out.loss / 3).backward()
            ctx.rec(f"{label}{step}.norm", torch.nn.utils.clip_grad_norm_(base.parameters(), 0.5))
            ctx.rec_grads(f"{label}{step}", base)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=False)
            ctx.rec_state(f"{label}{step}.state", base)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    epoch(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2)), "a", 2)
    base.bert.embeddings.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=1e-2, fused=True)
    epoch(opt, torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), "b", 2)
    base.bert.embeddings.requires_grad_(True)
    opt.add_param_group({"params": list(base.bert.embeddings.parameters()), "lr": 1e-3})
    epoch(opt, torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), "c", 1)


@case("aot", max_traces=4)
def checkpoints_between_eager_and_compiled(ctx: Ctx) -> None:
    """A Llama trained 2 steps compiled; torch.save(compiled.state_dict()) loaded into a fresh eager model that
    trains a step; its state dict (and an optimizer state dict) loaded back into the compiled model; pickled and
    deep-copied wrappers after compiling, each trained a step."""
    base = tiny_llama_lm()
    model = ctx.wrap(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _llama_steps(ctx, model, base, opt, "a", 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    ctx.rec("keys", list(saved["model"]))
    eager = tiny_llama_lm()
    eager.load_state_dict(saved["model"])
    eager_opt = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    eager_opt.load_state_dict(saved["opt"])
    _llama_steps(ctx, eager, eager, eager_opt, "eager", 1, start=2)
    model.load_state_dict(eager.state_dict())
    opt.load_state_dict(eager_opt.state_dict())
    _llama_steps(ctx, model, base, opt, "b", 1, start=3)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    pickled = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(model)
    for label, other in (("pickled", pickled), ("twin", twin)):
        other_base = getattr(other, "orig_module", other)
        other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
        _llama_steps(ctx, other, other_base, other_opt, label, 1, start=5)
    ctx.rec_state("original", base)


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------


def run_one(name: str, way: str) -> dict:
    """Run case ``name`` the ``way``; the records, or the error, with routes, trace and fallback counts."""
    from aotcache.aot.fallback import fallback_counts

    from aotcache.autograd_cache.cache import default_cache

    fn = CASES[name][0]
    ctx = Ctx(way)
    before_fb = sum(fallback_counts().values())
    stats_before = default_cache().stats()
    torch.manual_seed(0)
    start = time.perf_counter()
    error = None
    try:
        fn(ctx)
    except Exception as exc:  # noqa: BLE001 - a case's failure is a result
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if os.environ.get("BATTERY_TRACEBACK"):
            traceback.print_exc()
    stats = default_cache().stats()
    return {"records": ctx.records, "error": error, "traces": ctx.traces(), "routes": ctx.routes(),
            "fallbacks": sum(fallback_counts().values()) - before_fb, "seconds": time.perf_counter() - start,
            "hits": stats["hit"] - stats_before["hit"], "compiles": stats["compile"] - stats_before["compile"]}


def _in_subprocess(way: str, names: list[str], cache_dir: str) -> dict:
    """Run ``names`` the ``way`` in a fresh process on this cache dir; its results."""
    path = os.path.join(cache_dir, f"{way}_results.pt")
    env = {**os.environ, "AOTCACHE_CACHE_DIR": cache_dir,
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--only", ",".join(names),
                           "--worker", way, path], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the {way} worker failed")
    return torch.load(path, weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--ways", default="eager,compile,aot")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "loop_utilities.json"))
    parser.add_argument("--worker", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    os.environ.setdefault("AOTCACHE_PROGRESS", "0")
    os.environ.setdefault("AOTCACHE_TIERS", "memory,disk")
    if args.worker:
        way, path = args.worker
        warnings.simplefilter("ignore")
        torch.save({name: run_one(name, way) for name in names}, path)
        return
    os.environ.setdefault("AOTCACHE_CACHE_DIR", tempfile.mkdtemp(prefix="loop_utilities_"))
    ways = [w for w in args.ways.split(",") if w and w != "eager"]
    warm: dict[str, dict] = {}
    if "warm" in ways:  # a cold process fills a cache dir of its own, a second fresh process starts warm on it
        warm_dir = tempfile.mkdtemp(prefix="loop_utilities_warm_")
        _in_subprocess("compile", names, warm_dir)
        warm = _in_subprocess("warm", names, warm_dir)
    table: dict[str, dict] = {}
    for name in names:
        ref = run_one(name, "eager")
        row = table[name] = {"eager": {"error": ref["error"], "records": len(ref["records"])}}
        for way in ways:
            if way not in ("compile", "warm") and way not in CASES[name][1]:
                continue
            got = warm[name] if way == "warm" else run_one(name, way)
            if got["error"] or ref["error"]:
                ok = got["error"] == ref["error"]
                exact, problem = ok, got["error"] or ""
                if ref["error"] and not ok:
                    problem = f"eager raised {ref['error']}; {way}: {got['error']}"
            else:
                try:
                    ok, exact, problem = compare(ref["records"], got["records"])
                except Exception as exc:  # noqa: BLE001 - e.g. a FakeTensor recorded (it has no data)
                    ok, exact, problem = False, False, f"comparison raised {type(exc).__name__}: {exc}"[:300]
            limit = MAX_TRACES.get(name)
            if ok and limit is not None and got["traces"] > limit:
                ok, problem = False, f"perf cliff: {got['traces']} traces, at most {limit} expected"
            row[way] = {"ok": ok, "exact": exact, "problem": problem, "traces": got["traces"],
                        "routes": got["routes"], "fallbacks": got["fallbacks"], "seconds": round(got["seconds"], 2),
                        "hits": got["hits"], "compiles": got["compiles"]}
        print_row(name, row, ways)
    print_problems(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "cases": table}, f, indent=1, sort_keys=True)
    print(f"wrote {args.out}")
    if any(not cell.get("ok", True) or (w == "eager" and cell["error"]) for row in table.values()
           for w, cell in row.items()):
        sys.exit(1)


_printed_header = []


def print_row(name: str, row: dict, ways: list[str]) -> None:
    if not _printed_header:
        header = f"{'case':<32}" + "".join(f"{w:>30}" for w in ways)
        print(header)
        print("-" * len(header))
        _printed_header.append(True)
    cells = []
    for w in ways:
        cell = row.get(w)
        if cell is None:
            cells.append(f"{'-':>30}")
            continue
        mark = ("exact" if cell["exact"] else "close") if cell["ok"] else "FAIL"
        if cell["problem"].startswith("perf cliff"):
            mark = "CLIFF"
        if row["eager"]["error"]:
            mark = "EAGER-ERR"
        extra = "/".join(r for r in cell["routes"]) + f" t{cell['traces']}"
        extra += f" f{cell['fallbacks']}" if cell["fallbacks"] else ""
        extra += f" h{cell['hits']} c{cell['compiles']}" if w == "warm" else ""
        cells.append(f"{mark + ' ' + extra:>30}")
    print(f"{name:<32}" + "".join(cells), flush=True)


def print_problems(table: dict) -> None:
    for name, row in table.items():
        if row["eager"]["error"]:
            print(f"  {name} [eager]: {row['eager']['error']}")
        for w, cell in row.items():
            if w != "eager" and not cell.get("ok", True):
                print(f"  {name} [{w}]: {cell['problem']}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
