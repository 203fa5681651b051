"""Training-loop utilities wrapped around a compiled model (QAT, parametrizations), compared with eager under
the same seed (nop compiler). Each test is a bug found by ``bench/loop_utilities.py``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import aotcache


def _qat_linear() -> nn.Module:
    """A Linear prepared for eager-mode QAT: its weight FakeQuantize is per channel (x86 qconfig), whose
    scale / zero point start with one entry and running min / max with none."""
    from torch.ao import quantization as tq

    torch.manual_seed(0)
    model = nn.Sequential(tq.QuantStub(), nn.Linear(3, 4), tq.DeQuantStub()).train()
    model.qconfig = tq.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation warnings
        return tq.prepare_qat(model)


def _train_side_by_side(eager: nn.Module, model: nn.Module, compiled, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(5, 3, generator=g), torch.randint(0, 4, (5,), generator=g)
        for net, params in ((eager, eager), (compiled, model)):
            nn.functional.cross_entropy(net(x), y).backward()
            with torch.no_grad():
                for p in params.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
        for (name, got), want in zip(model.state_dict().items(), eager.state_dict().values()):
            assert got.shape == want.shape, name  # scale [1] -> [4], min_val [0] -> [4], as in eager
            torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize("entry", ["compile", "aot_module"])
def test_qat_per_channel_fake_quant_trains_as_eager(entry):
    """Found: the first training step of a ``prepare_qat`` model raised "output with shape [1] doesn't match the
    broadcast shape [4]" (Inductor: its size assertion): ``fused_moving_avg_obs_fake_quant`` resizes its scale /
    zero point / running min and max to one entry per channel inside its kernel, which its fake kernel does not
    show. Such a call is refused and falls back (NOTE [Kernels that resize their arguments]); once resized, the
    buffers keep their sizes and the next call is captured: ``aotcache.compile`` does not take the Dynamo way
    for good for it."""
    eager, model = _qat_linear(), _qat_linear()
    compiled = (aotcache.compile(model, compiler="nop") if entry == "compile"
                else aotcache.aot_module(model, "nop"))
    _train_side_by_side(eager, model, compiled)
    # the refused first call, then one capture for all the calls with the per-channel sizes
    assert compiled.compiled.num_compiles == 2
    if entry == "compile":
        assert compiled.route == "aot"


def test_a_qat_model_run_once_eagerly_is_captured_whole():
    """The workaround the refusal names: one eager forward of the prepared model (a calibration batch) before
    compiling gives the buffers their per-channel sizes, and the model is captured whole."""
    eager, model = _qat_linear(), _qat_linear()
    calibration = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    eager(calibration), model(calibration)
    compiled = aotcache.compile(model, compiler="nop")
    _train_side_by_side(eager, model, compiled)
    assert compiled.route == "aot" and compiled.compiled.num_compiles == 1


def test_evaluation_inside_parametrize_cached_gives_eager_results():
    """Found: a first call inside ``parametrize.cached()`` left a fake tensor in parametrize's process-wide cache
    (the analysis pass computed the weight on fake tensors); the trace pass read it back as a constant and the
    compiled call returned a FakeTensor ("compiled graph not cached (fake tensor constant)"). The capture now
    runs with the cache off (NOTE [parametrize.cached() during a capture])."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    parametrizations.weight_norm(eager[0])
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    parametrizations.weight_norm(model[0])
    model.load_state_dict(eager.state_dict())
    compiled = aotcache.compile(model, compiler="nop")
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        with parametrize.cached(), torch.no_grad():
            got, want = compiled(x), eager(x)
            assert not isinstance(got, FakeTensor)
            torch.testing.assert_close(got, want)
            assert not any(isinstance(t, FakeTensor) for t in parametrize._cache.values())
            torch.testing.assert_close(model(x), want)  # the eager model inside the same context
        assert parametrize._cache == {} and parametrize._cache_enabled == 0
    torch.testing.assert_close(compiled(x), eager(x))  # outside: a training capture
    assert compiled.route == "aot"


def test_a_qat_model_has_a_trusted_fingerprint_that_sees_its_qconfig():
    """Found: every call of a ``prepare_qat`` model warned that its fingerprint cannot be trusted (opaque object:
    ``torch.ao.quantization.observer._PartialWrapper``, then ``torch.qscheme``), so each warm start traced it
    again. The QConfig's observer constructors are read as their partial and callables (NOTE [QAT observer
    constructors] in reachable.py), a qscheme by its name; another observer setting is another fingerprint."""
    from torch.ao import quantization as tq

    from aotcache.autograd_cache.fingerprint import code_fingerprint

    def digest(quant_max: int) -> str:
        model = _qat_linear()
        model.qconfig = tq.QConfig(activation=tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver,
                                                                       quant_min=0, quant_max=quant_max),
                                   weight=tq.default_weight_fake_quant)
        fingerprint = code_fingerprint(model)
        assert fingerprint.trusted, fingerprint.reason
        return fingerprint.digest

    assert digest(255) == digest(255)
    assert digest(255) != digest(127)
