"""After compiling and calling, change something the forward reads (a config value, a module attribute, a
submodule); the next call must give eager's new result (tiny random models of session 14's architectures).
usage: python bench/hf_compile_tests/stale_patterns.py torch|backend|compile"""
import os
import sys
import tempfile
import traceback

import torch
import transformers as tf

from probe_common import compiler_for

VARIANT = sys.argv[1]
os.environ.setdefault("AOTCACHE_CACHE_DIR", tempfile.mkdtemp(prefix="s14_stale_"))
C = compiler_for(VARIANT)


torch.manual_seed(0)
ids = torch.randint(3, 99, (2, 7))
mask = torch.ones_like(ids)
small = dict(vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0)


def stale(name, build, change, call=lambda m: m(input_ids=ids, attention_mask=mask).logits, grad=False):
    try:
        torch.manual_seed(0)
        m = build().eval()
        cm = C(m)
        with torch.set_grad_enabled(grad):
            before = call(cm)
            change(m)
            want = call(m)
            got = call(cm)
        same_as_before = torch.allclose(want, before, atol=1e-6)
        ok = torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        print(f"{name}: {'ok' if ok else 'STALE'}{' (change had no effect in eager)' if same_as_before else ''}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}", flush=True)
        if os.environ.get("TB"): traceback.print_exc()
    torch._dynamo.reset()


def setattr_all(cls_name, attr, value):
    def change(m):
        for mod in m.modules():
            if type(mod).__name__.endswith(cls_name):
                setattr(mod, attr, value)
    return change


gemma2 = lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**small, num_key_value_heads=2, head_dim=8, sliding_window=4))
gemma3 = lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**small, num_key_value_heads=2, head_dim=8, sliding_window=4))
mixtral = lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**small, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
qwen2_moe = lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**small, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16))
falcon = lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0))
vit = lambda: tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, image_size=16, patch_size=4, num_labels=3))
px = torch.randn(2, 3, 16, 16)

def cfg(attr, value):
    def change(m):
        setattr(m.config, attr, value)
    return change

stale("gemma2 config.final_logit_softcapping", gemma2, cfg("final_logit_softcapping", 3.0))
stale("gemma2 config.sliding_window", gemma2, cfg("sliding_window", 2))
stale("gemma3 config.final_logit_softcapping", gemma3, cfg("final_logit_softcapping", 3.0))
stale("gemma2 attn.scaling", gemma2, setattr_all("Attention", "scaling", 0.5))
stale("mixtral router top_k attr", mixtral, setattr_all("TopKRouter", "top_k", 1))
stale("qwen2_moe router top_k attr", qwen2_moe, setattr_all("TopKRouter", "top_k", 1))
stale("qwen2_moe router norm_topk_prob", qwen2_moe, setattr_all("TopKRouter", "norm_topk_prob", True))
stale("falcon config.alibi", falcon, cfg("alibi", True))
stale("vit classifier swap", vit, lambda m: setattr(m, "classifier", torch.nn.Linear(32, 3)), call=lambda m: m(pixel_values=px).logits)
stale("vit layernorm eps attr", vit, lambda m: [setattr(mod, "eps", 0.5) for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)], call=lambda m: m(pixel_values=px).logits)
