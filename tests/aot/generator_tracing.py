"""The xfail mark of tests that need a torch able to trace a ``torch.Generator`` (NOTE [Generators in a traced
graph, torch 2.11] in aotcache/aot/generator_args.py)."""

from __future__ import annotations

import pytest

from aotcache.aot.generator_args import torch_traces_generators

# torch 2.11 cannot put a torch.Generator into a make_fx graph (it became an opaque reference type in 2.12): a
# call passing generator= falls back to torch.compile there, with eager's numbers. Tests asserting that such a
# call is captured whole (no fallback, one graph) fail on it; their eager comparisons still hold. Strict: a torch
# that traces generators must pass them.
needs_generator_tracing = pytest.mark.xfail(
    not torch_traces_generators(), strict=True,
    reason="this torch cannot trace a torch.Generator (torch 2.11; opaque reference type from 2.12): the call "
           "falls back to torch.compile, with eager's numbers")
