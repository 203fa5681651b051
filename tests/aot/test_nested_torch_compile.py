"""A ``torch.compile``-d callable called inside a forward that ``aotcache.compile`` captures runs its Python and is
captured with the call, as torch's own tracers do, instead of being compiled by Dynamo on the capture's fake
tensors (NOTE [torch.compile-d callables inside a capture] in aot/dynamo_compile.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import aotcache
from aotcache.aot.dynamo_compile import stance_forces_eager

# NOTE: a capture used to set Dynamo's stance "force_eager" so these callables ran their Python; that broke
# torch.cond inside a capture (torch's cond compiles its branches with Dynamo: under force_eager its eager
# autograd path fails in torch, "object of type 'bool' has no len()") and changed other threads'
# torch.compile (session 25, found by the final CI), so it was taken out: a known gap.
_NESTED_GAP = pytest.mark.xfail(strict=True, reason=(
    "known gap: a torch.compile-d callable inside a captured forward is compiled by Dynamo on the capture's "
    "fake tensors (Llama + flex_attention generate through aotcache.compile segfaults); the stance-based fix "
    "broke torch.cond inside a capture and was taken out"))


def _scaled_rows(row_fn, n):
    return row_fn(torch.arange(n, dtype=torch.float32))


class RecordingBackend:
    """A Dynamo backend that notes the kinds of the example inputs of every graph it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, gm, example_inputs):
        self.calls.append([type(t).__name__ for t in example_inputs])
        return gm.forward


class CompilesInside(torch.nn.Module):
    """Calls a torch.compile-d helper made in the forward, whose tensors come from a closure (as transformers'
    flex_attention mask: ``torch.compile(create_block_mask)(mask_mod, ...)``)."""

    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)
        self.backend = backend

    def forward(self, x):
        y = self.lin(x)
        rows = torch.compile(_scaled_rows, backend=self.backend)(lambda r: r[None, :] + y, 4)
        return (rows * 2).sum()


@_NESTED_GAP
def test_a_torch_compiled_helper_inside_a_captured_forward_is_captured_not_compiled_on_fake_tensors():
    """Found: Dynamo compiled the helper during the capture, on the capture's FunctionalTensors (and Inductor's
    kernels then read the fake tensors' memory: Llama + flex_attention ended the process in a segmentation fault).
    Now the helper runs as Python inside the capture: the backend sees no graph, the call is captured whole."""
    backend = RecordingBackend()
    model = CompilesInside(backend)
    x = torch.randn(3, 4)
    wrapped = aotcache.compile(model, compiler="nop")
    out = wrapped(x)
    assert backend.calls == []  # nothing compiled by Dynamo while aotcache captured
    assert wrapped.route == "aot"
    assert torch.equal(out.detach(), model(x).detach())
    out.backward()
    grad = model.lin.weight.grad.clone()
    model.zero_grad()
    model(x).backward()
    torch.testing.assert_close(grad, model.lin.weight.grad, rtol=0, atol=0)


def test_the_callers_stance_is_kept_and_restored_around_a_capture():
    """A capture under the caller's own stance captures and leaves the caller's stance as it was."""
    backend = RecordingBackend()
    with torch.compiler.set_stance("eager_on_recompile"):
        model = CompilesInside(backend)
        wrapped = aotcache.compile(model, compiler="nop")
        out = wrapped(torch.ones(3, 4))
        assert torch._dynamo.eval_frame._stance.stance == "eager_on_recompile"
    assert torch._dynamo.eval_frame._stance.stance == "default"
    assert wrapped.route == "aot" and backend.calls == []
    assert torch.equal(out.detach(), model(torch.ones(3, 4)).detach())


def test_the_callers_force_eager_stance_still_runs_aotcache_compile_eagerly():
    """The other direction: a caller's ``set_stance("force_eager")`` still runs the wrapper as written."""
    backend = RecordingBackend()
    model = CompilesInside(backend)
    wrapped = aotcache.compile(model, compiler="nop")
    with torch.compiler.set_stance("force_eager"):
        assert stance_forces_eager()
        out = wrapped(torch.ones(3, 4))
    assert not stance_forces_eager()
    assert backend.calls == [] and wrapped.route is None  # run as written: nothing captured, nothing compiled
    assert torch.equal(out.detach(), model(torch.ones(3, 4)).detach())


_FLEX_GENERATE_SCRIPT = r"""
import torch, aotcache
from tests.aot.tiny_transformers import tiny_llama

def greedy(model):
    ids = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)

want_tokens, want_logits = greedy(tiny_llama())
flex = tiny_llama()
flex.config._attn_implementation = "flex_attention"
tokens, logits = greedy(aotcache.compile(flex, compiler="nop"))
assert torch.equal(tokens, want_tokens), (tokens, want_tokens)
torch.testing.assert_close(logits, want_logits)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "known gap (see _NESTED_GAP): Inductor's kernels read the capture's fake tensors; whether that ends in a "
    "segmentation fault depends on the memory read, so not strict"))
def test_llama_flex_attention_generate_through_aotcache_compile_equals_eager_attention(tmp_path):
    """The bug as found: Llama with ``attn_implementation="flex_attention"`` (its mask built by
    ``torch.compile(create_block_mask)`` inside the forward), greedy ``generate`` through ``aotcache.compile``
    ended the process with a segmentation fault. Now its tokens and logits are eager attention's. A fresh
    process, as the failure was a crash."""
    env = {**os.environ, "AOTCACHE_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _FLEX_GENERATE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=550)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout
