"""A forward that branches on a tensor argument's Python class (``type(x)``, ``x.__class__``): the capture runs the
function on its trace tensors (``FunctionalTensor``), so the branch the trace takes is not eager's, and the graph
keeps it (found in session 27 running PyTorch's test_functions.py ``test_fstrings3`` under ``aotcache.compile``).
Known gap, in docs/limitations.md: neither ``type()`` nor ``__class__`` passes through a torch-function mode, so the
capture cannot see the read. Through the backend, Dynamo answers ``torch.Tensor`` and the result is eager's."""

from __future__ import annotations

import pytest
import torch

import aotcache
from aotcache.backend import aotcache_backend

X = torch.zeros(2)


def plus_one_if_plain_by_type(x):
    return x + 1 if type(x) is torch.Tensor else x - 1


def plus_one_if_plain_by_class_name(x):
    return x + 1 if x.__class__.__name__.startswith("Tensor") else x - 1


_BRANCHES = [plus_one_if_plain_by_type, plus_one_if_plain_by_class_name]
_GAP = "a tensor argument's type() / __class__ read during the capture is the trace tensor's (FunctionalTensor)"


@pytest.mark.xfail(strict=True, reason=_GAP)
@pytest.mark.parametrize("fn", _BRANCHES, ids=lambda f: f.__name__)
def test_a_branch_on_a_tensors_class_gives_eagers_result_through_compile(fn):
    compiled = aotcache.compile(fn, compiler="nop", cache=False)
    assert torch.equal(compiled(X), fn(X))


@pytest.mark.xfail(strict=True, reason=_GAP)
@pytest.mark.parametrize("fn", _BRANCHES, ids=lambda f: f.__name__)
def test_a_branch_on_a_tensors_class_gives_eagers_result_through_aot_function(fn):
    compiled = aotcache.aot_function(fn, "nop", cache=False)
    assert torch.equal(compiled(X), fn(X))


@pytest.mark.parametrize("fn", _BRANCHES, ids=lambda f: f.__name__)
def test_a_branch_on_a_tensors_class_gives_eagers_result_through_the_backend(fn):
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aotcache_backend)
    assert torch.equal(compiled(X), fn(X))
