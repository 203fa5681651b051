"""What a capture refuses of the values around its graph's tensor arguments: argument lists, dicts and other pytree
objects the function changes in place (NOTE [Argument containers changed in place], [Argument objects changed in
place]), tensors it reads from closures or globals that require grad or are fake (NOTE [closed-over tensors]), and a
Dynamo graph that hands a backward hook to compiled autograd through a ``BackwardState`` input.

The other refusals have modules of their own: the module tree (module_refusals.py), activation checkpointing
(checkpoint_refusals.py), the tensors a graph cannot take (unsupported_tensors.py), the calls and errors of the
function while it is captured (unsupported_ops.py); outputs and grad mode (output_checks.py).
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from aotcache.aot.cache_objects import is_cache_object
from aotcache.aot.errors import CaptureError
from aotcache.aot.signature import python_attributes

__all__ = ["argument_containers", "refuse_changed_argument_containers", "refuse_constants_requiring_grad",
           "refuse_backward_state_inputs", "tensor_attribute_state", "refuse_tensor_attribute_changes"]


# NOTE [Argument containers changed in place]
# A capture calls the function on containers rebuilt from the flattened arguments, so a list or dict the
# caller passed and the function changes in place (``log.append(x.shape[0])``, ``cache["k"] = v``) was changed
# only in the capture's copy: the caller's list stayed as it was, at the first call and every later one, where
# eager appends each time (a silent difference). A graph cannot replay such a change, so a capture after which
# a list or dict of the arguments holds other keys or members than before the call is refused; the fallback
# (Dynamo) replays the change on the caller's own containers at every call. Other registered pytree nodes
# are checked the same way (NOTE [Argument objects changed in place]), except transformers' cache objects,
# which are updated in place by design and written back (NOTE [Cache arguments are updated in place]).
_MUTABLE_CONTAINERS = (list, dict, collections.OrderedDict)

# NOTE [Argument objects changed in place]
# An object of a class registered as a pytree node (``register_pytree_node(Point, ...)``, a registered
# dataclass, a deque) reaches the capture rebuilt from its flattened parts too, so a function that assigns to
# it (``p.x = p.x + 1``, ``state.step += 1``, ``queue.append(t)``) changed the capture's copy only: the
# compiled call returned eager's values while the caller's object kept its old attributes, at every call
# (PyTorch's test_decorators ``nonstrict_trace`` side-effect tests through ``aotcache.compile``, session 19).
# Such an object's parts are taken before the call (its flatten function's children and context); a capture
# after which the children are other objects or the context compares unequal is refused, and the fallback
# (Dynamo) replays the assignment on the caller's object. A context that cannot be compared counts as changed.


def argument_containers(rebuilt: Any) -> list[tuple[Any, Any, tuple]]:
    """The lists, dicts and other registered pytree nodes reachable from ``rebuilt``, each with its keys (a
    node's flatten context) and members (its children) now (NOTE [Argument containers changed in place],
    [Argument objects changed in place]). Tuples (namedtuples too) are entered, not recorded; transformers'
    cache objects, which the model updates in place and aot_module writes back, are neither."""
    found = []
    stack = [rebuilt]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind in _MUTABLE_CONTAINERS:
            keys = tuple(value) if kind is not list else ()
            members = tuple(value.values()) if kind is not list else tuple(value)
            found.append((value, keys, members))
            stack.extend(members)
        elif isinstance(value, tuple):
            stack.extend(value)
        elif kind in pytree.SUPPORTED_NODES and not is_cache_object(value):
            children, context = pytree.SUPPORTED_NODES[kind].flatten_fn(value)
            found.append((value, context, tuple(children)))
            stack.extend(children)
    return found


def _same_context(before: Any, now: Any) -> bool:
    """Whether a pytree node's flatten context is unchanged; one that cannot be compared counts as changed."""
    if before is now:
        return True
    try:
        return bool(before == now)
    except Exception:  # tensors, objects whose __eq__ raises: NOTE [Argument objects changed in place]
        return False


def refuse_changed_argument_containers(containers: list[tuple[Any, Any, tuple]]) -> None:
    """Refuse a capture whose function changed one of the argument ``containers`` in place
    (:func:`argument_containers`, taken before the call; NOTE [Argument containers changed in place],
    [Argument objects changed in place])."""
    for container, keys, members in containers:
        kind = type(container)
        if kind not in _MUTABLE_CONTAINERS:
            try:
                children, context = pytree.SUPPORTED_NODES[kind].flatten_fn(container)
            except Exception:  # left in a state its own flatten cannot read: changed
                children, context = None, None
            now = () if children is None else tuple(children)
            if children is not None and len(now) == len(members) and all(map(operator.is_, now, members)) and \
                    _same_context(keys, context):
                continue
            raise CaptureError(
                f"aotcache: the function changes a {kind.__qualname__} it was passed (an attribute or member "
                f"assigned): the capture calls it on a copy rebuilt from the flattened arguments, so the caller's "
                f"object would keep its old state at every call. Return the new values instead, or keep the "
                f"object outside the compiled function.", reason="unsupported_construct")
        now = tuple(container.values()) if kind is not list else tuple(container)
        if len(now) == len(members) and all(map(operator.is_, now, members)) and (
                kind is list or all(map(operator.is_, container, keys))):
            continue
        raise CaptureError("aotcache: the function changes a list or dict it was passed in place (append, item "
                           "assignment, pop, ...): a graph cannot replay that at later calls. Return the new values "
                           "instead, or keep the container outside the compiled function.",
                           reason="unsupported_construct")


# NOTE [Python attributes a function sets on tensors]
# A graph holds tensor ops only: what a function does to a tensor's Python object is not in it. Assigning an
# attribute to a tensor argument (``x.offloading_activation = flag``), its ``.grad`` (``x.grad = g``, or
# ``x.grad.add_(g)`` on a grad it set), or an attribute to a tensor it returns (``y.foo = 42``, ``y.grad = x``)
# changed only the capture's trace tensors: the compiled call returned eager's values while the caller's tensor
# kept its old attributes and the returned one had none, at every call (PyTorch's test_misc
# ``test_input_tensor_custom_attr_mutation`` and its neighbours through ``aotcache.compile``, session 20). So a
# capture after which a tensor argument's attributes or ``.grad`` are other objects than before the call, or that
# returns a tensor of its own with attributes or a ``.grad``, is refused; the fallback (Dynamo) replays such
# assignments on the real tensors. Reading attributes is unaffected (NOTE [Python attributes of tensor arguments]
# in signature.py); a returned argument is checked as an argument. ``x.retain_grad()`` on a non-leaf argument is
# refused too (the caller's ``x.grad`` stayed None after backward; session 20's review). Not seen: ``x.grad = None``
# on an argument that has a grad, since a trace tensor has no ``.grad`` to clear (an xfail in
# tests/aot/test_tensor_attribute_assignments.py).


def tensor_attribute_state(flat_args: Sequence[Any], originals: Sequence[Any]) -> list[tuple[torch.Tensor, dict,
                                                                                                dict, Any]]:
    """Each tensor argument with a copy of its Python attributes, those of the real tensor it stands for
    (``originals``, position by position), its ``.grad`` and whether it retains its gradient, taken before the
    call (NOTE [Python attributes a function sets on tensors])."""
    state = []
    for arg, original in zip(flat_args, originals):
        if isinstance(arg, torch.Tensor):
            carried = python_attributes(original) if isinstance(original, torch.Tensor) and original is not arg \
                else {}
            state.append((arg, dict(python_attributes(arg)), dict(carried), (_grad_of(arg), _retains_grad(arg))))
    return state


def _retains_grad(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a non-leaf that retains its gradient (``retain_grad()``; a leaf always has one)."""
    with torch._C.DisableTorchFunction():  # aotcache's own read (NOTE [Autograd state read by the function])
        return not tensor.is_leaf and tensor.retains_grad


def refuse_tensor_attribute_changes(before: list[tuple[torch.Tensor, dict, dict, Any]], result: Any) -> None:
    """Refuse a capture whose function assigned Python attributes or ``.grad`` to a tensor argument or to a tensor it
    returns (:func:`tensor_attribute_state` taken before the call; NOTE [Python attributes a function sets on
    tensors]). An attribute the capture itself gave a trace tensor from the real tensor it stands for (a
    parameter's ``quant_scale``, ``nn.Buffer``'s ``persistent`` / ``_is_buffer``: NOTE [Python attributes of
    parameters] in module.py) is not the function's doing."""
    arguments = set()
    for tensor, attributes, carried, (grad, retains_grad) in before:
        arguments.add(id(tensor))
        now = python_attributes(tensor)
        if _retains_grad(tensor) != retains_grad:  # x.retain_grad() on a non-leaf argument: eager fills its .grad
            raise CaptureError(
                "aotcache: the function makes a tensor argument retain its gradient (retain_grad()): the caller's "
                "tensor would not get its .grad at backward. Call retain_grad() before the compiled call instead.",
                reason="unsupported_construct")
        if _grad_of(tensor) is not grad or any(name not in now for name in attributes) or any(
                attributes.get(name, carried.get(name, _MISSING)) is not value for name, value in now.items()):
            raise CaptureError(
                "aotcache: the function assigns a Python attribute or .grad to a tensor argument: a graph holds "
                "tensor ops only, so the caller's tensor would keep its old attributes at every call. Set the "
                "attribute outside the compiled function, or return the value instead.",
                reason="unsupported_construct")
    for out in pytree.tree_leaves(result):
        if isinstance(out, torch.Tensor) and id(out) not in arguments and (_grad_of(out) is not None
                                                                          or _user_attributes(out)):
            raise CaptureError(
                "aotcache: the function returns a tensor it gave a Python attribute or .grad: a graph's outputs are "
                "new tensors at every call, without them. Set the attribute outside the compiled function.",
                reason="unsupported_construct")


_MISSING = object()
# What the trace's own tensor classes keep in their ``__dict__`` (FunctionalTensor's ``elem``, FakeTensor's mode,
# device and memos), not a program's attributes: a returned trace tensor has them and nothing else. FakeTensor's
# device field is ``_fake_device`` in torch 2.13 but ``fake_device`` in 2.11: without the latter, on 2.11 every
# function returning a fake tensor that no functional input feeds (one computed from a closed-over tensor only)
# was refused as if it had set an attribute, and fell back to Dynamo (session 21).
_TRACE_TENSOR_FIELDS = frozenset({"elem", "constant", "dispatch_keys", "fake_device", "fake_mode", "pytype",
                                  "real_tensor"})


def _user_attributes(tensor: torch.Tensor) -> list[str]:
    """The names of the Python attributes a program gave ``tensor`` (the trace classes' own fields left out;
    names with a leading underscore on a trace tensor are taken for the class's too)."""
    names = list(python_attributes(tensor))
    if type(tensor).__module__.startswith("torch._subclasses"):
        names = [name for name in names if name not in _TRACE_TENSOR_FIELDS and not name.startswith("_")]
    elif names and hasattr(tensor, "__tensor_flatten__"):  # a traceable subclass keeps its inner tensors there
        try:
            inner = set(tensor.__tensor_flatten__()[0])
        except Exception:  # (the subclass's own check reports it)
            inner = set()
        names = [name for name in names if name not in inner]
    return names


def _grad_of(tensor: torch.Tensor) -> Any:
    """``tensor.grad`` of a leaf tensor; None for a non-leaf one (whose ``.grad`` autograd warns about reading,
    and a program does not set)."""
    with torch._C.DisableTorchFunction():  # aotcache's own read (NOTE [Autograd state read by the function])
        return tensor._grad if tensor.is_leaf else None


def refuse_constants_requiring_grad(gm: torch.fx.GraphModule) -> None:
    """NOTE [closed-over tensors] A tensor the function reads from a closure or a global (not an argument)
    becomes a constant of the graph, read by reference at run time. One that requires grad would get no
    gradient from the compiled backward while eager gives it one: refuse it rather than drop the gradient.
    """
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(gm, node.target, None)
        if isinstance(value, torch._subclasses.fake_tensor.FakeTensor):
            # a fake tensor has no data: the graph would fail at its first real call with FakeTensorMode's
            # "Please convert all Tensors to FakeTensors"; say what it is now
            raise CaptureError(
                f"aotcache: the function reads a FakeTensor of shape {tuple(value.shape)} from a closure, a global "
                f"or a module attribute (an unexpected fake constant); a compiled graph needs its real value. Pass "
                f"a real tensor, or take it as an argument.")
        if isinstance(value, torch.nn.Parameter) and value.requires_grad:
            raise CaptureError(
                f"aotcache: the function reads a parameter of shape {tuple(value.shape)} that is not one of its "
                f"inputs; its gradient would be lost. Either a function reads a module's parameters from a "
                f"closure or global (compile the module instead: aot_module / aotcache.compile(module) make its "
                f"parameters inputs), or activation checkpointing recomputes the forward while the backward is "
                f"traced, after the module call (torch.utils.checkpoint, transformers' "
                f"gradient_checkpointing_enable()): such a model cannot be captured whole, and aotcache.compile "
                f"runs it through torch.compile(backend='aotcache').")
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise CaptureError(
                f"aotcache: the function reads a tensor of shape {tuple(value.shape)} that requires grad from a "
                f"closure or global instead of taking it as an argument; its gradient would be lost. Pass it "
                f"as an argument, or wrap the code in an nn.Module and use aot_module (parameters are inputs).")


# NOTE [Hooks compiled autograd runs from a forward graph]
# With compiled autograd on when the forward is compiled, Dynamo puts a module's full backward hooks (and hooks
# registered inside the compiled function) into the forward graph as ``trace_wrapped`` calls that hand the hook to
# compiled autograd through a ``BackwardState`` input. The capture has no such state to trace: the user's compile
# failed (``AttributeError: 'BackwardState' object has no attribute 'proxy'``, ``BackendCompilerFailed``, where
# ``aot_eager`` compiles). Such a graph is refused: it runs eagerly as Dynamo's graph, the hooks called as eager
# calls them.
def refuse_backward_state_inputs(example_inputs: Sequence[Any]) -> None:
    """Refuse a Dynamo graph taking a ``BackwardState`` (NOTE [Hooks compiled autograd runs from a forward
    graph])."""
    from torch.fx.experimental._backward_state import BackwardState

    if any(isinstance(value, BackwardState) for value in example_inputs):
        raise CaptureError("aotcache: the graph hands a backward hook to compiled autograd (a BackwardState input: "
                           "a module's full backward hook or a hook registered in the compiled function, compiled "
                           "with compiled autograd on), which the capture cannot trace; the graph runs eagerly.",
                           reason="unsupported_construct")
