"""Small ATen graphs shared by the compiler tests (traced with make_fx, like the AOT layer's graphs)."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx


def with_constant(x, w):
    bias = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 3.0, 1.0])
    scale = torch.tensor([[float(i % 7) - 3.0 for i in range(8)] for _ in range(4)])  # large: not inlined
    hidden = torch.relu(x @ w) * scale + bias
    return (hidden.to(torch.float64), x.sin()[1:, ...].sum(dim=[0], keepdim=True))


def with_int_input(x, n):
    return (x * n + x.shape[0], None, n + 1)


def example_args():
    torch.manual_seed(0)
    return [torch.randn(4, 8), torch.randn(8, 8)]


def traced(fn, args, mode="fake", decompositions=None):
    """``fn`` as an ATen graph; pass the compiler's ``decompositions()`` for the inductor compiler."""
    return make_fx(fn, tracing_mode=mode, decomposition_table=decompositions)(*args)


# Source used by fresh-process tests to rebuild the same eager reference.
REFERENCE_SOURCE = '''
import torch
def with_constant(x, w):
    bias = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 3.0, 1.0])
    scale = torch.tensor([[float(i % 7) - 3.0 for i in range(8)] for _ in range(4)])  # large: not inlined
    hidden = torch.relu(x @ w) * scale + bias
    return (hidden.to(torch.float64), x.sin()[1:, ...].sum(dim=[0], keepdim=True))
def with_int_input(x, n):
    return (x * n + x.shape[0], None, n + 1)
'''
