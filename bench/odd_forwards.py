"""Adversarial battery: forwards that do unusual but legal things, through aotcache and eager side by side.

"Never fail where eager runs, never a wrong result": each case is a module or function that does something
legal but odd (custom autograd Functions, ``torch.func`` inside a forward, Python objects returned, odd
inputs, side effects, randomness, library models). Each is run for three calls eagerly and through

* ``compile``: ``aotcache.compile(obj, compiler="nop")``;
* ``aot``: ``aot_module`` / ``aot_function`` with the nop compiler;
* ``dynamo``: ``torch.compile(obj, backend="aotcache", options={"compiler": "nop"})``,

each side from the same seed, on equal copies of the model and the inputs, and compared with eager: outputs
(structure, Python values, tensors by value, dtype, shape, requires_grad), the exception raised (its type),
gradients of the inputs and parameters (and of a double backward where the case asks for it), the global RNG
state after each call, the inputs and buffers after the call (in-place mutations, lists appended to), and the
number of graphs compiled at each call (a graph compiled at every call is a retracing perf cliff). Writes
``bench/results/odd_forwards.json`` and prints a table::

    python bench/odd_forwards.py                         # all cases, all routes (a few minutes)
    python bench/odd_forwards.py --cases autograd_fn --routes aot -v
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "odd_forwards.json"
ROUTES = ("compile", "aot", "dynamo")
logger = logging.getLogger("odd_forwards")


# ---------------------------------------------------------------------------------------------------------
# The cases. Each builder returns (module or function, make_args(call) -> (args, kwargs)); builders run under
# the same seed on every side, and make_args draws from its own generator so it never moves the global one.
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    name: str
    build: Callable[[], tuple[Any, Callable[[int], tuple[tuple, dict]]]]
    backward: bool = True          # run a backward from the outputs and compare gradients
    double_backward: bool = False  # differentiate the gradients again (create_graph=True)
    calls: int = 3
    grad_mode: bool = True
    group: str = ""


CASES: list[Case] = []


def case(name: str, group: str, **kwargs: Any) -> Callable:
    def register(build: Callable) -> Callable:
        CASES.append(Case(name, build, group=group, **kwargs))
        return build
    return register


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    t = torch.randn(shape, generator=g, dtype=torch.float32 if dtype in (torch.complex64, torch.complex128)
                    else dtype) if dtype.is_floating_point or dtype.is_complex else \
        torch.randint(0, 5, shape, generator=g, dtype=dtype)
    if dtype.is_complex:
        t = torch.complex(t, torch.randn(shape, generator=g)).to(dtype)
    return t.requires_grad_(grad)


def tensors_args(*specs: Any, **kw_specs: Any) -> Callable[[int], tuple[tuple, dict]]:
    """make_args from (shape, kwargs) specs: a fresh input per call with a per-call seed."""
    def make(call: int) -> tuple[tuple, dict]:
        args = tuple(rand(*shape, seed=call * 31 + i, **opts) for i, (shape, opts) in enumerate(specs))
        kwargs = {k: rand(*shape, seed=call * 37 + j, **opts) for j, (k, (shape, opts)) in enumerate(kw_specs.items())}
        return args, kwargs
    return make


def x_args(*shape: int, grad: bool = True, **opts: Any) -> Callable[[int], tuple[tuple, dict]]:
    return tensors_args((shape, {"grad": grad, **opts}))


# ---- custom autograd Functions, custom ops, checkpoint, torch.func, cond, double backward -----------------

class ScaledSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = 2 * x * w * g if ctx.needs_input_grad[0] else None
        gw = (x * x * g).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gw


class AddOneInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x.add_(1)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return g


class SortWithIndex(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        values, idx = x.sort(dim=-1)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(idx)
        return values, idx

    @staticmethod
    def backward(ctx, gv, gi):
        (idx,) = ctx.saved_tensors
        return torch.zeros_like(gv).scatter(-1, idx, gv)


class OnceDiffTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class TwoOutNoMaterialize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        return x * 2, x * 3

    @staticmethod
    def backward(ctx, g1, g2):
        out = None
        if g1 is not None:
            out = g1 * 2
        if g2 is not None:
            out = g2 * 3 if out is None else out + g2 * 3
        return out


class FnModule(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        if self.kind == "save":
            return ScaledSquare.apply(x, self.w)
        if self.kind == "dirty":
            h = x * self.w
            return AddOneInPlace.apply(h) * 2
        if self.kind == "nondiff":
            v, i = SortWithIndex.apply(x * self.w)
            return v, i
        if self.kind == "once":
            return OnceDiffTanh.apply(x * self.w)
        a, b = TwoOutNoMaterialize.apply(x * self.w)
        return a  # b unused: its gradient is None in backward


for _kind in ("save", "dirty", "nondiff", "once", "nomaterialize"):
    case(f"autograd_fn_{_kind}", "autograd")(lambda k=_kind: (FnModule(k), x_args(3, 4)))


@torch.library.custom_op("oddfw::mysin", mutates_args=())
def _mysin(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


@_mysin.register_fake
def _(x):
    return torch.empty_like(x)


def _mysin_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _mysin_backward(ctx, g):
    (x,) = ctx.saved_tensors
    return g * torch.cos(x)


_mysin.register_autograd(_mysin_backward, setup_context=_mysin_setup)


@case("custom_op_autograd", "autograd")
def _():
    lin = nn.Linear(4, 4)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return _mysin(self.lin(x)).sum(-1)
    return M(), x_args(3, 4)


@case("checkpoint_region", "autograd")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

        def block(self, x):
            return self.b(torch.relu(self.a(x)))

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False).sum(-1)
    return M(), x_args(3, 4)


@case("func_grad_inside", "autograd")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            g = torch.func.grad(lambda t: (t.sin() * self.w).sum())(x)
            return g * 2
    return M(), x_args(3, 4)


@case("func_vmap_inside", "autograd")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.vmap(lambda r: self.w @ r.sin())(x)
    return M(), x_args(3, 4)


@case("func_jacrev_inside", "autograd")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.func.jacrev(lambda v: torch.tanh(self.w @ v))(x)
    return M(), x_args(4)


@case("torch_cond", "autograd")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda t: t * self.w, lambda t: t - self.w, (x,))
    def make(call):
        x = rand(3, 4, seed=call)
        return ((x.abs() if call % 2 == 0 else -x.abs()),), {}
    return M(), make


@case("double_backward_outside", "autograd", double_backward=True)
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.lin(x)).pow(2).sum(-1)
    return M(), x_args(3, 4)


@case("grad_penalty_inside", "autograd")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x):
            x = x.detach().requires_grad_(True) if not x.requires_grad else x
            y = torch.tanh(self.lin(x)).sum()
            (g,) = torch.autograd.grad(y, x, create_graph=True)
            return y + (g.norm(dim=-1) - 1).pow(2).mean()
    return M(), x_args(3, 4)


# ---- returned Python objects ------------------------------------------------------------------------------

class Pair(NamedTuple):
    value: torch.Tensor
    count: int


@dataclasses.dataclass
class Result:
    value: torch.Tensor
    label: str
    extra: Any = None


def fn_python_values(x):
    return x * 2, 3, 2.5, "text", None, True


def fn_nested(x):
    return {"a": [x * 2, (x + 1, {"b": x.sum()})], "n": 4, "s": None}


def fn_namedtuple(x):
    return Pair(x * 3, 7)


def fn_dataclass(x):
    return Result(x.cos(), "cos", extra=[1, 2])


def fn_model_output(x):
    from transformers.modeling_outputs import BaseModelOutput
    return BaseModelOutput(last_hidden_state=x * 2, hidden_states=(x, x + 1))


def fn_size(x):
    return x.shape, x.size(0), x * 1


def fn_view_of_input(x):
    return x.view(-1), x[0], x.t(), x + 1


def fn_same_twice(x):
    y = x * 2
    return y, y, {"again": y}


def fn_input_unchanged(x, y):
    return x, y, x + y


for _fn in (fn_python_values, fn_nested, fn_namedtuple, fn_dataclass, fn_model_output, fn_size,
            fn_view_of_input, fn_same_twice):
    case(_fn.__name__.removeprefix("fn_") + "_out", "outputs")(lambda f=_fn: (f, x_args(3, 4)))
case("input_unchanged_out", "outputs")(lambda: (fn_input_unchanged, tensors_args(((3, 4), {"grad": True}),
                                                                                  ((3, 4), {}))))


@case("parameter_returned", "outputs")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return self.w, x @ self.w, self.w.t()
    return M(), x_args(3, 4)


# ---- inputs ---------------------------------------------------------------------------------------------

def fn_complex(z, w):
    return (z * w.conj()).abs(), torch.view_as_real(z * 2), z.angle()


case("complex_inputs", "inputs")(lambda: (fn_complex, tensors_args(((3, 4), {"dtype": torch.complex64, "grad": True}),
                                                                   ((3, 4), {"dtype": torch.complex64}))))


def fn_low_precision(a, b, c):
    return a * 2, (b.float() + 1).bfloat16(), c.exp(), (a.double() + c).half()


case("fp16_bf16_fp64", "inputs")(lambda: (fn_low_precision, tensors_args(
    ((3, 4), {"dtype": torch.float16, "grad": True}), ((3, 4), {"dtype": torch.bfloat16, "grad": True}),
    ((3, 4), {"dtype": torch.float64, "grad": True}))))


def fn_int_bool(x, idx, mask):
    return torch.where(mask, x, 0.0)[idx % 3] + idx.sum(), mask.sum(), (idx * 2)


def _int_bool_args(call):
    x = rand(3, 4, seed=call, grad=True)
    idx = torch.tensor([0, 2, 1, call % 3])
    mask = rand(3, 4, seed=call + 7) > 0
    return (x, idx, mask), {}


case("int_bool_tensors", "inputs")(lambda: (fn_int_bool, _int_bool_args))


def fn_zero_d(x, s):
    return x * s, s * 2, (x.sum() + s)


case("zero_d_tensors", "inputs")(lambda: (fn_zero_d, tensors_args(((3,), {"grad": True}), ((), {"grad": True}))))


def fn_empty(x, e):
    return x.sum(0) + e.sum(), e * 2, torch.cat([e, x[:0]])


case("empty_tensors", "inputs")(lambda: (fn_empty, tensors_args(((3, 4), {"grad": True}), ((0, 4), {"grad": True}))))


def fn_noncontig(a, b, c):
    return a @ b, c * 2, (a + c[:, :4]).sum(0)


def _noncontig_args(call):
    base = rand(4, 3, seed=call, grad=True)
    a = base.t()                       # transposed (3, 4)
    b = rand(8, 4, seed=call + 1)[::2]  # strided rows (4, 4)
    c = rand(3, 1, seed=call + 2).expand(3, 6)  # expanded
    return (a, b, c), {}


case("noncontiguous_inputs", "inputs")(lambda: (fn_noncontig, _noncontig_args))


def fn_mixed_grad(a, b, c):
    return a * b + c, (b * c).sum()


case("mixed_requires_grad", "inputs")(lambda: (fn_mixed_grad, tensors_args(
    ((3, 4), {"grad": True}), ((3, 4), {}), ((3, 4), {"grad": True}))))


def _param_input_args(call):
    return (nn.Parameter(rand(3, 4, seed=call)), rand(3, 4, seed=call + 1)), {}


case("parameter_as_input", "inputs")(lambda: (lambda p, x: (p * x).sin(), _param_input_args))


class LoggingTensor(torch.Tensor):
    """A plain tensor subclass with __torch_function__ (counts calls; results stay the subclass)."""

    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        LoggingTensor.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def _subclass_args(call):
    return (rand(3, 4, seed=call).as_subclass(LoggingTensor).requires_grad_(),), {}


case("torch_function_subclass", "inputs")(lambda: (lambda x: (x * 2).sin(), _subclass_args))


def _nested_args(call):
    nt = torch.nested.nested_tensor([rand(2, 4, seed=call), rand(3, 4, seed=call + 1)], layout=torch.jagged)
    return (nt,), {}


case("nested_tensor", "inputs", backward=False)(lambda: (lambda nt: (nt * 2).sin(), _nested_args))


def _sparse_args(call):
    dense = rand(4, 4, seed=call) * (rand(4, 4, seed=call + 5) > 0.5)
    return (dense.to_sparse(), rand(4, 3, seed=call + 1, grad=True)), {}


case("sparse_tensor", "inputs")(lambda: (lambda s, x: torch.sparse.mm(s, x) * 2, _sparse_args))


def fn_generator_arg(x, gen):
    return x + torch.rand(x.shape, generator=gen)


def _gen_args(call):
    return (rand(3, 4, seed=call, grad=True), torch.Generator().manual_seed(5 + call)), {}


case("generator_arg", "inputs")(lambda: (fn_generator_arg, _gen_args))


def fn_dtype_device(x, dtype, device):
    return x.to(dtype=dtype, device=device) * 2, torch.zeros(2, dtype=dtype, device=device)


def _dtype_args(call):
    return (rand(3, 4, seed=call, grad=True), torch.float64 if call % 2 else torch.float32, torch.device("cpu")), {}


case("dtype_device_args", "inputs")(lambda: (fn_dtype_device, _dtype_args))


def fn_callable_arg(x, act):
    return act(x) * 2


def _callable_args(call):
    return (rand(3, 4, seed=call, grad=True), (lambda t: t.sin()) if call % 2 == 0 else torch.tanh), {}


case("callable_arg", "inputs")(lambda: (fn_callable_arg, _callable_args))


def fn_kwonly(x, *, scale, bias=None):
    return x * scale + (0 if bias is None else bias)


def _kwonly_args(call):
    return (rand(3, 4, seed=call, grad=True),), {"scale": 2.0, "bias": rand(4, seed=call + 3)}


case("keyword_only_args", "inputs")(lambda: (fn_kwonly, _kwonly_args))


@case("star_args_kwargs", "inputs")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, *args, **kwargs):
            out = sum(self.lin(a) for a in args)
            for k in sorted(kwargs):
                out = out + kwargs[k]
            return out

    def make(call):
        return ((rand(3, 4, seed=call, grad=True), rand(3, 4, seed=call + 1)),
                {"b": rand(4, seed=call), "a": rand(3, 4, seed=call + 2)})
    return M(), make


# ---- side effects ---------------------------------------------------------------------------------------

def fn_mutate_input(x, y):
    y.mul_(2)
    x[0].add_(1)
    return (x * y).sum(-1)


case("mutate_input_and_view", "side_effects", backward=False)(
    lambda: (fn_mutate_input, tensors_args(((3, 4), {}), ((3, 4), {}))))


def fn_mutate_aliases(a, b):
    a.add_(1)
    return a + b


def _alias_args(call):
    base = rand(4, 4, seed=call)
    return (base[1:], base[:3]), {}


case("mutate_aliasing_inputs", "side_effects", backward=False)(lambda: (fn_mutate_aliases, _alias_args))


def _base_view_args(call):
    base = rand(4, 4, seed=call)
    return (base, base[1]), {}


case("mutate_input_and_its_view", "side_effects", backward=False)(
    lambda: (lambda base, row: (row.mul_(3), base.sum())[1], _base_view_args))


def fn_resize(x):
    x.resize_(2, 2)
    return x * 2


case("resize_input", "side_effects", backward=False)(lambda: (fn_resize, x_args(3, 4, grad=False)))


def fn_data_assign(x, y):
    x.data = y * 2
    return x + 1


case("data_assignment", "side_effects", backward=False)(
    lambda: (fn_data_assign, tensors_args(((3, 4), {}), ((3, 4), {}))))


@case("mutate_buffer", "side_effects")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(()))
            self.register_buffer("ema", torch.zeros(4))
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.count += 1
            self.ema.mul_(0.9).add_(x.detach().mean(0), alpha=0.1)
            return self.lin(x) + self.ema
    return M(), x_args(3, 4)


def fn_append(x, log):
    log.append(x.shape[0])
    log.append("called")
    return x * len(log)


def _append_args(call):
    return (rand(3, 4, seed=call, grad=True), [0]), {}


case("append_to_list_arg", "side_effects")(lambda: (fn_append, _append_args))


def fn_print(x):
    print("forward got", tuple(x.shape))
    logger.info("forward logging %s", tuple(x.shape))
    return x * 2


case("print_and_log", "side_effects")(lambda: (fn_print, x_args(3, 4)))


def fn_warn(x):
    warnings.warn("odd_forwards: a warning from forward", UserWarning)
    return x + 1


case("warnings_warn", "side_effects")(lambda: (fn_warn, x_args(3, 4)))


class OddValueError(ValueError):
    pass


def fn_raise_on_value(x):
    if (x > 3).any():
        raise OddValueError("value too large")
    return x * 2


def _raise_args(call):
    x = rand(3, 4, seed=call).clamp(-1, 1)
    if call == 1:
        x[0, 0] = 5.0
    return (x.requires_grad_(),), {}


case("raise_on_value", "side_effects")(lambda: (fn_raise_on_value, _raise_args))


def fn_assert_shape(x):
    assert x.shape[-1] == 4, "last dimension must be 4"
    return x * 2


def _assert_args(call):
    return (rand(3, 4 if call != 1 else 5, seed=call, grad=True),), {}


case("assert_shape", "side_effects")(lambda: (fn_assert_shape, _assert_args))


def fn_torch_assert(x):
    torch._assert(x.dim() == 2, "expected 2-D")
    return x.sin()


def _torch_assert_args(call):
    return (rand(*((3, 4) if call != 1 else (3, 4, 1)), seed=call, grad=True),), {}


case("torch_assert", "side_effects")(lambda: (fn_torch_assert, _torch_assert_args))


@case("grad_enabled_and_training", "side_effects", calls=4)
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            if torch.is_grad_enabled():
                y = y * 2
            if self.training:
                y = y + 1
            return y
    return M(), x_args(3, 4)


# ---- randomness -----------------------------------------------------------------------------------------

@case("dropout", "random")
def _():
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 4)), x_args(3, 4)


case("rand_inside", "random")(lambda: (lambda x: x * torch.rand_like(x) + torch.randn(4), x_args(3, 4)))


def fn_rand_unused(x):
    torch.rand(3)  # moves the generator; nothing reads it (NOTE [Random draws nothing uses])
    return x * torch.rand_like(x)


case("rand_unused", "random")(lambda: (fn_rand_unused, x_args(3, 4)))


@case("dropout_double_backward", "random", double_backward=True)
def _():  # a gradient penalty through dropout (NOTE [Double backward through random ops])
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 4)), x_args(3, 4)


def fn_manual_seed(x):
    torch.manual_seed(123)
    return x + torch.rand_like(x)


case("manual_seed_inside", "random")(lambda: (fn_manual_seed, x_args(3, 4)))


def fn_rand_generator(x, gen):
    return x * torch.rand(x.shape, generator=gen) + torch.rand(4)


def _shared_gen_args():
    gen = torch.Generator().manual_seed(77)

    def make(call):
        return (rand(3, 4, seed=call, grad=True), gen), {}
    return make


case("rand_with_generator_across_calls", "random")(lambda: (fn_rand_generator, _shared_gen_args()))


# ---- models ---------------------------------------------------------------------------------------------

@case("jit_script_submodule", "models")
def _():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.lin(x))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.jit.script(Inner())
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.inner(x))
    return M(), x_args(3, 4)


@case("dynamic_quantized_linear", "models", backward=False)
def _():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8), x_args(3, 4, grad=False)


class PackedRNN(nn.Module):
    def __init__(self, cell: str) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(4, 6, batch_first=True)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        padded, out_lengths = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return padded, out_lengths


def _packed_args(call):
    return (rand(3, 5, 4, seed=call, grad=True), torch.tensor([5, 2, 3 + call % 2])), {}


case("packed_lstm", "models")(lambda: (PackedRNN("LSTM"), _packed_args))
case("packed_gru", "models")(lambda: (PackedRNN("GRU"), _packed_args))


@case("multihead_attention_masks", "models")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x, key_padding_mask, attn_mask):
            out, weights = self.mha(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                    need_weights=True, average_attn_weights=False)
            return out, weights

    def make(call):
        kpm = torch.zeros(2, 5, dtype=torch.bool)
        kpm[1, 3 + call % 2:] = True
        attn = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
        return (rand(2, 5, 8, seed=call, grad=True), kpm, attn), {}
    return M(), make


def fn_sdpa(q, k, v, mask):
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return a + b


def _sdpa_args(call):
    mask = rand(5, 5, seed=call + 9) > -0.5
    mask[:, 0] = True
    return (rand(2, 2, 5, 8, seed=call, grad=True), rand(2, 2, 5, 8, seed=call + 1, grad=True),
            rand(2, 2, 5, 8, seed=call + 2, grad=True), mask), {}


case("sdpa_causal_and_mask", "models")(lambda: (fn_sdpa, _sdpa_args))


@case("nn_transformer", "models")
def _():
    model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                           dropout=0.0, batch_first=True)

    def make(call):
        tgt_mask = nn.Transformer.generate_square_subsequent_mask(4)
        return (rand(2, 5, 8, seed=call, grad=True), rand(2, 4, 8, seed=call + 1)), {"tgt_mask": tgt_mask}
    return model, make


@case("distributions_normal", "models")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mu = nn.Linear(4, 4)
            self.log_sigma = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            d = torch.distributions.Normal(self.mu(x), self.log_sigma.exp())
            z = d.rsample()
            return z, d.log_prob(z).sum(-1), d.entropy().sum()
    return M(), x_args(3, 4)


@case("embedding_bag", "models")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(10, 4, mode="mean")

        def forward(self, idx, offsets, weights=None):
            return self.bag(idx, offsets)

    def make(call):
        return (torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 3 + call % 2])), {}
    return M(), make


def fn_grid_sample(img, grid):
    return F.grid_sample(img, grid, align_corners=False), F.interpolate(img, scale_factor=2, mode="bilinear",
                                                                         align_corners=False)


case("grid_sample_interpolate", "models")(lambda: (fn_grid_sample, tensors_args(
    ((1, 2, 4, 4), {"grad": True}), ((1, 3, 3, 2), {"grad": True}))))


def fn_fft(x):
    f = torch.fft.rfft(x, dim=-1)
    return torch.fft.irfft(f * 2, n=x.shape[-1]), f.abs(), torch.fft.fft2(x.to(torch.complex64)).real


case("fft", "models")(lambda: (fn_fft, x_args(3, 8)))


def fn_linalg(a):
    spd = a @ a.mT + 4 * torch.eye(4)
    u, s, vh = torch.linalg.svd(a)
    q, r = torch.linalg.qr(a)
    w, v = torch.linalg.eigh(spd)
    sol = torch.linalg.solve(spd, a)
    return s, (q @ r), w, sol, (u.abs().sum() + vh.abs().sum() + v.abs().sum())


case("linalg", "models")(lambda: (fn_linalg, x_args(4, 4)))


case("cdist", "models")(lambda: (lambda a, b: torch.cdist(a, b), tensors_args(((3, 4), {"grad": True}),
                                                                              ((5, 4), {"grad": True}))))


def fn_unique(x):
    values, inverse, counts = torch.unique(x.round(), return_inverse=True, return_counts=True)
    return values, inverse, counts, x * 2


case("unique", "models", backward=False)(lambda: (fn_unique, x_args(3, 4, grad=False)))


def fn_sort_topk(x):
    s = torch.sort(x, dim=-1, descending=True)
    t = torch.topk(x, 2, dim=-1)
    return s, t, s.values[..., 0] + t.values.sum(-1)


case("sort_topk", "models")(lambda: (fn_sort_topk, x_args(3, 5)))


def fn_where_one_arg(x):
    idx = torch.where(x > 0)
    return idx, x[idx] * 2


case("where_one_arg", "models")(lambda: (fn_where_one_arg, x_args(3, 4)))


def fn_bool_mask(x):
    return x[x > 0].sum() * x, x[x.abs() > 0.5]


case("boolean_mask_indexing", "models")(lambda: (fn_bool_mask, x_args(3, 4)))


# ---- more inputs and control flow ----------------------------------------------------------------------

@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    scale: float


def fn_dataclass_input(batch):
    return batch.x * batch.scale


def _dataclass_input_args(call):
    return (Batch(rand(3, 4, seed=call, grad=True), 2.0),), {}


case("dataclass_input", "inputs")(lambda: (fn_dataclass_input, _dataclass_input_args))


def fn_namedtuple_input(pair):
    return pair.value * pair.count


case("namedtuple_input", "inputs")(lambda: (fn_namedtuple_input,
                                            lambda call: ((Pair(rand(3, 4, seed=call, grad=True), 3),), {})))


@case("dict_in_dict_out", "inputs")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, batch):
            return {"y": self.lin(batch["x"]), "mask": batch["mask"].sum(), "n": len(batch)}

    def make(call):
        return ({"x": rand(3, 4, seed=call, grad=True), "mask": rand(3, seed=call) > 0},), {}
    return M(), make


def fn_string_mode(x, mode):
    return x.sin() if mode == "sin" else x.cos()


case("string_arg_switch", "inputs", calls=4)(lambda: (fn_string_mode, lambda call: (
    (rand(3, 4, seed=call, grad=True), "sin" if call % 2 == 0 else "cos"), {})))


def fn_float_arg(x, alpha):
    return x * alpha + alpha ** 2


case("float_arg_changing", "inputs", calls=4)(lambda: (fn_float_arg, lambda call: (
    (rand(3, 4, seed=call, grad=True), 0.5 + call), {})))


def fn_shape_branch(x):
    return x.sum(0) if x.shape[0] > 2 else x.prod(0)


case("shape_branch", "inputs", calls=4)(lambda: (fn_shape_branch, lambda call: (
    (rand(2 + call % 2, 4, seed=call, grad=True),), {})))


def fn_item_out(x):
    return x * 2, x.sum().item(), x.tolist()[0][0]


case("item_and_tolist_out", "outputs")(lambda: (fn_item_out, x_args(3, 4)))


@case("no_grad_decorated_forward", "side_effects")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        @torch.no_grad()
        def forward(self, x):
            return self.lin(x)
    return M(), x_args(3, 4)


@case("autocast_inside", "models")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self.lin(x)
            return y.float().sum(-1)
    return M(), x_args(3, 4)


@case("checkpoint_reentrant", "autograd")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=True)
    return M(), x_args(3, 4)


@case("lstm_state_in_out", "models")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 5, batch_first=True)

        def forward(self, x, state=None):
            out, (h, c) = self.rnn(x, state)
            return out, (h, c)

    def make(call):
        state = (rand(1, 2, 5, seed=call), rand(1, 2, 5, seed=call + 1)) if call % 2 else None
        return (rand(2, 3, 4, seed=call, grad=True), state), {}
    return M(), make


@case("clamp_param_in_forward", "side_effects")
def _():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4) * 3)

        def forward(self, x):
            with torch.no_grad():
                self.w.clamp_(-1, 1)
            return x * self.w
    return M(), x_args(3, 4)


@case("inference_mode_call", "side_effects", grad_mode=False)
def _():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU()), x_args(3, 4, grad=False)


def fn_try_except_item(x):
    try:
        s = float(x.sum())
    except Exception:  # noqa: BLE001 - a forward's own fallback path
        s = 0.0
    return x * s


case("try_except_around_item", "side_effects")(lambda: (fn_try_except_item, x_args(3, 4)))


# ---------------------------------------------------------------------------------------------------------
# Running one side and comparing.
# ---------------------------------------------------------------------------------------------------------

_GRAPHS = [0]


def _count_nop_graphs() -> None:
    """Count the graphs the nop compiler compiles (it is looked up by name at each compile)."""
    import aotcache.compilers.nop as nop

    if getattr(nop.nop_compiler, "_odd_counted", False):
        return
    inner = nop.nop_compiler

    def counted(gm, example_inputs, **kwargs):
        _GRAPHS[0] += 1
        return inner(gm, example_inputs, **kwargs)

    counted._odd_counted = True  # type: ignore[attr-defined]
    nop.nop_compiler = counted


def _wrap(route: str, obj: Any) -> Any:
    import aotcache

    if route == "eager":
        return obj
    if route == "compile":
        return aotcache.compile(obj, compiler="nop")
    if route == "aot":
        if isinstance(obj, nn.Module):
            return aotcache.aot_module(obj, "nop")
        return aotcache.aot_function(obj, "nop")
    if route == "dynamo":
        return torch.compile(obj, backend="aotcache", options={"compiler": "nop"})
    if route == "aot_dynamic":  # not in the default routes: symbolic captures (--routes aot_dynamic)
        if isinstance(obj, nn.Module):
            return aotcache.aot_module(obj, "nop", dynamic=True)
        return aotcache.aot_function(obj, "nop", dynamic=True)
    raise ValueError(route)


def _route_taken(route: str, wrapped: Any) -> str:
    from aotcache.aot.fallback import EagerRuntime, PartialRuntime

    if route == "eager":
        return "eager"
    if route == "dynamo":
        return "dynamo"
    function = getattr(wrapped, "compiled", wrapped)  # aot and aot_dynamic
    if route == "compile":
        r = getattr(wrapped, "route", None)
        if r == "dynamo":
            return "dynamo"
        function = getattr(getattr(wrapped, "_router", None), "aot", function)
    entries = [rt for rts in getattr(function, "_entries", {}).values() for rt in rts]
    kinds = {"partial" if isinstance(rt, PartialRuntime) and not rt.broken else
             "eager" if isinstance(rt, (EagerRuntime, PartialRuntime)) else "whole" for rt in entries}
    if not kinds:
        return "unkeyed"  # ran without a signature (a sparse or refused argument): eager or Dynamo per call
    return "+".join(sorted(kinds))


def _snapshot(value: Any) -> Any:
    """A comparable copy of a value: tensors detached and cloned with their metadata, objects walked."""
    if isinstance(value, torch.Tensor):
        meta = {"type": type(value).__name__, "dtype": str(value.dtype), "shape": tuple(value.shape),
                "requires_grad": value.requires_grad, "layout": str(value.layout)}
        if value.is_nested:  # its ragged size is a nested int numbered per tensor: compare the components
            meta["shape"] = tuple(tuple(t.shape) for t in value.unbind())
            return ("nested", meta, [t.detach().clone() for t in value.unbind()])
        if value.layout != torch.strided:
            return ("tensor", meta, value.detach().to_dense().clone())
        data = value.detach()
        return ("tensor", meta, torch.Tensor(data).clone() if type(data) is not torch.Tensor and
                not isinstance(data, nn.Parameter) else data.clone())
    if isinstance(value, torch.Generator):
        return ("generator", value.get_state().clone())
    if isinstance(value, torch.Size):
        return ("size", tuple(value))
    if isinstance(value, dict):
        return (type(value).__name__, {k: _snapshot(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_snapshot(v) for v in value])
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, {f.name: _snapshot(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if callable(value) and not isinstance(value, (int, float, str)):
        return ("callable", getattr(value, "__name__", type(value).__name__))
    if isinstance(value, (torch.dtype, torch.device)):
        return ("const", str(value))
    return ("py", value)


def _compare(a: Any, b: Any, where: str, errors: list[str], rtol: float = 1e-4, atol: float = 1e-5) -> None:
    if type(a) is not type(b) or (isinstance(a, tuple) and a[:1] != b[:1]):
        errors.append(f"{where}: {_short(a)} vs {_short(b)}")
        return
    if isinstance(a, tuple) and a and a[0] in ("tensor", "nested"):
        if a[1] != b[1]:
            errors.append(f"{where}: metadata {a[1]} vs {b[1]}")
            return
        xs, ys = (a[2], b[2]) if a[0] == "nested" else ([a[2]], [b[2]])
        for x, y in zip(xs, ys):
            if x.shape != y.shape or not torch.allclose(x.to(torch.complex128) if x.is_complex() else x.double(),
                                                        y.to(torch.complex128) if y.is_complex() else y.double(),
                                                        rtol=rtol, atol=atol, equal_nan=True):
                diff = ((x.double() - y.double()).abs().max().item() if x.shape == y.shape and not x.is_complex()
                        else "?")
                errors.append(f"{where}: values differ (max abs diff {diff})")
                return
        return
    if isinstance(a, tuple) and a and a[0] == "generator":
        if not torch.equal(a[1], b[1]):
            errors.append(f"{where}: generator state differs")
        return
    if isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], dict):
        if a[0] != b[0] or list(a[1]) != list(b[1]):
            errors.append(f"{where}: {a[0]} keys {list(a[1])} vs {b[0]} keys {list(b[1])}")
            return
        for k in a[1]:
            _compare(a[1][k], b[1][k], f"{where}.{k}", errors, rtol, atol)
        return
    if isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], list):
        if a[0] != b[0] or len(a[1]) != len(b[1]):
            errors.append(f"{where}: {a[0]}[{len(a[1])}] vs {b[0]}[{len(b[1])}]")
            return
        for i, (x, y) in enumerate(zip(a[1], b[1])):
            _compare(x, y, f"{where}[{i}]", errors, rtol, atol)
        return
    if isinstance(a, list):
        if len(a) != len(b):
            errors.append(f"{where}: {len(a)} vs {len(b)} items")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{where}[{i}]", errors, rtol, atol)
        return
    if a != b:
        errors.append(f"{where}: {_short(a)} vs {_short(b)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


def _leaves(value: Any) -> list[Any]:
    """Every tensor and object reachable in a returned value (in order)."""
    out: list[Any] = []
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            out.extend(_leaves(v))
    elif isinstance(value, (list, tuple)):
        for v in value:
            out.extend(_leaves(v))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            out.extend(_leaves(getattr(value, f.name)))
    return out


def _aliasing(out: Any, args: tuple, kwargs: dict, params: list[torch.Tensor]) -> list[str]:
    """For each output tensor: which input / parameter it is or views (by storage), else 'new'."""
    named = [(f"arg{i}", t) for i, t in enumerate(_leaves(list(args)))] + \
        [(f"kw{k}", t) for k, v in kwargs.items() for t in _leaves(v)] + [(f"p{i}", p) for i, p in enumerate(params)]
    result = []
    for t in _leaves(out):
        tag = "new"
        if not isinstance(t, torch.Tensor) or t.is_nested or t.layout != torch.strided:
            result.append("?")
            continue
        for name, src in named:
            if not isinstance(src, torch.Tensor) or src.is_nested or src.layout != torch.strided:
                continue
            if t is src:
                tag = f"is {name}"
                break
            if t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr() and t.numel() and src.numel():
                tag = f"views {name}"
                break
        result.append(tag)
    return result


def run_side(case: Case, route: str) -> dict[str, Any]:
    """Build the case under seed 0, wrap it for ``route``, run its calls; everything observable, recorded."""
    torch.manual_seed(0)
    obj, make_args = case.build()
    wrapped = _wrap(route, obj)
    params = list(obj.parameters()) if isinstance(obj, nn.Module) else []
    buffers = dict(obj.named_buffers()) if isinstance(obj, nn.Module) else {}
    torch.manual_seed(1)
    calls: list[dict[str, Any]] = []
    for call in range(case.calls):
        args, kwargs = make_args(call)
        if isinstance(obj, nn.Module):
            obj.train(call != 2)
            if route != "eager" and wrapped is not obj:
                wrapped.train(call != 2)
        record: dict[str, Any] = {}
        before = _GRAPHS[0]
        stdout = io.StringIO()
        grad_ctx = (torch.enable_grad() if call != 3 else torch.no_grad()) if case.grad_mode else \
            torch.inference_mode()
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout), grad_ctx:
            warnings.simplefilter("always")
            try:
                out = wrapped(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the exception type is what is compared
                record["raised"] = type(exc).__name__
                record["message"] = str(exc).splitlines()[0][:200] if str(exc) else ""
                out = None
        record["user_warnings"] = sum(1 for w in caught if "odd_forwards" in str(w.message))
        record["printed"] = stdout.getvalue().count("forward got")
        record["graphs"] = _GRAPHS[0] - before
        record["rng"] = torch.get_rng_state().clone()
        if "raised" not in record:
            record["out"] = _snapshot(out)
            record["aliasing"] = _aliasing(out, args, kwargs, params)
            if case.backward and torch.is_grad_enabled() and call != 3:
                record["grads"] = _backward(case, out, args, kwargs, params)
        record["args_after"] = _snapshot((args, kwargs))
        record["buffers_after"] = _snapshot(buffers)
        record["params_after"] = [_snapshot(p) for p in params]
        calls.append(record)
    return {"calls": calls, "route_taken": _route_taken(route, wrapped)}


def _backward(case: Case, out: Any, args: tuple, kwargs: dict, params: list[torch.Tensor]) -> Any:
    outs = [t for t in _leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad and
            (t.dtype.is_floating_point or t.is_complex())]
    leaves = [t for t in _leaves([list(args), kwargs]) if isinstance(t, torch.Tensor) and t.requires_grad
              and t.is_leaf] + [p for p in params if p.requires_grad]
    if not outs or not leaves:
        return None
    for t in leaves:
        t.grad = None
    try:
        loss = sum(((t.real if t.is_complex() else t).float() * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum()
                   for t in outs if not t.is_nested)
        if case.double_backward:
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            penalty = sum((g.pow(2).sum() for g in grads if g is not None), torch.zeros(()))
            (loss + penalty).backward()
        else:
            loss.backward()
    except Exception as exc:  # noqa: BLE001
        return ("backward raised", type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
    return [_snapshot(t.grad) if t.grad is not None else None for t in leaves]


def compare_sides(eager: dict[str, Any], other: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(result errors, gradient errors, notes) of ``other`` against ``eager``."""
    errors: list[str] = []
    grad_errors: list[str] = []
    notes: list[str] = []
    for i, (e, o) in enumerate(zip(eager["calls"], other["calls"])):
        at = f"call{i}"
        if e.get("raised") != o.get("raised"):
            errors.append(f"{at}: raised {e.get('raised')} vs {o.get('raised')}: {o.get('message', '')}")
            continue
        if "out" in e:
            _compare(e["out"], o["out"], f"{at}.out", errors)
            if e["aliasing"] != o["aliasing"]:
                errors.append(f"{at}: aliasing {e['aliasing']} vs {o['aliasing']}")
        if not torch.equal(e["rng"], o["rng"]):
            errors.append(f"{at}: global RNG state after the call differs")
        _compare(e["args_after"], o["args_after"], f"{at}.args_after", errors)
        _compare(e["buffers_after"], o["buffers_after"], f"{at}.buffers", errors)
        if "grads" in e or "grads" in o:
            ge, go = e.get("grads"), o.get("grads")
            if isinstance(go, tuple) and go and go[0] == "backward raised" or isinstance(ge, tuple):
                if ge != go:
                    grad_errors.append(f"{at}: backward {ge[:2] if isinstance(ge, tuple) else 'ok'} vs "
                                       f"{go[1:] if isinstance(go, tuple) else 'ok'}")
            else:
                _compare(ge, go, f"{at}.grads", grad_errors)
            _compare(e["params_after"], o["params_after"], f"{at}.params", grad_errors)
        for key in ("printed", "user_warnings"):
            if e[key] != o[key]:
                notes.append(f"{at}: {key} {e[key]} vs {o[key]}")
    graphs = [c["graphs"] for c in other["calls"]]
    if len(graphs) >= 3 and all(g > 0 for g in graphs[1:]) and graphs[1:] == graphs[2:] + graphs[-1:] and \
            other["calls"][1].get("raised") is None:
        notes.append(f"graphs compiled at every call: {graphs}")
    return errors, grad_errors, notes


def run_case(case: Case, routes: tuple[str, ...], verbose: bool) -> list[dict[str, Any]]:
    rows = []
    try:
        eager = run_side(case, "eager")
    except Exception as exc:  # noqa: BLE001
        return [{"case": case.name, "group": case.group, "route": "-", "error": f"eager side failed: {exc!r}"}]
    for route in routes:
        row: dict[str, Any] = {"case": case.name, "group": case.group, "route": route}
        start = time.perf_counter()
        try:
            other = run_side(case, route)
        except Exception as exc:  # noqa: BLE001 - a crash where eager ran is a finding
            row.update(taken="crash", equal=False, grads_equal=False,
                       error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            if verbose:
                traceback.print_exc()
            rows.append(row)
            continue
        errors, grad_errors, notes = compare_sides(eager, other)
        row.update(taken=other["route_taken"], graphs=[c["graphs"] for c in other["calls"]],
                   equal=not errors, grads_equal=not grad_errors,
                   error="; ".join(errors + grad_errors)[:600] or None, notes="; ".join(notes) or None,
                   eager_raised=[c.get("raised") for c in eager["calls"]],
                   seconds=round(time.perf_counter() - start, 2))
        rows.append(row)
        torch._dynamo.reset()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names (default: all)")
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated, of {', '.join(ROUTES)}")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--cache", action="store_true", help="keep the compiled-graph cache on (a fresh "
                        "directory): later routes of a case may load the graphs the first one stored")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    routes = tuple(r for r in args.routes.split(",") if r)
    wanted = [w for w in args.cases.split(",") if w]
    selected = [c for c in CASES if not wanted or any(w in c.name for w in wanted)]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["AOTCACHE_CACHE_DIR"] = cache_dir  # a fresh store, never the user's
        os.environ.setdefault("AOTCACHE_TIERS", "memory,disk")
        if not args.cache:  # every capture compiles: the graph counts are captures, not cache hits
            os.environ["AOTCACHE_ENABLED"] = "0"
        _count_nop_graphs()
        for case in selected:
            rows.extend(run_case(case, routes, args.verbose))
            for row in rows[-len(routes):]:
                if args.verbose or row.get("error") or row.get("notes"):
                    print(f"  {row['case']:<34} {row['route']:<8} {row.get('taken', '-'):<14} "
                          f"{row.get('error') or ''} {row.get('notes') or ''}", file=sys.stderr)
    _print_table(rows)
    summary = collections.Counter("ok" if r.get("equal") and r.get("grads_equal") else "fail" for r in rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if Path(args.out) == RESULTS and wanted:
        print("(a subset: results not written to the default file)")
    else:
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "routes": routes, "summary": summary,
                                              "rows": rows}, indent=1, default=str) + "\n")
    print(f"{summary['ok']} equal, {summary['fail']} not equal, of {len(rows)}")
    return 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'case':<34} {'route':<8} {'taken':<14} {'graphs':<10} {'equal':<6} {'grads':<6} error / notes"
    print(header)
    print("-" * len(header))
    for r in rows:
        graphs = ",".join(str(g) for g in r.get("graphs", [])) or "-"
        text = r.get("error") or r.get("notes") or ""
        print(f"{r['case']:<34} {r['route']:<8} {r.get('taken', '-'):<14} {graphs:<10} "
              f"{'yes' if r.get('equal') else 'NO':<6} {'yes' if r.get('grads_equal') else 'NO':<6} {text[:150]}")


if __name__ == "__main__":
    sys.exit(main())
