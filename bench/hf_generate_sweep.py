"""Hugging Face text generation (the serving path) through ``aotcache.compile``, many architectures, against eager.

Per architecture, in its own fresh subprocess (timeout) with a fresh ``AOTCACHE_CACHE_DIR``: a tiny random-weight
model from ``bench/hf_tiny.py`` in eval mode (weights redrawn with std ``WEIGHT_STD``, so that the tokens vary),
an eager twin built from the same seeds, and
``aotcache.compile(model, compiler="nop")``. Each generate mode compares the generated tokens exactly:

* ``greedy``: default DynamicCache, ``max_new_tokens=6`` (also each step's logits: ``max_logit_diff``);
* ``no_cache``: greedy with ``use_cache=False``;
* ``sample``: ``do_sample=True`` with the same ``torch.manual_seed`` before each;  ``beam``: ``num_beams=3``;
* ``padded``: a left-padded batch of 2 with its ``attention_mask``;
* ``static``: ``cache_implementation="static"`` (where eager supports it);
* ``pipeline``: ``transformers.pipeline("text-generation", model=compiled, tokenizer=...)`` with a WordLevel
  tokenizer built in code (decoder-only models).

Per mode it records: equal, traces (``fingerprint_miss`` + ``fingerprint_fallback``: each is one capture),
compiles, fingerprint hits, the route and the fallback decisions (``fallback_counts()``). After the modes, the
steady per-token decode time of eager and compiled greedy (the slope between two generation lengths, after
warm-up, median of rounds): the wrapper's per-call overhead is what a server pays per token. Then a second
process on the same cache dir ("warm") runs the same modes: it must trace nothing and give the same tokens.

NOTE [The sweep's recompile limit]: all modes run on one compiled model in one process, so its traces add up across
modes (Llama: 3 greedy + 2 no cache + 2 beam + 3 padded + 2 static + 1 pipeline = 13), each a distinct call form
that a server using one mode would trace once. Past aotcache's default recompile limit (8 per function, as
torch.compile's) the later modes' new forms ran eagerly ("F") and the warm process traced what the cold one never
stored ("/wN"). The children run with ``AOTCACHE_RECOMPILE_LIMIT`` set to ``--recompile-limit`` (default 32), so
each mode is checked as if it had the model to itself; ``--recompile-limit 8`` shows what the default does to a
process that serves all seven modes.

The children share ``PYTHONHASHSEED=0`` unless the caller set one: with mixed ``layer_types`` (Gemma 2) a static
cache's masks come as a dict whose key order follows the string hash, and with a seed drawn per process one warm
process in two traced those calls again (NOTE [The sweep's hash seed] in bench/backend_sweep.py, docs/models.md).

    PYTHONPATH=$PWD python bench/hf_generate_sweep.py [--archs Llama GPT2 ...] [--out PATH] [--no-timing]

writes bench/results/hf_generate_sweep.json and prints a table (docs/models.md, "Text generation").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent / "results" / "hf_generate_sweep.json"

#: architecture -> (model class suffix, kind): "lm" decoder-only, "s2s" encoder-decoder on ids, "speech" Whisper.
ARCHS: dict[str, tuple[str, str]] = {
    "Llama": ("ForCausalLM", "lm"), "Mistral": ("ForCausalLM", "lm"), "Qwen2": ("ForCausalLM", "lm"),
    "Qwen3": ("ForCausalLM", "lm"), "Phi": ("ForCausalLM", "lm"), "Phi3": ("ForCausalLM", "lm"),
    "Gemma": ("ForCausalLM", "lm"), "Gemma2": ("ForCausalLM", "lm"), "GPTNeoX": ("ForCausalLM", "lm"),
    "OPT": ("ForCausalLM", "lm"), "Falcon": ("ForCausalLM", "lm"), "Bloom": ("ForCausalLM", "lm"),
    "GPTJ": ("ForCausalLM", "lm"), "StableLm": ("ForCausalLM", "lm"), "Olmo": ("ForCausalLM", "lm"),
    "Starcoder2": ("ForCausalLM", "lm"), "GPTBigCode": ("ForCausalLM", "lm"), "GPT2": ("LMHeadModel", "lm"),
    "Mamba": ("ForCausalLM", "lm"), "Qwen2Moe": ("ForCausalLM", "lm"),
    "T5": ("ForConditionalGeneration", "s2s"), "Bart": ("ForConditionalGeneration", "s2s"),
    "Whisper": ("ForConditionalGeneration", "speech"),
}

MODES = ("greedy", "no_cache", "sample", "beam", "padded", "static", "pipeline")
NEW = 6  # new tokens per generate
WEIGHT_STD = 1.0  # the tiny models' weights (see _build)
LOGIT_MODES = ("greedy", "padded")  # modes whose every step's logits are compared too (max_logit_diff)


# -- one architecture, in this process -------------------------------------------------------------------------

def _inputs(kind: str, config, batch: int = 1, padded: bool = False) -> dict:
    import torch

    gen = torch.Generator().manual_seed(7)
    if kind == "speech":
        features = torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions, generator=gen)
        return {"input_features": features}
    ids = torch.randint(3, config.vocab_size, (batch, 6), generator=gen)
    if not padded:
        return {"input_ids": ids}
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = config.pad_token_id if config.pad_token_id is not None else 0
    return {"input_ids": ids, "attention_mask": mask}


def _mode_kwargs(mode: str, kind: str, config) -> tuple[dict, dict] | None:
    """(inputs, generate kwargs) of ``mode``; None where the mode does not apply to ``kind``."""
    base = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    if mode == "greedy":
        return _inputs(kind, config), {**base, "output_logits": True, "return_dict_in_generate": True}
    if mode == "no_cache":
        return _inputs(kind, config), {**base, "use_cache": False}
    if mode == "sample":
        return _inputs(kind, config), {**base, "do_sample": True, "top_k": 0}
    if mode == "beam":
        return _inputs(kind, config), {**base, "num_beams": 3}
    if mode == "padded":
        logits = {**base, "output_logits": True, "return_dict_in_generate": True}
        if kind == "speech":
            return _inputs(kind, config, batch=2), logits
        return _inputs(kind, config, batch=2, padded=True), logits
    if mode == "static":
        return _inputs(kind, config), {**base, "cache_implementation": "static"}
    return None


def _tokenizer(vocab_size: int):
    """A WordLevel tokenizer over ``w0 .. w<vocab-1>`` (0 pad, 1 bos, 2 eos), built in code: no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[PAD]")


def _counts(cache) -> dict:
    from aotcache.aot.fallback import fallback_counts

    c = cache.counters
    return {"traces": c.get("fingerprint_miss", 0) + c.get("fingerprint_fallback", 0), "compiles": c.get("compile", 0),
            "fingerprint_hits": c.get("fingerprint_hit", 0), "hits": c.get("hit", 0),
            "fallbacks": dict(fallback_counts())}


def _delta(after: dict, before: dict) -> dict:
    out = {k: after[k] - before[k] for k in ("traces", "compiles", "fingerprint_hits", "hits")}
    out["fallbacks"] = {k: v - before["fallbacks"].get(k, 0) for k, v in after["fallbacks"].items()
                        if v - before["fallbacks"].get(k, 0)}
    return out


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _per_token(model, inputs: dict, rounds: int) -> float:
    """Steady seconds per generated token: the slope between 4 and 20 new tokens (median of ``rounds``)."""
    import torch

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    run(20)  # warm-up: every length's graph exists
    slopes = [(run(20) - run(4)) / 16 for _ in range(rounds)]
    return statistics.median(slopes)


def _build(arch: str, head: str):
    """The tiny model in eval mode, with what ``generate`` needs that its config lacks (T5Config has no
    ``decoder_start_token_id``: its generate starts from the pad token, as the pretrained T5s do)."""
    import torch
    from hf_tiny import build

    model = build(arch, head).eval()
    # NOTE: weights drawn wider than the configs' init (std 0.02): logits far apart, so the generated tokens vary
    # and a small numerical difference would change them (with the default init most models repeat one token)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * WEIGHT_STD)
    if model.config.is_encoder_decoder and getattr(model.generation_config, "decoder_start_token_id", None) is None:
        model.generation_config.decoder_start_token_id = model.config.pad_token_id
    return model


def run_arch(arch: str, phase: str, modes: list[str], timing: bool) -> dict:
    """Every mode of ``arch`` in this process (its cache dir set by the caller)."""
    import torch

    torch.set_num_threads(1)
    import transformers

    import aotcache
    from aotcache.autograd_cache.cache import resolve_cache

    transformers.logging.set_verbosity_error()
    head, kind = ARCHS[arch]
    eager = _build(arch, head)
    model = aotcache.compile(_build(arch, head), compiler="nop")
    cache = resolve_cache(True)
    result: dict = {"arch": arch, "phase": phase, "modes": {}}
    for mode in modes:
        entry: dict = {}
        result["modes"][mode] = entry
        before = _counts(cache)
        try:
            if mode == "pipeline":
                if kind != "lm":
                    entry["skipped"] = "text-generation pipeline is for decoder-only models"
                    continue
                tok = _tokenizer(eager.config.vocab_size)
                prompt = "w5 w17 w33 w9"
                kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
                want = transformers.pipeline("text-generation", model=eager, tokenizer=tok)(prompt, **kwargs)
                got = transformers.pipeline("text-generation", model=model, tokenizer=tok)(prompt, **kwargs)
                entry["equal"] = got == want
                entry["text"] = got[0]["generated_text"]
            else:
                inputs, kwargs = _mode_kwargs(mode, kind, eager.config)
                try:
                    if mode == "sample":
                        torch.manual_seed(11)
                    with torch.no_grad():
                        want = eager.generate(**inputs, **kwargs)
                except Exception as exc:  # noqa: BLE001 - eager's own limit: the mode does not apply
                    entry["skipped"] = f"eager: {_short(exc)}"
                    continue
                if mode == "sample":
                    torch.manual_seed(11)
                with torch.no_grad():
                    got = model.generate(**inputs, **kwargs)
                if mode in LOGIT_MODES:  # the raw logits of every step too: a stronger check than the tokens
                    entry["max_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(got.logits, want.logits))
                    entry["max_logit"] = max(float(b.abs().max()) for b in want.logits)
                    got, want = got.sequences, want.sequences
                entry["equal"] = bool(got.shape == want.shape and torch.equal(got, want))
                entry["tokens"] = got.tolist()[0][-NEW:]
        except Exception as exc:  # noqa: BLE001 - a crash is a result of the sweep
            entry["error"] = _short(exc)
        finally:
            entry.update(_delta(_counts(cache), before))
            entry["route"] = model.route
    if timing and phase == "cold" and "greedy" in modes:
        inputs, _ = _mode_kwargs("greedy", kind, eager.config)
        try:
            before = _counts(cache)
            for _ in range(2):  # interleaved, so that both see the same machine load
                eager_s = _per_token(eager, inputs, 3)
                compiled_s = _per_token(model, inputs, 3)
            result["per_token_ms"] = {"eager": round(eager_s * 1e3, 3), "compiled": round(compiled_s * 1e3, 3),
                                      "ratio": round(compiled_s / eager_s, 2) if eager_s > 0 else None}
            result["timing_counts"] = _delta(_counts(cache), before)
        except Exception as exc:  # noqa: BLE001
            result["per_token_ms"] = {"error": _short(exc)}
    return result


# -- the sweep ---------------------------------------------------------------------------------------------------

def _child(arch: str, phase: str, modes: list[str], timing: bool, env: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--child", arch, "--phase", phase, "--modes", *modes]
    if not timing:
        cmd.append("--no-timing")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s", "seconds": timeout}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    out = json.loads(lines[-1][7:]) if lines else {
        "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}"}
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def _summary(cold: dict, warm: dict) -> dict:
    """Per mode: cold equal / traces / compiles / fallbacks, warm equal / traces; the case's verdict."""
    rows = {}
    for mode, c in cold.get("modes", {}).items():
        w = warm.get("modes", {}).get(mode, {})
        if "skipped" in c:
            rows[mode] = {"status": "skipped", "why": c["skipped"]}
            continue
        ok = c.get("equal") and w.get("equal") and not w.get("traces") and not w.get("compiles") \
            and not c.get("fallbacks") and not w.get("fallbacks") and "error" not in c and "error" not in w
        rows[mode] = {"status": "ok" if ok else "CHECK", "cold_equal": c.get("equal"), "cold_traces": c.get("traces"),
                      "cold_compiles": c.get("compiles"), "route": c.get("route"),
                      "fallbacks": c.get("fallbacks") or None, "warm_equal": w.get("equal"),
                      "warm_traces": w.get("traces"), "warm_compiles": w.get("compiles"),
                      "max_logit_diff": c.get("max_logit_diff"),
                      "error": c.get("error") or w.get("error")}
    return rows


def _cell(row: dict) -> str:
    if row["status"] == "skipped":
        return "skip"
    if row.get("error"):
        return "ERR"
    text = f"{'=' if row['cold_equal'] else 'NE'}{row['cold_traces']}"
    if row.get("fallbacks"):
        text += "F"
    if row["warm_traces"] or row["warm_compiles"] or not row["warm_equal"]:
        text += f"/w{row['warm_traces']}{'' if row['warm_equal'] else 'NE'}"
    return text


def print_table(results: dict) -> None:
    print("\ncell: '=' tokens equal eager (NE: not), then the traces of the cold process; F: a fallback; "
          "/wN: the warm process traced N (or NE: other tokens); ERR: crashed; skip: eager cannot")
    print(f"{'arch':<11}" + "".join(f"{m:>9}" for m in MODES) + "   ms/token eager compiled ratio")
    for arch, entry in results.items():
        summary = entry.get("summary", {})
        cells = "".join(f"{_cell(summary[m]) if m in summary else '-':>9}" for m in MODES)
        timing = entry.get("cold", {}).get("per_token_ms", {})
        t = f"{timing.get('eager', '-'):>9} {timing.get('compiled', '-'):>8} {timing.get('ratio', '-'):>5}" \
            if "eager" in timing else f"   {timing.get('error', '')[:40]}"
        err = entry.get("cold", {}).get("error") or entry.get("warm", {}).get("error") or ""
        print(f"{arch:<11}{cells}   {t} {err}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="*", default=list(ARCHS), help="architectures (default: all)")
    parser.add_argument("--modes", nargs="*", default=list(MODES), help="generate modes (default: all)")
    parser.add_argument("--out", default=str(RESULTS), help="results JSON (a partial run updates its archs)")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per process")
    parser.add_argument("--no-timing", action="store_true", help="skip the per-token decode timing")
    parser.add_argument("--recompile-limit", type=int, default=32,
                        help="AOTCACHE_RECOMPILE_LIMIT of the children (NOTE [The sweep's recompile limit]; 0: none)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="cold", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_arch(args.child, args.phase, args.modes, not args.no_timing)))
        return
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown architectures {unknown}; known: {', '.join(ARCHS)}")
    out = Path(args.out)
    results = {}
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as cache_dir:
            env = {**os.environ, "AOTCACHE_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": "1",
                   "AOTCACHE_RECOMPILE_LIMIT": str(args.recompile_limit)}
            # One string hash for the cold and the warm child, unless the caller chose one: a static cache's
            # mask dict follows it (NOTE [The sweep's hash seed] in bench/backend_sweep.py; docs/models.md, Gemma 2)
            env.setdefault("PYTHONHASHSEED", "0")
            cold = _child(arch, "cold", args.modes, not args.no_timing, env, args.timeout)
            warm = _child(arch, "warm", args.modes, False, env, args.timeout)
        results[arch] = {"cold": cold, "warm": warm, "summary": _summary(cold, warm),
                         "recompile_limit": args.recompile_limit, "hash_seed": env["PYTHONHASHSEED"]}
        print(f"{arch}: cold {cold.get('seconds')} s, warm {warm.get('seconds')} s "
              f"{json.dumps(results[arch]['summary'])}", flush=True)
    if out.exists():  # a partial run updates its architectures only
        results = {**json.loads(out.read_text()), **results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print_table({a: results[a] for a in ARCHS if a in results})


if __name__ == "__main__":
    main()
