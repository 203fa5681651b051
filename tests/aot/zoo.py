"""Model zoo for AOT Autograd tests and benchmarks: small, deterministic models with example inputs.

Each ``ZooEntry.build()`` returns ``(fn_or_module, inputs)`` freshly seeded, so two builds are identical.
Dropout probabilities are 0 so eager and compiled runs are comparable; modules stay in training mode
(BatchNorm updates its running statistics: a buffer mutation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["ZooEntry", "ZOO", "BENCH_MODELS", "get_entry", "training_loss"]


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """A named model: ``build()`` -> (callable or nn.Module, example inputs); tolerances for comparisons."""

    name: str
    build: Callable[[], tuple[Any, tuple[Any, ...]]]
    atol: float | None = None
    rtol: float | None = None
    description: str = ""


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------


def build_mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    return model, (torch.randn(32, 64, requires_grad=True),)


def build_cnn_bn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    model.train()
    return model, (torch.randn(4, 3, 16, 16, requires_grad=True),)


def build_transformer_encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    model = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model.train()
    return model, (torch.randn(2, 8, 32, requires_grad=True),)


def build_lstm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    model = nn.LSTM(input_size=8, hidden_size=16, num_layers=1, batch_first=True)
    return model, (torch.randn(2, 5, 8, requires_grad=True),)


def views_of_inputs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Returns views of its inputs (transpose, slice, reshape-as-view) next to a fresh tensor."""
    return x.t(), x[1:], y.view(-1), x * y.sum()


def build_views_of_inputs() -> tuple[Callable, tuple[torch.Tensor, ...]]:
    _seeded()
    return views_of_inputs, (torch.randn(4, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True))


def mutate_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mutates ``x`` (which needs no grad) in place, then uses the updated value."""
    x.mul_(2)
    x.add_(1)
    return (x * weight).sum(dim=0)


def build_mutate_input() -> tuple[Callable, tuple[torch.Tensor, ...]]:
    _seeded()
    return mutate_input, (torch.randn(5, 4), torch.randn(5, 4, requires_grad=True))


class NonTensorOutput(nn.Module):
    """A module whose output mixes tensors with ints, strings, None and a nested dict."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        hidden = self.proj(x)
        return {"logits": hidden.tanh(), "num_rows": x.shape[0], "tag": "proj", "extra": None,
                "nested": {"norm": hidden.norm(), "scale": 0.5}}


def build_non_tensor_output() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    return NonTensorOutput(), (torch.randn(3, 8, requires_grad=True),)


class TinyGPT2(nn.Module):
    """GPT-2 LM head model (random tiny config, no download) returning ``(loss, logits)``.

    Word embeddings are untied so that PyTorch's ``aot_module`` (the benchmark's reference, which rejects
    tied parameters) can run it too; tied parameters have their own zoo entry.
    """

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                            bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM",
                            tie_word_embeddings=False)
        config._attn_implementation = "eager"
        self.model = GPT2LMHeadModel(config)
        self.model.train()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # NOTE [explicit attention mask]
        # Without a mask, transformers inspects position ids for packed sequences with a data-dependent
        # ``if (...).all()`` that no fake-tensor trace can follow; an explicit all-ones mask avoids that path.
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                         return_dict=True)
        return out.loss, out.logits


def build_gpt2_tiny() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    model = TinyGPT2()
    input_ids = torch.randint(0, 100, (2, 16))
    return model, (input_ids, torch.ones_like(input_ids), input_ids.clone())


class TiedWeights(nn.Module):
    """One parameter used by two layers (as in tied input/output embeddings), plus a buffer counter."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(6, 6, bias=False)
        self.decode = nn.Linear(6, 6)
        self.decode.weight = self.encode.weight
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.decode(torch.relu(self.encode(x)))


def build_tied_weights() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    return TiedWeights(), (torch.randn(3, 6, requires_grad=True),)


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in [
        ZooEntry("mlp", build_mlp, description="3-layer MLP with ReLU/GELU"),
        ZooEntry("cnn_bn", build_cnn_bn, atol=1e-4, rtol=1e-4,
                 description="CNN with BatchNorm in training mode (running-stat buffer mutation)"),
        ZooEntry("transformer_encoder", build_transformer_encoder, atol=1e-4, rtol=1e-4,
                 description="nn.TransformerEncoderLayer, batch_first, dropout 0"),
        ZooEntry("lstm", build_lstm, atol=1e-5, rtol=1e-4, description="nn.LSTM, one layer, batch_first"),
        ZooEntry("views_of_inputs", build_views_of_inputs, description="function returning views of its inputs"),
        ZooEntry("mutate_input", build_mutate_input, description="function mutating its input in place"),
        ZooEntry("non_tensor_output", build_non_tensor_output,
                 description="module returning ints, strings, None and nested dicts next to tensors"),
        ZooEntry("tied_weights", build_tied_weights,
                 description="one parameter shared by two layers, and an integer buffer counter"),
        ZooEntry("gpt2_tiny", build_gpt2_tiny, atol=1e-4, rtol=1e-4,
                 description="transformers GPT2LMHeadModel, 2 layers, n_embd 32, eager attention"),
    ]
}

# The models the benchmark measures (the function entries are correctness cases, not workloads).
BENCH_MODELS = ["mlp", "cnn_bn", "transformer_encoder", "lstm", "gpt2_tiny"]


def get_entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``; a clear error listing the known names otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known models: {', '.join(ZOO)}") from None


def training_loss(outputs: Any) -> torch.Tensor:
    """A scalar to backpropagate from any zoo output: the sum of the means of its floating-point tensors."""
    import torch.utils._pytree as pytree

    leaves = [leaf for leaf in pytree.tree_leaves(outputs)
              if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.requires_grad]
    return sum(leaf.float().mean() for leaf in leaves)
