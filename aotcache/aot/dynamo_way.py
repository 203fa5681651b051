"""aotcache's own calls into Dynamo (the capture fallback, ``aotcache.compile``'s Dynamo way): run with the settings
and the global-hook check that make Dynamo give eager's results."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["dynamo_as_eager"]

logger = logging.getLogger(__name__)


# NOTE [Global module hooks under Dynamo]
# A frame Dynamo traced while no global module hook was registered calls its submodules' ``forward`` directly and
# guards on no hook registry: a ``register_module_forward_hook`` made after the first call never ran on the Dynamo
# way (``aotcache.compile`` of a model with a graph break gave the program without the hook, found in session 20;
# stock torch.compile does the same). aotcache's routes to Dynamo promise eager's results, so before each call
# they compare the registered global hooks (by their handles' ids) with those of the previous call, and where they
# changed drop Dynamo's compiled frames (``reset_code_caches``: every frame traces again, its graphs hit the
# aotcache cache). Global hooks rarely change; the comparison costs a few dict reads per call.
_HOOK_REGISTRIES = vars(torch.nn.modules.module)  # the global hook dicts are read from torch's module at every call
_global_hooks_seen: list[tuple | None] = [None]  # the registered global hooks at the last Dynamo-way call


def _drop_frames_traced_under_other_global_hooks() -> None:
    """NOTE [Global module hooks under Dynamo]: Dynamo's frames traced before the global module hooks changed."""
    registries = _HOOK_REGISTRIES  # spelled out, not a loop: this runs at every call (~1 µs)
    state = (tuple(registries["_global_forward_pre_hooks"]), tuple(registries["_global_forward_hooks"]),
             tuple(registries["_global_backward_pre_hooks"]), tuple(registries["_global_backward_hooks"]))
    if state == _global_hooks_seen[0]:
        return
    if _global_hooks_seen[0] is not None and not torch.compiler.is_compiling():
        logger.debug("aotcache: the global module hooks changed; Dynamo's frames trace again")
        torch._dynamo.reset_code_caches()
    _global_hooks_seen[0] = state


def dynamo_as_eager(dynamo_fn: Callable) -> Callable:
    """``dynamo_fn`` (a ``torch.compile``-d callable) with the Dynamo settings under which it computes what
    eager does: numpy's own random numbers (NOTE [numpy random under Dynamo]) and guards on module hooks (NOTE
    [Module hooks under Dynamo]).

    NOTE [numpy random under Dynamo]
    By default Dynamo traces ``np.random`` calls into the graph, drawing from torch's generator: the same
    distribution, other values (Wav2Vec2's training masks differ from eager's under the same seeds). aotcache's
    own routes to Dynamo (the capture fallback, ``aotcache.compile``'s Dynamo way) promise eager's results, so
    they call it with ``torch._dynamo.config.use_numpy_random_stream`` on: Dynamo breaks the graph at such a
    draw and numpy makes it. A direct ``torch.compile(backend="aotcache")`` keeps Dynamo's settings.

    NOTE [Module hooks under Dynamo]
    Dynamo's default ``skip_nnmodule_hook_guards=True`` leaves a submodule's forward hooks and pre-hooks out of
    its guards: a hook registered after a frame was traced was never run (``aotcache.compile`` of a model with a
    graph break kept the results of the program without the hook). aotcache's routes call Dynamo with those
    guards on, so a hook added or removed re-traces the frame. Global module hooks (``register_module_forward_hook``)
    are in no guard of a frame traced without any: :func:`_drop_frames_traced_under_other_global_hooks`.

    NOTE [Dynamo settings shared by threads]
    torch 2.13 keeps a setting changed in code per thread (a context variable): each call sets its own thread's
    and puts back what it found. torch 2.11 and older keep one value for the process: there calls of these routes
    from several threads overlap, and each putting back what it found left them changed for good whenever two
    calls ended in the order they began (the second had saved the first's values): every later
    ``torch.compile`` of the process then guarded submodule hooks and drew numpy's random numbers itself. So
    there the calls in flight are counted: the first sets the settings, the last puts back what the first found.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        _drop_frames_traced_under_other_global_hooks()
        found = _enter_eager_dynamo_settings()
        try:
            return dynamo_fn(*args, **kwargs)
        finally:
            _leave_eager_dynamo_settings(found)

    return call


_eager_dynamo_settings_lock = threading.Lock()
_eager_dynamo_settings_calls = 0  # calls in flight in the process (settings kept per process only)
_settings_before_eager_dynamo: tuple[bool, bool] | None = None


@functools.lru_cache(maxsize=1)
def _dynamo_settings_are_per_thread() -> bool:
    """Whether torch keeps a setting changed in code per thread (NOTE [Dynamo settings shared by threads])."""
    import contextvars

    import torch._dynamo.config as dynamo_config

    entry = getattr(dynamo_config, "_config", {}).get("skip_nnmodule_hook_guards")
    return isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)


def _enter_eager_dynamo_settings() -> tuple[bool, bool]:
    """Set the routes' Dynamo settings; returns what this thread saw (NOTE [Dynamo settings shared by threads])."""
    global _eager_dynamo_settings_calls, _settings_before_eager_dynamo
    import torch._dynamo.config as dynamo_config

    with _eager_dynamo_settings_lock:
        found = dynamo_config.use_numpy_random_stream, dynamo_config.skip_nnmodule_hook_guards
        if _eager_dynamo_settings_calls == 0:
            _settings_before_eager_dynamo = found
        _eager_dynamo_settings_calls += 1
        dynamo_config.use_numpy_random_stream = True
        dynamo_config.skip_nnmodule_hook_guards = False
    return found


def _leave_eager_dynamo_settings(found: tuple[bool, bool]) -> None:
    """Put back ``found`` (settings per thread), or, of the last call in flight, what the first found."""
    global _eager_dynamo_settings_calls, _settings_before_eager_dynamo
    import torch._dynamo.config as dynamo_config

    with _eager_dynamo_settings_lock:
        _eager_dynamo_settings_calls -= 1
        if _dynamo_settings_are_per_thread():
            put_back: tuple[bool, bool] | None = found
        else:
            put_back = _settings_before_eager_dynamo if _eager_dynamo_settings_calls == 0 else None
        if _eager_dynamo_settings_calls == 0:
            _settings_before_eager_dynamo = None
        if put_back is not None:
            dynamo_config.use_numpy_random_stream, dynamo_config.skip_nnmodule_hook_guards = put_back
