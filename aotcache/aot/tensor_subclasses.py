"""Refusals for tensor subclasses that wrap other tensors, and for the nested tensors built from plain ones.

aotcache's capture has no subclass desugaring (NOTE [Tensor subclass arguments] in unsupported_tensors.py): a graph
takes and returns plain tensors. A subclass used only *inside* the function is traced through its
``__torch_dispatch__`` into plain ops, as eager runs it; these refusals cover what a plain graph cannot stand
for, so that the fallback runs such a call as eager does instead of failing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.nn.parameter import UninitializedTensorMixin
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from aotcache.aot.errors import CaptureError
from aotcache.aot.unsupported_tensors import nested_tensor_error, unsupported_layout_error

__all__ = ["refuse_subclass_outputs", "refuse_nested_int_inputs", "refuse_non_strided_graph_values",
           "behaviour_overriding_class", "overriding_subclass_error"]


def refuse_subclass_outputs(flat_outs: Sequence[Any]) -> None:
    """NOTE [Tensor subclass outputs]
    A function that builds a tensor subclass from plain tensors and returns it (``return TwoTensor(x, x * 2)``,
    a float8 or DTensor made inside) was traced into a graph whose output slot held the subclass of the trace's
    own functional tensors: a graph constant (not cacheable, "tensor constant subclass") and, at the first call,
    "Attempting to use FunctionalTensor on its own" where eager and torch's aot_eager return the subclass. The
    graph has no way to rebuild the subclass around plain outputs, so the capture is refused (``unsupported_layout``)
    and the fallback runs the call as eager does. A subclass used inside and not returned is still captured.

    :raises CaptureError: naming the output and its class.
    """
    for k, out in enumerate(flat_outs):
        if isinstance(out, torch.Tensor) and is_traceable_wrapper_subclass(out):
            raise CaptureError(f"aotcache: output {k} is a {type(out).__name__}, a tensor subclass that wraps other "
                               f"tensors; a compiled graph returns plain tensors only. Return its inner tensors "
                               f"instead, or build the subclass after the compiled call.",
                               reason="unsupported_layout")


def refuse_nested_int_inputs(flat_args: Sequence[Any]) -> None:
    """NOTE [Offsets of nested tensors as inputs]
    A plain tensor that is the offsets (or lengths) of a jagged nested tensor eager has made is registered with
    a ragged size (a nested int); faking it makes that size a symbol, which needs a ShapeEnv. A static capture has
    none, so such an input (``nested_tensor_from_jagged(values, offsets)`` run once eagerly, then ``offsets``
    passed to a compiled function) failed with torch's "self.shape_env must not be None" where eager and aot_eager
    run. It is refused (``unsupported_layout``); the fallback runs the call as eager does. Called for static
    captures only (a symbolic one has its ShapeEnv).

    :raises CaptureError: naming the argument.
    """
    from torch.nested._internal.nested_tensor import _tensor_symint_registry

    for position, arg in enumerate(flat_args):
        if isinstance(arg, torch.Tensor) and arg in _tensor_symint_registry:
            raise CaptureError(f"aotcache: flat argument {position} is the offsets or lengths of a jagged nested "
                               f"tensor (it carries a ragged size), which a static capture cannot stand for. Pass a "
                               f"copy (offsets.clone()) or the nested tensor itself, or call the function eagerly.",
                               reason="unsupported_layout")


def refuse_non_strided_graph_values(gm: torch.nn.Module) -> None:
    """NOTE [Nested tensors built inside a Dynamo graph]
    Dynamo keeps ``nested_tensor_from_jagged(values, offsets)`` on plain inputs in its graph. A symbolic capture
    refuses the jagged result when it meets it (``unsupported_layout``), but a static one failed earlier, inside the
    op: the ragged size is a symbol and a static capture has no ShapeEnv ("self.shape_env must not be None", where
    aot_eager runs). So a Dynamo graph that computes any value with a non-strided layout (jagged, sparse) is
    refused before the capture, by the values Dynamo recorded: the outcome the symbolic capture already had.

    :raises CaptureError: naming the first such value.
    """
    graph = getattr(gm, "graph", None)
    if graph is None:
        return
    strided = torch.strided
    for node in graph.nodes:
        if node.op == "placeholder":
            continue  # inputs are checked as arguments (make_fake_inputs)
        value = node.meta.get("example_value", node.meta.get("val"))
        leaves = (value,) if isinstance(value, torch.Tensor) else pytree.tree_leaves(value) if isinstance(
            value, (tuple, list)) else ()  # a multi-output op (a few levels at most: pytree is the rare case)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.layout is not strided:
                what = f"the value {node.name} of the torch.compile graph"
                raise nested_tensor_error(what) if leaf.is_nested else unsupported_layout_error(what, leaf.layout)


# class members of a tensor subclass that leave the tensor's ops as they are (construction, copying, printing)
_HARMLESS_MEMBERS = frozenset((
    "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__", "__slots__",
    "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__", "__abstractmethods__",
    "_abc_impl", "__new__", "__init__", "__init_subclass__", "__class_getitem__", "__deepcopy__", "__copy__",
    "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__", "__repr__", "__str__", "__format__"))


# ``__torch_function__ = torch._C._disabled_torch_function_impl`` (as nn.Parameter has it): ops run as on a plain
# tensor and return plain tensors, what a compiled graph returns
_DISABLED_OVERRIDES = {"__torch_function__": torch._C._disabled_torch_function_impl,
                       "__torch_dispatch__": torch._C._disabled_torch_dispatch_impl}


def behaviour_overriding_class(arg: torch.Tensor) -> type | None:
    """NOTE [Tensor subclasses that change what ops do]
    A tensor argument of a subclass that defines ``__torch_function__`` or ``__torch_dispatch__``, or a member of
    ``torch.Tensor`` (``def sigmoid(self)``, a property ``shape``), changes what the function computes: eager runs the
    override at every call. aotcache's own trace (``aot_function``, ``aot_module``, ``aotcache.compile``) fakes its
    arguments as plain tensors, so the override was not traced: a ``__torch_function__`` that turns ``sigmoid`` into
    ``exp`` gave ``sigmoid``'s values, silently (PyTorch's test_subclasses.py ``SigmoidToExpSubclass``), and such an
    argument had the signature of a plain tensor, so it also reused a plain tensor's graph. Such an argument is
    refused (the fallback runs the call through torch.compile, whose Dynamo traces the override, or eagerly).
    ``torch.compile``'s graphs are unaffected: Dynamo has traced the override into them. Subclasses that only add
    attributes or construction (``class T(torch.Tensor): pass``, an ``nn.Parameter`` subclass with its own
    ``__new__``) or that disable ``__torch_function__`` (``torch._C._disabled_torch_function_impl``, as
    ``nn.Parameter`` does) compute as plain tensors do and are still captured. Found (session-14 review): the
    override of a mixin listed before ``torch.Tensor`` (``class T(SigmoidToExpMixin, torch.Tensor)``) was not
    looked at (the walk stopped at the first class that is no tensor class), so it gave ``sigmoid``'s values; and a
    disabled ``__torch_function__`` was refused. Every class before ``torch.Tensor`` in the MRO is now read, a
    name by the class that eager's lookup finds. The hot paths compare the classes of the arguments (``aot_module``'s
    compared a parameter's fields only: one whose ``__class__`` became an overriding class kept the plain graph);
    a class that gains an override after its calls were captured is a known gap (an xfail).

    :returns: the first class (from ``type(arg)`` down to ``torch.Tensor`` / ``nn.Parameter``) with such a member,
        or None.
    """
    kind = type(arg)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        return None
    if is_traceable_wrapper_subclass(arg):
        return None  # refused with its own message (NOTE [Tensor subclass arguments])
    if issubclass(kind, (FakeTensor, FunctionalTensor, UninitializedTensorMixin)):
        return None  # torch's own tracing tensors; lazy parameters are refused as uninitialized
    shadowed = set()  # names a class nearer type(arg) defines: what eager runs
    for cls in kind.__mro__:  # mixins too: a class listed before torch.Tensor overrides its members
        if cls is torch.Tensor or cls is torch.nn.Parameter:
            return None
        for name, member in vars(cls).items():
            if name in shadowed or name in _HARMLESS_MEMBERS:
                continue
            shadowed.add(name)
            if name in _DISABLED_OVERRIDES:
                if member is not _DISABLED_OVERRIDES[name]:
                    return cls
            elif hasattr(torch.Tensor, name):
                return cls
    return None


def overriding_subclass_error(what: str, arg: torch.Tensor) -> CaptureError:
    """The error for an argument of a subclass that changes what ops do (NOTE [Tensor subclasses that change what
    ops do])."""
    cls = behaviour_overriding_class(arg)
    return CaptureError(f"aotcache: {what} is a {type(arg).__name__}, a tensor subclass whose class "
                        f"{getattr(cls, '__name__', cls)} overrides tensor behaviour (__torch_function__, "
                        f"__torch_dispatch__ or a torch.Tensor member), which a compiled graph of plain tensors would "
                        f"not run. Pass a plain tensor (x.as_subclass(torch.Tensor)), or compile with "
                        f"torch.compile(backend='aotcache'), whose Dynamo traces the override.",
                        reason="unsupported_layout")
