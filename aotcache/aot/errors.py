"""Errors of the AOT Autograd layer (their own module so that every capture helper can raise them)."""

from __future__ import annotations

__all__ = ["CaptureError", "RefusedArgumentError"]


class CaptureError(RuntimeError):
    """The function uses a construct that cannot be captured as a graph; the message names it and the fix."""


class RefusedArgumentError(TypeError):
    """An argument a compiled function cannot compare by value (NOTE [Constant arguments]): an ``nn.Module``, an
    optimizer, a plain mutable object. ``aotcache.compile`` takes such a call to ``torch.compile`` instead."""
