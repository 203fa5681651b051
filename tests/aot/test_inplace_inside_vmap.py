"""In-place ops inside ``torch.vmap`` in a captured function (NOTE [Writes outside the trace] in
aot/unsupported_ops.py). Inside vmap every tensor is a functorch wrapper whose Python type is plain
``torch.Tensor``: a tensor the vmapped function makes itself and then writes was refused as a global or closure
tensor. ``create_block_mask`` (flex attention's mask, transformers' ``attn_implementation="flex_attention"``) does
that (``dense_mask[rows, cols] = 1`` under vmap), so every Dynamo graph building a block mask ran eagerly under
``torch.compile(backend="aotcache")`` (``fallback_counts()`` ``region``) and never reached the cache."""
from __future__ import annotations

import pytest
import torch

import aotcache
from aotcache.aot.fallback import fallback_counts


def scatter_rows(x: torch.Tensor) -> torch.Tensor:
    """Per row: a fresh tensor made inside vmap, written in place (as ``create_block_mask``'s ``_ordered_to_dense``)."""
    def row(r: torch.Tensor) -> torch.Tensor:
        out = r.new_zeros(5)
        out[:4] = r * 2
        out.add_(1)
        return out

    return torch.vmap(row)(x)


def test_a_tensor_made_and_written_inside_vmap_is_captured_with_eagers_results():
    x = torch.arange(12.0).reshape(3, 4)
    compiled = aotcache.aot_function(scatter_rows, "nop", on_capture_error="raise")
    torch.testing.assert_close(compiled(x), scatter_rows(x), rtol=0, atol=0)
    torch.testing.assert_close(compiled(x + 1), scatter_rows(x + 1), rtol=0, atol=0)


def test_a_global_tensor_written_inside_vmap_is_still_refused_before_the_write():
    """The other direction: vmap over a real tensor the function does not take (a batched wrapper of a plain
    tensor) writes real state; it is refused before the write, and the fallback writes it once per call."""
    state = torch.zeros(3, 2)

    def bump(x: torch.Tensor) -> torch.Tensor:
        torch.vmap(lambda s: s.add_(1))(state)
        return x * 2

    with pytest.raises(aotcache.aot.CaptureError, match="writes in place into a tensor that is not one of its"):
        aotcache.aot_function(bump, "nop", on_capture_error="raise")(torch.ones(2))
    assert torch.equal(state, torch.zeros(3, 2))  # not written by the refused capture
    compiled = aotcache.aot_function(bump, "nop", on_capture_error="eager")
    for _ in range(2):
        torch.testing.assert_close(compiled(torch.ones(2)), torch.full((2,), 2.0))
    assert torch.equal(state, torch.full((3, 2), 2.0))  # once per call, as eager


def test_flex_attention_with_a_block_mask_under_the_backend_is_captured_not_run_eagerly():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q, kv):
        return q >= kv

    def attend(q, k, v):
        mask = create_block_mask(causal, None, None, q.shape[-2], k.shape[-2], device="cpu")
        return flex_attention(q, k, v, block_mask=mask)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 8, generator=g) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    before = fallback_counts().get("region", 0)
    torch._dynamo.reset()
    got = torch.compile(attend, backend="aotcache", options={"compiler": "nop"})(q, k, v)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want)
    assert fallback_counts().get("region", 0) == before
