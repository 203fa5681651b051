"""The decomposition table of the ``inductor`` and ``aoti`` compilers: Inductor's, plus matmul-level LSTM layers.

NOTE [importing what Inductor's table calls]
Some entries of Inductor's table call into ``torch._inductor.lowering`` at trace time (max-pool with indices
asks ``torch._inductor.lowering.should_fallback_max_pool_with_indices``) without importing it; they only work
once something else imported it. :func:`inductor_decompositions` imports it first, so tracing with the table
works in a fresh process.

NOTE [LSTM layers without oneDNN]
On CPU, ``aten::lstm`` is a CompositeImplicitAutograd op whose C++ kernel calls ``aten::mkldnn_rnn_layer``
(and autograd records ``aten::mkldnn_rnn_layer_backward``). A table entry for ``aten.lstm.input`` does not
help: make_fx consults its table only for ops that reach its proxy mode, and composite ops decompose in C++
before that unless the Python dispatcher is on (the capture enables it for dynamic shapes only). The oneDNN
ops do reach the proxy mode, and compiled they are wrong in two ways: their fake kernel reports an empty
``workspace`` while the real one returns 28672 bytes (Inductor's size assert fails), and the real kernel
returns no workspace at all when grad mode is off (an AOTInductor library runs without grad mode, so the
backward gets ``None``). So the table decomposes both ops into matmuls and pointwise ops:
- forward: the input projection of all steps in one matmul, then per step ``h @ w_hh^T`` and the gates;
  the workspace is an empty uint8 tensor (as the fake kernel says; nothing reads it);
- backward: the gates are recomputed from the saved input, weights, initial state and outputs (one
  batched matmul; ``h_{t-1}`` of every step is known from the outputs), the cell states with a pointwise
  recurrence, then backpropagation through time per step; weight gradients are two matmuls over all steps.
Only what the oneDNN path produces is handled (mode LSTM, no projections, no packed batch sizes; each call is
one layer and direction of a stack, whatever its ``num_layers`` says);
anything else stays undecomposed (``NotImplemented``) and the compilers refuse the graph with a clear error.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["inductor_decompositions", "rnn_decompositions", "UNSUPPORTED_OPS", "check_supported_ops"]

_LSTM_MODE = 2  # ideep::rnn_kind::LSTM, the only mode the oneDNN path of aten::lstm emits


def inductor_decompositions() -> dict:
    """Inductor's ``select_decomp_table()`` plus :func:`rnn_decompositions` (a new dict on each call)."""
    import torch._inductor.lowering  # noqa: F401  - see NOTE [importing what Inductor's table calls]
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    table.update(rnn_decompositions())
    return table


def rnn_decompositions() -> dict:
    """Matmul + pointwise decompositions of the oneDNN LSTM layer ops (see NOTE [LSTM layers without oneDNN])."""
    aten = torch.ops.aten
    return {aten.mkldnn_rnn_layer.default: _lstm_layer_forward,
            aten.mkldnn_rnn_layer_backward.default: _lstm_layer_backward}


def _concrete_length(size: Any) -> int:
    """The number of time steps as an int (the recurrence is unrolled; a symbolic length is specialized)."""
    return size if isinstance(size, int) else int(size)


def _is_plain_lstm(mode: int, num_layers: int, batch_sizes: Any, hidden_size: int, w_hh: torch.Tensor) -> bool:
    return mode == _LSTM_MODE and not batch_sizes and w_hh.shape[-1] == hidden_size


def _lstm_bias(b_ih: torch.Tensor, b_hh: torch.Tensor, has_biases: bool) -> torch.Tensor | None:
    # without biases the oneDNN path passes zero tensors shaped like the weights: ignore them
    return b_ih + b_hh if has_biases else None


def _gate_activations(gates: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PyTorch's gate order (input, forget, cell, output) along the last dim, activated."""
    i, f, g, o = gates.chunk(4, dim=-1)
    return i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()


def _lstm_layer_forward(input: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                        b_hh: torch.Tensor, hx: torch.Tensor, cx: torch.Tensor, reverse: bool, batch_sizes: Any,
                        mode: int, hidden_size: int, num_layers: int, has_biases: bool, bidirectional: bool,
                        batch_first: bool, train: bool) -> Any:
    """``aten.mkldnn_rnn_layer``: ``input`` is time-major (T, B, I) whatever ``batch_first`` says."""
    del bidirectional, batch_first, train  # the op works on one direction of time-major input
    if not _is_plain_lstm(mode, num_layers, batch_sizes, hidden_size, w_hh):
        return NotImplemented
    steps = input.flip(0) if reverse else input
    projected = torch.matmul(steps, w_ih.t())
    bias = _lstm_bias(b_ih, b_hh, has_biases)
    if bias is not None:
        projected = projected + bias
    h, c = hx, cx
    outputs = []
    for t in range(_concrete_length(steps.shape[0])):
        i, f, g, o = _gate_activations(projected[t] + torch.mm(h, w_hh.t()))
        c = f * c + i * g
        h = o * c.tanh()
        outputs.append(h)
    output = torch.stack(outputs, 0)
    if reverse:
        output = output.flip(0)
    workspace = input.new_empty((0,), dtype=torch.uint8)
    return output, h, c, workspace


def _lstm_layer_backward(input: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                         b_hh: torch.Tensor, hx: torch.Tensor, cx: torch.Tensor, output: torch.Tensor,
                         hy: torch.Tensor, cy: torch.Tensor, grad_output: torch.Tensor | None,
                         grad_hy: torch.Tensor | None, grad_cy: torch.Tensor | None, reverse: bool, mode: int,
                         hidden_size: int, num_layers: int, has_biases: bool, train: bool, bidirectional: bool,
                         batch_sizes: Any, batch_first: bool, workspace: torch.Tensor) -> Any:
    """``aten.mkldnn_rnn_layer_backward`` by recomputation and backpropagation through time.

    Returns (d_input, d_w_ih, d_w_hh, d_bias, d_bias, d_hx, d_cx) in float32, like the oneDNN kernel.
    """
    del hy, cy, train, bidirectional, batch_first, workspace
    if not _is_plain_lstm(mode, num_layers, batch_sizes, hidden_size, w_hh):
        return NotImplemented
    x = input.flip(0) if reverse else input
    hs = output.flip(0) if reverse else output
    grad_hs = None if grad_output is None else (grad_output.flip(0) if reverse else grad_output)
    length = _concrete_length(x.shape[0])
    h_prev = torch.cat([hx.unsqueeze(0), hs[:-1]], 0)  # h_{t-1} for every step t
    gates = torch.matmul(x, w_ih.t()) + torch.matmul(h_prev, w_hh.t())
    bias = _lstm_bias(b_ih, b_hh, has_biases)
    if bias is not None:
        gates = gates + bias
    i, f, g, o = _gate_activations(gates)
    cells = []
    c = cx
    for t in range(length):
        c = f[t] * c + i[t] * g[t]
        cells.append(c)
    c_all = torch.stack(cells, 0)
    c_prev = torch.cat([cx.unsqueeze(0), c_all[:-1]], 0)
    tanh_c = c_all.tanh()

    dh_next = grad_hy if grad_hy is not None else torch.zeros_like(hx)
    dc_next = grad_cy if grad_cy is not None else torch.zeros_like(cx)
    grad_gates: list[torch.Tensor] = []
    for t in reversed(range(length)):
        dh = dh_next if grad_hs is None else dh_next + grad_hs[t]
        dc = dc_next + dh * o[t] * (1 - tanh_c[t] * tanh_c[t])
        d_i = dc * g[t] * i[t] * (1 - i[t])
        d_f = dc * c_prev[t] * f[t] * (1 - f[t])
        d_g = dc * i[t] * (1 - g[t] * g[t])
        d_o = dh * tanh_c[t] * o[t] * (1 - o[t])
        grad_gate = torch.cat([d_i, d_f, d_g, d_o], -1)
        grad_gates.append(grad_gate)
        dc_next = dc * f[t]
        dh_next = torch.mm(grad_gate, w_hh)
    grad_gates.reverse()
    grad_all = torch.stack(grad_gates, 0)  # (T, B, 4H)
    grad_input = torch.matmul(grad_all, w_ih)
    if reverse:
        grad_input = grad_input.flip(0)
    flat_grad = grad_all.reshape(-1, grad_all.shape[-1])
    grad_w_ih = torch.mm(flat_grad.t(), x.reshape(-1, x.shape[-1]))
    grad_w_hh = torch.mm(flat_grad.t(), h_prev.reshape(-1, h_prev.shape[-1]))
    grad_bias = flat_grad.sum(0)  # returned with or without biases, like the oneDNN kernel

    def as_float(value: torch.Tensor) -> torch.Tensor:
        return value.to(torch.float32)

    return (as_float(grad_input), as_float(grad_w_ih), as_float(grad_w_hh), as_float(grad_bias),
            as_float(grad_bias), as_float(dh_next), as_float(dc_next))


# Ops a compiled graph of the inductor/aoti compilers must not contain (see NOTE [LSTM layers without oneDNN]).
UNSUPPORTED_OPS: dict[str, str] = {
    "aten.mkldnn_rnn_layer.default": "oneDNN LSTM layer",
    "aten.mkldnn_rnn_layer_backward.default": "oneDNN LSTM layer backward",
}


def check_supported_ops(gm: torch.fx.GraphModule, compiler_name: str) -> None:
    """Refuse graphs holding ops this compiler's code would run wrongly. :raises ValueError: naming op and fix."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        description = UNSUPPORTED_OPS.get(str(node.target))
        if description is not None:
            raise ValueError(
                f"{compiler_name} compiler: the graph calls {node.target} ({description}, node {node.name!r}), "
                f"whose compiled form is wrong (its fake kernel and its real kernel disagree on the workspace). "
                f"Trace with the compiler's decompositions() (the default when no decompositions= is given) or "
                f"add aotcache.compilers.inductor_decomp.rnn_decompositions() to your table.")

