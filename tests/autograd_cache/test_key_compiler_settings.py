"""The key sees process-wide compiler settings as the call fingerprint does (NOTE [Global compiler settings in the
key]): a non-default ``torch._inductor.config`` value or a ``TORCHINDUCTOR_*`` variable is another key; an option
set back to its default, or a variable that only says where files go, is the same key."""

from __future__ import annotations

import json

import torch
import torch._inductor.config as inductor_config
from torch.fx.experimental.proxy_tensor import make_fx

from aotcache.autograd_cache.key import compute_key, explain_difference
from tests.conftest import run_python

SETTINGS = dict(compiler_name="inductor", partitioner_name="default_partition", decomposition_id="core_aten")


def key():
    def body(x):
        return (x * 2).sin()
    x = torch.randn(4)
    return compute_key(make_fx(body)(x), [x], **SETTINGS)


def test_a_global_inductor_setting_changes_the_key_and_one_set_back_to_its_default_does_not(monkeypatch):
    base = key()
    with inductor_config.patch({"fallback_random": not inductor_config.fallback_random}):
        changed = key()
    assert changed.digest != base.digest
    assert any("compiler" in line for line in explain_difference(base, changed))
    with inductor_config.patch({"fallback_random": inductor_config.fallback_random}):  # the default, set again
        assert key().digest == base.digest
    assert key().digest == base.digest  # left set to its default by patch's exit


def test_a_compile_variable_changes_the_key_and_a_location_variable_does_not(monkeypatch):
    base = key().digest
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/elsewhere")
    assert key().digest == base
    monkeypatch.setenv("TORCHINDUCTOR_EMULATE_PRECISION_CASTS", "1")
    assert key().digest != base


SCRIPT = """
import json, sys, torch
import aotcache
from aotcache.autograd_cache.cache import default_cache
if sys.argv[1] == "set":
    import torch._inductor.config as inductor_config
    inductor_config.fallback_random = True

def step(x):
    return (x * 2).sin() + 1

x = torch.randn(8, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = aotcache.compile(step, compiler="inductor")(x)
print(json.dumps({"same": torch.allclose(out, step(x)), **default_cache().counters}))
"""


def _process(*argv: str) -> dict:
    code = f"import sys; sys.argv = ['train', *{list(argv)!r}]; exec(compile({SCRIPT!r}, 'train', 'exec'))"
    return json.loads(run_python(code).stdout.strip().splitlines()[-1])


def test_a_global_inductor_setting_misses_in_the_next_process_and_the_same_setting_hits():
    # found: the fingerprint missed but the full key, blind to the setting, loaded the graph compiled without it
    cold = _process("none")
    changed = _process("set")
    again = _process("set")
    assert cold["same"] and changed["same"] and again["same"]
    assert changed.get("hit", 0) == 0 and changed["compile"] == 1, changed
    assert again["fingerprint_hit"] == 1 and again.get("compile", 0) == 0, again


NOP_SETTINGS = dict(compiler_name="nop", partitioner_name="default_partition", decomposition_id="compiler:nop",
                    compiler_options={"forward": "nop", "backward": "nop", "inference": "nop", "options": {}})


def nop_key(**settings):
    def body(x):
        return (x * 2).sin()
    x = torch.randn(4)
    return compute_key(make_fx(body)(x), [x], **{**NOP_SETTINGS, **settings})


def test_inductor_settings_leave_a_nop_compilers_key_alone_but_not_a_mixed_one(monkeypatch):
    # found in review: TORCHINDUCTOR_COMPILE_THREADS=1 in a warm process made every nop-compiled graph miss
    base = nop_key().digest
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    with inductor_config.patch({"fallback_random": not inductor_config.fallback_random}):
        assert nop_key().digest == base
        mixed = dict(NOP_SETTINGS["compiler_options"], backward="inductor")
        with_inductor_backward = nop_key(compiler_options=mixed).digest
    assert nop_key(compiler_options=mixed).digest != with_inductor_backward  # the backward reads Inductor's
    monkeypatch.setenv("TORCHDYNAMO_CAPTURE_SCALAR_OUTPUTS", "1")  # not Inductor's: still in the key
    assert nop_key().digest != base
