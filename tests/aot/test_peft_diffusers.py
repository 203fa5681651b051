"""Patterns of peft (LoRA) and diffusers models through ``aotcache.compile``, each a bug found by running them
(docs/models.md, "peft and diffusers"), kept as a small hand-written module in the shape it was found (nop, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aotcache
from aotcache.autograd_cache.cache import resolve_cache


class AttentionThenGroupNorm(nn.Module):
    """diffusers' VAE mid block in small: attention's ``(B, HW, C)`` result turned back into ``(B, C, H, W)`` by
    ``transpose(-1, -2).reshape(...)``, plus the residual, then a GroupNorm (a ResNet block's first norm)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.to_out = nn.Linear(channels, channels)
        self.norm = nn.GroupNorm(4, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.view(batch, channels, height * width).transpose(1, 2)
        hidden = self.to_out(tokens).transpose(-1, -2).reshape(batch, channels, height, width)
        return self.norm((hidden + x) / 1.0)


@pytest.mark.parametrize("source", ["compiled", "cache hit"])
def test_group_norm_after_a_transposed_reshape_with_batch_one_runs_and_trains_as_eager(source):
    # NOTE [Group norm inputs in eager's layout]: fake strides of a size-1 batch dimension differ from eager's, so
    # the trace recorded no copy before native_group_norm and the graph raised "Expected
    # X.is_contiguous(memory_format)" where eager runs (diffusers' AutoencoderKL, batch 1)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    eager = AttentionThenGroupNorm()
    expected = eager(x)
    expected.square().mean().backward()
    if source == "cache hit":  # the graphs rebuilt from stored artifacts behave the same
        torch.manual_seed(0)
        aotcache.compile(AttentionThenGroupNorm(), compiler="nop")(x).square().mean().backward()
    torch.manual_seed(0)
    model = AttentionThenGroupNorm()
    out = aotcache.compile(model, compiler="nop")(x)
    out.square().mean().backward()
    if source == "cache hit":
        assert resolve_cache(True).counters["hit"] >= 1 and resolve_cache(True).counters["compile"] == 1
    assert torch.allclose(out, expected, atol=1e-6)
    for (name, want), (_, got) in zip(eager.named_parameters(), model.named_parameters()):
        assert torch.allclose(want.grad, got.grad, atol=1e-6), name


_CONFIG_MODEL_FINGERPRINT = """
import torch
from torch import nn
from torch.utils import _pytree as pytree
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from aotcache.aot.api import AOTOptions
from aotcache.autograd_cache.fingerprint import fingerprint_module_call

class Tiny(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, width=4, depth=1, scale=1.0, act="silu", norm="layer", bias=True, eps=1e-5, groups=1):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return self.linear(x) * self.config.scale

model = Tiny()
assert len(model.config._use_default_values) > 4, model.config
x = torch.ones(2, 4)
flat, spec = pytree.tree_flatten(((dict(model.named_parameters()), {}, x), {}))
fingerprint = fingerprint_module_call(model, flat, spec, AOTOptions())
assert fingerprint.trusted, fingerprint.reason
print("DIGEST", fingerprint.digest)
"""


def test_a_diffusers_config_model_has_the_same_fingerprint_in_every_process():
    # NOTE [Set-ordered library metadata]: ConfigMixin's ``_use_default_values`` is ``list(set(...))``, ordered by
    # string hashing: each process fingerprinted a diffusers model differently, so every warm start traced again
    pytest.importorskip("diffusers")
    from tests.conftest import run_python

    digests = {run_python(_CONFIG_MODEL_FINGERPRINT, env={"PYTHONHASHSEED": str(seed)}).stdout.split("DIGEST ")[1]
               for seed in (1, 2, 3)}
    assert len(digests) == 1


class TimestepEmbedding(nn.Module):
    """diffusers' UNet in small: a Python int timestep turned into a tensor with ``torch.tensor([t])``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=sample.dtype, device=sample.device)
        frequencies = torch.arange(4, dtype=sample.dtype) * timestep.expand(sample.shape[0])[:, None] / 100
        return self.linear(sample) + torch.cat([frequencies.sin(), frequencies.cos()], dim=-1)


def test_an_int_timestep_changing_every_step_compiles_one_dynamic_graph_and_matches_eager():
    # NOTE [Integer arguments], [Tensors made from symbolic scalars]: a denoising loop passing the timestep as an
    # int compiled a graph per step (an int was always a constant; traced as a symbol, torch.tensor([t]) still
    # specialized on its value); torch.compile compiles two (static, then dynamic)
    torch.manual_seed(0)
    model = TimestepEmbedding()
    compiled = aotcache.compile(model, compiler="nop")
    sample = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in (900, 700, 500, 300, 100, 0):  # DDPM's last timestep is 0: a symbol too, as in torch.compile
            assert torch.equal(compiled(sample, t), model(sample, t)), t
    assert compiled.compiled.num_compiles == 2
    assert resolve_cache(True).counters["compile"] == 2


def test_a_tensor_timestep_taken_from_the_schedule_compiles_one_graph_and_matches_eager():
    # NOTE [Storage offsets are not part of the signature], [Misaligned inputs]: ``scheduler.timesteps[i]`` (int64)
    # is 16-byte aligned at every other step, and alignment in the signature made the loop use two graphs
    # (torch.compile: one)
    torch.manual_seed(0)
    model = TimestepEmbedding()
    compiled = aotcache.compile(model, compiler="nop")
    sample = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.arange(900, -1, -200)  # as DDPMScheduler.set_timesteps(5) leaves them
    with torch.no_grad():
        for i in range(len(timesteps)):
            assert torch.equal(compiled(sample, timesteps[i]), model(sample, timesteps[i])), i
    assert compiled.compiled.num_compiles == 1
    assert resolve_cache(True).counters["compile"] == 1


class AdapterLayer(nn.Module):
    """peft's LoRA layer in small: frozen adapters, the active ones named by a list attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.scales = nn.ParameterDict({"default": nn.Parameter(torch.ones(4)),
                                        "second": nn.Parameter(torch.full((4,), 2.0))})
        self._active_adapter = ["default"]
        self.requires_grad_(False)  # inference: no requires_grad flip for the signature to see

    def set_adapter(self, names: list[str]) -> None:
        self._active_adapter = names  # rebound, as peft's BaseTunerLayer.set_adapter does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for name in self._active_adapter:
            out = out * self.scales[name]
        return out


def test_an_adapter_switch_that_rebinds_a_list_attribute_traces_again_instead_of_reusing_the_old_graph():
    # NOTE [Rebound list attributes]: the graph of the previous adapter ran after set_adapter (a stale graph)
    torch.manual_seed(0)
    model = nn.Sequential(AdapterLayer(), nn.ReLU())
    compiled = aotcache.compile(model, compiler="nop")
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(compiled(x), model(x))
    model[0].set_adapter(["second"])
    assert torch.equal(compiled(x), model(x))
    model[0].set_adapter(["default"])  # a new list equal to the first: the first graph again
    assert torch.equal(compiled(x), model(x))
    model[0].set_adapter(["default", "second"])
    assert torch.equal(compiled(x), model(x))
    assert compiled.compiled.num_compiles == 3
