"""Random numbers drawn or seeded outside torch's traced ops while capturing: Python's and numpy's global
generators, torch's global generator seeded or set back, any ``torch.Generator``'s state read or set by the
function, and ``torch.Generator`` arguments seeded or set (NOTE [Host random numbers], NOTE [Generator states set
back inside the function]); such a capture is refused with the generators put back, so the fallback draws what
eager would."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from aotcache.aot.errors import CaptureError

__all__ = ["refuse_host_random", "refuse_replayed_checkpoint_draws"]

logger = logging.getLogger(__name__)


# NOTE [Host random numbers]
# Python's ``random`` and numpy's global generator are not ATen ops: a draw made while capturing (Wav2Vec2's
# ``_compute_mask_indices`` and adapter layerdrop draw from ``np.random``; older layerdrop code from
# ``random.uniform``) becomes a constant of the graph, so every later call would reuse the first call's mask or
# layer choice while eager draws anew. A capture that moved either generator is refused (then the call goes to
# torch.compile, which runs such draws per call), and both generators are put back where they were, so the
# fallback's first call draws what eager's would. Torch's own generator is traced (random ATen ops on fake
# tensors leave the real generator alone), but *seeding* it inside the function (``torch.manual_seed``,
# ``torch.set_rng_state``, ``torch.seed``) is Python a graph cannot replay: the compiled calls after the first
# went on from the generator's state where eager started again from the seed (other values, silently). So a
# capture that left torch's global CPU generator in another state (or with another initial seed) is refused the
# same way, with the generator put back (a seed that puts it exactly where it was is seen by the watch of NOTE
# [Generator states set back inside the function]); generators the function makes itself (``np.random.default_rng()``) are not checked (a ``torch.Generator()``
# it seeds or sets is: NOTE [Generator states set back inside the function]).
# A ``torch.Generator`` passed as an argument is checked too (a capture draws nothing from it, so any change is
# Python seeding or setting it: ``generator.manual_seed(0)`` in forward), and put back likewise.
def _host_random_states() -> tuple:
    import random
    import sys

    numpy = sys.modules.get("numpy")  # not imported: nothing can have drawn from it
    return (random.getstate(), (numpy.random.get_state() if numpy is not None else None),
            (torch.initial_seed(), torch.get_rng_state()))


def _same_torch_state(before: tuple, after: tuple) -> bool:
    return before[0] == after[0] and torch.equal(before[1], after[1])


def _same_numpy_state(before: Any, after: Any) -> bool:
    if before is None or after is None:
        return before is after
    return before[0] == after[0] and before[2:] == after[2:] and bool((before[1] == after[1]).all())


def _restore_host_random(python_state: Any, numpy_state: Any, torch_state: tuple) -> None:
    import random
    import sys

    random.setstate(python_state)
    if numpy_state is not None:
        sys.modules["numpy"].random.set_state(numpy_state)
    if torch.initial_seed() != torch_state[0]:
        torch.manual_seed(torch_state[0])  # the initial seed is only set by seeding; the state follows
    torch.set_rng_state(torch_state[1])


def _generator_states(generators: Sequence[torch.Generator]) -> list:
    return [(generator.initial_seed(), generator.get_state()) for generator in generators]


def _restore_generators(generators: Sequence[torch.Generator], states: list) -> None:
    for generator, (seed, state) in zip(generators, states):
        if generator.initial_seed() != seed:
            generator.manual_seed(seed)
        generator.set_state(state)


# NOTE [Generator states set back inside the function]
# ``torch.random.fork_rng()`` around a draw (or ``torch.get_rng_state()`` ... ``torch.set_rng_state(state)``, or
# ``torch.default_generator.get_state()`` ... ``.set_state(state)``) puts a generator back where it was: eager's
# call leaves it unmoved by that draw. The capture saw no change (NOTE [Host random numbers] compares states), but
# the graph cannot replay the Python setting the state back, so each compiled call drew the numbers for real and
# moved the generator (other values and state than eager's, silently). Reading a state is no better: the value
# read (``initial_seed()``, ``get_state()``) becomes a constant of the graph where eager reads it anew per call.
# So while a capture runs, every method of ``torch.Generator`` that reads or changes its state (``_STATE_METHODS``,
# on any generator: the default one, the function's own, an argument) records a call from the capturing thread,
# which refuses the capture (the fallback runs the Python, with eager's numbers). They are C methods of an
# immutable type, which no Python assignment can replace: they are swapped in the type's own dictionary for the
# time of the capture (NOTE [Watching a builtin type's methods]). ``torch.manual_seed``, ``torch.seed``,
# ``torch.set_rng_state``, ``torch.get_rng_state`` and ``fork_rng`` call those methods from torch/random.py, so
# the caller is the first frame outside it (and contextlib). Calls from ``torch.utils.checkpoint`` (its RNG
# preservation around a recomputation: NOTE [Checkpoint recomputations replaying draws]) and from Dynamo (which
# puts the state back after compiling a frame: ``torch.cond`` compiles itself with Dynamo whenever it runs, so
# every capture of a function calling it was refused) are torch's business and pass, as are aotcache's own.
# Not seen: an unseeded generator made inside the function and drawn from (``torch.rand(n,
# generator=torch.Generator())``): the graph keeps that generator and draws on from it, where eager starts each
# call at the default seed (tests/aot/test_random.py, the xfail).
_STATE_METHODS = ("get_state", "set_state", "manual_seed", "seed", "initial_seed", "graphsafe_get_state",
                  "graphsafe_set_state", "clone_state")
_SETTING_METHODS = frozenset({"set_state", "graphsafe_set_state", "manual_seed", "seed"})
_WATCH_LOCK = threading.Lock()
_WATCH: dict[str, Any] = {"users": 0, "originals": None}
_RNG_SET_IN = threading.local()
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))).replace("\\", "/") + "/"


def _watched_method(name: str, original: Any) -> Callable:
    """``torch.Generator.<name>`` while a capture runs: notes a call from a capturing thread, then runs it."""
    def watched(generator: torch.Generator, *args: Any, **kwargs: Any) -> Any:
        if getattr(_RNG_SET_IN, "watching", False):
            _note_state_use(name)
        return original(generator, *args, **kwargs)

    watched.__name__ = watched.__qualname__ = name
    watched.__doc__ = original.__doc__
    return watched


def _note_state_use(method: str) -> None:
    """Record a generator state method's call by the function (or a checkpoint's replay), by its caller."""
    caller = _state_caller_file()
    if caller.endswith("torch/utils/checkpoint.py"):  # NOTE [Checkpoint recomputations replaying draws]
        if method in _SETTING_METHODS:
            _RNG_SET_IN.checkpoint_replay = True
    elif "/torch/_dynamo/" not in caller and not caller.startswith(_OWN_DIR):
        if getattr(_RNG_SET_IN, "seen", None) is None:
            _RNG_SET_IN.seen = method


def _state_caller_file() -> str:
    """The file whose code called a generator's state method (skipping torch.random and contextlib frames,
    through which ``torch.manual_seed``, ``torch.set_rng_state`` and ``fork_rng`` call it)."""
    frame = sys._getframe(3)  # past _state_caller_file, _note_state_use, watched
    while frame is not None and frame.f_code.co_filename.replace("\\", "/").endswith(("torch/random.py",
                                                                                     "contextlib.py")):
        frame = frame.f_back
    return "" if frame is None else frame.f_code.co_filename.replace("\\", "/")


# NOTE [Watching a builtin type's methods]
# ``torch.Generator`` is a C type marked immutable: ``torch.Generator.set_state = f`` raises. Its methods live in
# the type's dictionary, which ``gc.get_referents`` of its read-only mapping proxy gives; a method put there
# (then ``PyType_Modified``, which drops CPython's caches of the type's attributes) is found by every lookup,
# ``torch.default_generator.set_state`` included. The original descriptors go back when the last capture ends.
# Where that dictionary cannot be had (not CPython), the methods are not watched (a debug log says so): the
# states compared before and after still refuse a function that leaves a generator seeded or set elsewhere.
def _generator_type_dict() -> dict | None:
    import gc

    referents = gc.get_referents(torch._C.Generator.__dict__)
    return referents[0] if len(referents) == 1 and isinstance(referents[0], dict) else None


def _set_generator_methods(methods: dict[str, Any]) -> bool:
    type_dict = _generator_type_dict()
    if type_dict is None:
        return False
    try:
        import ctypes

        type_dict.update(methods)
        ctypes.pythonapi.PyType_Modified(ctypes.py_object(torch._C.Generator))
    except (ImportError, AttributeError):
        return False
    return True


@contextlib.contextmanager
def _watching_generator_states() -> Iterator[None]:
    """Record calls of generators' state methods made by this thread in the body (NOTE [Generator states set
    back inside the function])."""
    with _WATCH_LOCK:
        if _WATCH["users"] == 0:
            originals = {name: torch._C.Generator.__dict__[name] for name in _STATE_METHODS
                         if name in torch._C.Generator.__dict__}
            if _set_generator_methods({name: _watched_method(name, method) for name, method in originals.items()}):
                _WATCH["originals"] = originals
            else:
                logger.debug("aotcache: torch.Generator's methods cannot be watched here; a function that sets a "
                             "generator back inside a capture is not seen")
        _WATCH["users"] += 1
    previous = (getattr(_RNG_SET_IN, "watching", False), getattr(_RNG_SET_IN, "checkpoint_replay", False),
                getattr(_RNG_SET_IN, "seen", None))
    _RNG_SET_IN.watching, _RNG_SET_IN.seen, _RNG_SET_IN.checkpoint_replay = True, None, False
    try:
        yield
    finally:  # a capture nested in another's body keeps what the outer one had seen, and adds its own
        _RNG_SET_IN.watching, _RNG_SET_IN.checkpoint_replay = previous[:2]
        if previous[0]:
            _RNG_SET_IN.seen = previous[2] if previous[2] is not None else _RNG_SET_IN.seen
        with _WATCH_LOCK:
            _WATCH["users"] -= 1
            if _WATCH["users"] == 0 and _WATCH["originals"] is not None:
                _set_generator_methods(_WATCH["originals"])
                _WATCH["originals"] = None


class HostRandomWatch:
    """What a captured body did with torch's global generator that the trace does not show."""

    checkpoint_replay = False  # torch's checkpoint put the state back for a recomputation (RNG preservation)


# NOTE [Checkpoint recomputations replaying draws]
# Where a whole function is captured (aot_function, aot_module, aotcache.compile's AOT way), a non-reentrant
# ``torch.utils.checkpoint`` in it runs for real: the backward's trace unpacks the region's saved values and
# recomputes its forward there, after putting torch's generator back to the forward's state so that eager's
# recomputation draws the forward's numbers again. The trace cannot replay that setting: each random op of the
# recomputation became a fresh draw of the graph (``torch.rand`` in a region: other values in the backward than in
# the forward, gradients unlike eager's and the generator moved twice, silently; found in review of session 12).
# Such a capture, with a random op anywhere in its graph, is refused: the call goes through torch.compile(backend=
# "aotcache") (aotcache.compile's Dynamo way, aot_module's fallback), where each region is traced in line and its
# draws saved (NOTE [Checkpointed regions traced in line]).
def refuse_replayed_checkpoint_draws(watch: HostRandomWatch, gm: torch.fx.GraphModule) -> None:
    """Raise a :class:`CaptureError` when torch's checkpoint recomputed a region in the trace (``watch``) and the
    traced graph ``gm`` draws random numbers (NOTE [Checkpoint recomputations replaying draws])."""
    if not watch.checkpoint_replay:
        return
    if any(node.op == "call_function" and torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
           for node in gm.graph.nodes):
        raise CaptureError("aotcache: an activation-checkpointed region (torch.utils.checkpoint) of a function "
                           "captured whole draws random numbers, and its recomputation in the backward replays "
                           "them by setting torch's generator back, which a traced graph cannot do (it would draw "
                           "other numbers than the forward's). The call goes through "
                           "torch.compile(backend='aotcache') instead, which captures such regions. Fix: compile "
                           "the model with torch.compile(backend='aotcache') directly to skip this attempt.",
                           reason="unsupported_construct")


@contextlib.contextmanager
def refuse_host_random(generators: Sequence[torch.Generator] = ()) -> Iterator[HostRandomWatch]:
    """Raise a :class:`CaptureError` when the body drew from Python's or numpy's global random generator, or
    seeded torch's or one of ``generators`` (the arguments'), after putting them back (NOTE [Host random
    numbers]), or set torch's global generator's state (NOTE [Generator states set back inside the
    function]). Yields a :class:`HostRandomWatch`, filled in when the body returns."""
    before = _host_random_states()
    passed = _generator_states(generators)
    watch = HostRandomWatch()
    try:
        with _watching_generator_states():
            yield watch
            state_method = _RNG_SET_IN.seen
            watch.checkpoint_replay = _RNG_SET_IN.checkpoint_replay
    except Exception:  # the fallback (or eager, NOTE [Captures that fail where eager may run]) runs the call
        _restore_host_random(*before)  # again: it draws what eager would
        _restore_generators(generators, passed)
        raise
    if state_method is not None:
        _restore_host_random(*before)
        _restore_generators(generators, passed)
        raise CaptureError(f"aotcache: the function reads or sets a random generator's state (torch.Generator."
                           f"{state_method}, called by torch.manual_seed, torch.seed, torch.get_rng_state, "
                           f"torch.set_rng_state and torch.random.fork_rng too): a graph cannot replay that, so "
                           f"its calls would draw, move the generator or use a state other than eager's. Seed or "
                           f"set generators outside the compiled function, or pass a torch.Generator as an "
                           f"argument (random ops take generator=).", reason="unsupported_construct")
    after = _generator_states(generators)
    if any(seed != seed_after or not torch.equal(state, state_after)
           for (seed, state), (seed_after, state_after) in zip(passed, after)):
        _restore_host_random(*before)
        _restore_generators(generators, passed)
        raise CaptureError("aotcache: the function seeds or sets a torch.Generator it is passed (manual_seed, "
                           "set_state): a graph cannot replay that, so its later calls would draw other numbers "
                           "than eager's. Seed the generator before the call.", reason="unsupported_construct")
    python_after, numpy_after, torch_after = _host_random_states()
    if not _same_torch_state(before[2], torch_after):
        _restore_host_random(*before)
        raise CaptureError("aotcache: the function seeds or sets torch's global random generator "
                           "(torch.manual_seed, torch.set_rng_state, torch.seed): a graph cannot replay that, so "
                           "its later calls would draw other numbers than eager's. Seed outside the compiled "
                           "function, or pass a torch.Generator as an argument (random ops take generator=).",
                           reason="unsupported_construct")
    python_before, numpy_before = before[0], before[1]
    drew = [name for name, same in (("random", python_before == python_after),
                                    ("numpy.random", _same_numpy_state(numpy_before, numpy_after))) if not same]
    if not drew:
        return
    _restore_host_random(*before)
    raise CaptureError(f"aotcache: the function draws from {' and '.join(drew)} (Python's random numbers, not "
                       f"torch's): a graph would keep the values drawn while capturing and reuse them at every "
                       f"call. Use torch's random functions (torch.rand, torch.randint, torch.bernoulli), which "
                       f"are traced, or draw outside the compiled function and pass the result as an argument.",
                       reason="unsupported_construct")
