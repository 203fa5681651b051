"""Errors of the AOT Autograd layer (their own module so that every capture helper can raise them)."""

from __future__ import annotations

__all__ = ["CaptureError"]


class CaptureError(RuntimeError):
    """The function uses a construct that cannot be captured as a graph; the message names it and the fix."""
