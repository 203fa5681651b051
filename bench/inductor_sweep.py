"""The default compiler (Inductor) through ``aotcache.compile(model)`` on tiny transformers models, next to eager
and ``torch.compile(model)``.

    python bench/inductor_sweep.py                       # every model below (~45 min on 2 shared cores)
    python bench/inductor_sweep.py --models llama,clip   # some; results merge into the JSON by model

Each model runs in three fresh processes (``OMP_NUM_THREADS=1``, each with an eager copy built from the same seed):

* ``tc``: ``torch.compile(model)`` (Inductor), empty ``TORCHINDUCTOR_CACHE_DIR``;
* ``cold``: ``aotcache.compile(model)`` with no ``compiler=`` (Inductor, as a C++ compiler is on PATH), a fresh
  ``AOTCACHE_CACHE_DIR`` and empty Inductor caches;
* ``warm``: the same in a new process on the same ``AOTCACHE_CACHE_DIR``, with a new empty
  ``TORCHINDUCTOR_CACHE_DIR``: it must compile nothing (no ``compile`` counter, no Inductor compile in torch's
  counters, no kernel library in Inductor's cache dir that the cold process did not build) and give the same
  results.

Each process runs two AdamW steps in train mode (losses and gradients compared with eager: the largest relative
difference) and an eval forward under ``no_grad`` (outputs). ``aotcache stats --json`` on the cache dir gives the
compiler fallbacks (``inductor->nop: <error type>``; the child's aotcache log lines, which carry the message,
are kept as ``warnings``). Writes
``bench/results/inductor_sweep.json`` and prints a table. Models are built tiny by ``bench/hf_tiny.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

RESULT = "RESULT "
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)


# ------------------------------------------------------------------------------------------------------------
# Models: name -> (build(), batch(step) -> kwargs with labels, eval kwargs, pick(output) -> eval tensor)
# ------------------------------------------------------------------------------------------------------------


def _gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _ids(step: int, length: int = 8, vocab: int = 99):
    import torch

    return torch.randint(3, vocab, (2, length), generator=_gen(step))


def _lm(step):
    ids = _ids(step)
    return dict(input_ids=ids, labels=ids)


def _pixels(step, size=32):
    import torch

    return torch.randn(2, 3, size, size, generator=_gen(100 + step))


def _image_cls(step):
    import torch

    return dict(pixel_values=_pixels(step), labels=torch.tensor([0, 1]))


def _build_hf(arch: str, head: str, **overrides):
    from hf_tiny import build

    return lambda: build(arch, head, **overrides)


def _build_t5():
    import torch
    import transformers as T
    from hf_tiny import tiny_config

    config = tiny_config("T5")
    config.decoder_start_token_id = 0  # not a default attribute of this transformers' T5Config
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return T.T5ForConditionalGeneration(config).train()


def _build_clip():
    import torch
    import transformers as T

    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32, projection_dim=16, dropout=0.0, attention_dropout=0.0)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=16, dropout=0.0, attention_dropout=0.0)
    config = T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return T.CLIPModel(config).train()


def _clip_batch(step):
    return dict(input_ids=_ids(step), pixel_values=_pixels(step), return_loss=True)


def _t5_batch(step):
    return dict(input_ids=_ids(step), labels=_ids(step + 50, 6))


def _whisper_batch(step):
    import torch

    return dict(input_features=torch.randn(2, 8, 32, generator=_gen(200 + step)), labels=_ids(step + 50, 6))


def _bert_batch(step):
    import torch

    return dict(input_ids=_ids(step), attention_mask=torch.ones(2, 8, dtype=torch.long), labels=torch.tensor([0, 2]))


def _drop_labels(batch_fn, **extra):
    def evaluate():
        batch = batch_fn(9)
        batch.pop("labels", None)
        batch.pop("return_loss", None)
        batch.update({k: v() for k, v in extra.items()})
        return batch

    return evaluate


def _decoder_ids():
    return _ids(77, 5)


MODELS: dict[str, tuple] = {
    "llama": (_build_hf("Llama", "ForCausalLM"), _lm, _drop_labels(_lm), "logits"),
    "gpt2": (_build_hf("GPT2", "LMHeadModel"), _lm, _drop_labels(_lm), "logits"),
    "bert": (_build_hf("Bert", "ForSequenceClassification", num_labels=3), _bert_batch, _drop_labels(_bert_batch),
             "logits"),
    "t5": (_build_t5, _t5_batch,
           _drop_labels(_t5_batch, decoder_input_ids=_decoder_ids), "logits"),
    "whisper": (_build_hf("Whisper", "ForConditionalGeneration", num_mel_bins=8, max_source_positions=16,
                          max_target_positions=32), _whisper_batch,
                _drop_labels(_whisper_batch, decoder_input_ids=_decoder_ids), "logits"),
    "clip": (_build_clip, _clip_batch, _drop_labels(_clip_batch), "logits_per_image"),
    "mistral": (_build_hf("Mistral", "ForCausalLM", sliding_window=4), _lm, _drop_labels(_lm), "logits"),
    "qwen2_moe": (_build_hf("Qwen2Moe", "ForCausalLM", num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=16, shared_expert_intermediate_size=16), _lm, _drop_labels(_lm),
                  "logits"),
    "mamba": (_build_hf("Mamba", "ForCausalLM", state_size=4, expand=2, conv_kernel=4, time_step_rank=4), _lm,
              _drop_labels(_lm), "logits"),
    "resnet": (_build_hf("ResNet", "ForImageClassification", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                         num_labels=3), _image_cls, _drop_labels(_image_cls), "logits"),
    "convnext": (_build_hf("ConvNext", "ForImageClassification", hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                           num_labels=3), _image_cls, _drop_labels(_image_cls), "logits"),
    "swin": (_build_hf("Swin", "ForImageClassification", embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                       window_size=4, patch_size=4, num_labels=3), _image_cls, _drop_labels(_image_cls), "logits"),
}


# ------------------------------------------------------------------------------------------------------------
# One process
# ------------------------------------------------------------------------------------------------------------


def _rel(a, b) -> float:
    return ((a - b).abs().max() / (b.abs().max() + 1e-6)).item() if a.numel() else 0.0


def _train(model, call, batch_fn) -> list:
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    steps = []
    for step in range(2):
        opt.zero_grad()
        loss = call(**batch_fn(step)).loss
        loss.backward()
        steps.append((loss.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
        opt.step()
    return steps


def _inductor_compiles() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {k: v for k, v in counters["inductor"].items() if v}


def _inductor_files() -> list[str]:
    """The kernel libraries and C++ sources under this process's ``TORCHINDUCTOR_CACHE_DIR`` (relative paths)."""
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not root:
        return []
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
                  if f.endswith((".so", ".cpp")))


def run_model(name: str, phase: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    build, batch_fn, eval_fn, pick = MODELS[name]
    record: dict[str, Any] = {"model": name, "phase": phase}
    stage = "build"
    try:
        eager, model = build(), build()
        record["params"] = sum(p.numel() for p in model.parameters())
        stage = "compile"
        started = time.perf_counter()
        if phase == "tc":
            call = torch.compile(model)
        else:
            import aotcache

            call = aotcache.compile(model)
        stage = "train"
        want, got = _train(eager, eager, batch_fn), _train(model, call, batch_fn)
        record["loss_diff"] = max(abs(a[0] - b[0]).item() / (1 + abs(b[0]).item()) for a, b in zip(got, want))
        grad = 0.0
        for (_, gg), (_, gw) in zip(got, want):
            if set(gg) != set(gw):
                record["grad_set_differs"] = sorted(set(gg) ^ set(gw))[:5]
            grad = max([grad] + [_rel(gg[n], gw[n]) for n in gw if n in gg])
        record["grad_diff"] = grad
        stage = "eval"
        eager.eval(), model.eval()
        with torch.no_grad():
            ow, og = getattr(eager(**eval_fn()), pick), getattr(call(**eval_fn()), pick)
        record["eval_diff"] = _rel(og, ow)
        record["seconds"] = round(time.perf_counter() - started, 1)
    except Exception as exc:  # noqa: BLE001 - the sweep records every failure
        record["error"] = f"{stage}: {type(exc).__name__}: {str(exc)[:600]}"
        record["traceback"] = traceback.format_exc()[-3000:]
    record["diff"] = max((record.get(k) or 0.0) for k in ("loss_diff", "grad_diff", "eval_diff"))
    record["inductor_counters"] = _inductor_compiles()
    record["inductor_files"] = _inductor_files()
    if phase != "tc":
        from aotcache.aot.fallback import fallback_counts
        from aotcache.autograd_cache.cache import resolve_cache

        record["route"] = getattr(call, "route", None) if stage != "compile" else None
        reason = getattr(getattr(call, "router", None), "reason", None)
        if reason:
            record["route_reason"] = str(reason)[:300]
        record["counters"] = {k: v for k, v in resolve_cache(True).stats().items() if v}
        record["capture_fallbacks"] = fallback_counts()
    return record


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------


def _child(name: str, phase: str, cache_dir: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="inductor-") as inductor_dir:
        env = dict(os.environ, AOTCACHE_CACHE_DIR=cache_dir, TORCHINDUCTOR_CACHE_DIR=inductor_dir,
                   TRITON_CACHE_DIR=os.path.join(inductor_dir, "triton"), OMP_NUM_THREADS="1",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("AOTCACHE_COMPILER", None)
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--phase", phase], env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"model": name, "phase": phase, "error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            record = json.loads(line[len(RESULT):])
            record["wall_s"] = round(time.perf_counter() - started, 1)
            record["warnings"] = [ln[:600] for ln in proc.stderr.splitlines() if "aotcache" in ln][:8]
            return record
    return {"model": name, "phase": phase, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}


def _fallbacks(cache_dir: str) -> dict[str, int]:
    """``aotcache stats --json``'s compiler fallback reasons for ``cache_dir``."""
    env = dict(os.environ, AOTCACHE_CACHE_DIR=cache_dir,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "aotcache.cli", "--json", "stats"], env=env, capture_output=True,
                          text=True)
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        return {"error": (proc.stderr or proc.stdout)[-300:]}
    reasons = data.get("autograd", {}).get("compiler_fallback_reasons") or {}
    return dict(reasons) if isinstance(reasons, dict) else {str(r[0]): r[1] for r in reasons}


def _diff(record: dict) -> str:
    """A phase's difference from eager for the table: ``-`` when not run, ``ERR`` when it failed."""
    if not record:
        return "-"
    return "ERR" if "error" in record or record.get("diff") is None else f"{record['diff']:.1e}"


def warm_compiled(cold: dict, warm: dict) -> str:
    """``"no"`` when the warm process compiled nothing: no aotcache compile, no Inductor compile in torch's
    counters, no kernel library in its Inductor cache dir that the cold process did not build too (the artifacts
    restore the cold process's libraries at the same paths)."""
    graphs = (warm.get("counters") or {}).get("compile", 0)
    inductor = {k: v for k, v in (warm.get("inductor_counters") or {}).items()
                if k in ("fxgraph_cache_miss", "pattern_matcher_count")}
    if "inductor_files" in warm and "inductor_files" in cold:
        new = [f for f in warm["inductor_files"] if f.endswith(".so") and f not in set(cold["inductor_files"])]
    else:
        new = []
    if not (graphs or inductor or new):
        return "no"
    return f"yes ({graphs} graphs, {inductor or ''} {len(new)} new .so)"


def table(records: list[dict]) -> str:
    lines = ["| model | route | aotcache vs eager | torch.compile vs eager | fallbacks | cold s | torch.compile s | "
             "warm s | warm compiled? | warm vs eager |", "| --- " * 10 + "|"]
    for r in records:
        cold, warm, tc = r.get("cold") or {}, r.get("warm") or {}, r.get("tc") or {}
        compiled = "-" if not warm or "error" in warm else warm_compiled(cold, warm)
        fb = ", ".join(f"{k} x{v}" for k, v in (r.get("fallbacks") or {}).items()) or "none"
        lines.append(f"| {r['model']} | {cold.get('route')} | {_diff(cold)} | "
                     f"{_diff(tc)} | {fb} | {cold.get('wall_s')} | "
                     f"{tc.get('wall_s')} | "
                     f"{warm.get('wall_s')} | {compiled} | {_diff(warm)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--phases", default="tc,cold,warm")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "inductor_sweep.json"))
    parser.add_argument("--child")
    parser.add_argument("--phase")
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()
    if args.table:
        with open(args.out) as f:
            order = list(MODELS)
            print(table(sorted(json.load(f)["models"], key=lambda r: order.index(r["model"]) if r["model"] in order
                               else len(order))))
        return
    if args.child:
        print(RESULT + json.dumps(run_model(args.child, args.phase), default=str), flush=True)
        return
    results: dict[str, dict] = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = {r["model"]: r for r in json.load(f).get("models", [])}
    phases = args.phases.split(",")
    for name in args.models.split(","):
        record = results.get(name, {"model": name})
        with tempfile.TemporaryDirectory(prefix="aotcache-ind-") as cache_dir:
            for phase in phases:
                if phase == "warm" and "error" in record.get("cold", {"error": 1}):
                    continue
                record[phase] = _child(name, phase, cache_dir, args.timeout)
            if "cold" in phases:
                record["fallbacks"] = _fallbacks(cache_dir)
        results[name] = record
        print(table([record]).splitlines()[-1], flush=True)
        import torch

        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "device": "cpu", "models": list(results.values())}, f, indent=1,
                      default=str)
    print(table([results[n] for n in MODELS if n in results]))


if __name__ == "__main__":
    main()
