"""GPU facts in the compiled-graph cache key: GPU arch, CUDA and Triton versions are key parts, read for the
devices a graph uses (probes patched: CI has no GPU), so an entry built for one arch is never looked up on
another."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from aotcache.autograd_cache import key as key_module


def graph_on(device: str) -> torch.fx.GraphModule:
    """``x + full(2, 1.0, device=device)``: a graph that names ``device`` (built without running it)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    constant = graph.call_function(torch.ops.aten.full.default, ([2], 1.0),
                                   {"device": torch.device(device), "dtype": torch.float32})
    graph.output((graph.call_function(torch.ops.aten.add.Tensor, (x, constant)),))
    return torch.fx.GraphModule({}, graph)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A host that reports CUDA with two devices whose arch, CUDA and Triton versions the test sets."""
    facts = {"arch": {0: (9, 0), 1: (9, 0)}, "cuda": "13.0", "triton": "3.6.0"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: facts["arch"][index or 0])
    monkeypatch.setattr(torch.version, "cuda", facts["cuda"])
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(key_module, "_distribution_version", lambda *names: facts["triton"])

    def set_cuda(version):
        facts["cuda"] = version
        monkeypatch.setattr(torch.version, "cuda", version)

    facts["set_cuda"] = set_cuda
    return facts


def key_for(device: str = "cuda:0") -> key_module.CacheKey:
    return key_module.compute_key(graph_on(device), [torch.randn(2)], compiler_name="inductor",
                                  partitioner_name="default_partition", decomposition_id="compiler:inductor",
                                  check_safety=False)


def test_gpu_facts_are_system_parts(fake_gpu):
    system = key_for().part("system").detail
    assert system["gpu_arch"] == ["sm_90"] and system["cuda"] == "13.0" and system["triton"] == "3.6.0"
    assert "gpu_arch" not in key_module.system_parts(["cpu"])  # a CPU graph does not depend on the GPU


@pytest.mark.parametrize("change", ["arch", "cuda", "triton"])
def test_each_gpu_fact_changes_the_key(fake_gpu, change):
    before = key_for()
    if change == "arch":
        fake_gpu["arch"][0] = (10, 0)
    elif change == "cuda":
        fake_gpu["set_cuda"]("12.8")
    else:
        fake_gpu["triton"] = "3.5.1"
    after = key_for()
    assert after.digest != before.digest
    assert [name for name, digest in after.parts_digests().items()
            if before.parts_digests().get(name) != digest] == ["system"]


def test_another_device_index_is_another_key(fake_gpu):
    """A graph for cuda:1 never finds the entry of cuda:0 (it would run there): the device is in the key."""
    assert key_for("cuda:0").digest != key_for("cuda:1").digest
