"""Errors of the AOT Autograd layer (their own module so that every capture helper can raise them)."""

from __future__ import annotations

__all__ = ["CaptureError", "CAPTURE_ERROR_REASONS", "RefusedArgumentError"]

# The categories of CaptureError.reason: the eager fallback counts and warns per reason (aot/fallback.py).
CAPTURE_ERROR_REASONS = ("data_dependent", "unsupported_layout", "aliased_mutation", "metadata_mutation",
                         "uninitialized_parameter", "unsupported_construct", "trace_failed")


class CaptureError(RuntimeError):
    """The function uses a construct that cannot be captured as a graph; the message names it and the fix.

    ``reason`` is a short category (one of :data:`CAPTURE_ERROR_REASONS`) for counters and warnings.
    """

    def __init__(self, message: str = "", *, reason: str = "unsupported_construct", any_settings: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        # the refusal holds whatever an aot_module's settings (NOTE [Refusals that hold for any settings] in api.py)
        self.any_settings = any_settings


class RefusedArgumentError(TypeError):
    """An argument a compiled function cannot compare by value (NOTE [Constant arguments]): an ``nn.Module``, an
    optimizer, a plain mutable object. ``aotcache.compile`` takes such a call to ``torch.compile`` instead."""
