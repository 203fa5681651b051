"""The transformers architectures of ``bench/hf_sweep.py`` in training with ``dynamic=True``: two steps at two
sizes through ``aotcache.aot_module(model, "nop", dynamic=True)`` against eager, and how the capture traced.

    PYTHONPATH=$PWD python bench/hf_sweep_dynamic.py [--archs Bert,GPT2,...] [--label new] [--root DIR]

Each architecture runs in a fresh process (with a timeout) that imports the aotcache of ``--root`` (default: this
checkout; the process checks ``aotcache.__file__``), so one copy of this file measures another checkout too::

    python bench/hf_sweep_dynamic.py --root /path/to/other/checkout --label base

Per architecture: an eager model and a wrapped twin from the same seed; two AdamW steps, the first at batch 2 x
length 8, the second at batch 3 x length 12 (images: batch 2 then 3; audio: 400 then 480 samples), dropout seeded
alike. Recorded: the largest loss / logits / gradient / parameter differences (``train_ok`` with ``hf_sweep``'s
tolerances), ``compiles`` (graphs traced: the second size reuses the first's graph unless a guard fails), the
capture fallbacks, the traces the capture made (``traces``: per trace, whether it ran with functionalization --
``plain`` is the trace without it, NOTE [Symbolic trace without functionalization]; a checkout without that trace
records ``functional`` only), and the CPU seconds of the first (capturing) forward and of the first step, beside
eager's. Results go to ``--out`` under ``--label`` (one file holds several labels); with two labels the table
compares them (``--table`` prints it again).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULT = "RESULT "
SIZES = ((2, 8), (3, 12))  # (batch, length) of the two steps
OUTPUT_KEYS = ("logits", "logits_per_image", "last_hidden_state")


def dynamic_batch(kind: str, config: Any, step: int, distinct_labels: bool = False) -> dict:
    """Step ``step``'s inputs at ``SIZES[step]`` (``hf_sweep.batch``'s kinds). A causal LM's labels are its
    ``input_ids`` tensor (as transformers' examples pass them), or a copy with ``distinct_labels``."""
    import torch

    from hf_sweep import batch

    rows, length = SIZES[step]
    g = torch.Generator().manual_seed(step)
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 99)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    if kind in ("causal", "classify", "masked", "seq2seq"):
        labels = {"causal": ids.clone() if distinct_labels else ids,
                  "classify": torch.randint(0, getattr(config, "num_labels", 2), (rows,), generator=g),
                  "masked": ids.masked_fill(torch.rand(ids.shape, generator=g) < 0.5, -100),
                  "seq2seq": torch.randint(3, vocab, (rows, length // 2 + 1), generator=g)}[kind]
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    if kind in ("image", "clip"):
        size = config.vision_config.image_size if kind == "clip" else getattr(config, "image_size", 32)
        pixels = torch.randn(rows, getattr(config, "num_channels", 3), size, size, generator=g)
        if kind == "clip":
            return dict(input_ids=ids, pixel_values=pixels, return_loss=True)
        return dict(pixel_values=pixels, labels=torch.randint(0, config.num_labels, (rows,), generator=g))
    if kind == "whisper":  # the encoder's input length is fixed by the config: the batch and labels change
        features = torch.randn(rows, config.num_mel_bins, 2 * config.max_source_positions, generator=g)
        return dict(input_features=features, labels=torch.randint(3, vocab, (rows, length // 2 + 1), generator=g))
    if kind == "ctc":
        audio = torch.randn(rows, 400 + 80 * step, generator=g)
        return dict(input_values=audio, labels=torch.randint(1, vocab, (rows, 4), generator=g))
    return batch(kind, config, step)


def _main_output(out: Any) -> Any:
    for key in OUTPUT_KEYS:
        value = getattr(out, key, None)
        if value is not None:
            return value.detach().clone()
    return None


def train_steps(model: Any, forward: Any, batches: list, record: dict | None = None) -> list:
    """``hf_tiny.adamw_steps`` plus the main output (logits) per step; ``record`` gets the CPU seconds of the
    first forward and of the first step."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    steps = []
    for index, inputs in enumerate(batches):
        optimizer.zero_grad()
        started = time.process_time()
        out = forward(**inputs)
        forward_s = time.process_time() - started
        out.loss.backward()
        if record is not None and index == 0:
            record["first_forward_cpu_s"] = round(forward_s, 3)
            record["first_step_cpu_s"] = round(time.process_time() - started, 3)
        steps.append({"loss": out.loss.detach().clone(), "output": _main_output(out),
                      "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}})
        optimizer.step()
    return steps


class _TraceLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.retraces: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "tracing again with functionalization" in message:
            self.retraces.append(message[:300])


def watch_traces(traces: list) -> _TraceLog:
    """Appends ``"plain"`` / ``"functional"`` to ``traces`` per trace of the capture; returns a log handler that
    keeps the "tracing again with functionalization" lines."""
    capture = sys.modules["aotcache.aot.capture"]
    name = "_trace" if hasattr(capture, "_trace") else "trace"  # a checkout without the plain trace: trace
    inner = getattr(capture, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        traces.append("functional" if kwargs.get("functional", True) else "plain")
        return inner(*args, **kwargs)

    setattr(capture, name, counted)
    applies_name = "plain_trace_applies" if hasattr(capture, "plain_trace_applies") else "_plain_trace_applies"
    applies = getattr(capture, applies_name, None)
    if applies is not None:  # why a capture kept functionalization from the start
        def noted(analysis: Any, *args: Any, **kwargs: Any) -> Any:
            result = applies(analysis, *args, **kwargs)
            if not result:
                traces.append(f"not plain: {analysis.needs_functionalization or 'other condition'}")
            return result

        setattr(capture, applies_name, noted)
    handler = _TraceLog()
    logger = logging.getLogger("aotcache")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return handler


def run_arch(arch: str, root: str, distinct_labels: bool = False) -> dict:
    """One architecture in this process: the record (``error`` where something raised)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(1, HERE)
    import aotcache
    import aotcache.aot.capture  # noqa: F401 - watched below
    from aotcache.aot.fallback import fallback_counts
    from hf_sweep import ARCHS, base_arch, seed
    from hf_tiny import build, compare_steps, max_diff

    where = os.path.dirname(os.path.dirname(os.path.abspath(aotcache.__file__)))
    if os.path.realpath(where) != os.path.realpath(root):
        raise SystemExit(f"imported aotcache from {where}, not from --root {root}")
    head, kind = ARCHS[arch][:2]
    record: dict[str, Any] = {"arch": arch, "model": base_arch(arch) + head, "aotcache": aotcache.__file__}
    try:
        eager, model = build(base_arch(arch), head), build(base_arch(arch), head)
    except Exception as exc:  # noqa: BLE001 - an architecture that does not build is a result
        record["build_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return record
    traces: list[str] = []
    log = watch_traces(traces)
    wrapped = aotcache.aot_module(model, "nop", dynamic=True, cache=False)
    try:
        batches = [dynamic_batch(kind, model.config, step, distinct_labels) for step in range(len(SIZES))]
        seed(1)
        eager_cpu: dict = {}
        want = train_steps(eager, eager, batches, eager_cpu)
        seed(1)
        got = train_steps(model, wrapped, batches, record)
        record["eager_first_step_cpu_s"] = eager_cpu["first_step_cpu_s"]
        record.update(compare_steps(want, got, eager, model))
        record["output_diff"] = max((max_diff(g["output"], w["output"]) for w, g in zip(want, got)
                                     if w["output"] is not None), default=0.0)
        record["train_ok"] = (record["loss_diff"] < 1e-5 and record["grad_reldiff"] < 1e-4
                              and not record["grad_set_mismatch"] and record["param_diff"] < 1e-4
                              and record["output_diff"] < 1e-5)
    except Exception as exc:  # noqa: BLE001 - the sweep records every failure
        record["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
        record["traceback"] = traceback.format_exc()[-3000:]
    record["compiles"] = wrapped.compiled.num_compiles
    record["traces"] = traces
    record["retraces"] = log.retraces
    record["fallbacks"] = fallback_counts()
    return record


GENERATE_PROMPTS = (6, 9)  # prompt lengths of the two generate calls
GENERATE_NEW = 5


def run_generate(arch: str, root: str) -> dict:
    """``hf_generate_sweep``'s model ``arch``: greedy ``generate`` (DynamicCache) at two prompt lengths through
    ``aotcache.compile(model, compiler="nop", dynamic=True, cache=False)`` against eager: tokens and every step's
    logits, graphs traced, how the captures traced, CPU seconds of the first generate (eager's beside it)."""
    import torch
    import transformers

    torch.set_num_threads(1)
    sys.path.insert(1, HERE)
    transformers.logging.set_verbosity_error()
    import aotcache
    import aotcache.aot.capture  # noqa: F401 - watched below
    from aotcache.aot.fallback import fallback_counts
    from hf_generate_sweep import ARCHS as GENERATE_ARCHS
    from hf_generate_sweep import _build, _inputs

    head, kind = GENERATE_ARCHS[arch]
    record: dict[str, Any] = {"arch": arch, "aotcache": aotcache.__file__}
    traces: list[str] = []
    log = watch_traces(traces)
    eager = _build(arch, head)
    compiled = aotcache.compile(_build(arch, head), compiler="nop", dynamic=True, cache=False)
    kwargs = dict(max_new_tokens=GENERATE_NEW, min_new_tokens=GENERATE_NEW, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    record["equal"], record["logit_diff"] = [], 0.0
    try:
        for index, length in enumerate(GENERATE_PROMPTS):
            inputs = _inputs(kind, eager.config)
            if "input_ids" in inputs:
                inputs["input_ids"] = torch.randint(3, eager.config.vocab_size, (1, length),
                                                    generator=torch.Generator().manual_seed(length))
            with torch.no_grad():
                started = time.process_time()
                want = eager.generate(**inputs, **kwargs)
                eager_s = time.process_time() - started
                started = time.process_time()
                got = compiled.generate(**inputs, **kwargs)
                compiled_s = time.process_time() - started
            if index == 0:
                record["first_generate_cpu_s"], record["eager_generate_cpu_s"] = round(compiled_s, 3), round(eager_s, 3)
            record["equal"].append(bool(torch.equal(got.sequences, want.sequences)))
            record["logit_diff"] = max([record["logit_diff"]] + [float((a - b).abs().max())
                                                                   for a, b in zip(got.logits, want.logits)])
        record["ok"] = all(record["equal"]) and record["logit_diff"] < 1e-4
    except Exception as exc:  # noqa: BLE001 - the sweep records every failure
        record["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
        record["traceback"] = traceback.format_exc()[-3000:]
    record["route"] = compiled.route
    record["compiles"] = compiled.compiled.num_compiles if getattr(compiled, "compiled", None) is not None else None
    record["traces"] = traces
    record["retraces"] = log.retraces
    record["fallbacks"] = fallback_counts()
    return record


def _child(arch: str, root: str, timeout: float, distinct_labels: bool, generate: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", arch, "--root", root]
                              + ["--distinct-labels"] * distinct_labels + ["--generate"] * generate,
                              env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"arch": arch, "error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            record = json.loads(line[len(RESULT):])
            record["wall_s"] = round(time.perf_counter() - started, 1)
            return record
    return {"arch": arch, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}


def interleaved(archs: list, root: str, versus: str, rounds: int, distinct_labels: bool, generate: bool,
                timeout: float) -> dict:
    """Per architecture, ``rounds`` child runs of ``root`` and of ``versus`` alternating (ABBA...): the median CPU
    seconds of the first call of each and their ratio, side by side on the same machine load."""
    out = {}
    for arch in archs:
        seconds: dict[str, list] = {root: [], versus: []}
        for index in range(rounds):
            for which in (root, versus) if index % 2 == 0 else (versus, root):
                record = _child(arch, which, timeout, distinct_labels, generate)
                seconds[which].append(record.get(_cpu_key(record)))
        mine, theirs = (statistics.median(v) if None not in v else None for v in seconds.values())
        out[arch] = {"cpu_s": seconds[root], "versus_cpu_s": seconds[versus], "median": mine, "versus_median": theirs,
                     "ratio": round(mine / theirs, 3) if mine and theirs else None}
        print(arch, out[arch], flush=True)
    return out


def capture_kind(record: dict) -> str:
    """``plain`` (traced without functionalization), ``retraced`` (a plain trace, then one with it),
    ``functional`` (with it only), or ``-``."""
    traces = [t for t in record.get("traces") or [] if t in ("plain", "functional")]
    if "plain" in traces:
        return "retraced" if "functional" in traces else "plain"
    return "functional" if traces else "-"


def _ok(record: dict) -> str:
    if "build_error" in record:
        return "no build"
    if "error" in record:
        return "ERR"
    return "yes" if record.get("train_ok", record.get("ok")) else "NO"


def table(results: dict) -> list[list[str]]:
    labels = list(results)
    header = ["arch"]
    for label in labels:
        header += [f"{label} ok", f"{label} graphs", f"{label} capture", f"{label} fwd CPU s"]
    if len(labels) == 2:
        header += [f"CPU {labels[0]}/{labels[1]}", "same result"]
    rows = [header]
    names = list(dict.fromkeys(a for label in labels for a in results[label]))
    for arch in names:
        row = [arch]
        recs = [results[label].get(arch, {}) for label in labels]
        for rec in recs:
            fallbacks = ",".join(rec.get("fallbacks") or {})
            row += [_ok(rec) + (f" ({fallbacks})" if fallbacks else ""), str(rec.get("compiles", "-")),
                    capture_kind(rec), str(rec.get(_cpu_key(rec), "-"))]
        if len(labels) == 2:
            a, b = (rec.get(_cpu_key(rec)) for rec in recs)
            row.append(f"{a / b:.2f}" if a and b else "-")
            row.append("yes" if _same(*recs) else "NO")
        rows.append(row)
    return rows


def _cpu_key(record: dict) -> str:
    return "first_generate_cpu_s" if "first_generate_cpu_s" in record else "first_forward_cpu_s"


def _same(a: dict, b: dict) -> bool:
    keys = ("loss_diff", "grad_reldiff", "param_diff", "output_diff", "train_ok", "compiles", "error",
            "build_error", "grad_set_mismatch", "ok", "equal", "logit_diff")
    return all(a.get(k) == b.get(k) for k in keys) and (a.get("fallbacks") or {}) == (b.get("fallbacks") or {})


def summary(results: dict) -> dict:
    """Per label: models run, train_ok count, capture kinds; with two labels the median CPU ratio."""
    out: dict[str, Any] = {}
    for label, recs in results.items():
        ran = [r for r in recs.values() if "build_error" not in r]
        kinds = [capture_kind(r) for r in ran]
        out[label] = {"models": len(ran), "train_ok": sum(bool(r.get("train_ok", r.get("ok"))) for r in ran),
                      "errors": sum("error" in r for r in ran),
                      "one_graph": sum(r.get("compiles") == 1 for r in ran),
                      "capture": {k: kinds.count(k) for k in sorted(set(kinds))}}
    if len(results) == 2:
        first, second = results.values()
        def ratio(arch: str) -> float | None:
            a, b = first[arch].get(_cpu_key(first[arch])), second.get(arch, {}).get(_cpu_key(first[arch]))
            return a / b if a and b else None

        ratios = [r for r in map(ratio, first) if r is not None]
        plain = [r for a in first if capture_kind(first[a]) == "plain" and (r := ratio(a)) is not None]
        out["cpu_ratio_median"] = round(statistics.median(ratios), 3) if ratios else None
        out["cpu_ratio_median_plain"] = round(statistics.median(plain), 3) if plain else None
        out["same_result"] = sum(_same(first[a], second[a]) for a in first if a in second)
        out["compared"] = sum(a in second for a in first)
    return out


def print_table(results: dict) -> None:
    rows = table(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(r, widths)))
    print(json.dumps(summary(results), indent=1))


def main() -> None:
    from hf_sweep import ARCHS, CAUSAL, EXTRA_CAUSAL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures (default: all; "
                        "'causal': the causal LMs)")
    parser.add_argument("--root", default=REPO, help="the checkout whose aotcache runs (default: this one)")
    parser.add_argument("--label", default="new", help="the key of this run's records in --out")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "hf_sweep_dynamic.json"))
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--distinct-labels", action="store_true",
                        help="a causal LM's labels are a copy of input_ids, not the same tensor (one tensor in two "
                        "argument slots keeps functionalization)")
    parser.add_argument("--generate", action="store_true",
                        help="greedy generate at two prompt lengths (hf_generate_sweep's models) instead of training")
    parser.add_argument("--versus", help="another checkout: --rounds alternating runs of both per architecture "
                        "(CPU seconds of the first call side by side), stored under 'interleaved' in --out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child")
    args = parser.parse_args()
    root = os.path.abspath(args.root)
    if args.child:
        run = run_generate(args.child, root) if args.generate else run_arch(args.child, root, args.distinct_labels)
        print(RESULT + json.dumps(run, default=str), flush=True)
        return
    data: dict[str, Any] = {"results": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            data = json.load(f)
    if args.table:
        print_table(data["results"])
        return
    import torch
    import transformers

    data.update(torch=torch.__version__, transformers=transformers.__version__, compiler="nop", device="cpu",
                sizes=SIZES)
    archs = ",".join(CAUSAL + EXTRA_CAUSAL + ["GPT2"]) if args.archs == "causal" else args.archs
    if args.versus:
        versus = os.path.abspath(args.versus)
        data.setdefault("interleaved", {}).update(interleaved(
            archs.split(","), root, versus, args.rounds, args.distinct_labels, args.generate, args.timeout))
        data["interleaved_roots"] = [root, versus]
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1, default=str)
        return
    results = data["results"].setdefault(args.label, {})
    data.setdefault("roots", {})[args.label] = root
    for arch in archs.split(","):
        if arch not in ARCHS and not args.generate:
            raise SystemExit(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
        record = _child(arch, root, args.timeout, args.distinct_labels, args.generate)
        results[arch] = record
        print(arch, _ok(record), record.get("compiles"), capture_kind(record), record.get(_cpu_key(record)),
              record.get("error", "")[:120], flush=True)
        data["summary"] = summary(data["results"])
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1, default=str)
    print_table(data["results"])


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
