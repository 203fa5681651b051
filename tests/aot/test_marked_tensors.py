"""A tensor marked by ``torch._dynamo.mark_dynamic`` / ``mark_unbacked`` / ``maybe_mark_dynamic`` / ``mark_static``
is an ordinary argument of ``aotcache.compile``: the marks' ``_specialize_on`` dict made it refuse the tensor as
"neither a tensor nor a hashable constant" (an error under ``fullgraph=True``; found with PyTorch's test_misc.py
through ``aotcache.compile``). See ``python_attributes`` in ``aot/signature.py``."""

from __future__ import annotations

import pytest
import torch

import aotcache


def _checked_add(x):
    torch._check(x.shape[0] > 3, lambda: "Shape is not greater than 3")
    return x + 1


@pytest.mark.parametrize("mark", ("mark_dynamic", "maybe_mark_dynamic", "mark_static", "mark_unbacked"))
def test_a_marked_tensor_is_captured_whole(mark):
    marker = getattr(torch._dynamo, mark, None) or getattr(torch._dynamo.decorators, mark)
    compiled = aotcache.compile(_checked_add, compiler="nop", fullgraph=True)
    for size in (5, 6):
        x = torch.randn(size)
        marker(x, 0)
        torch.testing.assert_close(compiled(x), x + 1)
    assert compiled.route == "aot"


def test_a_users_attribute_next_to_the_marks_still_selects_its_graph():
    """The other direction: the marks are left out of the signature, a program's own attribute is not."""
    def scaled(x):
        return x * getattr(x, "scale", 1.0)

    compiled = aotcache.compile(scaled, compiler="nop", fullgraph=True)
    for scale in (2.0, 3.0):
        x = torch.ones(4)
        torch._dynamo.mark_dynamic(x, 0)
        x.scale = scale
        torch.testing.assert_close(compiled(x), torch.full((4,), scale))
