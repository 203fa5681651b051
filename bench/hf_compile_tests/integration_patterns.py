"""The compile patterns of transformers' integration tests (test_compile_static_cache of llama / t5 / mistral,
test_compile_static_cache_encoder), on tiny random models (no downloads), per variant.
usage: python bench/hf_compile_tests/integration_patterns.py torch|backend|compile"""
import os
import sys
import tempfile

import torch
import transformers as tf

from probe_common import check, compiler_for

VARIANT = sys.argv[1]
os.environ.setdefault("AOTCACHE_CACHE_DIR", tempfile.mkdtemp(prefix="s13_probe_"))
C = compiler_for(VARIANT)


def gen(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **kw)


torch.manual_seed(0)
ids = torch.randint(3, 99, (2, 7))
mask = torch.ones_like(ids)
mask[1, :2] = 0


def t5_forward():
    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.0,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = tf.T5ForConditionalGeneration(config).eval()
    want = gen(model, ids, mask, cache_implementation="static")
    model.forward = C(model.forward, mode="reduce-overhead", fullgraph=True)
    return torch.equal(gen(model, ids, mask, cache_implementation="static"), want)


def t5_encoder():
    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.0)
    model = tf.T5EncoderModel(config).eval()
    want = model(input_ids=ids, attention_mask=mask)
    model.forward = C(model.forward, mode="reduce-overhead", fullgraph=True)
    got = model(input_ids=ids, attention_mask=mask)
    return torch.allclose(want[0], got[0], atol=1e-5, rtol=1e-5)


def mistral_call(cache):
    def run():
        torch.manual_seed(0)
        config = tf.MistralConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, sliding_window=4, pad_token_id=0)
        model = tf.MistralForCausalLM(config).eval()
        want = gen(model, ids, mask, cache_implementation=cache)
        forward_function = model.__call__
        model.__call__ = C(forward_function, mode="reduce-overhead", fullgraph=True)
        return torch.equal(gen(model, ids, mask, cache_implementation=cache), want)
    return run


def llama_forward_compiled_generate():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = tf.LlamaForCausalLM(config).eval()
    want = gen(model, ids, mask)
    static = gen(model, ids, mask, cache_implementation="static")
    model.forward = C(model.forward)
    return torch.equal(gen(model, ids, mask), want) and torch.equal(
        gen(model, ids, mask, cache_implementation="static"), static)


def llama_whole_model_generate():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = tf.LlamaForCausalLM(config).eval()
    want = gen(model, ids, mask)
    compiled = C(model)
    return torch.equal(gen(compiled, ids, mask), want)


check("t5 model.forward = compile(model.forward) + static generate", t5_forward)
check("t5 encoder model.forward = compile(model.forward)", t5_encoder)
check("mistral model.__call__ = compile(model.__call__) static", mistral_call("static"))
check("mistral model.__call__ = compile(model.__call__) sliding_window", mistral_call("sliding_window"))
check("llama model.forward = compile(model.forward), dynamic + static generate", llama_forward_compiled_generate)
check("llama compile(model).generate", llama_whole_model_generate)
