"""Many transformers architectures (tiny random weights, ``bench/hf_tiny.py``) through ``aotcache.compile``,
training and evaluation against eager, cold and warm.

    PYTHONPATH=$PWD python bench/hf_sweep.py [--archs Llama,Bert,...] [--out bench/results/hf_sweep.json]

Each architecture runs in two fresh processes (one after the other, each with a timeout) sharing one new
``AOTCACHE_CACHE_DIR``:

* cold: an eager model and a compiled twin (``aotcache.compile(model, compiler="nop")``, ``dynamic=None``) built
  from the same seed; three AdamW steps, the third on a longer sequence (a larger batch for image models), which
  exercises automatic dynamic shapes; losses, the set of parameters with gradients, gradients and parameters are
  compared; then an eval forward under ``no_grad`` (every output tensor compared); where anything is not bit-equal
  (within the tolerance or not) the same under ``torch.compile(backend="aot_eager")`` is recorded beside it
  (``aot_eager``). Recorded: ``.route``
  (``aot`` / ``dynamo`` / ``eager``), the cache counters, the capture fallbacks
  (``aotcache.aot.fallback.fallback_counts()``), the number of traces and the time;
* warm: the same in a new process on the same cache dir, plus whether it traced (``traces``, ``compile`` and
  ``fingerprint_miss`` counters; ``traces`` counts the AOT compile steps a fingerprint alias did not answer).

Generation is not exercised (KV caches: ``bench/transformers_real_compilers.py``). Writes ``--out`` (one record per
architecture) and prints a table.
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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULT = "RESULT "

CAUSAL = ("Llama Mistral Qwen2 Qwen3 Phi Phi3 Gemma Gemma2 GPTNeoX OPT Falcon Bloom GPTJ CodeGen StableLm Olmo "
          "Olmo2 Cohere Starcoder2 GPTBigCode Mixtral Qwen2Moe Mamba Granite").split()
ENCODERS = "DistilBert Albert Electra DebertaV2 XLMRoberta MPNet Longformer BigBird".split()
SEQ2SEQ = "T5 MT5 Bart Pegasus Marian MBart".split()
EXTRA_CAUSAL = "Qwen3Moe GraniteMoe SmolLM3 Exaone4 Glm Glm4 Nemotron Lfm2".split()
EXTRA_ENCODERS = "Bert Roberta ModernBert".split()
VISION = "ViT DeiT Beit Swin ConvNext ResNet Segformer MobileViT Dinov2".split()

#: architecture -> (model class suffix, kind of inputs[, transformers architecture when the name is not one])
ARCHS: dict[str, tuple[str, ...]] = {
    **{arch: ("ForCausalLM", "causal") for arch in CAUSAL},
    **{arch: ("ForMaskedLM", "masked") for arch in ENCODERS},
    **{arch: ("ForConditionalGeneration", "seq2seq") for arch in SEQ2SEQ},
    "Marian": ("MTModel", "seq2seq"),
    **{arch: ("ForImageClassification", "image") for arch in VISION},
    "CLIP": ("Model", "clip"),
    "Whisper": ("ForConditionalGeneration", "whisper"),
    "Hubert": ("ForCTC", "ctc"),
    # beyond the brief's list
    **{arch: ("ForCausalLM", "causal") for arch in EXTRA_CAUSAL},
    "GPT2": ("LMHeadModel", "causal"),
    **{arch: ("ForMaskedLM", "masked") for arch in EXTRA_ENCODERS},
    "Siglip": ("Model", "clip"),
    "Wav2Vec2": ("ForCTC", "ctc"),
    "WavLM": ("ForCTC", "ctc"),
    # sequence classifiers (the usual fine-tuning setup: config.problem_type set on the first call with labels)
    "BertForSequenceClassification": ("ForSequenceClassification", "classify", "Bert"),
    "RobertaForSequenceClassification": ("ForSequenceClassification", "classify", "Roberta"),
    # session 22: the families the earlier runs of this sweep had left out
    "Mpt": ("ForCausalLM", "causal"),
    "SwitchTransformers": ("ForConditionalGeneration", "seq2seq"),
    "Esm": ("ForMaskedLM", "masked"),
    # session 23: recent LLM families (text models of Llama 4 and Qwen3.5; GLM-4.5 MoE, OLMo 3, Ministral,
    # ERNIE 4.5) and one encoder (EuroBERT)
    **{arch: ("ForCausalLM", "causal") for arch in "Llama4 Qwen3_5 Glm4Moe Olmo3 Ministral Ernie4_5".split()},
    "EuroBert": ("ForMaskedLM", "masked"),
}


def base_arch(arch: str) -> str:
    """The transformers architecture of an ``ARCHS`` name (``BertForSequenceClassification`` -> ``Bert``)."""
    entry = ARCHS[arch]
    return entry[2] if len(entry) > 2 else arch


def batch(kind: str, config: Any, step: int) -> dict:
    """Step ``step``'s inputs (with labels); step 2 is longer (larger for images), step 9 the eval batch."""
    import torch

    g = torch.Generator().manual_seed(step)
    length = 12 if step == 2 else 8
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 99)
    ids = torch.randint(3, vocab, (2, length), generator=g)
    if kind == "causal":
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    if kind == "classify":
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                    labels=torch.randint(0, config.num_labels, (2,), generator=g))
    if kind == "masked":
        labels = ids.masked_fill(torch.rand(ids.shape, generator=g) < 0.5, -100)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    if kind == "seq2seq":
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                    labels=torch.randint(3, vocab, (2, length // 2 + 1), generator=g))
    if kind in ("image", "clip"):
        size = config.vision_config.image_size if kind == "clip" else getattr(config, "image_size", 32)
        pixels = torch.randn(3 if step == 2 else 2, getattr(config, "num_channels", 3), size, size, generator=g)
        if kind == "clip":
            return dict(input_ids=ids[:2], pixel_values=pixels[:2], return_loss=True)
        return dict(pixel_values=pixels, labels=torch.randint(0, config.num_labels, (len(pixels),), generator=g))
    if kind == "whisper":
        features = torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions, generator=g)
        return dict(input_features=features, labels=torch.randint(3, vocab, (2, length // 2 + 1), generator=g))
    if kind == "ctc":
        audio = torch.randn(2, 400 + 80 * (step == 2), generator=g)
        return dict(input_values=audio, labels=torch.randint(1, vocab, (2, 4), generator=g))
    raise ValueError(kind)


def seed(value: int) -> None:
    import numpy
    import torch

    torch.manual_seed(value)
    numpy.random.seed(value)


def reference(arch: str, head: str, implementation: str | None, batches: list, inputs: dict, eager_run: tuple,
              aotcache_run: tuple) -> dict:
    """Where aotcache's results differ from eager's: the same steps and eval under ``torch.compile(backend=
    "aot_eager")`` (torch's own AOT Autograd, no compiler; numpy's random draws made by numpy, as aotcache's
    Dynamo way makes them: NOTE [numpy random under Dynamo]), compared with eager's and with aotcache's
    (``(steps, model, eval output)`` each). aotcache equal to aot_eager (``same_as_aotcache``) while both differ
    from eager: the difference is torch's (its decompositions' rounding), not aotcache's."""
    import torch

    from hf_tiny import adamw_steps, build, compare_steps, max_diff

    from aotcache.aot.fallback import dynamo_as_eager

    model = build(arch, head, attn=implementation)
    compiled = dynamo_as_eager(torch.compile(model, backend="aot_eager"))  # numpy's draws as eager's
    seed(1)
    steps = adamw_steps(model, compiled, batches)
    model.eval()
    with torch.no_grad():
        seed(2)
        out = compiled(**inputs)
    result = {"vs_eager": compare_steps(eager_run[0], steps, eager_run[1], model),
              "vs_aotcache": compare_steps(steps, aotcache_run[0], model, aotcache_run[1])}
    result["vs_eager"]["eval_diff"] = max_diff(out, eager_run[2])
    result["vs_aotcache"]["eval_diff"] = max_diff(aotcache_run[2], out)
    for part in result.values():
        part.pop("losses")
    same = result["vs_aotcache"]
    result["same_as_aotcache"] = (same["loss_diff"] == same["grad_reldiff"] == same["param_diff"] == 0.0
                                  and same["eval_diff"] == 0.0 and not same["grad_set_mismatch"])
    return result


def run_arch(arch: str, phase: str, attn: str) -> dict:
    """One architecture in this process: the record (``error`` where something raised)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, HERE)
    import aotcache
    from aotcache.aot.fallback import fallback_counts
    from aotcache.autograd_cache.cache import resolve_cache
    from hf_tiny import adamw_steps, build, compare_steps, max_diff

    head, kind = ARCHS[arch][:2]
    record: dict[str, Any] = {"arch": arch, "model": base_arch(arch) + head, "phase": phase, "attn": attn}
    implementation = None if attn == "default" else attn
    try:
        eager, model = (build(base_arch(arch), head, attn=implementation),
                        build(base_arch(arch), head, attn=implementation))
    except Exception as exc:  # noqa: BLE001 - an architecture that does not build is a result
        record["build_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return record
    started = time.perf_counter()
    compiled = aotcache.compile(model, compiler="nop")
    stage = "train"
    try:
        batches = [batch(kind, model.config, step) for step in range(3)]
        seed(1)  # dropout, and numpy's draws (Wav2Vec2 / Hubert SpecAugment masks)
        want = adamw_steps(eager, eager, batches)
        seed(1)
        got = adamw_steps(model, compiled, batches)
        record.update(compare_steps(want, got, eager, model))
        record["train_ok"] = (record["loss_diff"] < 1e-5 and record["grad_reldiff"] < 1e-4
                              and not record["grad_set_mismatch"] and record["param_diff"] < 1e-4)
        record["route_train"] = compiled.route
        stage = "eval"
        eager.eval(), compiled.eval()
        inputs = batch(kind, model.config, 9)
        with torch.no_grad():
            seed(2)
            expected = eager(**inputs)
            seed(2)
            actual = compiled(**inputs)
        record["eval_diff"] = max_diff(actual, expected)
        record["eval_ok"] = record["eval_diff"] < 1e-5
    except Exception as exc:  # noqa: BLE001 - the sweep records every failure
        record["error"] = f"{stage}: {type(exc).__name__}: {str(exc)[:600]}"
        record["traceback"] = traceback.format_exc()[-3000:]
    record["seconds"] = round(time.perf_counter() - started, 1)
    exact = (record.get("loss_diff") == record.get("grad_reldiff") == record.get("param_diff") == 0.0
             and record.get("eval_diff") == 0.0 and not record.get("grad_set_mismatch"))
    if phase == "cold" and "error" not in record and not exact:  # within tolerance too: whose rounding is it?
        try:
            record["aot_eager"] = reference(base_arch(arch), head, implementation, batches, inputs, (want, eager, expected),
                                            (got, model, actual))
        except Exception as exc:  # noqa: BLE001 - a reference that fails is recorded
            record["aot_eager"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    record["route"] = compiled.route
    record["reason"] = compiled.router.reason
    counters = dict(resolve_cache(True).counters)
    record["counters"] = {k: v for k, v in counters.items() if v}
    # the AOT way's compile steps less those a fingerprint alias answered without tracing
    record["traces"] = compiled.compiled.num_compiles - counters.get("fingerprint_hit", 0)
    record["fallbacks"] = fallback_counts()
    return record


def _child(arch: str, phase: str, attn: str, cache_dir: str, timeout: float) -> dict:
    env = dict(os.environ, AOTCACHE_CACHE_DIR=cache_dir, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", arch, "--phase", phase, "--attn", attn],
                              env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"arch": arch, "phase": phase, "error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            record = json.loads(line[len(RESULT):])
            record["wall_s"] = round(time.perf_counter() - started, 1)
            record["warnings"] = [ln[:400] for ln in proc.stderr.splitlines() if "aotcache" in ln][:5]
            return record
    return {"arch": arch, "phase": phase, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}


def warm_traced(warm: dict) -> bool:
    """Whether the warm process traced anything the cache should have answered: an AOT capture the fingerprint did
    not skip, or a graph compiled instead of loaded (the Dynamo way always runs Dynamo's own trace)."""
    counters = warm.get("counters", {})
    if warm.get("route") != "aot":  # its fingerprint is looked up (a miss) before the route record is read
        return bool(warm.get("traces", 0) > 0 or counters.get("compile"))
    return bool(warm.get("traces", 0) > 0 or counters.get("compile") or counters.get("fingerprint_miss"))


def row(entry: dict) -> list[str]:
    cold, warm = entry["cold"], entry.get("warm") or {}
    if "build_error" in cold:
        return [entry["arch"], "-", "-", "-", "-", "does not build: " + cold["build_error"][:60], "-"]
    torch_own = (cold.get("aot_eager") or {}).get("same_as_aotcache")

    def ok(rec: dict, key: str) -> str:
        if rec.get(key):
            return "yes"
        return "ERR" if "error" in rec else ("= aot_eager" if torch_own else "NO")

    reasons = [f"{k} x{v}" for k, v in cold.get("fallbacks", {}).items()]
    if cold.get("route") not in (None, "aot"):
        reasons.append(_short(cold.get("reason", "")))
    if (warm.get("counters") or {}).get("fingerprint_state_changed"):
        reasons.append("warm: call changes program state")
    reasons = ", ".join(reasons) or cold.get("error", "")[:60]
    warm_ok = "" if not warm or (warm.get("train_ok"), warm.get("eval_ok")) == (cold.get("train_ok"), cold.get(
        "eval_ok")) else " (warm differs)"
    return [entry["arch"], str(cold.get("route")), ok(cold, "train_ok"), ok(cold, "eval_ok") + warm_ok,
            ("yes" if warm_traced(warm) else "no") if warm else "-", reasons,
            f"{cold.get('wall_s', '-')}/{warm.get('wall_s', '-')}"]


def _short(reason: str) -> str:
    """A capture refusal's source line (``at file:line in f: `code```), else its first words."""
    if reason.count("`") >= 2:
        return reason.split("`")[1][:70]
    return reason[:70]


def print_table(results: dict) -> None:
    header = ["arch", "route", "train ok", "eval ok", "warm traced", "fallback reasons", "seconds cold/warm"]
    rows = [header] + [row(results[name]) for name in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures (default: all)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "hf_sweep.json"))
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--attn", default="eager", help="attention implementation: eager (default), sdpa, or "
                        "default (what the model picks when none is set: sdpa where supported)")
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--child")
    parser.add_argument("--phase", default="cold")
    args = parser.parse_args()
    if args.child:
        print(RESULT + json.dumps(run_arch(args.child, args.phase, args.attn), default=str), flush=True)
        return
    results: dict[str, Any] = {}
    if os.path.exists(args.out):  # a partial run updates its architectures only
        with open(args.out) as f:
            results = {r["arch"]: r for r in json.load(f).get("archs", [])}
    if args.table:
        print_table(results)
        return
    import torch
    import transformers

    for arch in args.archs.split(","):
        if arch not in ARCHS:
            raise SystemExit(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
        with tempfile.TemporaryDirectory(prefix="aotcache-hf-") as cache_dir:
            cold = _child(arch, "cold", args.attn, cache_dir, args.timeout)
            warm = (None if "error" in cold or "build_error" in cold
                    else _child(arch, "warm", args.attn, cache_dir, args.timeout))
        results[arch] = {"arch": arch, "cold": cold, "warm": warm}
        print(" | ".join(row(results[arch])), flush=True)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__, "compiler": "nop",
                       "device": "cpu", "attn": args.attn, "archs": [results[a] for a in ARCHS if a in results]},
                      f, indent=1, default=str)
    print_table({a: results[a] for a in ARCHS if a in results})


if __name__ == "__main__":
    main()
