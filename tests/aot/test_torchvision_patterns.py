"""torchvision's models through ``aotcache.compile``, as patterns: each test is a bug found by the sweep of
``bench/torchvision_sweep.py`` (torch 2.14.1 + torchvision 0.29.1, nop compiler, CPU), kept in the shape it was
found with a small hand-written module, since torchvision cannot be installed beside this env's torch."""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

import aotcache
from aotcache.autograd_cache.cache import resolve_cache
from tests.conftest import run_python


class _CorrBlock(nn.Module):
    """RAFT's ``CorrBlock``: ``build_pyramid`` keeps a list of tensors on the module, ``index_pyramid`` reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.corr_pyramid: list[torch.Tensor] = [torch.tensor(0)]

    def build_pyramid(self, fmap1: torch.Tensor, fmap2: torch.Tensor) -> None:
        volume = torch.einsum("bci,bcj->bij", fmap1.flatten(2), fmap2.flatten(2))
        self.corr_pyramid = [volume]
        self.corr_pyramid.append(nn.functional.avg_pool1d(volume, 2))

    def index_pyramid(self) -> torch.Tensor:
        return torch.cat([level.mean(-1) for level in self.corr_pyramid], dim=-1)


class _TinyRaft(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3, padding=1)
        self.corr_block = _CorrBlock()
        self.head = nn.Linear(32, 2)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        self.corr_block.build_pyramid(self.encoder(image1), self.encoder(image2))
        return self.head(self.corr_block.index_pyramid())


class _KeepsPrevious(nn.Module):
    """A streaming model that adds the previous call's features (``self.prev = h.detach()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.prev: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.prev is not None:
            h = h + self.prev
        self.prev = h.detach()
        return h


def _images(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)


def test_raft_pyramid_kept_on_the_module_trains_as_eager_and_leaves_no_trace_tensors():
    # NOTE [Tensors stored on modules]: the capture left the pyramid holding FunctionalTensors (a read of the
    # attribute met dead trace tensors) and every warm start traced again
    torch.manual_seed(0)
    eager = _TinyRaft()
    model = copy.deepcopy(eager)
    compiled = aotcache.compile(model, compiler="nop")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, model)]
    for step in range(2):
        for forward, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            forward(*_images(step)).pow(2).mean().backward()
            optimizer.step()
        for (name, want), (_, got) in zip(eager.named_parameters(), model.named_parameters()):
            assert torch.allclose(want, got, atol=1e-6), name
    assert compiled.route == "dynamo"  # the assignment is replayed at every call, with real tensors
    pyramid = model.corr_block.corr_pyramid
    assert len(pyramid) == 2 and all(type(level) is torch.Tensor for level in pyramid)
    for want, got in zip(eager.corr_block.corr_pyramid, pyramid):
        assert torch.allclose(want, got, atol=1e-6)


def test_a_module_keeping_the_previous_calls_features_runs_as_eager():
    # the second call failed with "Attempting to use FunctionalTensor on its own" where eager runs
    torch.manual_seed(0)
    eager = _KeepsPrevious()
    compiled = aotcache.compile(copy.deepcopy(eager), compiler="nop")
    for step in range(3):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
        assert torch.allclose(compiled(x), eager(x), atol=1e-6), step
    assert type(compiled.prev) is torch.Tensor and torch.allclose(compiled.prev, eager.prev)
    assert resolve_cache(True).counters.get("route_recorded_dynamo", 0) == 0  # this process chose, none read


def test_aot_module_of_a_module_keeping_a_tensor_tries_the_capture_once():
    """Through ``aot_module`` itself (no recorded route): the stored tensor changes the module's settings at every
    call, and the fallback kept under the call's settings was never found again, so each call tried the capture
    before falling back (NOTE [Refusals that hold for any settings])."""
    torch.manual_seed(0)
    eager = _KeepsPrevious()
    compiled = aotcache.aot_module(copy.deepcopy(eager), "nop", cache=False, on_capture_error="eager")
    for step in range(5):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
        assert torch.allclose(compiled(x), eager(x), atol=1e-6), step
    assert compiled.compiled.num_compiles == 1
    assert type(compiled.prev) is torch.Tensor and torch.allclose(compiled.prev, eager.prev)


_WARM_START = """
import json, torch, aotcache
from aotcache.autograd_cache.cache import resolve_cache
from tests.aot.test_torchvision_patterns import _TinyRaft, _images
torch.manual_seed(0)
model = _TinyRaft()
compiled = aotcache.compile(model, compiler="nop")
compiled(*_images(0)).sum().backward()
print(json.dumps({"route": compiled.route, "traces": compiled.compiled.num_compiles,
                  "pyramid": [type(level).__name__ for level in model.corr_block.corr_pyramid],
                  **{k: v for k, v in resolve_cache(True).counters.items() if isinstance(v, int)}}))
"""


def test_raft_pattern_warm_start_takes_the_recorded_way_without_a_trace():
    # before NOTE [Tensors stored on modules] every warm start traced again (the call changed the state its
    # fingerprint covers), and left FunctionalTensors on the model
    cold = json.loads(run_python(_WARM_START).stdout.strip().splitlines()[-1])
    warm = json.loads(run_python(_WARM_START).stdout.strip().splitlines()[-1])
    assert cold["route"] == warm["route"] == "dynamo" and cold["compile"] >= 1
    assert warm["route_recorded_dynamo"] == 1 and warm["traces"] == 0
    assert warm.get("compile", 0) == 0 and warm["hit"] == cold["compile"]
    assert warm["pyramid"] == ["Tensor", "Tensor"]
