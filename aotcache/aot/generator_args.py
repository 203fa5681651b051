"""``torch.Generator`` arguments: one graph for every generator passed, drawing from the caller's generator.

NOTE [Generator arguments]
A random op with ``generator=g`` traces ``g`` into the graph as a constant (the graph draws from that very
object), so the signature held the generator by identity: a new generator at every call (``torch.Generator()
.manual_seed(step)``, diffusers' pipelines take one per call) traced a graph per call, until the recompile limit
ran the rest eagerly, and each entry kept its generator alive. Now a compiled function passes its graphs a
generator of its own per argument position and device (a *slot*) in place of the caller's: the signature sees
the same slot at every call, so one graph serves every generator. Around a compiled graph's run the slot takes
the caller's generator's state, and the caller's generator takes the slot's state after it, so the graph draws
the caller's numbers and leaves the caller's generator where eager does (a double backward replays the slot's
draws: NOTE [Double backward through random ops] in double_backward.py). A slot's run is held under a lock per function
(two threads passing different generators would share the slot otherwise). A fallback that runs the Python
(eager, Dynamo) gets the caller's own generators.
Not substituted, the generators then keyed by identity as before (one graph per generator, exact): a call
passing one generator at two positions (its draws must follow each other); a device's default generator passed
as an argument (``generator=torch.default_generator``) stays in place at its position: the graph's global draws
(``torch.rand(n)``) come from it too, and a slot would draw them again from a copy, the default generator then
overwritten with the slot's state (other numbers and state than eager's); a function whose graph also draws
from the caller's generator another way (an attribute of the module that is passed as well): the graph's own
generators are checked before its first run with slots (``CompiledRuntime.graph_generators``); and a module
whose forward keeps the generator it is passed on an attribute (``self.generator = generator``), where the slot
would stay in the caller's place: the module tree's attributes are checked after a capture with slots, before
its graph runs, and the call is captured again with the caller's generator. Not seen: a slot kept elsewhere (a
global, a container on the module). A function returning a generator is refused by the capture (NOTE [Object
outputs]: a graph would return a copy at the capture's state), so its fallback returns the caller's.
The states are copied per call (a CPU generator's state is about 5 KB): microseconds against a trace per call.

NOTE [Generators in a traced graph, torch 2.11]
A graph holds a generator as a constant attribute, which ``make_fx`` can make only for types registered as
opaque reference types; torch registers ``torch.Generator`` as one from 2.12 on. On torch 2.11 any call passing
``generator=`` (or drawing from a generator it holds) fails its trace ("NotImplementedError: argument of type:
<class 'torch._C.Generator'>") and runs through the fallback (torch.compile), with eager's numbers: the AOT way
is lost, nothing is wrong. :func:`torch_traces_generators` detects the feature; the fallback's warning then
names the cause (``fallback.trace_failure_error``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["GeneratorSlots", "torch_traces_generators", "untraceable_generator_failure"]


def torch_traces_generators() -> bool:
    """Whether this torch can put a ``torch.Generator`` into a traced graph (NOTE [Generators in a traced
    graph, torch 2.11])."""
    try:
        from torch._library.opaque_object import is_opaque_reference_type
    except ImportError:
        return False
    try:
        return bool(is_opaque_reference_type(torch.Generator))
    except Exception:  # a private helper whose behaviour may change: assume no
        return False


def untraceable_generator_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a trace's refusal of a ``torch.Generator`` constant by a torch that cannot trace one."""
    return (isinstance(exc, NotImplementedError) and "Generator" in str(exc)
            and not torch_traces_generators())


def _identity(generator: torch.Generator) -> int:
    """The C++ generator behind ``generator``: Python objects for one generator differ (a graph's own is another
    object than the one it was traced from), its ``_cdata`` does not."""
    return getattr(generator, "_cdata", None) or id(generator)


def _is_default(generator: torch.Generator) -> bool:
    """Whether ``generator`` is its device's default generator (``torch.default_generator``, CUDA's per device):
    the graph's global draws come from it too, so a slot in its place would split one stream in two."""
    device = generator.device
    if device.type == "cpu":
        return _identity(generator) == _identity(torch.default_generator)
    module = getattr(torch, device.type, None)
    defaults = getattr(module, "default_generators", ()) if module is not None else ()
    return any(_identity(generator) == _identity(default) for default in defaults)


class GeneratorSlots:
    """The slots of one compiled function (NOTE [Generator arguments])."""

    def __init__(self) -> None:
        self._slots: dict[tuple[int, torch.device], torch.Generator] = {}
        self._lock = threading.RLock()
        self.enabled = True  # False once a graph was found drawing from a caller's generator another way

    def substitute(self, flat_args: list) -> tuple[list, list[tuple[torch.Generator, torch.Generator]]] | None:
        """``(flat arguments with slots in place of generators, [(caller's generator, slot)])``, or None when no
        argument is a generator (or none is to be substituted)."""
        if not self.enabled or not any(type(arg) is torch.Generator and not _is_default(arg) for arg in flat_args):
            return None
        swapped: list[tuple[torch.Generator, torch.Generator]] = []
        substituted = list(flat_args)
        for position, arg in enumerate(flat_args):
            if type(arg) is not torch.Generator or _is_default(arg):
                continue  # a default generator stays: the graph's global draws are its draws too
            if any(_identity(arg) == _identity(caller) for caller, _ in swapped):
                return None  # one generator twice: its draws follow each other (keyed by identity instead)
            key = (position, arg.device)
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots.setdefault(key, torch.Generator(device=arg.device))
            substituted[position] = slot
            swapped.append((arg, slot))
        return substituted, swapped

    def draws_elsewhere(self, runtime: Any, swapped: Sequence[tuple[torch.Generator, torch.Generator]]) -> bool:
        """Whether ``runtime``'s graph draws from one of the caller's generators itself (not through its slot):
        then slots are off for this function from now on."""
        held = getattr(runtime, "graph_generators", ())
        if not held:
            return False
        identities = {_identity(generator) for generator in held}
        if any(_identity(caller) in identities for caller, _ in swapped):
            self.enabled = False
            return True
        return False

    def kept_by_module(self, module: Any, swapped: Sequence[tuple[torch.Generator, torch.Generator]]) -> bool:
        """Whether a capture left a slot on an attribute of ``module`` or its submodules (``self.generator =
        generator`` in forward): the caller's generator belongs there, so slots are off from now on."""
        if not isinstance(module, torch.nn.Module):
            return False
        slots = {_identity(slot) for _, slot in swapped}
        if any(type(value) is torch.Generator and _identity(value) in slots
               for submodule in module.modules() for value in vars(submodule).values()):
            self.enabled = False
            return True
        return False

    def run(self, call: Callable[[], Any], swapped: Sequence[tuple[torch.Generator, torch.Generator]]) -> Any:
        """Run ``call`` with each slot at its caller's generator's state; the callers' generators take the slots'
        states after it (also when it raises, as eager's draws would have moved them)."""
        with self._lock:
            for caller, slot in swapped:
                slot.set_state(caller.get_state())
            try:
                return call()
            finally:
                for caller, slot in swapped:
                    caller.set_state(slot.get_state())
