"""The autograd nodes behind a traced call's outputs, for the checks and hooks put on them before its backward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["autograd_nodes", "is_custom_function_node"]


def autograd_nodes(outputs: Sequence[Any]) -> list:
    """Every autograd node reachable from the ``grad_fn`` of the tensors in ``outputs``, each once (the list keeps
    them alive, so their ids stay unique while it is used)."""
    nodes: list = []
    seen: set[int] = set()
    stack = [out.grad_fn for out in outputs if isinstance(out, torch.Tensor) and out.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes


def is_custom_function_node(node: Any) -> bool:
    """Whether the autograd ``node`` runs a custom autograd.Function's backward (Python, or C++ ``CppFunction``)
    rather than one of autograd's derivative formulas."""
    return isinstance(node, torch.autograd.function.BackwardCFunction) or type(node).__name__ == "CppFunction"
