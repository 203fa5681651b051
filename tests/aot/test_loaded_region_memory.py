"""A torch.compile region loaded from the cache keeps no tensor of the call that loaded it (NOTE [A loaded region
keeps no tensor of the call that loaded it] in ``autograd_cache/pipeline.py``). Found by PyTorch's
test_misc.py (test_parameter_free, test_release_input_memory) run in a second process on a warm cache."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from aotcache.autograd_cache.cache import default_cache


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo remembers, per code object, the shapes it saw (automatic dynamic): an ``nn.Linear`` called at other
    batch sizes by earlier tests in the process made this file's first compile dynamic and the compile after
    ``torch._dynamo.reset()`` static, two keys, no hit. Each test starts from a Dynamo that saw nothing."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _call_then_forget(model_factory):
    """Compile a fresh model, call it once, drop every reference; weak references to the input, the model and
    its weight, to see what the compiled region still holds."""
    model = model_factory()
    x = torch.rand(2, 4)
    refs = {"input": weakref.ref(x), "model": weakref.ref(model), "weight": weakref.ref(model.weight)}
    out = torch.compile(model, backend="aotcache", options={"compiler": "nop"})(x)
    refs["output"] = weakref.ref(out)
    del model, x, out
    gc.collect()
    return {name: ref() is None for name, ref in refs.items()}


def test_a_region_loaded_from_the_cache_keeps_neither_its_first_input_nor_the_weights():
    """On a hit the runtime kept Dynamo's example inputs (the call's batch, the lifted weights) for a possible
    double backward: the weight outlived its deleted module and the batch its last use. A compile (a miss) keeps
    neither, as torch's backends."""
    torch.manual_seed(0)
    freed_after_compile = _call_then_forget(lambda: nn.Linear(4, 4))
    assert default_cache().stats()["saved"] == 1
    torch._dynamo.reset()
    freed_after_load = _call_then_forget(lambda: nn.Linear(4, 4))
    assert default_cache().stats()["hit"] == 1
    assert freed_after_compile == {"input": True, "model": True, "weight": True, "output": True}
    assert freed_after_load == {"input": True, "model": True, "weight": True, "output": True}


class _Critic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return torch.tanh(self.lin(x)).sum()


def _gradient_penalty(model, x):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x), x, create_graph=True)
    loss = (g.norm(dim=-1) - 1).pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_a_double_backward_of_a_loaded_region_after_its_first_inputs_are_gone_matches_eager():
    """The joint graph of a loaded region is now captured on the differentiated call's own inputs: a gradient
    penalty on a later batch, the first call's batch freed, gives eager's loss and gradients."""
    torch.manual_seed(0)
    eager = _Critic()
    first, later = torch.randn(3, 4), torch.randn(3, 4)
    torch.compile(copy.deepcopy(eager), backend="aotcache", options={"compiler": "nop"})(first)  # stored
    torch._dynamo.reset()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aotcache", options={"compiler": "nop"})
    batch = first.clone()
    batch_ref = weakref.ref(batch)
    compiled(batch)  # loaded here, on a batch that is then dropped
    del batch
    gc.collect()
    assert batch_ref() is None
    assert default_cache().stats()["hit"] >= 1
    want_loss, want_grads = _gradient_penalty(copy.deepcopy(eager), later)
    loss, grads = _gradient_penalty(compiled, later)
    torch.testing.assert_close(loss, want_loss)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want)
