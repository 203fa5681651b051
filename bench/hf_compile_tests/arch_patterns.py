"""Compile patterns on tiny random models of the architectures of session 14 (no downloads), per variant:
compiled against eager -- two training steps (loss, every gradient, an SGD step between), greedy generate with the
forward compiled (dynamic, static and no cache), encoder-decoder generate, seeded dropout in training.
usage: python bench/hf_compile_tests/arch_patterns.py torch|backend|compile [name,name,...|dropout]"""
import functools
import os
import sys
import tempfile

import torch
import transformers as tf

from probe_common import check, close, compare_training, compiler_for

VARIANT = sys.argv[1]
ONLY = sys.argv[2].split(",") if len(sys.argv) > 2 else None
os.environ.setdefault("AOTCACHE_CACHE_DIR", tempfile.mkdtemp(prefix="s14_arch_"))
C = compiler_for(VARIANT)


torch.manual_seed(0)
ids = torch.randint(3, 99, (2, 7))
mask = torch.ones_like(ids)
mask[1, :2] = 0
small = dict(vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             pad_token_id=0)
DEC = {
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**small, num_key_value_heads=2, head_dim=8)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**small, num_key_value_heads=2, head_dim=8, sliding_window=4)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**small, num_key_value_heads=2, head_dim=8, sliding_window=4)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**small, num_key_value_heads=2)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**small, num_key_value_heads=2, head_dim=8)),
    "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**small, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**small, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=99, hidden_size=32, ffn_dim=40, num_hidden_layers=2, num_attention_heads=4, pad_token_id=1, word_embed_proj_dim=32, dropout=0.0)),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**small)),
    "mamba": lambda: tf.MambaForCausalLM(tf.MambaConfig(vocab_size=99, hidden_size=32, state_size=8, num_hidden_layers=2, pad_token_id=0)),
}


def make(name):
    torch.manual_seed(0)
    m = DEC[name]()
    for mod in m.modules():  # no dropout: exact comparisons in training mode
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return m



def train_step(name):
    def run():
        m = make(name).train()
        ref = make(name).train()
        return compare_training(m, ref, C(m), lambda: dict(input_ids=ids, attention_mask=mask, labels=ids))
    return run


def gen_forward(name, cache):
    def run():
        m = make(name).eval()
        kw = {} if cache is None else ({"use_cache": False} if cache == "nocache" else {"cache_implementation": cache})
        want = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **kw)
        m.forward = C(m.forward)
        got = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **kw)
        got2 = m.generate(input_ids=ids[:, 1:], attention_mask=mask[:, 1:], max_new_tokens=5, do_sample=False, **kw)
        want2 = m.__class__.forward  # eager rerun on the second prompt
        m.forward = functools.partial(want2, m)
        want2 = m.generate(input_ids=ids[:, 1:], attention_mask=mask[:, 1:], max_new_tokens=5, do_sample=False, **kw)
        return (torch.equal(got, want) and torch.equal(got2, want2)) or f"{got.tolist()} vs {want.tolist()}"
    return run


for name in DEC:
    if ONLY and name not in ONLY: continue
    check(f"{name} train compile(model) x2 steps", train_step(name))
    check(f"{name} generate forward=compile(forward) dynamic", gen_forward(name, None))
    if name != "mamba":
        check(f"{name} generate forward=compile(forward) static", gen_forward(name, "static"))
    check(f"{name} generate forward=compile(forward) no cache", gen_forward(name, "nocache"))


def seeded_dropout_train(name):
    """Dropout active: the same seed before each side; aotcache claims eager's random draws."""
    def run():
        torch.manual_seed(0)
        m = DEC[name]().train()
        torch.manual_seed(0)
        ref = DEC[name]().train()
        cm = C(m)
        for step in range(2):
            torch.manual_seed(10 + step)
            got = cm(input_ids=ids, attention_mask=mask, labels=ids)
            torch.manual_seed(10 + step)
            want = ref(input_ids=ids, attention_mask=mask, labels=ids)
            if not close(got.loss, want.loss):
                return f"step {step} loss {got.loss.item()} vs {want.loss.item()}"
        return True
    return run


def enc_dec(name):
    torch.manual_seed(0)
    if name == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, dropout=0.0,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, max_position_embeddings=64))
    return tf.WhisperForConditionalGeneration(tf.WhisperConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, num_mel_bins=8,
        max_source_positions=15, max_target_positions=40, dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=3, suppress_tokens=None, begin_suppress_tokens=None))


def enc_dec_gen(name, cache, whole):
    def run():
        m = enc_dec(name).eval()
        if name == "bart":
            inputs = dict(input_ids=ids, attention_mask=mask)
        else:
            torch.manual_seed(1)
            inputs = dict(input_features=torch.randn(2, 8, 30))
        kw = {} if cache is None else {"cache_implementation": cache}
        want = m.generate(**inputs, max_new_tokens=6, do_sample=False, **kw)
        if whole:
            got = C(m).generate(**inputs, max_new_tokens=6, do_sample=False, **kw)
        else:
            m.forward = C(m.forward)
            got = m.generate(**inputs, max_new_tokens=6, do_sample=False, **kw)
        return torch.equal(got, want) or f"{got.tolist()} vs {want.tolist()}"
    return run


def enc_dec_train(name):
    def run():
        m = enc_dec(name).train()
        ref = enc_dec(name).train()
        if name == "bart":
            inputs = dict(input_ids=ids, attention_mask=mask, labels=ids)
        else:
            torch.manual_seed(1)
            inputs = dict(input_features=torch.randn(2, 8, 30), labels=ids)
        return compare_training(m, ref, C(m), lambda: inputs)
    return run


def vision(name):
    torch.manual_seed(0)
    if name == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=40, image_size=16, patch_size=4, num_labels=3))
    return tf.CLIPModel(tf.CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=40,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=4), projection_dim=16))


def vision_train(name):
    def run():
        m = vision(name).train()
        ref = vision(name).train()
        torch.manual_seed(2)
        px = torch.randn(2, 3, 16, 16)
        if name == "vit":
            inputs = dict(pixel_values=px, labels=torch.tensor([0, 2]))
        else:
            inputs = dict(pixel_values=px, input_ids=ids, attention_mask=mask, return_loss=True)
        return compare_training(m, ref, C(m), lambda: inputs)
    return run


for name in ["bart", "whisper"]:
    if ONLY and name not in ONLY: continue
    check(f"{name} train compile(model) x2 steps", enc_dec_train(name))
    check(f"{name} compile(model).generate", enc_dec_gen(name, None, True))
    check(f"{name} forward=compile(forward) generate", enc_dec_gen(name, None, False))
    check(f"{name} forward=compile(forward) generate static", enc_dec_gen(name, "static", False))
for name in ["vit", "clip"]:
    if ONLY and name not in ONLY: continue
    check(f"{name} train compile(model) x2 steps", vision_train(name))
for name in ["opt", "gpt_neox", "falcon"]:
    if ONLY and "dropout" not in ONLY: continue
    check(f"{name} seeded dropout train", seeded_dropout_train(name))
