"""The inductor/aoti decomposition table: oneDNN LSTM layers become matmuls + pointwise ops that match the real
kernels (no compile needed), and the compilers refuse graphs that still call the oneDNN ops."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from aotcache.compilers import get_compiler
from aotcache.compilers.inductor_decomp import inductor_decompositions, rnn_decompositions

aten = torch.ops.aten
STEPS, BATCH, FEATURES, HIDDEN = 5, 3, 4, 6


def _layer_args(reverse: bool, has_biases: bool, num_layers: int = 1) -> tuple:
    torch.manual_seed(0)
    x = torch.randn(STEPS, BATCH, FEATURES)
    w_ih, w_hh = torch.randn(4 * HIDDEN, FEATURES), torch.randn(4 * HIDDEN, HIDDEN)
    if has_biases:
        b_ih, b_hh = torch.randn(4 * HIDDEN), torch.randn(4 * HIDDEN)
    else:  # what aten::lstm passes to the oneDNN layer without biases
        b_ih, b_hh = torch.zeros(4 * HIDDEN, FEATURES), torch.zeros(4 * HIDDEN, HIDDEN)
    hx, cx = torch.randn(BATCH, HIDDEN), torch.randn(BATCH, HIDDEN)
    return (x, w_ih, w_hh, b_ih, b_hh, hx, cx, reverse, [], 2, HIDDEN, num_layers, has_biases, False, True, True)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("has_biases", [True, False])
@pytest.mark.parametrize("num_layers", [1, 3])  # each call is one layer of a stack: num_layers only describes it
def test_lstm_layer_decompositions_match_the_onednn_kernels(reverse: bool, has_biases: bool, num_layers: int) -> None:
    forward, backward = rnn_decompositions().values()
    args = _layer_args(reverse, has_biases, num_layers)
    with torch.enable_grad():  # the real kernel returns its workspace only in grad mode
        real = aten.mkldnn_rnn_layer(*args)
    mine = forward(*args)
    for got, want in zip(mine[:3], real[:3]):
        torch.testing.assert_close(got, want)
    assert mine[3].dtype == torch.uint8 and mine[3].numel() == 0  # what the fake kernel reports
    grad_output, grad_hy, grad_cy = torch.randn(STEPS, BATCH, HIDDEN), torch.randn(BATCH, HIDDEN), \
        torch.randn(BATCH, HIDDEN)
    (x, w_ih, w_hh, b_ih, b_hh, hx, cx), flags = args[:7], (reverse, 2, HIDDEN, num_layers, has_biases, True, False, [], True)
    for grads in [(grad_output, grad_hy, grad_cy), (grad_output, None, None), (None, grad_hy, None)]:
        backward_args = (x, w_ih, w_hh, b_ih, b_hh, hx, cx, *real[:3], *grads, *flags, real[3])
        want = aten.mkldnn_rnn_layer_backward(*backward_args)
        got = backward(*backward_args)
        assert len(got) == len(want) == 7
        for index, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, msg=lambda m, i=index: f"backward output {i}: {m}")


def test_unsupported_lstm_layers_stay_undecomposed() -> None:
    forward, _ = rnn_decompositions().values()
    args = list(_layer_args(False, True))
    args[9] = 3  # another RNN mode than LSTM
    assert forward(*args) is NotImplemented


def _lstm_training_graphs(decompositions, num_layers=1, bidirectional=False):
    """(joint graph ops, output, grads) of an nn.LSTM traced through aotcache with ``decompositions``."""
    import aotcache

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(FEATURES, HIDDEN, batch_first=True, num_layers=num_layers, bidirectional=bidirectional)
    seen = []

    def nop_recording(gm, example_inputs):
        seen.append(gm)
        return gm

    compiled = aotcache.aot_module(lstm, fw_compiler=nop_recording, decompositions=decompositions, cache=False)
    x = torch.randn(BATCH, STEPS, FEATURES, requires_grad=True)
    out, (hy, cy) = compiled(x)
    (out.sum() + hy.sum() * 2 + cy.sum()).backward()
    ops = {str(node.target) for gm in seen for node in gm.graph.nodes if node.op == "call_function"}
    return ops, (out, hy, cy), [x.grad, *(p.grad for p in lstm.parameters())], lstm, x


@pytest.mark.parametrize("num_layers, bidirectional", [(1, False), (2, True)])
def test_lstm_traced_with_the_table_has_no_onednn_op_and_matches_eager(num_layers, bidirectional) -> None:
    # (found by exploration: a 2-layer LSTM kept its oneDNN ops, so the inductor compiler fell back to nop)
    ops, outputs, grads, lstm, x = _lstm_training_graphs(inductor_decompositions(), num_layers, bidirectional)
    assert not any("mkldnn_rnn" in op for op in ops), sorted(ops)
    assert "aten.mm.default" in ops
    reference = x.detach().clone().requires_grad_()
    lstm.zero_grad()
    out, (hy, cy) = lstm(reference)
    (out.sum() + hy.sum() * 2 + cy.sum()).backward()
    for got, want in zip(outputs, (out, hy, cy)):
        torch.testing.assert_close(got, want)
    for got, want in zip(grads, [reference.grad, *(p.grad for p in lstm.parameters())]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("compiler_name", ["inductor", "aoti"])
def test_compilers_refuse_graphs_with_onednn_lstm_ops(compiler_name: str) -> None:
    lstm = torch.nn.LSTM(FEATURES, HIDDEN)
    gm = make_fx(lambda x: lstm(x)[0])(torch.randn(STEPS, BATCH, FEATURES))  # no table: the oneDNN op stays
    assert any("mkldnn_rnn_layer" in str(node.target) for node in gm.graph.nodes)
    with pytest.raises(ValueError, match=r"mkldnn_rnn_layer.*decompositions\(\)"):
        get_compiler(compiler_name)(gm, [torch.randn(STEPS, BATCH, FEATURES)])


def test_table_is_inductors_plus_rnn_layers() -> None:
    from torch._inductor.decomposition import select_decomp_table

    table = get_compiler("aoti").decompositions()
    assert set(select_decomp_table()) <= set(table)
    assert set(rnn_decompositions()) <= set(table)
    assert get_compiler("inductor").decompositions().keys() == table.keys()
