"""A forward that branches on a tensor argument's (or a parameter's / buffer's) autograd state: ``.grad``,
``._version``, ``.is_inference()``, ``.is_leaf`` (NOTE [Autograd state read by the function] in
aot/tensor_state_reads.py; found in session 21: the graph kept the branch its trace took, ``is_leaf`` was wrong from
the first call). Every call gives eager's result, and a program that reads none of it is still captured."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import aotcache
from aotcache.aot.fallback import fallback_counts
from aotcache.backend import aotcache_backend
from tests.conftest import run_python

X = torch.ones(2, 3)

_ROUTES = {
    "aot_module": lambda model: aotcache.aot_module(model, "nop", cache=False),
    "compile": lambda model: aotcache.compile(model, compiler="nop", cache=False),
}


class ScaledByGradState(nn.Module):
    """Scales by 3 once its weight has a gradient (a branch on ``.grad``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) * (2 if self.fc.weight.grad is None else 3)


class ScaledByBufferVersion(nn.Module):
    """Scales by 3 once its buffer was changed in place (a branch on ``._version``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.ones(3))

    def forward(self, x):
        return (x + self.shift) * (2 if self.shift._version == 0 else 3)


class ScaledByInferenceBuffer(nn.Module):
    """Scales by 2 while its buffer is an inference tensor (a branch on ``.is_inference()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.ones(3))

    def forward(self, x):
        return (x + self.shift) * (2 if self.shift.is_inference() else 3)


def _model(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return cls()


@pytest.mark.parametrize("route", list(_ROUTES))
def test_a_parameters_grad_set_by_backward_and_cleared_gives_eagers_result(route):
    model = _model(ScaledByGradState)
    compiled = _ROUTES[route](model)
    torch.testing.assert_close(compiled(X), model(X))
    model(X).sum().backward()
    torch.testing.assert_close(compiled(X), model(X))  # was the no-grad branch: 2x where eager gives 3x
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(compiled(X), model(X))
    model(X).sum().backward()
    torch.testing.assert_close(compiled(X), model(X))


def test_an_arguments_grad_gives_eagers_result():
    def by_grad(x):
        return x * 2 if x.grad is None else x * 3

    x = torch.ones(3, requires_grad=True)
    compiled = aotcache.aot_function(by_grad, "nop", cache=False)
    torch.testing.assert_close(compiled(x), by_grad(x))
    x.grad = torch.zeros(3)
    torch.testing.assert_close(compiled(x), by_grad(x))


def test_the_leafness_of_an_argument_requiring_grad_gives_eagers_result():
    def by_leafness(x):
        return x * 2 if x.is_leaf else x * 3

    def by_grad_fn(x):
        return x * 2 if x.grad_fn is None else x * 3

    leaf = torch.ones(3, requires_grad=True)
    for fn in (by_leafness, by_grad_fn):
        compiled = aotcache.aot_function(fn, "nop", cache=False)
        torch.testing.assert_close(compiled(leaf), fn(leaf))  # was 3x from the first call: a trace tensor's leafness
        torch.testing.assert_close(compiled(leaf * 1), fn(leaf * 1))
        torch.testing.assert_close(compiled(leaf), fn(leaf))


@pytest.mark.parametrize("route", list(_ROUTES))
def test_a_buffer_changed_in_place_read_by_version_gives_eagers_result(route):
    model = _model(ScaledByBufferVersion)
    compiled = _ROUTES[route](model)
    torch.testing.assert_close(compiled(X), model(X))
    model.shift.mul_(1)
    torch.testing.assert_close(compiled(X), model(X))  # was the version-0 branch


def test_an_arguments_version_gives_eagers_result_through_the_backend():
    def by_version(x):
        return x * 2 if x._version == 0 else x * 3

    x = torch.ones(3)
    for compiled in (aotcache.aot_function(by_version, "nop", cache=False),
                     torch.compile(by_version, backend=aotcache_backend)):
        x = torch.ones(3)
        torch.testing.assert_close(compiled(x), by_version(x))
        x.add_(0)
        torch.testing.assert_close(compiled(x), by_version(x))  # the backend too: Dynamo's graph held the read
        torch._dynamo.reset()


@pytest.mark.parametrize("route", list(_ROUTES))
def test_a_buffer_made_an_inference_tensor_gives_eagers_result(route):
    model = _model(ScaledByInferenceBuffer)
    compiled = _ROUTES[route](model)
    torch.testing.assert_close(compiled(X), model(X))
    with torch.inference_mode():
        model.shift = torch.ones(3)
    torch.testing.assert_close(compiled(X), model(X))


def test_refused_reads_are_remembered_and_a_program_reading_none_is_still_captured():
    model = _model(ScaledByGradState)
    compiled = aotcache.aot_module(model, "nop", cache=False)
    before = fallback_counts().get("partial:unsupported_construct", 0)
    compiled(X)
    compiled(X)
    assert compiled.compiled.num_compiles == 1  # the fallback is kept for the signature: not traced again
    assert fallback_counts().get("partial:unsupported_construct", 0) == before + 1

    class ReadsWhatTheSignatureHolds(nn.Module):
        """Reads ``requires_grad`` and the leafness of an input that does not require grad: both the trace's."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.register_buffer("shift", torch.ones(3))

        def forward(self, x):
            scale = 2 if x.requires_grad else 3
            return self.fc(x) * scale + (self.shift if self.shift.is_leaf and x.grad_fn is None else 0)

    plain = _model(ReadsWhatTheSignatureHolds)
    compiled = aotcache.aot_module(plain, "nop", cache=False)
    for x in (X, X.clone(), torch.ones(2, 3, requires_grad=True)):
        torch.testing.assert_close(compiled(x), plain(x))
    plain(X).sum().backward()
    torch.testing.assert_close(compiled(X), plain(X))
    assert compiled.compiled.num_compiles == 2  # two signatures (requires_grad), both captured
    assert fallback_counts().get("partial:unsupported_construct", 0) == before + 1


GRAD_SCRIPT = """
import json, sys, torch
import aotcache
from torch import nn

class ScaledByGradState(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) * (2 if self.fc.weight.grad is None else 3)

torch.manual_seed(0)
model = ScaledByGradState()
compiled = aotcache.compile(model, compiler="nop")
x = torch.ones(2, 3)
if sys.argv[1] == "with_grad":
    model(x).sum().backward()
print(json.dumps({"same": torch.equal(compiled(x), model(x))}))
"""


def test_a_warm_process_with_a_grad_set_gives_eagers_result():
    """Nothing a cold process stored may serve a warm one whose parameter has a grad."""
    def run(mode):
        code = f"import sys; sys.argv = ['grad', {mode!r}]; exec({GRAD_SCRIPT!r})"
        return json.loads(run_python(code).stdout.strip().splitlines()[-1])

    assert run("without_grad")["same"]
    assert run("with_grad")["same"]
    assert run("without_grad")["same"]


class ScaledByAliasState(nn.Module):
    """Branches on its buffer's version and inference-ness read through aliases (``detach()``, a view) and through
    ``torch.is_inference``: an alias shares both with the buffer."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.read = read
        self.register_buffer("shift", torch.ones(3))

    def forward(self, x):
        if self.read == "detach_version":
            changed = self.shift.detach()._version != 0
        elif self.read == "view_version":
            changed = self.shift[:]._version != 0
        elif self.read == "torch_is_inference":
            changed = torch.is_inference(self.shift)
        else:
            changed = self.shift.view(-1).is_inference()
        return (x + self.shift) * (3 if changed else 2)


@pytest.mark.parametrize("route", list(_ROUTES))
@pytest.mark.parametrize("read", ["detach_version", "view_version", "torch_is_inference", "view_is_inference"])
def test_state_read_through_an_alias_or_torch_is_inference_gives_eagers_result(route, read):
    """Found by the session-21 review: each kept the branch of the first call."""
    model = ScaledByAliasState(read)
    compiled = _ROUTES[route](model)
    torch.testing.assert_close(compiled(X), model(X))
    if read.endswith("version"):
        model.shift.mul_(1)
    else:
        with torch.inference_mode():
            model.shift = torch.ones(3)
    torch.testing.assert_close(compiled(X), model(X))


GLOBAL_WEIGHT = torch.ones(3, requires_grad=True)


class ScaledByGlobalGrad(nn.Module):
    """Branches on the ``.grad`` of a global tensor (a real tensor the program holds, not an input)."""

    def forward(self, x):
        return x * (2 if GLOBAL_WEIGHT.grad is None else 3)


@pytest.mark.parametrize("route", list(_ROUTES))
def test_the_grad_of_a_global_tensor_gives_eagers_result(route):
    """Found by the session-21 review: a backward setting the global's grad kept the no-grad branch."""
    GLOBAL_WEIGHT.grad = None
    model = ScaledByGlobalGrad()
    compiled = _ROUTES[route](model)
    try:
        torch.testing.assert_close(compiled(X), model(X))
        GLOBAL_WEIGHT.grad = torch.zeros(3)
        torch.testing.assert_close(compiled(X), model(X))
    finally:
        GLOBAL_WEIGHT.grad = None


def test_a_checkpointed_region_is_still_compiled_through_the_backend():
    """aotcache's own read of a checkpointed region's input versions is not the function's: found by the session-21
    review, every torch.utils.checkpoint region ran eagerly through the backend."""
    import torch.utils.checkpoint as checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return checkpoint.checkpoint(self.fc, x, use_reentrant=False)

    model = _model(Checkpointed)
    compiled = torch.compile(model, backend=aotcache_backend)
    x = torch.ones(2, 3, requires_grad=True)
    before = dict(fallback_counts())
    torch.testing.assert_close(compiled(x), model(x))
    assert dict(fallback_counts()) == before
    torch._dynamo.reset()
