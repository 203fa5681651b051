"""PyTorch's own test data through aotcache: OpInfo ops and ModuleInfo modules, compared with eager.

* OpInfo (``op_db``): every differentiable op with float32 on CPU (the ops of ``tests/aot/test_opinfo.py``
  that support autograd: 540 with torch 2.13), its first two float32 CPU samples, forward and backward
  through ``aot_function`` with the nop compiler, compared with eager by ``tests/aot/verify.py``; an op
  passes when both samples do.
* ModuleInfo (``module_db``): every module with float32 on CPU, training mode, each of its module inputs
  (constructor and forward arguments), two steps through ``aot_module`` with the nop compiler: outputs,
  parameter gradients and buffers compared with eager; a module passes when all its inputs do.

Each passing case is also classified by how aotcache ran it: ``compiled`` (one captured graph), ``partial``
(capture failed; torch.compile graph breaks with aotcache compiling the regions) or ``eager`` (capture
failed; ran as written): see NOTE [Capture fallback] in aotcache/aot/fallback.py. Writes
``bench/results/opinfo.json`` and prints a summary table::

    python bench/opinfo_sweep.py                  # ops and modules (~10 minutes on 2 shared cores)
    python bench/opinfo_sweep.py --only modules --api pytorch   # PyTorch's functorch.compile as reference
    python bench/opinfo_sweep.py --ops nonzero,cov --verbose
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tests.aot.test_opinfo import OPINFO_ATOL, OPINFO_RNG_SEED, OPINFO_RTOL, OPS, function_of_tensors  # noqa: E402
from tests.aot.verify import pytorch_api, verify  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "opinfo.json"


def _how(compiled: Any) -> str:
    """How aotcache ran the (last) signature of ``compiled``: compiled, partial or eager."""
    from aotcache.aot.api import AOTModule
    from aotcache.aot.fallback import EagerRuntime, PartialRuntime

    function = compiled.compiled if isinstance(compiled, AOTModule) else compiled
    entries = [runtime for runtimes in getattr(function, "_entries", {}).values() for runtime in runtimes]
    if not entries:
        return "eager"  # a lazy module still materializing, or a call without a signature (sparse)
    kinds = {"partial" if isinstance(r, PartialRuntime) and not r.broken else
             "eager" if isinstance(r, (EagerRuntime, PartialRuntime)) else "compiled" for r in entries}
    return "eager" if "eager" in kinds else "partial" if "partial" in kinds else "compiled"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def sweep_ops(names: list[str], api: Any, samples_per_op: int, verbose: bool) -> dict[str, Any]:
    results = {}
    for name in names:
        op = OPS[name]
        outcome: dict[str, Any] = {"passed": True, "how": []}
        try:
            samples = op.sample_inputs("cpu", torch.float32, requires_grad=op.supports_autograd)
            for index, sample in enumerate(samples):
                if index >= samples_per_op:
                    break
                fn, tensors = function_of_tensors(op, sample)
                report = verify(fn, tensors, compiler="nop", train=op.supports_autograd, steps=1,
                                atol=OPINFO_ATOL, rtol=OPINFO_RTOL, api=api, rng_seed=OPINFO_RNG_SEED,
                                check_compiled=False)
                outcome["how"].append(_how(report.compiled))
        except Exception as exc:  # noqa: BLE001 -- a sweep records every failure and goes on
            outcome = {"passed": False, "error": _first_line(exc), "how": outcome["how"]}
            if verbose:
                traceback.print_exc()
        results[name] = outcome
        if verbose:
            print(name, outcome, flush=True)
    return results


class _WithKwargs(nn.Module):
    """A module called with fixed keyword arguments (verify passes positional inputs only)."""

    def __init__(self, inner: nn.Module, kwargs: dict) -> None:
        super().__init__()
        self.inner = inner
        self.kwargs = kwargs

    def forward(self, *args: Any) -> Any:
        return self.inner(*args, **self.kwargs)


def module_cases() -> dict[str, Any]:
    from torch.testing._internal.common_modules import module_db

    cases = {}
    for info in module_db:
        if torch.float32 not in info.dtypes:
            continue
        name = f"{info.name}.{info.variant_name}" if getattr(info, "variant_name", "") else info.name
        cases[name] = info
    return cases


def sweep_modules(cases: dict[str, Any], names: list[str], api: Any, verbose: bool) -> dict[str, Any]:
    results = {}
    for name in names:
        info = cases[name]
        outcome: dict[str, Any] = {"passed": True, "how": []}
        try:
            inputs = info.module_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=True,
                                             training=True)
            for index, sample in enumerate(inputs):
                if sample.forward_input is None:
                    continue
                torch.manual_seed(0)
                module = info.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
                module = module.to(torch.float32).train()
                args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
                with contextlib.suppress(TypeError, ValueError):  # keyword tensors become positional inputs
                    bound = inspect.signature(module.forward).bind(*args, **kwargs)
                    args, kwargs = bound.args, bound.kwargs
                if kwargs:
                    module = _WithKwargs(module, dict(kwargs))
                report = verify(module, list(args), compiler="nop", train=True, steps=2, atol=1e-4, rtol=1e-4,
                                api=api, rng_seed=OPINFO_RNG_SEED, check_compiled=False)
                outcome["how"].append(_how(report.compiled))
        except Exception as exc:  # noqa: BLE001
            outcome = {"passed": False, "error": f"input {index}: {_first_line(exc)}", "how": outcome["how"]}
            if verbose:
                traceback.print_exc()
        results[name] = outcome
        if verbose:
            print(name, outcome, flush=True)
    return results


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    passed = [name for name, r in results.items() if r["passed"]]
    how = collections.Counter()
    for name in passed:
        kinds = set(results[name].get("how") or ["compiled"])
        how["eager" if "eager" in kinds else "partial" if "partial" in kinds else "compiled"] += 1
    return {"total": len(results), "passed": len(passed), "by_how": dict(how),
            "failed": sorted(name for name, r in results.items() if not r["passed"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["ops", "modules"], default=None)
    parser.add_argument("--ops", default="", help="comma-separated op ids (default: all)")
    parser.add_argument("--modules", default="", help="comma-separated module names (default: all)")
    parser.add_argument("--samples", type=int, default=2, help="samples per op (default 2)")
    parser.add_argument("--api", choices=["aotcache", "pytorch"], default="aotcache")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--verbose", action="store_true")
    options = parser.parse_args()
    logging.getLogger("aotcache").setLevel(logging.ERROR)  # one fallback warning per op is noise here
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    api = pytorch_api() if options.api == "pytorch" else None
    out: dict[str, Any] = {"meta": {"torch": torch.__version__, "api": options.api, "compiler": "nop",
                                    "samples_per_op": options.samples, "date": time.strftime("%Y-%m-%d %H:%M")}}
    started = time.perf_counter()
    if options.only in (None, "ops"):
        names = [n for n in options.ops.split(",") if n] or sorted(n for n, op in OPS.items() if op.supports_autograd)
        with contextlib.redirect_stderr(sys.stdout if options.verbose else open("/dev/null", "w")):
            ops = sweep_ops(names, api, options.samples, options.verbose)
        out["ops"] = {"summary": _summary(ops), "results": ops}
    if options.only in (None, "modules"):
        cases = module_cases()
        names = [n for n in options.modules.split(",") if n] or sorted(cases)
        with contextlib.redirect_stderr(sys.stdout if options.verbose else open("/dev/null", "w")):
            modules = sweep_modules(cases, names, api, options.verbose)
        out["modules"] = {"summary": _summary(modules), "results": modules}
    out["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    path = Path(options.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if options.only is not None and path.exists():  # keep the other sweep's results from an earlier run
        previous = json.loads(path.read_text())
        kept = "modules" if options.only == "ops" else "ops"
        if kept in previous:
            out[kept] = previous[kept]
            out["meta"][f"{kept}_meta"] = previous.get("meta", {})
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{'sweep':<10}{'passed':>8}{'total':>7}{'compiled':>10}{'partial':>9}{'eager':>7}")
    for kind in ("ops", "modules"):
        if kind in out:
            s = out[kind]["summary"]
            by = s["by_how"]
            print(f"{kind:<10}{s['passed']:>8}{s['total']:>7}{by.get('compiled', 0):>10}{by.get('partial', 0):>9}"
                  f"{by.get('eager', 0):>7}")
            for name in s["failed"]:
                print(f"  FAIL {name}: {out[kind]['results'][name].get('error', '')[:160]}")
    print(f"wrote {path} ({out['meta']['seconds']} s)")


if __name__ == "__main__":
    main()
