"""Global numerics state and float arguments: a change that alters the result re-traces (in-process) and misses
(across processes); an unchanged one reuses and hits (NOTE [Numerics flags], NOTE [Floats by bits])."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aotcache.aot import aot_function, aot_module
from aotcache.aot.ambient import numerics_flags, numerics_signature
from tests.conftest import run_python

FLAG_CHANGES = {
    "mkldnn": lambda: torch.backends.mkldnn.flags(enabled=False, deterministic=False),
    "cudnn": lambda: torch.backends.cudnn.flags(enabled=False, benchmark=False, deterministic=False, allow_tf32=True),
    "tf32": lambda: _setting(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "bf16_reduction": lambda: _setting(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False),
    "deterministic": lambda: _deterministic(),
    "matmul_precision": lambda: _matmul_precision("medium"),
    "sdpa_math": lambda: _sdpa_math_off(),
}


if torch.backends.opt_einsum.is_available():  # without the package torch ignores the strategy
    FLAG_CHANGES["opt_einsum"] = lambda: _setting(torch.backends.opt_einsum, "strategy", "greedy")


class _setting:
    """Context manager that sets ``owner.name`` and restores it."""

    def __init__(self, owner, name, value):
        self.owner, self.name, self.value = owner, name, value

    def __enter__(self):
        self.old = getattr(self.owner, self.name)
        setattr(self.owner, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.old)


class _deterministic:
    def __enter__(self):
        torch.use_deterministic_algorithms(True, warn_only=True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(False)


class _matmul_precision:
    def __init__(self, value):
        self.value = value

    PAIRS = (("generic", "all"), ("mkldnn", "all"), ("cuda", "all"), ("mkldnn", "matmul"), ("cuda", "matmul"))

    def __enter__(self):
        # set_float32_matmul_precision rewrites the fp32_precision flags ("none" -> "ieee"): restore those exactly
        self.old = [torch._C._get_fp32_precision_getter(*pair) for pair in self.PAIRS]
        self.old_precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.value)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.old_precision)
        for pair, value in zip(self.PAIRS, self.old):
            torch._C._set_fp32_precision_setter(*pair, value)


class _sdpa_math_off:
    def __enter__(self):
        torch.backends.cuda.enable_math_sdp(False)

    def __exit__(self, *exc):
        torch.backends.cuda.enable_math_sdp(True)


@pytest.mark.parametrize("change", sorted(FLAG_CHANGES))
def test_each_backend_flag_is_in_the_signature_and_the_key(change):
    before_signature, before_flags = numerics_signature(), numerics_flags()
    with FLAG_CHANGES[change]():
        assert numerics_signature() != before_signature
        changed = {name for name, value in numerics_flags().items() if before_flags[name] != value}
    assert changed, f"{change}: no named flag changed"
    assert numerics_signature() == before_signature, "the context manager restored the flags"


def test_a_flag_that_cannot_be_read_never_breaks_the_call(monkeypatch):
    from aotcache.aot import ambient

    def refusing():
        raise RuntimeError("mix of the legacy and new APIs")

    getters = ambient._getters() + (("refusing", refusing),)
    monkeypatch.setattr(ambient, "_getters", lambda: getters)
    assert numerics_signature() == numerics_signature()
    assert numerics_flags()["refusing"].startswith("unreadable")
    compiled = aot_function(lambda x: x * 2, "nop", cache=False)
    compiled(torch.ones(2))
    compiled(torch.ones(2))
    assert compiled.num_compiles == 1


def body(x, w):
    return torch.tanh(x @ w).sum()


def test_flag_change_between_calls_retraces_and_restoring_reuses():
    compiled = aot_function(body, "nop", cache=False)
    x, w = torch.randn(4, 3), torch.randn(3, 2, requires_grad=True)
    compiled(x, w)
    compiled(x, w)
    assert compiled.num_compiles == 1, "same flags: the graph is reused"
    with torch.backends.mkldnn.flags(enabled=False):
        compiled(x, w)
    assert compiled.num_compiles == 2, "mkldnn flag flipped: the reused graph was traced under other flags"
    compiled(x, w)
    assert compiled.num_compiles == 2, "flags restored: the first graph is reused again"


def test_module_hot_path_sees_a_flag_change():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    compiled = aot_module(model, "nop", cache=False)
    x = torch.randn(2, 3)
    for _ in range(3):  # the hot path is taken from the second call on
        compiled(x)
    assert compiled.compiled.num_compiles == 1
    with torch.backends.cudnn.flags(enabled=False, benchmark=False, deterministic=False, allow_tf32=True):
        compiled(x)
        compiled(x)
    assert compiled.compiled.num_compiles == 2


def test_default_dtype_change_between_calls_matches_eager():
    def fn(x):
        return (x + torch.ones(3)).exp().sum()

    compiled = aot_function(fn, "nop", cache=False)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    compiled(x).backward()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x.grad = None
        result = compiled(x)
        expected = fn(x.detach())
        assert result.dtype == expected.dtype == torch.float64
        result.backward()  # the reused float32 backward raised a dtype error here
        assert torch.allclose(x.grad, torch.exp(x.detach() + 1))
    finally:
        torch.set_default_dtype(old)
    assert compiled.num_compiles == 2


@pytest.mark.parametrize("first, second", [(0.0, -0.0), (-0.0, 0.0), (1.0, 1.0 + 2 ** -52)])
def test_float_arguments_are_compared_by_bits(first, second):
    def fn(x, s):
        return x / s

    compiled = aot_function(fn, "nop", cache=False)
    x = torch.ones(3)
    assert torch.equal(compiled(x, first), fn(x, first))
    assert torch.equal(compiled(x, second), fn(x, second)), "a stale graph baked the first float in"
    assert compiled.num_compiles == 2


def test_equal_floats_and_nan_arguments_reuse():
    def fn(x, s):
        return x + s

    compiled = aot_function(fn, "nop", cache=False)
    x = torch.ones(2)
    compiled(x, 0.5)
    compiled(x, float("0.5"))
    assert compiled.num_compiles == 1
    compiled(x, float("nan"))
    out = compiled(x, float("nan"))  # another NaN object: same bits, so no re-trace on every call
    assert compiled.num_compiles == 2 and all(math.isnan(v) for v in out.tolist())


def test_complex_zero_signs_differ():
    def fn(x, c):
        return x * c

    compiled = aot_function(fn, "nop", cache=False)
    x = torch.ones(2, dtype=torch.complex64)
    compiled(x, complex(0.0, 0.0))
    compiled(x, complex(-0.0, 0.0))
    assert compiled.num_compiles == 2


# Across processes: the persistent cache must miss under other flags and hit under the same ones.
STEP = """
import json, sys, torch
from aotcache.aot import aot_function
from aotcache.autograd_cache.cache import default_cache

def body(x, s):
    return torch.tanh(x / s).sum()

if sys.argv[1] == "dtype64":
    torch.set_default_dtype(torch.float64)
if sys.argv[1] == "mkldnn_off":
    torch.backends.mkldnn.enabled = False
x = torch.ones(3, requires_grad=True)
out = aot_function(body, "nop")(x, float(sys.argv[2]))
out.backward()
print(json.dumps({**default_cache().stats(), "out": out.item(), "dtype": str(out.dtype)}))
"""


def _run(tmp_path, mode, scale):
    script = tmp_path / "step.py"
    script.write_text(STEP)
    proc = run_python(f"import runpy, sys; sys.argv = ['step', {mode!r}, {scale!r}]; runpy.run_path({str(script)!r})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_across_processes_flags_dtype_and_float_sign_miss_and_same_state_hits(tmp_path):
    cold = _run(tmp_path, "default", "0.0")
    assert cold["compile"] == 1
    same = _run(tmp_path, "default", "0.0")
    assert same["compile"] == 0 and same["hit"] == 1, "unchanged state must hit"
    for mode, scale in (("mkldnn_off", "0.0"), ("dtype64", "0.0"), ("default", "-0.0")):
        other = _run(tmp_path, mode, scale)
        assert other["compile"] == 1 and other["hit"] == 0, f"{mode} {scale}: a false hit"
    negative = _run(tmp_path, "default", "-0.0")
    assert negative["hit"] == 1 and negative["out"] == -3.0 * torch.tanh(torch.tensor(math.inf)).item()
    assert _run(tmp_path, "dtype64", "0.0")["dtype"] == "torch.float64"


@pytest.mark.slow
def test_inductor_float_sign_and_default_dtype_are_not_reused():
    def fn(x, s):
        return x / s + torch.ones(2)

    compiled = aot_function(fn, "inductor", cache=False)
    x = torch.ones(2)
    assert torch.equal(compiled(x, 0.0), fn(x, 0.0))
    assert torch.equal(compiled(x, -0.0), fn(x, -0.0))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        result = compiled(x, -0.0)
        assert result.dtype == fn(x, -0.0).dtype == torch.float64
    finally:
        torch.set_default_dtype(old)
    assert compiled.num_compiles == 3
