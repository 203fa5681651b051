"""NOTE [Item getters as values] (session 26 review): an ``operator.itemgetter`` a program holds is written down by
its items, so it no longer makes the call fingerprint untrusted; a different item is a different program."""

from __future__ import annotations

import json
import operator

import torch
from torch import nn

import aotcache
from aotcache.autograd_cache.fingerprint import code_fingerprint
from aotcache.autograd_cache.reachable import value_digest

try:  # tests/ is not a package: pytest puts it on sys.path and imports its conftest as `conftest`
    from conftest import run_python
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.conftest import run_python


class Picks(nn.Module):
    def __init__(self, *items):
        super().__init__()
        self.pick = operator.itemgetter(*items)

    def forward(self, x):
        return self.pick(x.unbind(0))


def test_item_getters_are_written_by_their_items():
    assert value_digest(operator.itemgetter(0)) == value_digest(operator.itemgetter(0))
    assert value_digest(operator.itemgetter(0)) != value_digest(operator.itemgetter(1))
    assert value_digest(operator.itemgetter(0, 1)) != value_digest(operator.itemgetter((0, 1)))
    assert value_digest(operator.itemgetter("a")) != value_digest(operator.itemgetter(0))


def test_a_module_holding_an_item_getter_has_a_trusted_fingerprint():
    first, same, other = code_fingerprint(Picks(0)), code_fingerprint(Picks(0)), code_fingerprint(Picks(1))
    assert first.trusted, first.reason  # was: "opaque object: operator.itemgetter"
    assert first.digest == same.digest and first.digest != other.digest


DIGEST = r"""
import json, operator
from aotcache.autograd_cache.reachable import value_digest
print(json.dumps([value_digest(operator.itemgetter("a", "b")), value_digest(operator.itemgetter(2))]))
"""


def test_item_getter_digests_agree_across_processes():
    runs = [json.loads(run_python(DIGEST, env={"PYTHONHASHSEED": seed}).stdout.strip().splitlines()[-1])
            for seed in ("1", "2")]
    assert runs[0] == runs[1]


def test_swapping_the_item_getter_gives_eagers_result():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    model = Picks(0)
    compiled = aotcache.compile(model, compiler="nop")
    torch.testing.assert_close(compiled(x), x[0])
    model.pick = operator.itemgetter(2)
    torch.testing.assert_close(compiled(x), x[2])
    torch.testing.assert_close(compiled(x), model(x))
