"""Tiny random-config transformers models through aotcache.compile with a real compiler, against eager.

    python bench/transformers_real_compilers.py MODEL COMPILER PHASE   # llama|gpt2|bert|t5|vit, nop|inductor|aoti, cold|warm

Two AdamW steps (losses, gradients, parameters vs eager), an eval forward, greedy generate(max_new_tokens=4) for
the decoders; prints one line ``RESULT {json}`` with the differences, ``.route``, the cache counters and the capture
fallbacks. Run it twice with the same fresh AOTCACHE_CACHE_DIR (cold, then warm with an empty
TORCHINDUCTOR_CACHE_DIR): the warm run must show hits and no "compile" counter; `aotcache stats --json` shows
compiler fallbacks (autograd.compiler_fallback_reasons). Variants: SWEEP_SDPA=1 (sdpa attention), SWEEP_VARLEN=1
(the second step 4 tokens longer), SWEEP_PAD=1 (attention masks with padding, left-padded generate), SWEEP_GC=1
(non-reentrant gradient checkpointing: the Dynamo route).
"""
import json, os, sys, time
import torch, transformers
import aotcache
from aotcache.autograd_cache.cache import resolve_cache
from aotcache.aot.fallback import fallback_counts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_tiny import adamw_steps, compare_steps  # noqa: E402

name, compiler, phase = sys.argv[1:4]
T = transformers
torch.manual_seed(0)
g = lambda s: torch.Generator().manual_seed(s)

def build():
    torch.manual_seed(0)
    if name == "llama":
        c = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        c._attn_implementation = "eager" if not os.environ.get("SWEEP_SDPA") else "sdpa"
        return T.LlamaForCausalLM(c)
    if name == "gpt2":
        c = T.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        c._attn_implementation = "eager" if not os.environ.get("SWEEP_SDPA") else "sdpa"
        return T.GPT2LMHeadModel(c)
    if name == "bert":
        c = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
        c._attn_implementation = "eager" if not os.environ.get("SWEEP_SDPA") else "sdpa"
        return T.BertForSequenceClassification(c)
    if name == "t5":
        c = T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T.T5ForConditionalGeneration(c)
    if name == "vit":
        c = T.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
        c._attn_implementation = "eager" if not os.environ.get("SWEEP_SDPA") else "sdpa"
        return T.ViTForImageClassification(c)
    raise SystemExit(name)

def batch(step):
    L = 8 + 4 * step if os.environ.get("SWEEP_VARLEN") else 8
    if name in ("llama", "gpt2"):
        ids = torch.randint(3, 64, (2, L), generator=g(step))
        if os.environ.get("SWEEP_PAD"):
            m = torch.ones_like(ids); m[1, :3] = 0; lab = ids.masked_fill(m == 0, -100)
            return dict(input_ids=ids, attention_mask=m, labels=lab)
        return dict(input_ids=ids, labels=ids)
    if name == "bert":
        ids = torch.randint(3, 64, (2, L), generator=g(step)); m = torch.ones_like(ids)
        if os.environ.get("SWEEP_PAD"): m[1, -3:] = 0
        return dict(input_ids=ids, attention_mask=m, labels=torch.tensor([0, 2]))
    if name == "t5":
        return dict(input_ids=torch.randint(3, 64, (2, L), generator=g(step)), labels=torch.randint(3, 64, (2, 6), generator=g(step + 100)))
    return dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g(step)), labels=torch.tensor([0, 2]))

def train(model, fwd):
    model.train(); return adamw_steps(model, fwd, [batch(s) for s in range(2)])

def evalf(model, fwd):
    model.eval(); b = batch(5); b.pop("labels")
    if name == "t5": b["decoder_input_ids"] = torch.randint(3, 64, (2, 5), generator=g(7))
    with torch.no_grad(): return fwd(**b).logits

res = {"model": name, "compiler": compiler, "phase": phase}
eager = build(); model = build()
if os.environ.get("SWEEP_GC"):
    for mm in (eager, model): mm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
cache = resolve_cache(True)
t0 = time.time()
cm = aotcache.compile(model, compiler=compiler)
diffs = compare_steps(train(eager, eager), train(model, cm), eager, model)
res.update(train_loss_diff=diffs["loss_diff"], train_grad_reldiff=diffs["grad_reldiff"],
           grad_set_mismatch=diffs["grad_set_mismatch"], param_diff=diffs["param_diff"], losses=diffs["losses"],
           route=getattr(cm, "route", None))
res["train_ok"] = diffs["loss_diff"] < 1e-4 and diffs["grad_reldiff"] < 1e-3 and not diffs["grad_set_mismatch"]
le, lc = evalf(eager, eager), evalf(model, cm)
res["eval_diff"] = (le - lc).abs().max().item(); res["eval_ok"] = res["eval_diff"] < 1e-4
if name in ("llama", "gpt2", "t5"):
    ids = torch.randint(3, 64, (1, 5), generator=g(9)); kw = {}
    if os.environ.get("SWEEP_PAD") and name != "t5":
        ids = torch.randint(3, 64, (2, 5), generator=g(9)); am = torch.ones_like(ids); am[0, :2] = 0; ids[0, :2] = 0; kw = dict(attention_mask=am)
    with torch.no_grad():
        ge = eager.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4, **kw)
        gc = cm.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4, **kw)
    res["gen_eager"], res["gen_comp"] = ge.tolist(), gc.tolist(); res["gen_ok"] = torch.equal(ge, gc)
res["seconds"] = round(time.time() - t0, 1)
res["counters"] = {k: v for k, v in cache.stats().items() if v}
res["capture_fallbacks"] = fallback_counts()
print("RESULT " + json.dumps(res))
