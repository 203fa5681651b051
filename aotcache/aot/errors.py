"""Errors of the AOT Autograd layer (their own module so that every capture helper can raise them)."""

from __future__ import annotations

__all__ = ["CaptureError", "CAPTURE_ERROR_REASONS", "RefusedArgumentError", "is_trace_failure",
           "mark_trace_failure"]

# The categories of CaptureError.reason: the eager fallback counts and warns per reason (aot/fallback.py).
CAPTURE_ERROR_REASONS = ("data_dependent", "unsupported_layout", "aliased_mutation", "metadata_mutation",
                         "uninitialized_parameter", "unsupported_construct", "trace_failed", "refused_argument")


class CaptureError(RuntimeError):
    """The function uses a construct that cannot be captured as a graph; the message names it and the fix.

    ``reason`` is a short category (one of :data:`CAPTURE_ERROR_REASONS`) for counters and warnings.
    """

    def __init__(self, message: str = "", *, reason: str = "unsupported_construct", any_settings: bool = False,
                 dynamo_safe: bool = True, first_call_only: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        # True: the construct is gone once the call has run eagerly (a kernel that resizes its buffers on its first
        # call: NOTE [Kernels that resize their arguments]); aotcache.compile runs this call eagerly and captures
        # the next one, instead of taking the Dynamo way for good
        self.first_call_only = first_call_only
        # the refusal holds whatever an aot_module's settings (NOTE [Refusals that hold for any settings] in api.py)
        self.any_settings = any_settings
        # False: Dynamo is known to give other results than eager for this construct, so the fallback runs the
        # call eagerly instead of through torch.compile (NOTE [Constructs Dynamo gets wrong] in module_state.py)
        self.dynamo_safe = dynamo_safe


class RefusedArgumentError(TypeError):
    """An argument a compiled function cannot compare by value (NOTE [Constant arguments]): an ``nn.Module``, an
    optimizer, a plain mutable object. ``aotcache.compile`` takes such a call to ``torch.compile`` instead."""

    # False: Dynamo guards the argument without what eager reads of it, so the fallback runs the call eagerly
    # (NOTE [Arguments Dynamo guards without their order] in signature.py)
    dynamo_safe: bool = True


_TRACE_FAILURE = "_aotcache_trace_failure"


def mark_trace_failure(exc: BaseException) -> None:
    """Mark ``exc``, raised by the user's code or torch's machinery while a capture traced it (not a
    CaptureError): eager may run that call (NOTE [Captures that fail where eager may run] in fallback.py)."""
    try:
        setattr(exc, _TRACE_FAILURE, True)
    except (AttributeError, TypeError):  # an exception type without a __dict__: left unmarked (raised as is)
        pass


def is_trace_failure(exc: BaseException) -> bool:
    """Whether ``exc`` escaped a capture's trace without being a CaptureError (:func:`mark_trace_failure`)."""
    return bool(getattr(exc, _TRACE_FAILURE, False))
