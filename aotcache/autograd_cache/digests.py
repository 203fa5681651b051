"""The deterministic text forms every digest of a program is made of, and :class:`Untrusted` for a value
that has none.

The walker (:mod:`aotcache.autograd_cache.reachable`), the cache key (:mod:`aotcache.autograd_cache.key`), the
call fingerprint and the in-process program guards all write their parts with :func:`canonical_json` and
:func:`sha256_text`, and hash tensor constants with :func:`tensor_content_digest`: one definition each, so the
same value always gives the same digest whichever of them reads it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from aotcache.autograd_cache.safety import BypassAOTAutogradCache

__all__ = ["Untrusted", "sha256_text", "canonical_json", "tensor_content_digest", "check_plain_tensor"]


class Untrusted(Exception):
    """Raised when the cheap form cannot describe something; ``reason`` is short and categorical."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.where = ""  # the function, class or object being described (for the log, not for counting)


def sha256_text(text: str) -> str:
    """sha256 hex digest of a text (UTF-8)."""
    return hashlib.sha256(text.encode()).hexdigest()


def canonical_json(value: Any) -> str:
    """Deterministic JSON text (sorted keys, no whitespace, no NaN) used for every digest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def tensor_content_digest(tensor: torch.Tensor) -> str:
    """sha256 over dtype, shape and the bytes of a contiguous CPU copy.

    :raises BypassAOTAutogradCache: a fake or meta tensor, or a dtype whose bytes cannot be read.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(tensor, FakeTensor) or tensor.device.type == "meta":
        raise BypassAOTAutogradCache("fake tensor constant")
    data = tensor.detach()
    if data.is_sparse or data.layout != torch.strided or data.is_quantized:
        raise BypassAOTAutogradCache(f"unhashable tensor constant: {data.layout}")
    data = data.resolve_conj().resolve_neg().to("cpu").contiguous()
    try:
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    except (RuntimeError, TypeError) as exc:
        raise BypassAOTAutogradCache(f"unhashable tensor constant: {data.dtype}") from exc
    header = canonical_json([str(data.dtype), list(data.shape)])
    return hashlib.sha256(header.encode() + b"\0" + raw).hexdigest()


def check_plain_tensor(value: torch.Tensor, what: str) -> None:
    """A real tensor of torch's own classes, whose bytes a digest can read. :raises Untrusted: a fake or meta
    tensor, or a tensor subclass (its behaviour is code the digest would not see)."""
    from torch._subclasses.fake_tensor import FakeTensor

    allowed = (torch.Tensor, nn.Parameter, getattr(nn, "Buffer", torch.Tensor))
    if isinstance(value, FakeTensor) or value.device.type == "meta":
        raise Untrusted(f"fake or meta {what}")
    if type(value) not in allowed:
        raise Untrusted(f"{what} subclass: {type(value).__name__}")
