"""The fallback chain of the named compilers (NOTE [compiler fallback]): a failing compiler never fails the job,
the fallback is counted and shown by ``aotcache stats``, strict mode raises, and a fallen-back result is never
stored under the key of the compiler asked for."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import aotcache
from aotcache import config, logs
from aotcache.autograd_cache.cache import AOTAutogradCache
from aotcache.compilers import fallback, inductor, nop
from aotcache.compilers.fallback import FallbackCompiler
from aotcache.store.journal import default_journal
from tests.conftest import run_python


def step(x, w):
    return (torch.tanh(x @ w) * 2).sum(dim=1)


def make_args():
    torch.manual_seed(0)
    return torch.randn(4, 3), torch.randn(3, 5, requires_grad=True)


def injected_failure(gm, example_inputs, **_unused):
    raise RuntimeError("injected lowering error: no such lowering")


injected_failure.decompositions = nop.decompositions  # the graph is traced as for nop: no Inductor import


@pytest.fixture
def failing_inductor(monkeypatch):
    """The ``inductor`` name resolves to a compiler that raises (looked up at each compile)."""
    monkeypatch.setattr(inductor, "inductor_compiler", injected_failure)


def fallback_reasons() -> dict:
    return default_journal().read().get(fallback.REASON_SECTION, {})


def run_and_compare(compiled_fn):
    x, w = make_args()
    got = compiled_fn(x, w)
    got.sum().backward()
    x2, w2 = make_args()
    want = step(x2, w2)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(w.grad, w2.grad)


def test_failing_compiler_falls_back_counted_and_not_stored(failing_inductor, caplog, monkeypatch):
    monkeypatch.setattr(logs, "_seen", set())  # log_once's memory of this process: start afresh
    cache = AOTAutogradCache()
    before = dict(fallback_reasons())
    compiled = aotcache.aot_function(step, fw_compiler="inductor", cache=cache)
    with caplog.at_level("WARNING", logger="aotcache"):
        run_and_compare(compiled)
    reasons = fallback_reasons()
    key = "inductor->nop: RuntimeError"
    assert reasons.get(key, 0) - before.get(key, 0) == 2  # forward and backward
    assert sum("injected lowering error" in record.getMessage() for record in caplog.records) == 1  # logged once
    runtime = next(iter(compiled._entries.values()))[0]
    assert runtime.forward.compiler_name == "nop" and runtime.forward.fallback_from == "inductor"
    # never stored under the key that names inductor: a process where inductor works must not reuse it
    assert cache.stats()["bypass_reasons"] == {"compiler fallback: inductor->nop": 1}
    assert cache.list_entries() == []


def test_strict_mode_raises_the_compiler_error(failing_inductor):
    with config.patch(strict=True):
        compiled = aotcache.aot_function(step, fw_compiler="inductor", cache=False)
        with pytest.raises(RuntimeError, match="injected lowering error"):
            compiled(*make_args())


def test_aotcache_stats_shows_compiler_fallbacks(failing_inductor):
    compiled = aotcache.aot_function(step, fw_compiler="inductor", cache=False)
    compiled(*make_args())
    default_journal().flush()
    from aotcache.cli import cli

    result = CliRunner().invoke(cli, ["--json", "stats"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)["autograd"]
    assert data["counters"]["compiler_fallback"] >= 1
    assert data["compiler_fallback_reasons"]["inductor->nop: RuntimeError"] >= 1
    shown = CliRunner().invoke(cli, ["stats"]).output
    assert "Compiler fallbacks" in shown and "inductor->nop: RuntimeError" in shown


def test_the_last_compiler_failing_is_raised(monkeypatch):
    monkeypatch.setattr(nop, "nop_compiler", injected_failure)
    with pytest.raises(RuntimeError, match="injected"):
        FallbackCompiler("nop")(torch.fx.symbolic_trace(lambda x: x + 1), [torch.randn(2)])


def test_a_working_compiler_is_not_marked():
    compiled = FallbackCompiler("nop")(torch.fx.symbolic_trace(lambda x: x + 1), [torch.randn(2)])
    assert fallback.fell_back(compiled) is None
    with pytest.raises(ValueError, match="unknown compiler"):
        FallbackCompiler("tvm")


@pytest.mark.slow
def test_no_cpp_toolchain_falls_back_to_nop_in_a_fresh_process(tmp_path):
    """CXX points nowhere: aoti and inductor cannot build C++, the job still runs (nop), with the counts."""
    code = f"""
import json, torch, aotcache
from aotcache.store.journal import default_journal
from aotcache.compilers import fallback
def step(x, w):
    return (torch.tanh(x @ w) * 2).sum(dim=1)
torch.manual_seed(0)
x, w = torch.randn(4, 3), torch.randn(3, 5, requires_grad=True)
out = aotcache.aot_function(step, fw_compiler="aoti")(x, w)
out.sum().backward()
w2 = w.detach().clone().requires_grad_()
want = step(x, w2); want.sum().backward()
torch.testing.assert_close(out, want); torch.testing.assert_close(w.grad, w2.grad)
print(json.dumps(default_journal().read().get(fallback.REASON_SECTION, {{}})))
"""
    proc = run_python(code, env={"CXX": "/nonexistent/c++", "CC": "/nonexistent/cc",
                                 "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
                                 "AOTCACHE_CACHE_DIR": str(tmp_path / "aotcache")})
    reasons = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sum(count for name, count in reasons.items() if name.startswith("aoti->inductor")) == 2, reasons
    assert sum(count for name, count in reasons.items() if name.startswith("inductor->nop")) == 2, reasons
    assert "the aoti compiler failed" in proc.stderr


def test_a_misspelled_inductor_option_is_an_error_naming_it_not_a_fallback(monkeypatch):
    """A bad option is the user's error: compiling with it raises at the first call, naming the option, and
    nothing falls back to nop (which would hide the typo behind a slower model)."""
    reached = []
    monkeypatch.setattr(inductor, "inductor_compiler", lambda *args, **kwargs: reached.append(1))
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    with pytest.raises(ValueError, match=r"unknown Inductor option\(s\) \['max_autotunee'\]"):
        FallbackCompiler("inductor", {"max_autotunee": True, "triton.cudagraphs": False})(gm, [torch.ones(2)])
    assert reached == [] and default_journal().read().get("autograd", {}).get("compiler_fallback", 0) == 0
    model = torch.nn.Linear(2, 2)
    compiled = aotcache.compile(model, compiler="inductor", options={"max_autotunee": True}, cache=False)
    with pytest.raises(ValueError, match="max_autotunee"):
        compiled(torch.ones(1, 2))
