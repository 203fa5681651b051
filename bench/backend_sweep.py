"""``torch.compile(model, backend="aotcache")`` on tiny Hugging Face models, against eager and ``aot_eager``.

    python bench/backend_sweep.py                      # every model below, nop compiler
    python bench/backend_sweep.py Llama GPT2           # some of them
    python bench/backend_sweep.py --inductor Llama     # also the default compiler (Inductor) on one model
    python bench/backend_sweep.py --with-compile --out bench/results/hf_families_sweep.json Gemma3 Siglip
                                                       # also aotcache.compile(model), cold and warm
    python bench/backend_sweep.py --table --out bench/results/hf_families_sweep.json   # its table
    python bench/backend_sweep.py --with-compile --attn sdpa --out bench/results/hf_attn_sweep.json Llama Bert
                                                       # another attention implementation (row "Llama+sdpa")
    python bench/backend_sweep.py --with-compile --no-aot-eager Llama   # without the aot_eager yardstick
    python bench/backend_sweep.py --with-compile --no-aot-eager --steps 2 --no-generate --attn sdpa Bert
                                                       # a quick row: two steps at one shape, no generate
    python bench/backend_sweep.py --with-compile --in-place --checkpointing Bart   # row "Bart+ckpt+inplace"
    python bench/backend_sweep.py --with-compile --in-place --trainer Gemma2       # the steps through the Trainer

Per model, each way in a fresh process (fresh ``AOTCACHE_CACHE_DIR`` per model): ``eager``, ``aot_eager``
(``torch.compile(model, backend="aot_eager")``), ``aotcache`` (``backend="aotcache",
options={"compiler": "nop"}``) cold, then ``aotcache`` warm in another process on the same cache dir. Each runs
three AdamW steps (the third on a longer sequence / larger batch: a recompile or a dynamic graph), an eval
forward and, for decoders and T5, greedy ``generate(max_new_tokens=6)`` with the forward compiled
(``model.forward = torch.compile(model.forward, ...)``: ``OptimizedModule.generate`` runs eagerly, see
docs/compile.md, "Methods run the compiled forward"). Compares losses, grads, params, outputs and tokens with
eager's; counts Dynamo's frames, unique graphs and graph breaks and aotcache's counters. Writes
bench/results/backend_sweep.json (``--out``).
Decoders also generate with ``cache_implementation="static"`` and compare every step's logits of the default
greedy run. ``--with-compile`` adds ``aotcache.compile(model, compiler="nop")`` cold and warm (generate through
the wrapper's own ``generate``). Where a way differs from eager, ``within_aot_eager`` says whether it is no
farther from eager than ``aot_eager`` (or equal to it). ``MODELS`` names each row's head and inputs;
``CONFIG_EXTRAS`` what its tiny config needs beyond bench/hf_tiny.py's (Cohere2's 4-token sliding window).
``--checkpointing``, ``--in-place`` (``model.compile(backend=...)``) and ``--trainer`` (transformers' Trainer runs
the steps): NOTE [The sweep's loop flags].
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: a row of ``MODELS``: (head, input kind, generate?)
CAUSAL_LM = ("ForCausalLM", "causal", True)
MASKED_LM = ("ForMaskedLM", "mlm", False)
SEQ2SEQ_LM = ("ForConditionalGeneration", "seq2seq", True)
IMAGE_CLASSIFIER = ("ForImageClassification", "image", False)


def _rows(row: tuple[str, str, bool], *archs: str) -> dict[str, tuple[str, str, bool]]:
    """The same row for each of ``archs`` (most families share one of the rows above)."""
    return dict.fromkeys(archs, row)


#: arch -> (head, input kind, generate?)
MODELS: dict[str, tuple[str, str, bool]] = {
    **_rows(CAUSAL_LM, "Llama", "Mistral", "Qwen2", "Phi3", "Gemma2", "GPTNeoX", "OPT", "Bloom", "Falcon", "Mamba"),
    "GPT2": ("LMHeadModel", "causal", True),
    **_rows(MASKED_LM, "Bert", "DistilBert", "DebertaV2"),
    "T5": SEQ2SEQ_LM, "Bart": SEQ2SEQ_LM,  # Bart: generate since session 27
    **_rows(IMAGE_CLASSIFIER, "ViT", "Swin"),
    "CLIP": ("Model", "clip", False), "Whisper": ("ForConditionalGeneration", "whisper", True),
    "Wav2Vec2": ("ForCTC", "audio", False),
    # session 19: the families the first pass left out
    **_rows(CAUSAL_LM, "Gemma", "Gemma3", "Phi", "Qwen3", "Qwen2Moe", "Mixtral", "Qwen3Moe", "StableLm",
            "Starcoder2"),
    "MBart": SEQ2SEQ_LM, **_rows(IMAGE_CLASSIFIER, "DeiT", "ConvNext"), "Siglip": ("Model", "clip", False),
    **_rows(MASKED_LM, "Roberta", "Electra", "ModernBert"),
    # session 20: families no earlier pass ran through either drop-in
    **_rows(CAUSAL_LM, "Cohere2", "GraniteMoe", "Persimmon", "GPTBigCode", "Olmo2", "Granite", "Cohere"),
    "Pegasus": SEQ2SEQ_LM, "ViTMAE": ("ForPreTraining", "mae", False),
    # session 21: families neither this sweep nor bench/hf_generate_sweep.py had run
    **_rows(CAUSAL_LM, "DeepseekV3", "GptOss", "Olmoe", "Jamba", "GPTNeo", "Mpt", "SmolLM3", "Lfm2"),
    "SwitchTransformers": SEQ2SEQ_LM, "Marian": ("MTModel", "seq2seq", True),
    **_rows(MASKED_LM, "Albert", "Esm"), **_rows(IMAGE_CLASSIFIER, "Dinov2", "ResNet"),
    # session 23: recent LLM families (bench/hf_tiny.py's configs) and one encoder
    **_rows(CAUSAL_LM, "Llama4", "Qwen3_5", "Glm4Moe", "Olmo3", "Ministral", "Ernie4_5"), "EuroBert": MASKED_LM,
}
#: What a row's tiny config needs beyond bench/hf_tiny.py's (set on the config after ``build``'s shrink).
#: Cohere2: a window of 4 tokens, shorter than every sequence the sweep runs (8 and 12 in training, 5 + 6
#: generated), with one sliding and one full layer, so the sliding-window mask and the hybrid cache's sliding
#: layers do real work; GptOss the same window (its two layers' types are bench/hf_tiny.py's).
CONFIG_EXTRAS: dict[str, dict] = {
    "Whisper": dict(num_mel_bins=8, max_source_positions=16, max_target_positions=32, d_model=32),
    "Swin": dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2, image_size=32, patch_size=4),
    "Wav2Vec2": dict(conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=4, vocab_size=32),
    "Cohere2": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "GptOss": dict(sliding_window=4),  # as Cohere2's: shorter than every sequence
    # session 27: the Gemmas with the same 4-token window on one of two layers (the hybrid cache in generate) and
    # soft-capping small enough to bend the scores and logits (the defaults, 50 and 30, barely touch tiny ones)
    "Gemma2": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                   attn_logit_softcapping=1.0, final_logit_softcapping=0.5),
    "Gemma3": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                   attn_logit_softcapping=1.0, final_logit_softcapping=0.5),
    "ViTMAE": dict(decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
                   decoder_intermediate_size=37),
}
#: eager, torch's AOT Autograd, ``torch.compile(backend="aotcache")`` cold and warm, ``aotcache.compile`` cold and
#: warm (each warm way a new process on its cold way's cache dir)
WAYS = ("eager", "aot_eager", "aotcache", "aotcache_warm", "compile", "compile_warm")
#: ``run_model``'s ways by default; ``--with-compile`` adds the ``aotcache.compile`` pair
BACKEND_WAYS = WAYS[:4]

CHILD = r"""
import json, sys, time, numpy, torch
numpy.random.seed(0)  # Wav2Vec2's SpecAugment masks are numpy draws: the same in every way's process
sys.path.insert(0, sys.argv[5])
from bench.hf_tiny import build
arch, head, kind, way, gen = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[6] == "1"
compiler = sys.argv[7]
extra = json.loads(sys.argv[9])
attn = sys.argv[10]
steps = int(sys.argv[11])  # 3: the third on a longer sequence / larger batch; fewer: one shape only (--steps)
gen = gen and sys.argv[12] == "1"  # --no-generate
flags = json.loads(sys.argv[13])  # --checkpointing, --in-place, --trainer (NOTE [The sweep's loop flags])
# NOTE [Flex attention on CPU]: torch has no CPU backward for flex_attention, so its rows run the three steps as
# no-grad forwards (losses compared, no optimizer); and run eagerly, transformers' CPU flex kernel gives other
# numbers on every call (NaN on some), so the eager reference is the same model on eager attention
train = attn != "flex_attention"
if way == "eager" and not train:
    attn = "eager"
if kind == "clip" and arch != "CLIP":
    model = build(arch, head, attn=attn)
elif kind == "clip":
    import transformers
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=16)
    cfg._attn_implementation = attn
    model = transformers.CLIPModel(cfg).train()
else:
    model = build(arch, head, attn=attn, **extra)
if flags["checkpointing"]:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if arch == "T5":  # T5Config() has no decoder_start_token_id (transformers sets it from pad_token_id = 0)
    model.config.decoder_start_token_id = 0
    model.generation_config.decoder_start_token_id = 0

def inputs(step):
    g = torch.Generator().manual_seed(100 + step)
    b, t = (2, 12) if step == 2 else (2, 8)
    ri = lambda *s: torch.randint(3, 90, s, generator=g)
    if kind in ("causal", "mlm"):
        ids = ri(b, t)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    if kind == "seq2seq":
        return dict(input_ids=ri(b, t), attention_mask=torch.ones(b, t, dtype=torch.long), labels=ri(b, t // 2 + 1))
    if kind in ("image", "mae"):
        b = 3 if step == 2 else 2
        if kind == "mae":  # ViTMAE's pre-training loss: reconstruct the patches it masks (a torch.rand draw)
            return dict(pixel_values=torch.randn(b, 3, 32, 32, generator=g))
        return dict(pixel_values=torch.randn(b, 3, 32, 32, generator=g), labels=torch.randint(0, 2, (b,), generator=g))
    if kind == "clip":
        ids = ri(b, t)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(b, 3, 32, 32, generator=g), return_loss=True)
    if kind == "whisper":
        b = 3 if step == 2 else 2
        return dict(input_features=torch.randn(b, 8, 32, generator=g), labels=ri(b, 5 if step == 2 else 4))
    if kind == "audio":
        n = 1200 if step == 2 else 800
        return dict(input_values=torch.randn(b, n, generator=g), labels=torch.randint(3, 30, (b, 4), generator=g))
    raise ValueError(kind)

def wrap(fn):
    if way == "eager":
        return fn
    if way == "compile":  # the drop-in wrapper: no Dynamo
        import aotcache
        return aotcache.compile(fn, **({} if compiler == "default" else {"compiler": compiler}))
    backend = dict(backend="aot_eager") if way == "aot_eager" else dict(
        backend="aotcache", options={} if compiler == "default" else {"compiler": compiler})
    if flags["in_place"] and fn is model:  # nn.Module.compile: model(...) and model.generate run compiled
        model.compile(**backend)
        return model
    return torch.compile(fn, **backend)

def trainer_steps(compiled):
    # --trainer: the steps through transformers' Trainer (the model compiled in place, or the aotcache.compile
    # wrapper passed in); its logged losses, and each step's gradients recorded by a callback
    import tempfile, transformers
    rows = []
    for step in range(steps):
        batch = inputs(step if step < 2 else 0)  # one shape: the Trainer's collator stacks the rows
        rows += [{k: v[i] for k, v in batch.items() if torch.is_tensor(v)} for i in range(len(batch["labels"]))]
    grads = []
    class Grads(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, seed=0, report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, lr_scheduler_type="constant", remove_unused_columns=False)  # rows: inputs only
    trainer = transformers.Trainer(model=compiled, args=args, train_dataset=rows, callbacks=[Grads()])
    t0 = time.perf_counter()
    trainer.train()
    out["step_s"].append(time.perf_counter() - t0)  # the whole train(): the first step's compile included
    out["losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    out["grads"] = grads

out = {"losses": [], "step_s": [], "grads": [], "params": None, "eval": None, "tokens": None, "error": None,
       "gen_logits": None, "static_tokens": None, "static_error": None}
try:
    compiled = wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if not train:
        model.eval()
    if flags["trainer"]:
        trainer_steps(compiled)
    for step in range(0 if flags["trainer"] else steps):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(train):
            res = compiled(**inputs(step))
        loss = res.loss
        if train:
            loss.backward()
        out["step_s"].append(time.perf_counter() - t0)
        out["losses"].append(loss.item())
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if train:
            opt.step(); opt.zero_grad()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        ev = {k: v for k, v in inputs(0).items() if k not in ("labels",)}
        if kind == "seq2seq":
            ev["decoder_input_ids"] = inputs(0)["labels"]
        if kind == "whisper":
            ev["decoder_input_ids"] = inputs(0)["labels"]
        r = compiled(**ev)
        out["eval"] = (r.logits_per_image if kind == "clip" else r.logits).clone()
    if gen:
        # torch.compile: the forward compiled (OptimizedModule.generate runs eagerly); aotcache.compile: the
        # wrapper's own generate, which compiles the forward it calls
        if way == "compile" or compiled is model:  # the wrapper, or the model compiled in place
            generator_model = compiled
        else:
            model.forward = wrap(model.forward)
            generator_model = model
        g = torch.Generator().manual_seed(7)
        if kind == "whisper":  # audio features in, text out
            prompt = dict(input_features=torch.randn(2, 8, 32, generator=g))
        else:
            ids = torch.randint(3, 90, (2, 5), generator=g)
            prompt = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            res = generator_model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                           output_logits=True, return_dict_in_generate=True)
        out["tokens"] = res.sequences
        out["gen_logits"] = list(res.logits)
        try:  # a static cache, where the model supports one (eager's failure is the model's)
            with torch.no_grad():
                out["static_tokens"] = generator_model.generate(
                    **prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
        except Exception as exc:
            out["static_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
except Exception as exc:  # reported, compared by the parent
    import traceback
    out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    traceback.print_exc()
from torch._dynamo.utils import counters
stats = {"frames_ok": sum(counters["frames"].get(k, 0) for k in ("ok",)),
         "frames_total": counters["frames"].get("total", 0),
         "unique_graphs": counters["stats"].get("unique_graphs", 0),
         "graph_breaks": sum(counters["graph_break"].values()),
         "break_reasons": sorted(counters["graph_break"])[:5],
         "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0}
if way in ("aotcache", "compile"):
    from aotcache.autograd_cache.cache import default_cache
    from aotcache.aot.fallback import fallback_counts
    s = default_cache().stats()
    stats.update({k: s[k] for k in ("hit", "miss", "guard_miss", "compile", "bypass", "load_error", "store_error")})
    stats["bypass_reasons"] = s["bypass_reasons"]
    stats["fallback"] = fallback_counts()
    # the AOT way's captures: fingerprint misses and fallbacks trace; hits load without tracing
    counted = default_cache().counters
    stats["traces"] = counted.get("fingerprint_miss", 0) + counted.get("fingerprint_fallback", 0)
    stats["fingerprint_hit"] = counted.get("fingerprint_hit", 0)
    if way == "compile":
        stats["route"] = compiled.route
        stats["route_reason"] = (compiled.router.reason or "")[:300]
out["stats"] = stats
torch.save(out, sys.argv[8])
"""


def _cmp(a, b) -> float | None:
    """Largest abs difference between two results (tensors / dicts / lists of them); None if not comparable."""
    import torch

    if a is None or b is None:
        return None if (a is None) != (b is None) else 0.0
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape:
            return float("inf")
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        if set(a) != set(b):
            return float("inf")
        return max([_cmp(a[k], b[k]) or 0.0 for k in a], default=0.0)
    if isinstance(a, list):
        if len(a) != len(b):
            return float("inf")
        return max([_cmp(x, y) if not isinstance(x, float) else abs(x - y) for x, y in zip(a, b)], default=0.0)
    raise TypeError(type(a))


# NOTE [The sweep's hash seed]
# transformers builds a static-cache generate's masks as a dict keyed by layer type, iterating
# set(config.layer_types): with mixed layer types (Cohere2's sliding window here) the key order follows the
# process's string hash, and the order is part of the call's signature and fingerprint. With Python's random
# seed per process, one warm process in two re-traced those calls (docs/models.md, Cohere2). The children share
# one seed so that "warm: traces" measures the cache, not the draw; run with PYTHONHASHSEED set to choose another.


# NOTE [The sweep's loop flags]
# --checkpointing: gradient_checkpointing_enable() (non-reentrant) before anything is compiled; --in-place: the
# Dynamo ways compile the model in place, model.compile(backend=...), so the loop, the eval forward and generate
# call the model itself (no forward swapped in); --trainer: the training steps run through transformers' Trainer
# (one shape, constant learning rate, losses as logged, gradients from a callback before each optimizer step),
# the model compiled in place (accelerate refuses torch_compile_backend="aotcache": docs/aot.md) or the
# aotcache.compile wrapper passed in. Each flag adds a suffix to the row's name (Bart+ckpt).
LOOP_FLAGS = {"checkpointing": "ckpt", "in_place": "inplace", "trainer": "trainer"}


def run_model(arch: str, compiler: str, ways: tuple[str, ...] = BACKEND_WAYS, attn: str = "eager", steps: int = 3,
              generate: bool = True, flags: dict | None = None) -> dict:
    import torch

    flags = {name: bool((flags or {}).get(name)) for name in LOOP_FLAGS}
    head, kind, gen = MODELS[arch]
    row: dict = {"arch": arch, "compiler": compiler, "attn": attn, "steps": steps, "generate": generate and gen,
                 **{k: v for k, v in flags.items() if v}}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = os.path.join(tmp, "cache")
        env = {**os.environ, "AOTCACHE_CACHE_DIR": cache_dir, "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # One string hash for every child (NOTE [The sweep's hash seed]), unless the caller chose one
        env.setdefault("PYTHONHASHSEED", "0")
        results = {}
        for way in ways:
            path = os.path.join(tmp, f"{way}.pt")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", CHILD, arch, head, kind, way.replace("_warm", ""),
                                   str(REPO), "1" if gen else "0", compiler, path,
                                   json.dumps(CONFIG_EXTRAS.get(arch, {})), attn, str(steps),
                                   "1" if generate else "0", json.dumps(flags)], env=env,
                                  capture_output=True, text=True, timeout=900)
            wall = time.perf_counter() - t0
            print(f"  {arch} {way}: {wall:.0f} s, rc {proc.returncode}", flush=True)  # progress of a long row
            if proc.returncode or not os.path.exists(path):
                row[way] = {"error": f"process rc={proc.returncode}: {proc.stderr.strip()[-400:]}", "wall_s": wall}
                continue
            res = torch.load(path, weights_only=False)
            results[way] = res
            entry = {"error": res["error"], "static_error": res.get("static_error"), "wall_s": round(wall, 2),
                     "losses_recorded": len(res["losses"]), "grad_steps_recorded": len(res["grads"]),
                     **res["stats"],
                     "first_step_s": round(res["step_s"][0], 3) if res["step_s"] else None}
            if res["error"]:
                entry["stderr_tail"] = proc.stderr.strip()[-600:]
            row[way] = entry
        ref, torch_own = results.get("eager"), results.get("aot_eager")
        for way in ways[1:]:
            res = results.get(way)
            if ref is None or res is None or res["error"]:
                continue
            diffs = _diffs(ref, res)
            row[way]["diff"] = diffs
            row[way]["equal"] = _equal(diffs)
            if way != "aot_eager" and torch_own is not None and not torch_own["error"]:
                # where eager differs, torch's own AOT Autograd is the yardstick: its numbers, or no farther
                # from eager than they are
                row[way]["diff_vs_aot_eager"] = _diffs(torch_own, res)
                own = row["aot_eager"].get("diff") or {}
                row[way]["within_aot_eager"] = row[way]["equal"] or _equal(row[way]["diff_vs_aot_eager"]) or all(
                    (diffs.get(k) or 0.0) <= (own.get(k) or 0.0) * 1.01 for k in _NUMERIC)
    return row


_NUMERIC = ("losses", "grads", "params", "eval", "gen_logits")


def _diffs(ref: dict, res: dict) -> dict:
    """Largest differences of ``res`` from ``ref`` (two children's results), and whether their tokens agree."""
    import torch

    diffs: dict = {k: _cmp(ref[k], res[k]) for k in _NUMERIC if k in ref and k in res}
    for name in ("tokens", "static_tokens"):
        want, got = ref.get(name), res.get(name)
        diffs[name + "_equal"] = (None if want is None else
                                  got is not None and want.shape == got.shape and bool(torch.equal(want, got)))
    if ref.get("static_error") != res.get("static_error"):
        diffs["static_error"] = res.get("static_error")
    return diffs


def _equal(diffs: dict) -> bool:
    return (all(v is not None and v < 1e-4 for k, v in diffs.items() if k in _NUMERIC)
            and diffs.get("tokens_equal") is not False and diffs.get("static_tokens_equal") is not False
            and "static_error" not in diffs)


def _cell(entry: dict, keys: tuple[str, ...]) -> str:
    if entry.get("error"):
        return "ERROR " + entry["error"][:60]
    parts = ["eq" if entry.get("equal") else f"DIFF {entry.get('diff')}"]
    parts += [f"{k}={entry.get(k)}" for k in keys]
    return " ".join(parts)


def _verdict(entry: dict | None) -> str:
    """A way's outcome against eager: ``eq`` (bit-equal or within 1e-4), ``= aot_eager`` (differs from eager no more
    than torch's own AOT Autograd does), else what differs."""
    if not entry:
        return "-"
    if entry.get("error"):
        return "ERROR"
    if entry.get("equal"):
        return "eq"
    if entry.get("within_aot_eager"):
        return "~aot_eager"
    return "DIFF " + ",".join(k for k, v in (entry.get("diff") or {}).items() if v not in (0.0, True, None))


def print_table(results: dict) -> None:
    """One line per model of a ``--with-compile`` run: each way's outcome, tokens, warm compiles and fallbacks."""
    print("| model | backend: train+eval | backend: generate (default / static) | backend warm: compiles, hits | "
          "aotcache.compile: route, train+eval | compile: generate | compile warm: traces, compiles | fallbacks |")
    print("|" + " --- |" * 8)
    for name, row in results.items():
        backend, warm = row.get("aotcache") or {}, row.get("aotcache_warm") or {}
        comp, comp_warm = row.get("compile") or {}, row.get("compile_warm") or {}

        def tokens(entry: dict) -> str:
            diff = entry.get("diff") or {}
            if diff.get("tokens_equal") is None:
                return "-"
            static = diff.get("static_tokens_equal")
            return (("eq" if diff["tokens_equal"] else "DIFF") + " / "
                    + ("-" if static is None else "eq" if static else "DIFF"))

        fallbacks = {**(backend.get("fallback") or {}), **(comp.get("fallback") or {})}
        bypass = backend.get("bypass_reasons") or {}
        print(f"| {name} | {_verdict(backend)} | {tokens(backend)} | {warm.get('compile')}, {warm.get('hit')} | "
              f"{comp.get('route')}, {_verdict(comp)} | {tokens(comp)} | {comp_warm.get('traces')}, "
              f"{comp_warm.get('compile')} | {fallbacks or bypass or 'none'} |")


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:  # the module docstring is the usage (a bare run sweeps every model)
        print(__doc__)
        return
    if "--table" in argv:
        path = Path(argv[argv.index("--out") + 1]) if "--out" in argv else REPO / "bench/results/backend_sweep.json"
        print_table(json.loads(path.read_text()))
        return
    inductor = "--inductor" in argv
    attn = "eager"
    if "--attn" in argv:  # an attention implementation: eager (default), sdpa, flex_attention
        attn = argv[argv.index("--attn") + 1]
        argv = argv[:argv.index("--attn")] + argv[argv.index("--attn") + 2:]
    steps = 3
    if "--steps" in argv:  # fewer training steps, one shape (the third step is the dynamic recompile)
        steps = int(argv[argv.index("--steps") + 1])
        argv = argv[:argv.index("--steps")] + argv[argv.index("--steps") + 2:]
    generate = "--no-generate" not in argv
    flags = {name: f"--{name.replace('_', '-')}" in argv for name in LOOP_FLAGS}  # NOTE [The sweep's loop flags]
    ways = WAYS if "--with-compile" in argv else BACKEND_WAYS
    if "--no-aot-eager" in argv:  # the yardstick only matters where a way differs from eager; it costs a Dynamo run
        ways = tuple(way for way in ways if way != "aot_eager")
    out = REPO / "bench" / "results" / "backend_sweep.json"
    if "--out" in argv:
        out = Path(argv[argv.index("--out") + 1])
        argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    archs = [a for a in argv if not a.startswith("--")] or list(MODELS)
    unknown = [a for a in archs if a not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    results = json.loads(out.read_text()) if out.exists() else {}
    for arch in archs:
        for compiler in (["nop", "default"] if inductor else ["nop"]):
            t0 = time.perf_counter()
            row = run_model(arch, compiler, ways, attn, steps, generate, flags)
            key = arch if compiler == "nop" else f"{arch}+{compiler}"
            key = key if attn == "eager" else f"{key}+{attn}"
            key += "".join(f"+{suffix}" for name, suffix in LOOP_FLAGS.items() if flags[name])
            results[key] = row
            print(f"== {key} ({time.perf_counter() - t0:.0f} s)")
            stat = ("unique_graphs", "graph_breaks", "recompiles", "first_step_s")
            if "aot_eager" in ways:
                print("  aot_eager     ", _cell(row["aot_eager"], stat))
            print("  aotcache cold ", _cell(row["aotcache"], stat + ("compile", "hit", "bypass", "fallback")))
            print("  aotcache warm ", _cell(row["aotcache_warm"], stat + ("compile", "hit", "guard_miss", "fallback")))
            if "compile" in ways:
                keys = ("route", "traces", "compile", "fingerprint_hit", "fallback", "first_step_s")
                print("  compile cold  ", _cell(row["compile"], keys))
                print("  compile warm  ", _cell(row["compile_warm"], keys))
            out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
