"""Runtime checks in a captured graph: ``torch._check_tensor_all`` (NOTE [Tensor checks in a capture]) and side
effects nothing uses in a training forward (NOTE [Random draws nothing uses] in partition.py)."""

import pytest
import torch
from torch import nn
from transformers.utils.import_utils import torch_compilable_check

import aotcache
from aotcache.aot.tensor_checks import tensor_checks_in_graph


class PlaceholderCount(nn.Module):
    """The shape of transformers' multimodal placeholder check: as many image tokens as feature rows."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n_image_tokens = (ids == 5).sum()
        torch_compilable_check(n_image_tokens == features.shape[0], "image tokens and features do not match")
        return self.proj(features)


@pytest.mark.parametrize("train", [True, False], ids=["train", "no_grad"])
def test_a_tensor_check_is_captured_and_checked_at_every_call(train):
    """transformers' ``torch_compilable_check`` calls ``torch._check_tensor_all`` under tracing, whose host read
    failed the capture: with fullgraph=True aotcache.compile raised where torch.compile runs (otherwise the model
    took the Dynamo way). Now the graph checks the condition at every call, a cache hit included."""
    torch.manual_seed(0)
    model = PlaceholderCount()
    features = torch.randn(2, 4, requires_grad=train)
    good, bad = torch.tensor([5, 1, 5]), torch.tensor([5, 1, 1])
    for _ in range(2):  # the second wrapper loads the first one's entry
        compiled = aotcache.compile(model, compiler="nop", fullgraph=True)
        with torch.set_grad_enabled(train):
            out = compiled(features, good)
            assert compiled.route == "aot"
            assert torch.equal(out, model(features, good))
            if train:
                (grad,) = torch.autograd.grad(out.sum(), features)
                (want,) = torch.autograd.grad(model(features, good).sum(), features)
                assert torch.equal(grad, want)
            with pytest.raises(ValueError, match="do not match"):
                model(features, bad)  # eager's own error
            with pytest.raises(RuntimeError, match=r"torch\._check_tensor_all"):
                compiled(features, bad)


def test_outside_a_capture_the_check_is_torchs_own():
    """While captures run, only the capturing thread traces the check: any other call is torch's own check,
    its errors included, and torch's function is back when the last capture ends."""
    original = torch._check_tensor_all_with
    with tensor_checks_in_graph(), tensor_checks_in_graph():
        assert torch._check_tensor_all_with is not original
        torch._check_tensor_all(torch.tensor([True, True]))
        with pytest.raises(RuntimeError, match="Expected cond to be True"):
            torch._check_tensor_all(torch.tensor([True, False]))
        with pytest.raises(TypeError, match="dtype torch.bool"):
            torch._check_tensor_all(torch.tensor([1]))
    assert torch._check_tensor_all_with is original


def _asserts_positive(x: torch.Tensor) -> torch.Tensor:
    torch._assert_async((x > 0).all(), "x must be positive")  # nothing uses its result
    return x.log()


@pytest.mark.parametrize("partition", ["default", "min_cut"])
def test_an_assertion_nothing_uses_stays_in_the_training_forward(partition):
    """The training forward kept only what its outputs and saved values need: the assertion was dropped, so a
    call that eager (and the inference graph) refuses returned NaN."""
    compiled = aotcache.aot_function(_asserts_positive, "nop", partition_fn=partition, cache=False)
    x = torch.rand(3) + 0.5
    for train in (True, False):
        with torch.set_grad_enabled(train):
            x_in = x.clone().requires_grad_(train)
            assert torch.equal(compiled(x_in), _asserts_positive(x_in))
            with pytest.raises(RuntimeError, match="x must be positive"):
                compiled(-x_in)
