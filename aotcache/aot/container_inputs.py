"""Dynamo graphs whose inputs include a list, tuple or dict of tensors (compiled autograd's boxed ``inputs``),
rewritten to take each element as its own input.

NOTE [Container inputs of a Dynamo graph]
Compiled autograd hands its backward graph to Dynamo with the gradients and leaves boxed in one list
(``L_inputs_: list``, read with ``inputs[i]``), and Dynamo calls the backend with that list as an example input.
The capture traces tensors, not containers: the list's real tensors met the fake tensors of the trace and the
compile failed with "Please convert all Tensors to FakeTensors" (``BackendCompilerFailed``, where ``aot_eager``,
whose backend flattens such inputs, compiles). Here each container placeholder read only by constant indexing is
replaced by one placeholder per element (the indexing nodes by those placeholders), so the graph is an ordinary
graph of flat inputs, keyed and compiled as any other; the returned function flattens each call's containers the
same way. A container read otherwise (passed whole to a call, indexed by a value) is refused: the graph runs
eagerly. A list compiled autograd marks as stolen (``steal_arg``) is emptied once flattened, as its own
backends do, so that the list holds none of the gradients it boxes. The call's flat arguments still hold each one
until the graph returns: aotcache's compiled functions take positional arguments, where torch's boxed runtime
(``aot_eager``, Inductor) lets each input go at its last use, so a compiled-autograd backward can peak higher here
by the gradients it reads.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aotcache.aot.errors import CaptureError

__all__ = ["FlatInputs", "flatten_container_inputs", "with_flat_inputs"]

_CONTAINERS = (list, tuple, dict)
_LEAVES = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


@dataclass(frozen=True)
class FlatInputs:
    """A Dynamo graph rewritten to flat inputs, its flat example inputs, and how to flatten a call's arguments."""

    gm: torch.fx.GraphModule
    example_inputs: list
    #: per original input: None (passed as it is) or the keys/indices of its elements, in placeholder order
    layout: tuple[tuple[Any, ...] | None, ...]
    #: the original inputs (lists) emptied once flattened (compiled autograd's ``steal_arg``)
    stolen: tuple[int, ...]

    def flatten(self, args: Sequence[Any]) -> list:
        """The flat arguments of a call made with the original (container) arguments ``args``."""
        flat: list = []
        for value, keys in zip(args, self.layout):
            if keys is None:
                flat.append(value)
            elif len(value) != len(keys) or (isinstance(value, dict) and list(value) != list(keys)):
                raise ValueError(f"aotcache backend: a container input of the compiled graph had {len(keys)} "
                                 f"elements and now has {len(value)} (Dynamo guards its length); call the "
                                 "compiled graph only through the torch.compile function that made it")
            else:
                flat.extend(value[key] for key in keys)
        for index in self.stolen:
            args[index].clear()
        return flat


def _refuse(why: str) -> CaptureError:
    return CaptureError(f"a container input of the Dynamo graph {why}; the graph runs eagerly",
                        reason="container-input")


def flatten_container_inputs(gm: Any, example_inputs: Sequence[Any]) -> FlatInputs | None:
    """``gm`` rewritten so that each list / tuple / dict input is one input per element (NOTE [Container inputs
    of a Dynamo graph]); None when no example input is a container.

    :raises CaptureError: a container input that cannot be flattened (read other than by constant indexing,
        nested, holding a value that is not a tensor or a number, or ``gm`` not an FX graph).
    """
    if not any(isinstance(value, _CONTAINERS) for value in example_inputs):
        return None
    if not isinstance(gm, torch.fx.GraphModule):
        raise _refuse("belongs to a module that is not an FX graph")
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise _refuse(f"cannot be matched to a placeholder ({len(placeholders)} for {len(example_inputs)} inputs)")
    flat_gm = torch.fx.GraphModule(gm, gm.graph.__deepcopy__(), type(gm).__name__)
    flat_gm.meta = dict(getattr(gm, "meta", {}))
    new_placeholders = [node for node in flat_gm.graph.nodes if node.op == "placeholder"]
    flat_examples: list = []
    layout: list[tuple[Any, ...] | None] = []
    stolen: list[int] = []
    for index, (node, value) in enumerate(zip(new_placeholders, example_inputs)):
        if not isinstance(value, _CONTAINERS):
            flat_examples.append(value)
            layout.append(None)
            continue
        keys = tuple(value) if isinstance(value, dict) else tuple(range(len(value)))
        elements = [value[key] for key in keys]
        if not all(isinstance(element, _LEAVES) for element in elements):
            raise _refuse(f"'{node.name}' holds a value that is not a tensor or a number")
        users = list(node.users)
        if not all(user.op == "call_function" and user.target is operator.getitem and user.args[0] is node
                   and len(user.args) == 2 and not user.kwargs and user.args[1] in keys for user in users):
            raise _refuse(f"'{node.name}' is read other than by indexing with a constant")
        # the indexing nodes carry Dynamo's fake (symbolic) values; the container's own meta holds the real ones
        traced = {user.args[1]: user.meta["example_value"] for user in users if "example_value" in user.meta}
        with flat_gm.graph.inserting_before(node):
            element_nodes = {}
            for key, element in zip(keys, elements):
                element_node = flat_gm.graph.placeholder(f"{node.name}_{key}")
                element_node.meta = {name: meta for name, meta in node.meta.items()
                                     if name not in ("example_value", "val", "grapharg", "steal_arg")}
                element_node.meta["example_value"] = traced.get(key, element)
                element_nodes[key] = element_node
        for user in users:
            user.replace_all_uses_with(element_nodes[user.args[1]])
            flat_gm.graph.erase_node(user)
        if node.meta.get("steal_arg", False) and isinstance(value, list):
            stolen.append(index)
        flat_gm.graph.erase_node(node)
        flat_examples.extend(elements)
        layout.append(keys)
    flat_gm.graph.lint()
    flat_gm.recompile()
    return FlatInputs(flat_gm, flat_examples, tuple(layout), tuple(stolen))


def with_flat_inputs(flat: FlatInputs, compiled: Callable) -> Callable:
    """The function Dynamo calls with the original (container) arguments: flattens them and calls ``compiled``."""

    def run(*args: Any) -> Any:
        return compiled(*flat.flatten(args))

    if hasattr(compiled, "runtime"):
        run.runtime = compiled.runtime  # type: ignore[attr-defined]
    return run
