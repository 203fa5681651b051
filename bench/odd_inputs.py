"""Adversarial battery: ordinary forwards called with unusual arguments or in unusual autograd / call contexts.

The other axis of ``bench/odd_forwards.py`` (which varies the forward body): here the forwards are plain and the
*calls* are odd (zero-size then nonzero inputs, int / bool / uint8 inputs, channels_last, a storage offset, one
tensor twice, views of one base, non-leaf inputs, hooks on inputs, ``retain_grad`` on outputs, nested containers
with None, ``*args`` of varying length; inference_mode / no_grad / grad alternating, anomaly detection,
saved-tensor hooks, ``save_on_cpu``, forward-mode AD, ``torch.func`` transforms over the compiled callable,
``create_graph``, ``retain_graph``, odd ``backward(gradient=...)``, threads, nesting, recursion, deepcopy, pickle).

Each scenario is a function ``scenario(wrap) -> dict`` that builds its model / function under a fixed seed, wraps
it with ``wrap`` (eager: the identity; else one entry point with the nop compiler), makes its (usually three)
calls in its context and returns what a user could observe (outputs, gradients, inputs after the call, raised
exception types). Eager's dict and each route's are compared with ``odd_forwards``' snapshot and compare
helpers. Writes ``bench/results/odd_inputs.json`` and prints a table::

    python bench/odd_inputs.py                    # all scenarios, all routes
    python bench/odd_inputs.py --cases hook --routes aot -v
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import json
import logging
import os
import pickle
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import odd_forwards as of  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "odd_inputs.json"
ROUTES = of.ROUTES
SCENARIOS: dict[str, tuple[str, Callable[[Callable], dict]]] = {}


def scenario(name: str, group: str) -> Callable:
    def register(fn: Callable) -> Callable:
        SCENARIOS[name] = (group, fn)
        return fn
    return register


def rand(*shape: int, seed: int = 0, grad: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return of.rand(*shape, seed=seed, grad=grad, dtype=dtype)


def attempt(fn: Callable[[], Any]) -> Any:
    """fn()'s value, or ('raised', exception type name) where it raises."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the type is compared with eager's
        return ("raised", type(exc).__name__)


def graphs() -> int:
    return of._GRAPHS[0]


class Lin(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * 2


def fn_basic(x, y):
    return (x * y).sin() + y.cos()


def fn_one(x):
    return x.sin() * 2 + x


def grads_of(*ts: torch.Tensor) -> list:
    return [None if t.grad is None else t.grad.clone() for t in ts]


def weighted(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()


# ---- inputs ----------------------------------------------------------------------------------------------

@scenario("zero_size_then_nonzero", "inputs")
def _(wrap):
    f = wrap(fn_one)
    rec = {}
    for i, n in enumerate((0, 3, 0, 5)):
        x = rand(n, 4, seed=i, grad=True)
        out = f(x)
        weighted(out).backward() if n else out.sum().backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


@scenario("zero_dim_inputs", "inputs")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        x, y = rand(seed=i, grad=True), rand(seed=i + 9, grad=True)
        out = f(x, y)
        out.backward()
        rec[f"c{i}"] = (out, x.grad, y.grad)
    return rec


def fn_int_types(x, b, i8, u8, i64):
    return x * b + i8 * 0.5 + u8.float() / 255 + i64, (u8 + 1), b.logical_not(), (i8 * 3)


@scenario("bool_int8_uint8_int64", "inputs")
def _(wrap):
    f = wrap(fn_int_types)
    rec = {}
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        x = rand(3, 4, seed=i, grad=True)
        b = torch.rand(3, 4, generator=g) > 0.5
        i8 = torch.randint(-128, 127, (3, 4), generator=g, dtype=torch.int8)
        u8 = torch.randint(250, 256, (3, 4), generator=g, dtype=torch.uint8)  # u8 + 1 wraps
        i64 = torch.randint(-5, 5, (4,), generator=g)
        out = f(x, b, i8, u8, i64)
        weighted(out[0]).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


def fn_mixed_dtypes(a, b, c):
    return a + b, b * c, (a.float() + c.float()).sum()


@scenario("mixed_dtype_promotion", "inputs")
def _(wrap):
    f = wrap(fn_mixed_dtypes)
    rec = {}
    for i, dt in enumerate((torch.float16, torch.bfloat16, torch.float64)):
        a = rand(3, 4, seed=i, grad=True, dtype=dt)
        b = rand(3, 4, seed=i + 1, grad=True)
        c = torch.arange(12).view(3, 4)
        out = f(a, b, c)
        (weighted(out[0].float()) + weighted(out[1])).backward()
        rec[f"c{i}"] = (out, a.grad, b.grad)
    return rec


@scenario("channels_last_conv", "inputs")
def _(wrap):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(2, 3, 5, 5, seed=i).contiguous(memory_format=torch.channels_last if i != 1 else
                                                torch.contiguous_format).requires_grad_()
        out = f(x)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad, out.is_contiguous(memory_format=torch.channels_last), out.stride(),
                        x.grad.stride())
    rec["w"] = m[0].weight.grad
    return rec


@scenario("storage_offset", "inputs")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        base = rand(40, seed=i, grad=True)
        x = base[3 + i:15 + i].view(3, 4)
        y = base[20:32].view(3, 4)
        out = f(x, y)
        weighted(out).backward()
        rec[f"c{i}"] = (out, base.grad, out.storage_offset())
    return rec


@scenario("same_tensor_twice", "inputs")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        y = rand(3, 4, seed=i + 5, grad=True)
        out = f(x, x) if i != 1 else f(x, y)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


@scenario("overlapping_views_of_one_base", "inputs")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        base = rand(5, 4, seed=i, grad=True)
        b = base * 1
        x, y = (b[0:3], b[2:5]) if i != 1 else (b[0:3], rand(3, 4, seed=99))
        out = f(x, y)
        weighted(out).backward()
        rec[f"c{i}"] = (out, base.grad)
    return rec


@scenario("disjoint_views_of_leaf", "inputs")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        base = rand(6, 4, seed=i, grad=True)
        out = f(base[:3], base[3:])
        weighted(out).backward()
        rec[f"c{i}"] = (out, base.grad)
    return rec


class UsesView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w + x.sum()


@scenario("input_is_view_of_parameter", "inputs")
def _(wrap):
    torch.manual_seed(0)
    m = UsesView()
    f = wrap(m)
    rec = {}
    for i in range(3):
        m.w.grad = None
        out = f(m.w[i:i + 2])
        weighted(out).backward()
        rec[f"c{i}"] = (out, m.w.grad)
    return rec


@scenario("non_leaf_inputs", "inputs")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        leaf = rand(3, 4, seed=i, grad=True)
        x = leaf.exp() * 0.5
        out = f(x)
        weighted(out).backward()
        rec[f"c{i}"] = (out, leaf.grad, x.grad_fn is not None, out.grad_fn is not None)
    rec["p"] = [p.grad for p in m.parameters()]
    return rec


@scenario("high_rank", "inputs")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        x = rand(1, 2, 1, 2, 1, 2, 1, 2, 1, 3, seed=i, grad=True)
        y = rand(2, 1, 2, 1, 1, 2, 1, 1, 3, seed=i + 1)
        out = f(x, y)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


def fn_mut(x, y):
    x.mul_(2)
    return x + y


@scenario("from_numpy_shared_mutated", "inputs")
def _(wrap):
    f = wrap(fn_mut)
    rec = {}
    for i in range(3):
        arr = np.arange(12, dtype=np.float32).reshape(3, 4) + i
        x = torch.from_numpy(arr)
        out = f(x, rand(3, 4, seed=i))
        rec[f"c{i}"] = (out, torch.from_numpy(arr.copy()), x)
    return rec


@scenario("frombuffer_input", "inputs")
def _(wrap):
    f = wrap(fn_mut)
    rec = {}
    for i in range(3):
        buf = bytearray(np.arange(12, dtype=np.float32).tobytes())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = torch.frombuffer(buf, dtype=torch.float32).view(3, 4)
        out = f(x, rand(3, 4, seed=i))
        rec[f"c{i}"] = (out, torch.frombuffer(bytes(buf), dtype=torch.float32).clone())
    return rec


@scenario("inference_tensor_into_training_call", "inputs")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        with torch.inference_mode():
            x = rand(3, 4, seed=i)
        out = attempt(lambda: f(x))
        if isinstance(out, torch.Tensor):
            rec[f"b{i}"] = attempt(lambda: weighted(out).backward())
        rec[f"c{i}"] = (out, [p.grad for p in m.parameters()])
    return rec


@scenario("hook_on_input", "inputs")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        y = rand(3, 4, seed=i + 1, grad=True)
        seen = []
        x.register_hook(lambda g: (seen.append(g.clone()), g * 3)[1])
        out = f(x, y)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad, y.grad, seen)
    return rec


@scenario("retain_grad_on_output", "inputs")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        out = f(x)
        out.retain_grad()
        (weighted(out) * 2).backward()
        rec[f"c{i}"] = (out, out.grad, x.grad)
    return rec


def fn_nested(batch):
    out = batch["a"][0][0] * 2
    for pair in batch["a"][1:]:
        if pair[1] is not None:
            out = out + pair[1]
    return {"out": out, "extra": [None, (out.sum(), None)]}


@scenario("nested_containers_with_none", "inputs")
def _(wrap):
    f = wrap(fn_nested)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        batch = {"a": [(x, None), (None, rand(3, 4, seed=i + 1)), (None, None if i == 1 else rand(3, 4, seed=3))],
                 "b": None}
        out = f(batch)
        weighted(out["out"]).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


def fn_defaults(x, y=None, *, scale=2.0, shift=None):
    out = x * scale
    if y is not None:
        out = out + y
    if shift is not None:
        out = out - shift
    return out


@scenario("kwargs_only_and_defaults", "inputs")
def _(wrap):
    f = wrap(fn_defaults)
    rec = {}
    x = rand(3, 4, seed=1, grad=True)
    y = rand(3, 4, seed=2)
    calls = [lambda: f(x), lambda: f(x=x), lambda: f(x, y), lambda: f(x, y=y, scale=3.0),
             lambda: f(x=x, shift=y), lambda: f(x), lambda: f(x, None, scale=2.0)]
    for i, c in enumerate(calls):
        rec[f"c{i}"] = attempt(c)
    return rec


def fn_star(*xs):
    out = xs[0]
    for t in xs[1:]:
        out = out * t
    return out, len(xs)


@scenario("star_args_varying_length", "inputs")
def _(wrap):
    f = wrap(fn_star)
    rec = {}
    for i, n in enumerate((1, 3, 2, 3, 1)):
        xs = [rand(3, seed=i * 10 + k, grad=True) for k in range(n)]
        out, k = f(*xs)
        weighted(out).backward()
        rec[f"c{i}"] = (out, k, [t.grad for t in xs])
    return rec


@scenario("input_and_target_windows", "inputs")
def _(wrap):
    f = wrap(lambda x, y: ((x.sin() * y).sum(), x.view(-1)[:2] * 1))
    data = rand(200, seed=3, grad=True)
    rec = {}
    for i in range(10):
        out = f(data[i:i + 12].view(3, 4), data[i + 1:i + 13].view(3, 4))
        out[0].backward()
        rec[f"c{i}"] = out
    rec["grad"] = data.grad
    return rec


# ---- contexts --------------------------------------------------------------------------------------------

@scenario("grad_modes_alternating", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    modes = [torch.enable_grad, torch.no_grad, torch.inference_mode, torch.enable_grad, torch.inference_mode,
             torch.no_grad, torch.enable_grad]
    for i, mode in enumerate(modes):
        x = rand(3, 4, seed=i, grad=True)
        with mode():
            out = f(x)
        rec[f"c{i}"] = (out, out.requires_grad, out.is_inference(), out.grad_fn is not None)
        if out.requires_grad:
            weighted(out).backward()
            rec[f"g{i}"] = x.grad
    return rec


class EnableGradInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        with torch.enable_grad():
            return self.lin(x).relu()


@scenario("enable_grad_inside_under_no_grad", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = EnableGradInside()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i)
        ctx = torch.no_grad() if i != 1 else torch.enable_grad()
        with ctx:
            out = f(x)
        rec[f"c{i}"] = (out, out.requires_grad)
        if out.requires_grad:
            weighted(out).backward()
            rec[f"g{i}"] = [p.grad.clone() for p in m.parameters()]
    return rec


@scenario("detect_anomaly", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.set_detect_anomaly(i != 1):
                out = f(x)
                weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


@scenario("detect_anomaly_nan_backward", "contexts")
def _(wrap):
    f = wrap(lambda x: x.sqrt().sum())
    rec = {}
    for i in range(3):
        x = torch.tensor([1.0, 4.0, 0.0 if i != 1 else 9.0], requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.set_detect_anomaly(True):
                out = f(x)
                rec[f"c{i}"] = (out, attempt(lambda: out.backward()))
    return rec


@scenario("saved_tensors_hooks", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        packed = [0]

        def pack(t):
            packed[0] += 1
            return t.clone()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = f(x)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad, packed[0] > 0)
    return rec


@scenario("save_on_cpu", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        with torch.autograd.graph.save_on_cpu(pin_memory=False):
            out = f(x)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad, [p.grad.clone() for p in m.parameters()])
    return rec


@scenario("forward_ad_dual_input", "contexts")
def _(wrap):
    import torch.autograd.forward_ad as fwAD

    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        x, y, t = rand(3, 4, seed=i), rand(3, 4, seed=i + 1), rand(3, 4, seed=i + 2)
        with fwAD.dual_level():
            def run():
                out = f(fwAD.make_dual(x, t), y)
                p, tan = fwAD.unpack_dual(out)
                return p.clone(), None if tan is None else tan.clone()
            rec[f"c{i}"] = attempt(run)
    return rec


@scenario("func_jvp_over_compiled", "contexts")
def _(wrap):
    f = wrap(fn_one)
    return {f"c{i}": attempt(lambda: torch.func.jvp(f, (rand(3, 4, seed=i),), (rand(3, 4, seed=i + 1),)))
            for i in range(3)}


@scenario("func_vjp_over_compiled", "contexts")
def _(wrap):
    f = wrap(fn_one)

    def run(i):
        out, vjp = torch.func.vjp(f, rand(3, 4, seed=i))
        return out, vjp(rand(3, 4, seed=i + 1))
    return {f"c{i}": attempt(lambda: run(i)) for i in range(3)}


@scenario("func_grad_over_compiled", "contexts")
def _(wrap):
    f = wrap(lambda x: fn_one(x).sum())
    return {f"c{i}": attempt(lambda: torch.func.grad(f)(rand(3, 4, seed=i))) for i in range(3)}


@scenario("func_vmap_over_compiled", "contexts")
def _(wrap):
    f = wrap(fn_basic)
    rec = {f"c{i}": attempt(lambda: torch.func.vmap(f, in_dims=(0, None))(rand(5, 3, 4, seed=i),
                                                                          rand(3, 4, seed=i + 1)))
           for i in range(3)}
    for i in range(2):  # plain calls after: captured (graphs counted), not sent to Dynamo by the vmap calls
        x = rand(3, 4, seed=i, grad=True)
        out = f(x, rand(3, 4, seed=i + 1))
        weighted(out).backward()
        rec[f"plain{i}"] = (out, x.grad)
    return rec


@scenario("create_graph_then_use_grads", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        out = f(x)
        (gx,) = torch.autograd.grad(weighted(out), x, create_graph=True)
        penalty = (gx ** 2).sum()
        penalty.backward()
        rec[f"c{i}"] = (out, gx, x.grad, [p.grad.clone() for p in m.parameters()])
    return rec


@scenario("backward_retain_graph_twice", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        out = f(x)
        loss = weighted(out)
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=i == 0)
        rec[f"c{i}"] = (out, x.grad, attempt(lambda: loss.backward()))
    return rec


@scenario("backward_with_odd_gradient", "contexts")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        y = rand(3, 4, seed=i + 1, grad=True)
        out = f(x, y)
        grad = rand(4, 3, seed=i + 2).t() if i != 1 else rand(4, seed=i + 2).expand(3, 4)
        out.backward(gradient=grad)
        rec[f"c{i}"] = (out, x.grad, y.grad)
    return rec


def fn_two_outs(x, y):
    return x.sin() * y, (x * y).exp().sum(), y.cos()


@scenario("backward_on_one_of_several_outputs", "contexts")
def _(wrap):
    f = wrap(fn_two_outs)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        y = rand(3, 4, seed=i + 1, grad=True)
        outs = f(x, y)
        weighted(outs[i]).backward()
        rec[f"c{i}"] = (outs, x.grad, y.grad)
    return rec


def fn_view_out(x):
    return x.view(12), x * 2


@scenario("output_used_after_input_mutated", "contexts")
def _(wrap):
    f = wrap(fn_view_out)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i)
        v, d = f(x)
        x.add_(1)
        rec[f"c{i}"] = (v, d, v._version == x._version)
    return rec


def fn_saves(x):
    return (x * x).sum()


@scenario("backward_after_saved_input_mutated", "contexts")
def _(wrap):
    f = wrap(fn_saves)
    rec = {}
    for i in range(3):
        leaf = rand(3, 4, seed=i, grad=True)
        x = leaf * 1
        out = f(x)
        if i != 1:
            with torch.no_grad():
                x.add_(1)
        rec[f"c{i}"] = (out, attempt(lambda: out.backward()), leaf.grad)
    return rec


@scenario("deterministic_algorithms", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for i in range(3):
            torch.use_deterministic_algorithms(i != 1)
            x = rand(3, 4, seed=i, grad=True)
            out = f(x)
            weighted(out).backward()
            rec[f"c{i}"] = (out, x.grad)
    finally:
        torch.use_deterministic_algorithms(before)
    return rec


@scenario("threads_different_shapes", "contexts")
def _(wrap):
    f = wrap(fn_one)
    results: dict[str, Any] = {}

    def work(k):
        for j in range(3):
            x = rand(k + 1, 4, seed=k * 10 + j, grad=True)
            out = f(x)
            weighted(out).backward()
            results[f"t{k}c{j}"] = (out.detach().clone(), x.grad.clone())

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(sorted(results.items()))


@scenario("nested_wrappers", "contexts")
def _(wrap):
    inner = wrap(fn_one)

    def outer_fn(x, y):
        return inner(x) * y + 1

    f = wrap(outer_fn)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        y = rand(3, 4, seed=i + 1, grad=True)
        out = f(x, y)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad, y.grad)
    return rec


@scenario("recursion_through_wrapper", "contexts")
def _(wrap):
    box: dict[str, Any] = {}

    def rec_fn(x, n):
        if n == 0:
            return x.sin()
        return box["f"](x * 2, n - 1) + 1

    box["f"] = wrap(rec_fn)
    rec = {}
    for i, n in enumerate((2, 2, 3)):
        x = rand(3, seed=i, grad=True)
        out = attempt(lambda: box["f"](x, n))
        if isinstance(out, torch.Tensor):
            weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


@scenario("deepcopy_of_wrapped_module", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    x = rand(3, 4, seed=0, grad=True)
    rec["first"] = f(x)
    g = attempt(lambda: copy.deepcopy(f))
    if isinstance(g, tuple):
        return {**rec, "copy": g}
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1)
    for i in range(3):
        rec[f"c{i}"] = (f(rand(3, 4, seed=i)), g(rand(3, 4, seed=i)))
    return rec


def fn_picklable(x):
    return x.sin() * 2


@scenario("pickle_wrapped_module", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    x = rand(3, 4, seed=0)
    rec = {"first": f(x)}
    data = attempt(lambda: pickle.dumps(f))
    if isinstance(data, tuple):
        return {**rec, "pickle": data}
    g = pickle.loads(data)
    rec.update({f"c{i}": g(rand(3, 4, seed=i)) for i in range(3)})
    return rec


# ---- layouts, views and autograd metadata of what comes back ----------------------------------------------

def fn_elementwise(x):
    return x * 2 + 1, x.t() * 3, x.sum(0)


@scenario("output_strides_follow_input_layout", "layouts")
def _(wrap):
    f = wrap(fn_elementwise)
    rec = {}
    for i in range(4):
        base = rand(4, 6, seed=i, grad=True)
        x = (base.t(), base[:, ::2], base, rand(4, 1, seed=i).expand(4, 6).requires_grad_())[i]
        out = f(x)
        weighted(out[0]).backward()
        rec[f"c{i}"] = (out, base.grad)
    return rec


def fn_return_views(x):
    return x[0], x.view(-1), x.transpose(0, 1), x.unsqueeze(0)


@scenario("view_outputs_then_inplace", "layouts")
def _(wrap):
    f = wrap(fn_return_views)
    rec = {}
    for i in range(3):
        leaf = rand(3, 4, seed=i, grad=True)
        x = leaf * 1
        outs = f(x)
        r = attempt(lambda: outs[i].mul_(2))
        loss = attempt(lambda: weighted(x).backward())
        rec[f"c{i}"] = (outs, x, r, loss, leaf.grad, [o._base is x for o in outs])
    return rec


@scenario("conj_and_neg_bit_inputs", "layouts")
def _(wrap):
    f = wrap(lambda z, w: (z * 2 + w, z.abs()))
    rec = {}
    for i in range(3):
        z = rand(3, 4, seed=i, dtype=torch.complex64)
        w = rand(3, 4, seed=i + 1, dtype=torch.complex64)
        z = z.conj() if i != 1 else z
        w = torch._neg_view(w) if i != 2 else w
        rec[f"c{i}"] = attempt(lambda: f(z, w))
    return rec


@scenario("conj_input_mutated", "layouts")
def _(wrap):
    def fn(z):
        z.mul_(2)
        return z + 1
    f = wrap(fn)
    rec = {}
    for i in range(3):
        base = rand(3, 4, seed=i, dtype=torch.complex64)
        z = base.conj() if i != 1 else base
        out = attempt(lambda: f(z))
        rec[f"c{i}"] = (out, base, z)
    return rec


@scenario("meta_device_inputs", "layouts")
def _(wrap):
    torch.manual_seed(0)
    f = wrap(fn_basic)
    rec = {}
    for i, n in enumerate((3, 3, 5)):
        x = torch.empty(n, 4, device="meta", requires_grad=True)
        out = attempt(lambda: f(x, torch.empty(n, 4, device="meta")))
        rec[f"c{i}"] = out if isinstance(out, tuple) else (tuple(out.shape), out.device.type, out.requires_grad)
    return rec


@scenario("size_one_then_larger", "layouts")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i, n in enumerate((1, 3, 1, 5, 2, 1)):
        x = rand(n, 4, seed=i, grad=True)
        y = rand(1, 4, seed=i + 1) if i % 2 else rand(n, 4, seed=i + 1)
        out = f(x, y)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


@scenario("requires_grad_flips_between_calls", "layouts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i, (xg, wg) in enumerate(((True, True), (False, True), (True, False), (False, False), (True, True))):
        m.lin.weight.requires_grad_(wg)
        m.lin.weight.grad = None
        x = rand(3, 4, seed=i, grad=xg)
        out = f(x)
        if out.requires_grad:
            weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad, m.lin.weight.grad, m.lin.bias.grad)
    return rec


@scenario("dtype_changes_between_calls", "layouts")
def _(wrap):
    f = wrap(fn_one)
    rec = {}
    for i, dt in enumerate((torch.float32, torch.float64, torch.int64, torch.float16, torch.float32)):
        x = rand(3, 4, seed=i, dtype=dt)
        rec[f"c{i}"] = attempt(lambda: f(x))
    return rec


@scenario("leaf_requiring_grad_mutated", "layouts")
def _(wrap):
    def fn(x):
        x.add_(1)
        return x * 2
    f = wrap(fn)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=i != 1)
        rec[f"c{i}"] = (attempt(lambda: f(x)), x)
    return rec


@scenario("expanded_input_mutated", "layouts")
def _(wrap):
    def fn(x):
        x.add_(1)
        return x * 2
    f = wrap(fn)
    rec = {}
    for i in range(3):
        base = rand(1, 4, seed=i)
        x = base.expand(3, 4) if i != 1 else base.clone().expand(3, 4).contiguous()
        rec[f"c{i}"] = (attempt(lambda: f(x)), base)
    return rec


@scenario("detached_alias_mutated_in_forward", "layouts")
def _(wrap):
    def fn(x, xd):
        y = x * 2
        xd.add_(1)
        return y + x
    f = wrap(fn)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        out = attempt(lambda: f(x, x.detach()))
        b = attempt(lambda: weighted(out).backward()) if isinstance(out, torch.Tensor) else None
        rec[f"c{i}"] = (out, x.detach().clone(), b, x.grad)
    return rec


# ---- module hooks registered between calls ----------------------------------------------------------------

@scenario("forward_hooks_added_after_first_call", "hooks")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    handles = []
    seen = []
    for i in range(4):
        if i == 1:
            handles.append(m.register_forward_pre_hook(lambda mod, args: (args[0] * 10,)))
            handles.append(m.register_forward_hook(lambda mod, args, out: (seen.append(1), out + 1)[1]))
        if i == 3:
            for h in handles:
                h.remove()
        x = rand(3, 4, seed=i, grad=True)
        out = f(x)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad, len(seen))
    return rec


@scenario("submodule_hook_added_after_first_call", "hooks")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        if i == 1:
            h = m.lin.register_forward_hook(lambda mod, args, out: out * 0 + 5)
        if i == 2:
            h.remove()
        x = rand(3, 4, seed=i, grad=True)
        out = f(x)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


@scenario("full_backward_hook", "hooks")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    seen = []
    m.register_full_backward_hook(lambda mod, gin, gout: (seen.append(gout[0].clone()), (gin[0] * 2,))[1])
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        out = f(x)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad, len(seen))
    rec["seen"] = seen
    return rec


@scenario("hook_on_output", "hooks")
def _(wrap):
    f = wrap(fn_two_outs)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        y = rand(3, 4, seed=i + 1, grad=True)
        outs = f(x, y)
        outs[0].register_hook(lambda g: g * 0)
        (weighted(outs[0]) + outs[1]).backward()
        rec[f"c{i}"] = (outs, x.grad, y.grad)
    return rec


@scenario("multi_grad_hook_on_inputs", "hooks")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        y = rand(3, 4, seed=i + 1, grad=True)
        got = []
        torch.autograd.graph.register_multi_grad_hook((x, y), lambda gs: got.append([g is not None for g in gs]))
        weighted(f(x, y)).backward()
        rec[f"c{i}"] = (x.grad, y.grad, got)
    return rec


@scenario("grad_accumulates_across_calls", "hooks")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    x = rand(3, 4, seed=0, grad=True)
    rec = {}
    for i in range(3):
        weighted(f(x)).backward()
        rec[f"c{i}"] = (x.grad.clone(), m.lin.weight.grad.clone())
    return rec


# ---- calls from autograd utilities and module-level APIs ---------------------------------------------------

@scenario("parameter_hooks_fire", "hooks")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    seen = []
    m.lin.weight.register_hook(lambda g: (seen.append("w"), g * 2)[1])
    m.lin.bias.register_post_accumulate_grad_hook(lambda p: seen.append("b-acc"))
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        weighted(f(x)).backward()
        # the order of hooks on different leaves is the engine's (a compiled backward is one node): counts compared
        rec[f"c{i}"] = (x.grad, m.lin.weight.grad.clone(), sorted(seen))
    return rec


@scenario("retain_grad_on_non_leaf_input", "hooks")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        leaf = rand(3, 4, seed=i, grad=True)
        x = leaf * 2
        x.retain_grad()
        weighted(f(x, rand(3, 4, seed=i + 1))).backward()
        rec[f"c{i}"] = (x.grad, leaf.grad)
    return rec


@scenario("chained_calls_output_as_input", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        h = f(x)
        out = f(h)
        (gh,) = torch.autograd.grad(weighted(out), h, retain_graph=True)
        weighted(out).backward()
        rec[f"c{i}"] = (out, gh, x.grad)
    return rec


@scenario("grads_batched", "contexts")
def _(wrap):
    f = wrap(fn_one)
    rec = {}
    for i in range(3):
        x = rand(4, seed=i, grad=True)
        out = f(x)
        rec[f"c{i}"] = attempt(lambda: torch.autograd.grad(out, x, grad_outputs=torch.eye(4), is_grads_batched=True))
    return rec


@scenario("autograd_functional_jacobian", "contexts")
def _(wrap):
    f = wrap(fn_one)
    rec = {}
    for i in range(2):
        x = rand(4, seed=i)
        rec[f"c{i}"] = attempt(lambda: torch.autograd.functional.jacobian(f, x))
        rec[f"v{i}"] = attempt(lambda: torch.autograd.functional.jacobian(f, x, vectorize=True))
        rec[f"h{i}"] = attempt(lambda: torch.autograd.functional.hessian(lambda t: f(t).sum(), x))
    return rec


@scenario("checkpoint_around_call", "contexts")
def _(wrap):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(4):
        x = rand(3, 4, seed=i, grad=True)
        out = attempt(lambda: checkpoint(f, x, use_reentrant=i % 2 == 1))
        if isinstance(out, torch.Tensor):
            rec[f"b{i}"] = attempt(lambda: weighted(out).backward())
        rec[f"c{i}"] = (out, x.grad, [None if p.grad is None else p.grad.clone() for p in m.parameters()])
    return rec


@scenario("functional_call_on_wrapper", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        params = {k: (v.detach() + i).requires_grad_() for k, v in m.named_parameters()}
        x = rand(3, 4, seed=i)
        out = attempt(lambda: torch.func.functional_call(f, params, (x,)))
        if isinstance(out, torch.Tensor):
            weighted(out).backward()
        rec[f"c{i}"] = (out, [params[k].grad for k in sorted(params)], f(x))
    return rec


@scenario("autocast_around_call", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(4):
        x = rand(3, 4, seed=i, grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=i % 2 == 0):
            out = f(x)
        weighted(out.float()).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


@scenario("autograd_backward_several_with_none", "contexts")
def _(wrap):
    f = wrap(fn_two_outs)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        y = rand(3, 4, seed=i + 1, grad=True)
        a, b, c = f(x, y)
        torch.autograd.backward([a, b, c], [rand(3, 4, seed=7), None, rand(3, 4, seed=8)])
        rec[f"c{i}"] = (x.grad, y.grad)
    return rec


@scenario("compiled_called_in_backward_hook", "contexts")
def _(wrap):
    f = wrap(fn_one)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        x.register_hook(lambda g: f(g))
        y = (x * 3).sin()
        weighted(y).backward()
        rec[f"c{i}"] = x.grad
    return rec


def fn_makes_tensors(x):
    return x + torch.ones(x.shape[-1]), torch.arange(3) * 0.5, torch.tensor(1.5)


@scenario("default_dtype_changes", "contexts")
def _(wrap):
    f = wrap(fn_makes_tensors)
    rec = {}
    before = torch.get_default_dtype()
    try:
        for i, dt in enumerate((torch.float32, torch.float64, torch.float32, torch.float64)):
            torch.set_default_dtype(dt)
            rec[f"c{i}"] = f(rand(3, 4, seed=i, grad=True))
    finally:
        torch.set_default_dtype(before)
    return rec


class CountingMode(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@scenario("torch_function_mode_around_call", "contexts")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        x, y = rand(3, 4, seed=i, grad=True), rand(3, 4, seed=i + 1)
        mode = CountingMode()
        if i == 1:
            out = f(x, y)
        else:
            with mode:
                out = f(x, y)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad, mode.calls > 0)
    return rec


@scenario("allow_mutation_on_saved_tensors", "contexts")
def _(wrap):
    f = wrap(fn_basic)
    rec = {}
    for i in range(3):
        x, y = rand(3, 4, seed=i, grad=True), rand(3, 4, seed=i + 1)
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            out = f(x, y)
            y.mul_(2)
            r = attempt(lambda: weighted(out).backward())
        rec[f"c{i}"] = (out, r, x.grad, y)
    return rec


@scenario("module_own_parameter_as_argument", "inputs")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        m.lin.weight.grad = None
        out = f(m.lin.weight if i != 1 else rand(4, 4, seed=i))
        weighted(out).backward()
        rec[f"c{i}"] = (out, m.lin.weight.grad)
    return rec


@scenario("no_grad_output_into_training_call", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        with torch.no_grad():
            h = f(x)
        out = f(h.requires_grad_() if i == 1 else h)
        weighted(out).backward()
        rec[f"c{i}"] = (h, out, h.grad, x.grad, m.lin.weight.grad.clone())
    return rec


@scenario("saved_output_modified_in_place", "contexts")
def _(wrap):
    f = wrap(lambda x: x.exp())
    rec = {}
    for i in range(3):
        x = rand(3, seed=i, grad=True)
        out = f(x)
        if i != 1:
            out.mul_(2)
        rec[f"c{i}"] = (attempt(lambda: out.sum().backward()), x.grad)
    return rec


@scenario("backward_inputs_subset", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        weighted(f(x)).backward(inputs=[x] if i != 1 else [m.lin.bias])
        rec[f"c{i}"] = (x.grad, m.lin.weight.grad, m.lin.bias.grad)
    return rec


@scenario("grad_of_unused_and_other_dtype_gradient", "contexts")
def _(wrap):
    f = wrap(lambda x, unused: x * 2)
    rec = {}
    for i in range(3):
        x, u = rand(3, seed=i, grad=True), rand(3, seed=i + 1, grad=True)
        out = f(x, u)
        rec[f"c{i}"] = (torch.autograd.grad(out, [x, u], torch.ones(3, dtype=torch.float64), allow_unused=True,
                                            materialize_grads=i == 2))
    return rec


@scenario("profiler_around_call", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if i != 1 else \
                contextlib.nullcontext():
            with torch.autograd.profiler.record_function("user_region"):
                out = f(x)
                weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


@scenario("disable_saved_tensors_hooks_around_call", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
            out = attempt(lambda: f(x))
            if isinstance(out, torch.Tensor):
                weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


@scenario("dual_level_open_without_duals", "contexts")
def _(wrap):
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        with fwAD.dual_level():
            out = f(x)
        weighted(out).backward()
        rec[f"c{i}"] = (out, x.grad)
    return rec


@scenario("enable_grad_inside_under_inference_mode", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = EnableGradInside()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i)
        with torch.inference_mode(i != 1):
            out = f(x)
        rec[f"c{i}"] = (out, out.requires_grad, out.is_inference())
    return rec


@scenario("no_grad_call_mutates_leaf_requiring_grad", "contexts")
def _(wrap):
    def fn(x):
        x.mul_(2)
        return x + 1
    f = wrap(fn)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        with torch.no_grad():
            out = f(x)
        rec[f"c{i}"] = (out, x, x._version > 0)
    return rec


@scenario("multithreading_disabled_backward", "contexts")
def _(wrap):
    torch.manual_seed(0)
    m = Lin()
    f = wrap(m)
    rec = {}
    for i in range(3):
        x = rand(3, 4, seed=i, grad=True)
        with torch.autograd.set_multithreading_enabled(i == 1):
            weighted(f(x)).backward()
        rec[f"c{i}"] = x.grad
    return rec


# ---- running ---------------------------------------------------------------------------------------------

# Case-routes that differed from eager and were fixed (each has a test in tests/aot/test_odd_inputs.py), and the
# known differences outside aotcache's reach (docs/limitations.md, "Unusual inputs and call contexts").
FIXED = {("checkpoint_around_call", route) for route in ROUTES} | {
    ("leaf_requiring_grad_mutated", "compile"),
    ("input_and_target_windows", "aot"), ("input_and_target_windows", "compile"),  # a graph per step (perf)
    ("detect_anomaly", "aot"), ("detect_anomaly", "compile"),  # not captured under anomaly mode (route, perf)
    ("func_vmap_over_compiled", "compile")}  # the vmap call sent later plain calls to Dynamo (route, perf)
KNOWN = {
    ("leaf_requiring_grad_mutated", "dynamo"): "Dynamo raises its TorchRuntimeError (any backend)",
    ("submodule_hook_added_after_first_call", "dynamo"): "Dynamo does not guard submodule hooks (any backend)",
}


def _label(row: dict) -> str:
    key = (row["case"], row["route"])
    if row.get("equal"):
        return "fixed" if key in FIXED else "equal"
    return "known" if key in KNOWN else "DIFF"

def run_route(name: str, route: str) -> tuple[dict, list[int]]:
    """Run one scenario through ``route``: (its observed values, snapshotted; the graphs compiled)."""
    _, fn = SCENARIOS[name]
    before = graphs()
    torch.manual_seed(0)
    with warnings.catch_warnings(), contextlib_redirect():
        warnings.simplefilter("ignore")
        value = fn((lambda obj: obj) if route == "eager" else (lambda obj: of._wrap(route, obj)))
    return of._snapshot(_with_layout(value)), graphs() - before


def _with_layout(value: Any) -> Any:
    """Each tensor with what a user can see of its layout: strides, storage offset, whether it is a view."""
    if isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_nested:
        return ("T", value, tuple(value.stride()), value.storage_offset() if value._is_view() else 0,
                value._is_view(), value.is_conj(), value.is_neg(), value.device.type)
    if isinstance(value, dict):
        return {k: _with_layout(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_with_layout(v) for v in value)
    return value


class contextlib_redirect:
    def __enter__(self):
        self._saved = sys.stdout
        sys.stdout = io.StringIO()

    def __exit__(self, *exc):
        sys.stdout = self._saved


def run_case(name: str, routes: tuple[str, ...], verbose: bool) -> list[dict[str, Any]]:
    group = SCENARIOS[name][0]
    try:
        eager, _ = run_route(name, "eager")
    except Exception as exc:  # noqa: BLE001
        return [{"case": name, "group": group, "route": "-", "equal": False, "error": f"eager failed: {exc!r}"}]
    rows = []
    for route in routes:
        row: dict[str, Any] = {"case": name, "group": group, "route": route}
        start = time.perf_counter()
        try:
            other, n = run_route(name, route)
        except Exception as exc:  # noqa: BLE001 - a crash where eager ran is a finding
            if verbose:
                traceback.print_exc()
            row.update(equal=False, error=f"crash {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            rows.append(row)
            torch._dynamo.reset()
            continue
        errors: list[str] = []
        of._compare(eager, other, "", errors)
        row.update(equal=not errors, graphs=n, error="; ".join(errors)[:600] or None,
                   known=KNOWN.get((name, route)) if errors else None,
                   seconds=round(time.perf_counter() - start, 2))
        rows.append(row)
        torch._dynamo.reset()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="")
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    routes = tuple(r for r in args.routes.split(",") if r)
    wanted = [w for w in args.cases.split(",") if w]
    selected = [n for n in SCENARIOS if not wanted or any(w in n for w in wanted)]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["AOTCACHE_CACHE_DIR"] = cache_dir
        os.environ.setdefault("AOTCACHE_TIERS", "memory,disk")
        os.environ["AOTCACHE_ENABLED"] = "0"
        of._count_nop_graphs()
        for name in selected:
            new = run_case(name, routes, args.verbose)
            rows.extend(new)
            for row in new:
                if args.verbose or row.get("error"):
                    print(f"  {row['case']:<36} {row['route']:<8} {row.get('error') or ''}", file=sys.stderr)
    print(f"{'case':<36} {'group':<9} " + " ".join(f"{r:<8}" for r in routes) + "  graphs")
    by_case: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for r in rows:
        by_case[r["case"]][r["route"]] = r
    for name, per in by_case.items():
        cells = " ".join(f"{_label(per[r]) if r in per else '-':<8}" for r in routes)
        print(f"{name:<36} {SCENARIOS[name][0]:<9} {cells}  "
              + ",".join(str(per.get(r, {}).get("graphs", "-")) for r in routes))
    summary = collections.Counter("equal" if r.get("equal") else "known" if r.get("known") else "differs"
                                  for r in rows)
    if Path(args.out) == RESULTS and wanted:
        print("(a subset: results not written to the default file)")
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "routes": routes, "summary": summary,
                                              "rows": rows}, indent=1, default=str) + "\n")
    print(f"{summary['equal']} equal ({sum(1 for r in rows if r.get('equal') and (r['case'], r['route']) in FIXED)} "
          f"of them fixed in session 10), {summary['known']} known differences, {summary['differs']} differ, "
          f"of {len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
