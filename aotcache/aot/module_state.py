"""Tensors a module's forward keeps on the module (``self.prev = h``, ``self.corr_pyramid = [...]``): refused by a
capture, which puts the attributes back as they were (NOTE [Tensors stored on modules])."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from aotcache.aot.errors import CaptureError

__all__ = ["bounded_deque", "bind_rebound_buffers", "dynamo_safe_module", "holds_trace_tensor",
           "module_put_back", "refuse_rebound_module_tensors", "refuse_tensors_stored_on_modules",
           "symbolic_size_stored_error", "trace_tensor_ids"]

# NOTE [Tensors stored on modules]
# A forward may keep a tensor it computed on a module: RAFT's correlation block builds ``self.corr_pyramid``
# (a list of tensors) and reads it later in the same call; a recurrent or streaming model keeps
# ``self.prev = h.detach()`` and adds it at the next call; others keep ``self.attn_map`` to plot. The capture runs
# that Python with trace tensors, so the attribute was left holding the capture's FunctionalTensors: the next
# call that read it failed ("Attempting to use FunctionalTensor on its own") where eager runs, a read of the
# attribute after the call met a dead trace tensor, and the fingerprint saw an untrusted tensor constant (a warm
# start traced every time). A graph cannot set a Python attribute at each call, so such a capture is refused
# (``unsupported_construct``) and every attribute is put back as the capture found it; the call then runs the
# fallback (``aotcache.compile``: the Dynamo way, which replays the assignment with real tensors at every call).
# Only attributes that end up holding a trace tensor count: state set to a plain value (a counter,
# ``config.problem_type``) is NOTE [State changed by the call]; parameters and buffers are the graph's own
# inputs. Attributes are compared by identity, and lists, deques, tuples and dicts (to a small depth) are searched,
# so ``self.pyramid.append(t)`` on an existing list (or ``self.frames.append(h)`` on a deque) is found and undone.

# NOTE [Buffers and parameters rebound by forward]
# A forward may rebind one of its module's registered tensors instead of writing into it: ``self.buf = self.buf +
# 1`` (nn.Module's ``__setattr__`` puts the new tensor in ``_buffers``), ``self.register_buffer("inv_freq", t)``
# (transformers' dynamic RoPE, when the sequence grows past the cached length and again when it shrinks back),
# ``self.w = nn.Parameter(...)``, a new buffer registered or ``del self.buf``. The capture swaps trace tensors in for
# the module's registered tensors (``functional_call``) and swaps the originals back after the trace, which undid
# the rebinding: the graph read the original tensor at every call and the module kept it, so ``aot_module`` and
# ``aotcache.compile`` returned the first call's result at every call and the buffer never changed (eager: a new
# tensor each call, results 1, 2, 3), silently. After the trace, a registered tensor the forward replaced
# (``functional_call`` writes the module's tensor at the swap-back into the dict it was given: one that is not the
# tensor swapped in was rebound), and any name registered or deleted in a submodule's ``_parameters`` /
# ``_buffers`` (or moved in or out of ``_non_persistent_buffers_set``), are found, and every registry is put back as
# the capture found it (a deleted tensor the swap-back left as a plain attribute is removed again). Then:
#
# * a *buffer* rebound to a tensor the trace computed is supported: the captured call returns
#   ``ReboundBuffers(output, {path: new value})`` (module_call.py), so the new values are outputs of the graph, and
#   ``AOTModule.forward`` binds them into ``_buffers`` after each call and returns the output. As in eager, each call
#   leaves a new tensor (a reference to the old one keeps its value, an in-place write into it before the rebinding
#   included), with the new value's autograd history; a new dtype is a new signature at the next call, and so is a
#   new shape until automatic dynamic shapes mark the buffer's changed dimensions (NOTE [Buffers that change size]
#   in dynamic_dims.py: a buffer grown at every call is two graphs). The namedtuple is defined at module level, so a
#   cached graph's output structure names it and a warm start rebuilds it. One graph serves every call (hot path,
#   fingerprint warm starts).
# * anything else is refused (``unsupported_construct``, naming the tensor), and the fallback runs the module itself
#   (the Dynamo way of ``aotcache.compile``, ``aot_module``'s partial fallback: both replay the Python with real
#   tensors), so results and tensors are eager's: a parameter (``nn.Parameter`` made in the trace; an optimizer
#   would hold the old one anyway), a registration or deletion (``first_call_only`` when no tensor was replaced:
#   ``aotcache.compile`` runs a lazily registering first call eagerly and captures the next), a persistence change,
#   and a new value the graph cannot return as its own tensor: a view, one of the call's arguments, another swapped
#   tensor (two buffers swapped), a real constant (dynamic RoPE's reset to ``original_inv_freq``, a plain
#   attribute), or the value of two buffers. ``aot_export_module`` refuses every rebinding (its signature has no
#   place for it).
#
# Only what the Python rebinds counts: an in-place write (``self.running_mean.mul_(m)``, BatchNorm's statistics)
# keeps the tensor and is a graph input mutation, as before. A forward that rebinds only now and then is refused or
# returns the new values on those calls only; a graph traced on a call that did not rebind is selected by what
# decided it, as any graph is (the module's settings such as ``max_seq_len_cached``, the program guards, the shape
# guards), so a call whose Python would rebind does not reuse it (tests/test_buffer_rebinding.py: a shape test,
# static and dynamic, and dynamic RoPE, whose growth test on a tensor is a data-dependent refusal of its own).

# NOTE [Tensors stored in program state]
# The same construct on the program's own state: a forward appending what it computed to a module-level list
# (``STORE.append(self.lin(x))``), a global ``deque``, a dict, a class attribute or a closure variable, or
# rebinding a global to it (``global LAST; LAST = h``, a tuple rebuilt). The capture's last run of the Python
# left that state holding its trace tensors: with the nop compiler the caller got a FakeTensor from the second
# call on (the graph read the list's trace tensors) and the list filled with FunctionalTensors; with Inductor a
# global deque crashed the process. So after each run of the Python in a capture (``AOTFunction._compile``), the
# state the program guards recorded (NOTE [Program guards]: globals, class attributes, closure cells, the
# containers reached, and any other entry of those namespaces, a global the function creates included) is
# searched for a trace tensor (``SavedCallState.refuse_trace_tensors``); one found puts the state back as the
# capture found it (NOTE [State changed by a capture]) and refuses the capture (``unsupported_construct``, naming
# the global, for any settings), so the fallback runs the Python with real tensors and leaves eager's tensors in
# that state. Only trace tensors the capture left count (one held there before, a user's own fake tensor, does
# not). State the walk does not reach (the insides of opaque objects) is not searched.

# NOTE [Constructs Dynamo gets wrong]
# The fallback of a refused capture is torch.compile, which runs the Python the graph cannot hold at every call.
# For a few constructs torch's Dynamo itself gives other results than eager, even with backend="eager"; a
# fallback that promises eager's results runs those calls eagerly instead (``CaptureError.dynamo_safe=False``:
# ``aotcache.compile`` takes, and records, the route "eager"; ``aot_module`` an eager runtime). Found: a forward
# appending a tensor to a bounded ``collections.deque`` attribute (``deque(maxlen=2)``, a streaming model's
# history): under torch 2.13's Dynamo the third call's sum over the deque differed from eager's (the eviction
# of the oldest item is not replayed as eager does it), while a plain deque or a list was right. The refusal
# that reaches the fallback is the capture's first one, though: an ``.item()`` branch before the append refused
# the capture as data-dependent (Dynamo-safe) and the call went to Dynamo, wrong from the third call. So the
# fallback also asks the module tree itself (:func:`dynamo_safe_module`): a submodule attribute that is, or
# holds, a bounded deque sends the fallback to eager whatever the refusal (``aotcache.compile``'s router and
# ``aot_module``'s fallback runtime alike). Conservative: such a deque never appended to costs the compiled
# regions of a fallback, never a result.

# NOTE [Symbolic sizes stored in program state]
# A dynamic capture runs the Python with symbolic sizes, so ``LAST = x.shape[0] * 2`` (a global, a closure
# variable, ``self.seq_len = ...``) left the program holding a ``torch.SymInt`` such as ``2*s57`` where eager
# holds 8: every later reader met the trace's symbol, and the call traced again at every call. A SymInt, SymFloat or
# SymBool exists only inside a trace, so it counts as a trace tensor does in the two NOTEs above: the state is put
# back and the capture refused; the fallback runs the Python with real sizes (static captures store plain ints).
_SYMBOLIC_SCALARS = (torch.SymInt, torch.SymFloat, torch.SymBool)

_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}
_DEPTH = 4


def holds_trace_tensor(value: Any, depth: int = 0, known: frozenset[int] = frozenset(), sizes: bool = True) -> bool:
    """Whether ``value`` (a tensor, or lists / tuples / deques / sets / dicts of them) holds a tensor of a trace
    (fake or functional) or, with ``sizes``, a symbolic scalar, not a real one; one whose ``id`` is in ``known``
    (there before the capture) does not count."""
    if isinstance(value, torch.Tensor):
        from torch._subclasses.fake_tensor import is_fake

        return id(value) not in known and (is_fake(value) or torch._is_functional_tensor(value))
    if isinstance(value, _SYMBOLIC_SCALARS):  # NOTE [Symbolic sizes stored in program state]
        return sizes and id(value) not in known
    if depth >= _DEPTH:
        return False
    if isinstance(value, (list, tuple, collections.deque, set, frozenset)):
        return any(holds_trace_tensor(item, depth + 1, known, sizes) for item in tuple(value))
    if isinstance(value, dict):  # members copied in one step: another thread may change the container meanwhile
        return any(holds_trace_tensor(item, depth + 1, known, sizes) for item in tuple(value.values()))
    return False


def trace_tensor_ids(values: Any, depth: int = 0) -> set[int]:
    """The ids of the trace tensors ``values`` (an iterable of values, searched as :func:`holds_trace_tensor`
    does) hold: those there before a capture, which its own check leaves alone."""
    found: set[int] = set()
    for value in tuple(values):  # one step (NOTE [Containers another thread changes] in autograd_cache)
        if isinstance(value, (torch.Tensor, *_SYMBOLIC_SCALARS)):
            if holds_trace_tensor(value):
                found.add(id(value))
        elif depth < _DEPTH and isinstance(value, (list, tuple, collections.deque, set, frozenset)):
            found |= trace_tensor_ids(value, depth + 1)
        elif depth < _DEPTH and isinstance(value, dict):
            found |= trace_tensor_ids(tuple(value.values()), depth + 1)
    return found


def _contents(value: Any) -> Any:
    """A shallow copy of a mutable container's contents (to undo ``append`` / item assignment), else None."""
    if isinstance(value, (list, collections.deque)):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return None


def _state_of(module: nn.Module) -> list[tuple[nn.Module, dict[str, tuple[Any, Any]]]]:
    return [(sub, {name: (value, _contents(value)) for name, value in vars(sub).items()
                   if name not in _MODULE_INTERNALS})
            for sub in module.modules()]


def _unchanged(value: Any, saved: tuple[Any, Any] | None) -> bool:
    """Whether an attribute is the object it was before, with the same items (compared by identity)."""
    if saved is None or saved[0] is not value:
        return False
    contents, before = _contents(value), saved[1]
    if isinstance(value, (list, collections.deque)):
        return len(contents) == len(before) and all(a is b for a, b in zip(contents, before))
    if isinstance(value, dict):
        return contents.keys() == before.keys() and all(contents[k] is before[k] for k in contents)
    return True


def _put_back(sub: nn.Module, name: str, saved: dict[str, tuple[Any, Any]]) -> None:
    if name not in saved:
        sub.__dict__.pop(name, None)
        return
    value, contents = saved[name]
    sub.__dict__[name] = value
    if isinstance(value, list):
        value[:] = contents
    elif isinstance(value, collections.deque):
        value.clear()
        value.extend(contents)
    elif isinstance(value, dict):
        value.clear()
        value.update(contents)


@contextlib.contextmanager
def refuse_tensors_stored_on_modules(module: nn.Module) -> Iterator[None]:
    """Raise a :class:`CaptureError` when the body left a trace tensor in an attribute of ``module`` or of one of
    its submodules, after putting every such attribute back (NOTE [Tensors stored on modules])."""
    before = _state_of(module)
    try:
        yield
    finally:
        stored = []
        for sub, saved in before:
            for name, value in list(vars(sub).items()):
                if name in _MODULE_INTERNALS or _unchanged(value, saved.get(name)) or not holds_trace_tensor(value):
                    continue
                stored.append((sub, name, value))
                _put_back(sub, name, saved)
    if stored:
        paths = {id(sub): path for path, sub in module.named_modules(remove_duplicate=False)}
        where = ", ".join(f"{paths.get(id(sub)) + '.' if paths.get(id(sub)) else ''}{name}"
                          for sub, name, _ in stored[:3])
        values = [value for _, _, value in stored]
        if not any(holds_trace_tensor(value, sizes=False) for value in values):
            raise symbolic_size_stored_error(f"on the model ({where} = ...)")
        raise CaptureError(
            f"aotcache: the call keeps a tensor it computed on the model ({where} = ...): a graph cannot set a "
            f"Python attribute at every call, and the attribute would hold the capture's trace tensors. Return "
            f"the tensor from forward instead, or keep it in a registered buffer updated in place "
            f"(self.buf.copy_(...)).", reason="unsupported_construct", any_settings=True,
            dynamo_safe=not any(bounded_deque(value) for value in values))


def symbolic_size_stored_error(where: str) -> CaptureError:
    """The refusal of a dynamic capture that left a symbolic size in Python state (NOTE [Symbolic sizes stored in
    program state]); a static capture of the call stores plain ints."""
    return CaptureError(
        f"aotcache: the call keeps a size it computed {where}; traced with dynamic shapes, it would hold a "
        f"symbolic size of the trace (a torch.SymInt) instead of eager's int. The call is compiled per shape "
        f"(or runs in a fallback); pass dynamic=False to skip the attempt, or keep such sizes out of the compiled "
        f"code.", reason="unsupported_construct")


def _registries(module: nn.Module) -> list[tuple[nn.Module, dict, dict, frozenset[str], frozenset[str]]]:
    """Per submodule: copies of its ``_parameters`` and ``_buffers``, its attribute names, its non-persistent
    buffer names."""
    return [(sub, dict(sub._parameters), dict(sub._buffers), frozenset(sub.__dict__),
             frozenset(sub.__dict__.get("_non_persistent_buffers_set", ()))) for sub in module.modules()]


def module_put_back(module: nn.Module) -> Callable[[], None]:
    """What puts ``module`` back as it is now: each submodule's parameter and buffer registries and its attributes
    (a child forked while another thread's capture had swapped trace tensors in: NOTE [A child forked while another
    thread captures the same model] in capture_threads.py)."""
    registries, attributes = _registries(module), _state_of(module)

    def put_back() -> None:
        for sub, params, buffers, names, non_persistent in registries:
            for current, saved in ((sub._parameters, params), (sub._buffers, buffers)):
                current.clear()
                current.update(saved)
            for name in set(params) | set(buffers):  # a tensor a swap set as a plain attribute
                if name not in names:
                    sub.__dict__.pop(name, None)
            now = sub.__dict__.get("_non_persistent_buffers_set")
            if now is not None:
                now.clear()
                now.update(non_persistent)
        for sub, saved in attributes:
            for name, value in list(vars(sub).items()):
                if name not in _MODULE_INTERNALS and not _unchanged(value, saved.get(name)):
                    _put_back(sub, name, saved)

    return put_back


def _returnable(value: Any, name: str, swapped: dict[str, Any], buffers: frozenset[str], taken: set[int]) -> bool:
    """Whether a buffer's new value can be a graph output the runtime binds after each call (NOTE [Buffers and
    parameters rebound by forward]): a tensor the trace computed (not a real constant, a view, another swapped
    tensor, an argument of the call (``taken``), nor the value of another rebound buffer)."""
    if name not in buffers or not isinstance(value, torch.Tensor) or isinstance(value, nn.Parameter):
        return False
    if id(value) in taken or any(value is other for other in swapped.values()) or not holds_trace_tensor(value):
        return False
    try:
        return not value._is_view()
    except RuntimeError:
        return False


def _add_tied_names(module: nn.Module, swapped: dict[str, Any], buffer_names: frozenset[str]) -> frozenset[str]:
    """NOTE [Tied tensors rebound by forward]
    ``functional_call(tie_weights=True)`` swaps a tensor registered under two names (``b.buf`` is ``a.buf``, a
    tied embedding) in under both, but writes back into the given dict only the names it was given (the
    deduplicated ones), and its swap-back puts the original under every name. A forward that rebinds the other
    name (``self.b.buf = self.b.buf + 1``) therefore left no trace at all: the graph never returned the new value
    and the module kept the old tensor, so every call gave the first call's result, silently. The tied names are
    added to ``swapped`` (the same tensor, so ``functional_call`` accepts them) before the call, so a rebinding
    under any name is found like any other (a tensor in a submodule shared under two paths, one slot under two
    names, is left out: functional_call needs all or none of a tie's names). Returns the added buffer names."""
    groups: dict[int, list[tuple[str, tuple[int, str]]]] = {}  # per tensor: its names and slots (owner, attribute)
    for path, sub in module.named_modules(remove_duplicate=False):
        for registry in (sub._parameters, sub._buffers):
            for leaf, tensor in registry.items():
                if tensor is not None:
                    groups.setdefault(id(tensor), []).append((f"{path}.{leaf}" if path else leaf, (id(sub), leaf)))
    tied = []
    for names in groups.values():
        primary = names[0][0]
        # a submodule shared under two paths is one slot under two names: its swap-back is right for the first
        # name only, and functional_call needs all or none of a tie's names, so such a tensor is left as it was
        if len(names) < 2 or primary not in swapped or len({slot for _, slot in names}) != len(names):
            continue
        tied.extend((name, primary) for name, _ in names[1:] if name not in swapped)
    for name, primary in tied:
        swapped[name] = swapped[primary]
    return frozenset(name for name, primary in tied if primary in buffer_names)


@contextlib.contextmanager
def refuse_rebound_module_tensors(module: nn.Module, swapped: dict[str, Any],
                                  rebound: dict[str, torch.Tensor] | None = None,
                                  buffer_names: frozenset[str] = frozenset(), arguments: Any = ()) -> Iterator[None]:
    """Around ``functional_call(module, swapped, ...)``: raise a :class:`CaptureError` when the forward rebound,
    registered or deleted a parameter or buffer, after putting every registry back as it was (NOTE [Buffers and
    parameters rebound by forward]). ``swapped``: the dict given to ``functional_call`` (it writes back into it).

    With a ``rebound`` dict, buffers (of ``buffer_names``, keys of ``swapped``) rebound to a tensor the trace
    computed (not one of the call's ``arguments``) are not refused: their new values are put in it by name (the
    caller returns them from the graph and binds them after each call)."""
    before = _registries(module)
    buffer_names = buffer_names | _add_tied_names(module, swapped, buffer_names)
    passed = dict(swapped)
    try:
        yield
    finally:
        changed = [name for name, value in swapped.items() if passed.get(name, value) is not value]
        rebound_any = any(isinstance(swapped[name], torch.Tensor) for name in changed)  # (not deleted, not None)
        registry_changed = False
        paths = None
        for sub, params, buffers, attributes, non_persistent in before:
            for current, saved in ((sub._parameters, params), (sub._buffers, buffers)):
                if current.keys() == saved.keys() and all(current[k] is saved[k] for k in saved):
                    continue
                if paths is None:
                    paths = {id(m): p for p, m in module.named_modules(remove_duplicate=False)}
                prefix = paths.get(id(sub)) + "." if paths.get(id(sub)) else ""
                rebound_any = rebound_any or any(current[k] is not saved[k] for k in current.keys() & saved.keys())
                changed.extend(prefix + name for name in current.keys() ^ saved.keys())
                registry_changed = True
                current.clear()
                current.update(saved)
            for name in set(params) | set(buffers):  # a deleted tensor the swap-back set as a plain attribute
                if name not in attributes:
                    sub.__dict__.pop(name, None)
            now = sub.__dict__.get("_non_persistent_buffers_set")
            if now is not None and frozenset(now) != non_persistent:  # register_buffer(persistent=...) changed it
                registry_changed = True
                changed.append(next(iter(frozenset(now) ^ non_persistent)))
                now.clear()
                now.update(non_persistent)
    if changed and rebound is not None and not registry_changed:
        taken = {id(leaf) for leaf in pytree.tree_leaves(arguments) if isinstance(leaf, torch.Tensor)}
        for name in changed:
            value = swapped[name]
            if not _returnable(value, name, passed, buffer_names, taken):
                break
            taken.add(id(value))
        else:
            rebound.update((name, swapped[name]) for name in changed)
            return
    if changed:
        where = ", ".join(dict.fromkeys(changed[:3]))
        raise CaptureError(
            f"aotcache: the call {'rebinds' if rebound_any else 'registers or deletes'} a parameter or buffer of the "
            f"model ({where}) in a way a compiled graph cannot replay: "
            + ("an exported graph's signature has no place for it" if rebound is None else
               "only a buffer set to a new tensor the call computes is returned by the graph and bound after each "
               "call, not a parameter, a view, an argument, a constant, a swap, a registration, deletion or "
               "persistence change")
            + " (NOTE [Buffers and parameters rebound by forward]). Write into the tensor in place instead "
            "(self.buf.copy_(new)).",
            reason="unsupported_construct", first_call_only=not rebound_any)


def bind_rebound_buffers(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Bind each buffer of ``module`` at path ``name`` to the new tensor a compiled call returned for it (NOTE
    [Buffers and parameters rebound by forward]), as the forward's ``self.buf = ...`` does in eager."""
    for path, value in values.items():
        owner, _, leaf = path.rpartition(".")
        module.get_submodule(owner)._buffers[leaf] = value


def bounded_deque(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is, or holds (to a small depth), a deque with a ``maxlen`` (NOTE [Constructs Dynamo gets
    wrong])."""
    if isinstance(value, collections.deque):
        return value.maxlen is not None
    if depth >= _DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return any(bounded_deque(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return any(bounded_deque(item, depth + 1) for item in value.values())
    return False


def dynamo_safe_module(module: Any) -> bool:
    """Whether no attribute of ``module`` or of its submodules is, or holds, a bounded deque: a fallback of such a
    module runs eagerly, not through Dynamo, whichever refusal came first (NOTE [Constructs Dynamo gets wrong])."""
    if not isinstance(module, nn.Module):
        return True
    return not any(bounded_deque(value) for sub in module.modules() for name, value in vars(sub).items()
                   if name not in _MODULE_INTERNALS)
