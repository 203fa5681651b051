"""The call fingerprint's view of Inductor's config (NOTE [Inductor config left set to its default]): an option
set back to its default, or AOTInductor's own machine metadata, changes nothing; a real change does."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from aotcache.aot.api import AOTOptions
from aotcache.autograd_cache.fingerprint import fingerprint_call


def double_sin(x):
    return (x * 2).sin()


def digest() -> str:
    flat, spec = pytree.tree_flatten(((torch.randn(4),), {}))
    fingerprint = fingerprint_call(double_sin, flat, spec, AOTOptions(fw_compiler="aoti"))
    assert fingerprint.trusted, fingerprint.reason
    return fingerprint.digest


def test_options_set_back_to_default_and_aoti_metadata_do_not_change_the_fingerprint():
    import torch._inductor.config as inductor_config

    before = digest()
    with inductor_config.patch(max_autotune=not inductor_config.max_autotune):
        assert digest() != before  # a real change counts
    assert digest() == before  # patched and restored: the value is the default again
    metadata = inductor_config.aot_inductor.metadata
    saved = dict(metadata)
    try:
        metadata.update({"AOTI_PLATFORM": "linux", "AOTI_CPU_ISA": "AVX2"})  # what an aoti compile leaves
        assert digest() == before
        metadata["user_key"] = "1"  # a user's metadata goes into the library: a change
        assert digest() != before
    finally:
        metadata.clear()
        metadata.update(saved)
