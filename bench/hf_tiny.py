"""Tiny random-weight transformers models of many architectures, built from each config class's defaults.

``tiny_config("Llama")`` shrinks ``LlamaConfig()`` (2 layers, hidden 32, vocab 99, dropout off) by setting every
common size attribute the config has (and its sub-configs': CLIP's text and vision configs);
``ARCH_OVERRIDES`` holds what one architecture needs beyond that. ``build("Llama", "ForCausalLM")`` seeds and
instantiates. ``adamw_steps`` / ``compare_steps`` / ``max_diff``: the training and output comparisons against
eager the transformers sweeps under bench/ share.
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

_AUDIO = dict(num_feat_extract_layers=2, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
              num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, feat_proj_dropout=0.0, final_dropout=0.0,
              vocab_size=16, ctc_loss_reduction="mean")

#: What one architecture needs beyond ``SHRINK`` (found by building it); set whether or not the config has the
#: attribute already.
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "GPTJ": dict(rotary_dim=4),
    "CodeGen": dict(rotary_dim=4),
    "DebertaV2": dict(pooler_hidden_size=32),
    "Deberta": dict(pooler_hidden_size=32),
    "T5": dict(decoder_start_token_id=0),
    "Marian": dict(decoder_vocab_size=99),
    "Falcon": dict(ffn_hidden_size=37),
    "OPT": dict(word_embed_proj_dim=32),
    "Qwen2Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                     shared_expert_intermediate_size=16),
    "Mixtral": dict(num_local_experts=4, intermediate_size=32),  # grouped_mm: strides multiple of 16 bytes
    "DistilBert": dict(dim=32, hidden_dim=37, n_layers=2, n_heads=4),
    "Longformer": dict(attention_window=4),
    # 32 input frames of 8 mel bins (the defaults, 3000 x 80, make the eager encoder the cost)
    "Whisper": dict(num_mel_bins=8, max_source_positions=16, max_target_positions=64),
    "Swin": dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=2, patch_size=4),
    "ConvNext": dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], out_features=None, out_indices=None),
    "ResNet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
    "Segformer": dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                      patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                      decoder_hidden_size=32),
    "MobileViT": dict(image_size=64, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32]),
    "Hubert": _AUDIO,
    "Wav2Vec2": _AUDIO,
    "WavLM": _AUDIO,
    "Qwen3Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "GraniteMoe": dict(num_local_experts=4, intermediate_size=32),  # grouped_mm: strides multiple of 16 bytes
    "GptOss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                   layer_types=["sliding_attention", "full_attention"]),
    "Olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32),
    # multi-head latent attention: low-rank q / kv, a rotary part and a plain part per head; layer 0 dense, 1 MoE
    "DeepseekV3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                       first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
                       qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=8, num_key_value_heads=4),
    # layer 0 Mamba with a dense MLP, layer 1 attention with MoE (the defaults put attention at layer 4 of 8)
    "Jamba": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32, attn_layer_period=2,
                  attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, use_mamba_kernels=False,
                  mamba_d_state=4, mamba_dt_rank=4),
    # session 23: Llama 4 text (MoE every layer, one routed expert plus a shared one; chunked attention with a
    # 4-token chunk, shorter than the sequences; the second layer full attention without rope)
    "Llama4": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=37,
                   moe_layers=[0, 1], layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0],
                   attention_chunk_size=4),
    # Qwen3.5 text: a gated delta-net linear-attention layer, then a full-attention one
    "Qwen3_5": dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                    linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4),
    # GLM-4.5 MoE: layer 0 dense, layer 1 MoE (4 routed experts, 2 per token, one shared)
    "Glm4Moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                    first_k_dense_replace=1, n_group=1, topk_group=1),
    "LongT5": dict(decoder_start_token_id=0),
    "SwitchTransformers": dict(decoder_start_token_id=0, num_experts=4, expert_capacity=8,
                               num_sparse_encoder_layers=1, num_sparse_decoder_layers=1),
}

#: The config class of an architecture whose ``<arch>Config`` is another model's (``Gemma3Config`` is the
#: vision-to-text model's; ``Gemma3ForCausalLM`` takes the text config).
CONFIG_CLASS: dict[str, str] = {"Gemma3": "Gemma3TextConfig", "Llama4": "Llama4TextConfig",
                                 "Qwen3_5": "Qwen3_5TextConfig"}

#: Overrides of a sub-config (after ``SHRINK``): SigLIP's text tower projects to 768 by default, which the shrunk
#: vision tower's 32 does not match.
SUB_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {"Siglip": {"text_config": dict(projection_size=32)}}


def tiny_config(arch: str, **overrides: Any) -> Any:
    """``<arch>Config()`` with ``SHRINK``, the architecture's overrides and ``overrides`` applied."""
    import transformers

    config = getattr(transformers, CONFIG_CLASS.get(arch, f"{arch}Config"))()
    _shrink(config, SHRINK)
    for name, value in {**ARCH_OVERRIDES.get(arch, {}), **overrides}.items():  # set even where not an attribute
        setattr(config, name, value)
    for name in getattr(config, "sub_configs", {}):  # CLIP's text_config / vision_config, ...
        sub = getattr(config, name, None)
        if isinstance(sub, transformers.PretrainedConfig):
            _shrink(sub, SHRINK)
            for attr, value in SUB_OVERRIDES.get(arch, {}).get(name, {}).items():
                setattr(sub, attr, value)
    return config


def _shrink(config: Any, values: dict[str, Any]) -> None:
    for name, value in values.items():
        if hasattr(config, name):
            try:
                setattr(config, name, value)
            except AttributeError:  # a read-only property derived from other fields
                pass
            except Exception as exc:  # a typed field of another kind (Swin's per-stage num_heads: a list)
                if "Validation" not in type(exc).__name__:
                    raise


def build(arch: str, head: str, seed: int = 0, attn: str | None = "eager", **overrides: Any) -> torch.nn.Module:
    """``<arch><head>`` (e.g. ``Llama`` + ``ForCausalLM``) of a tiny config, seeded, in train mode."""
    import transformers

    config = tiny_config(arch, **overrides)
    if attn is not None:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    return getattr(transformers, f"{arch}{head}")(config).train()


def max_diff(a: Any, b: Any) -> float:
    """The largest difference between two pytrees of tensors, relative to ``1 + |b|`` (inf where the structure,
    a shape or a dtype differs). ``ModelOutput``s are compared as their ``to_tuple()``."""
    import torch.utils._pytree as pytree

    la, sa = pytree.tree_flatten(_plain(a))
    lb, sb = pytree.tree_flatten(_plain(b))
    if sa != sb:
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
                return float("inf")
            if x.numel() and (x.is_floating_point() or x.is_complex()):
                d = (x.detach().double() - y.detach().double()).abs() / (1.0 + y.detach().double().abs())
                worst = max(worst, float(d.nan_to_num(float("inf")).max()))
            elif x.numel() and not torch.equal(x, y):
                return float("inf")
        elif x != y:
            return float("inf")
    return worst


def _plain(value: Any) -> Any:
    to_tuple = getattr(value, "to_tuple", None)
    return to_tuple() if callable(to_tuple) else value


def adamw_steps(model: torch.nn.Module, forward: Any, batches: list[dict], lr: float = 1e-2) -> list[dict]:
    """One AdamW step per batch (``forward(**batch).loss``); per step: the loss and a copy of every gradient."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    steps = []
    for batch in batches:
        optimizer.zero_grad()
        loss = forward(**batch).loss
        loss.backward()
        steps.append({"loss": loss.detach().clone(),
                      "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}})
        optimizer.step()
    return steps


def compare_steps(want: list[dict], got: list[dict], eager: torch.nn.Module, model: torch.nn.Module) -> dict:
    """Losses, the sets of parameters with gradients, gradients (relative to each tensor's largest) and the
    parameters after the steps: the largest differences, and the names whose gradient presence differs."""
    loss = max(abs(float(w["loss"]) - float(g["loss"])) for w, g in zip(want, got))
    grad, presence = 0.0, []
    for w, g in zip(want, got):
        presence += sorted(set(w["grads"]) ^ set(g["grads"]))
        for name in set(w["grads"]) & set(g["grads"]):
            a, b = w["grads"][name], g["grads"][name]
            grad = max(grad, float((a - b).abs().max() / (a.abs().max() + 1e-6)))
    pairs = zip(eager.parameters(), model.parameters())
    param = max((float((a.detach() - b.detach()).abs().max()) for a, b in pairs), default=0.0)
    return {"loss_diff": loss, "grad_reldiff": grad, "grad_set_mismatch": sorted(set(presence)),
            "param_diff": param, "losses": [float(w["loss"]) for w in want]}
