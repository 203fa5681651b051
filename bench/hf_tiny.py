"""Tiny random-weight transformers models of many architectures, built from each config class's defaults.

``tiny_config("Llama")`` shrinks ``LlamaConfig()`` (2 layers, hidden 32, vocab 99, dropout off) by setting every
common size attribute the config has; ``ARCH_OVERRIDES`` holds what one architecture needs beyond that.
``build("Llama", "ForCausalLM")`` seeds and instantiates. Used by the transformers sweeps under bench/.
"""

from __future__ import annotations

from typing import Any

import torch

#: Attribute values applied to any config that has the attribute (sizes small, every dropout off).
SHRINK: dict[str, Any] = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=37, max_position_embeddings=128, d_model=32, encoder_layers=2, decoder_layers=2,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_layers=2,
    num_heads=4, d_ff=37, d_kv=8, n_embd=32, n_layer=2, n_head=4, n_positions=128, embed_dim=32, ffn_dim=37,
    num_decoder_layers=2, head_dim=8, image_size=32, patch_size=8,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dropout=0.0, attention_dropout=0.0,
    hidden_dropout=0.0, activation_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dropout_rate=0.0,
    layerdrop=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)

#: What one architecture needs beyond ``SHRINK`` (found by building it).
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "GPTJ": dict(rotary_dim=4),
    "CodeGen": dict(rotary_dim=4),
    "DebertaV2": dict(pooler_hidden_size=32),
    "Deberta": dict(pooler_hidden_size=32),
    # generate sweep: 32 input frames of 8 mel bins (the defaults, 3000 x 80, make the eager encoder the cost)
    "Whisper": dict(max_source_positions=16, num_mel_bins=8, max_target_positions=64),
}


def tiny_config(arch: str, **overrides: Any) -> Any:
    """``<arch>Config()`` with ``SHRINK``, the architecture's overrides and ``overrides`` applied."""
    import transformers

    config = getattr(transformers, f"{arch}Config")()
    for name, value in {**SHRINK, **ARCH_OVERRIDES.get(arch, {}), **overrides}.items():
        if hasattr(config, name):
            try:
                setattr(config, name, value)
            except AttributeError:  # a read-only property derived from other fields
                pass
    return config


def build(arch: str, head: str, seed: int = 0, attn: str | None = "eager", **overrides: Any) -> torch.nn.Module:
    """``<arch><head>`` (e.g. ``Llama`` + ``ForCausalLM``) of a tiny config, seeded, in train mode."""
    import transformers

    config = tiny_config(arch, **overrides)
    if attn is not None:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    return getattr(transformers, f"{arch}{head}")(config).train()
