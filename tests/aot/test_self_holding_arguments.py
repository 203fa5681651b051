"""A list argument that holds itself: eager and ``torch.compile`` run such a call (the function reads ``len``),
aotcache's entry points flatten their arguments with torch's pytree, which recurses without end (found in session
26's review)."""

from __future__ import annotations

import pytest
import torch

import aotcache


def _scaled_by_length(x, items):
    return x * len(items)


@pytest.mark.xfail(strict=True, raises=RecursionError, reason=(
    "aotcache flattens a call's arguments with torch's pytree (api.py call_structured, the signature, the call hot "
    "path), which recurses forever over a list holding itself: a RecursionError where eager and torch.compile run; "
    "a fix runs such a call eagerly at every flattening place (not small)"))
@pytest.mark.parametrize("entry", ["aot_function", "compile"])
def test_a_list_holding_itself_runs_as_eager_runs(entry):
    items = [1]
    items.append(items)
    compiled = (aotcache.aot_function(_scaled_by_length, "nop", cache=False) if entry == "aot_function"
                else aotcache.compile(_scaled_by_length, compiler="nop", cache=False))
    x = torch.ones(2)
    assert torch.equal(compiled(x, items), _scaled_by_length(x, items))
