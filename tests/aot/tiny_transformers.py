"""Tiny random-weight transformers models for wrapper / cache-object tests (built locally, no downloads)."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer LlamaForCausalLM (hidden 32, vocab 64), eager attention, in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def tiny_t5(seed: int = 0):
    """A T5ForConditionalGeneration with a small default config (its cache on: ``use_cache=True``)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(config)


def tiny_roberta_classifier(seed: int = 0, num_labels: int = 3):
    """A 2-layer RobertaForSequenceClassification (hidden 32, vocab 64), dropout off, ``problem_type`` unset."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, num_labels=num_labels, pad_token_id=1)
    return transformers.RobertaForSequenceClassification(config)


def tiny_roberta_model(seed: int = 0):
    """A 2-layer RobertaModel with its pooler (hidden 32, vocab 64), dropout off."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, pad_token_id=1)
    return transformers.RobertaModel(config)


def tiny_wav2vec2_ctc(seed: int = 0):
    """A 2-layer Wav2Vec2ForCTC (hidden 32, 2 conv layers) with SpecAugment time masking on (``mask_time_prob``
    0.3: data-dependent spans from numpy's generator in train mode), dropout and layerdrop off."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Wav2Vec2Config(
        vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.3, mask_time_length=2,
        pad_token_id=0, ctc_loss_reduction="mean")
    return transformers.Wav2Vec2ForCTC(config).train()


def tiny_bart(seed: int = 0):
    """A BartForConditionalGeneration (d_model 32, 2+2 layers, vocab 64), dropout off, in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None)
    return transformers.BartForConditionalGeneration(config).eval()


def word_level_tokenizer(vocab_size: int = 64):
    """A ``PreTrainedTokenizerFast`` over the words ``w3 .. w<vocab-1>`` (0 pad, 1 bos, 2 eos), built in code from
    a ``tokenizers`` WordLevel model: a pipeline's tokenizer without downloads."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="[BOS]",
                                                eos_token="[EOS]", unk_token="[PAD]")


def tiny_bigbird_mlm(seed: int = 0):
    """A 2-layer BigBirdForMaskedLM (hidden 32, vocab 64) with its default block-sparse attention, dropout off: on
    inputs shorter than its sparse pattern needs, its first call switches to full attention, replacing each
    layer's attention submodule (``set_attention_type("original_full")``)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BigBirdConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, pad_token_id=0)
    config._attn_implementation = "eager"
    return transformers.BigBirdForMaskedLM(config).train()
