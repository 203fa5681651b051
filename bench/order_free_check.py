"""Cost of ``holds_order_free_argument`` (NOTE [Sets inside plain objects] in aotcache/aot/signature.py), the check
that keeps a call holding a ``set`` / ``dict_keys`` off Dynamo's way, for a few argument shapes.

``python bench/order_free_check.py [OTHER_SIGNATURE_PY]``: with a path to another version of signature.py (``git show
main:aotcache/aot/signature.py > /tmp/old.py``) both are timed, interleaved (best of 15 x 2000 calls), since a shared
machine's load changes between runs.
"""

from __future__ import annotations

import dataclasses
import sys
import timeit
import types

import torch

from aotcache.aot.signature import holds_order_free_argument


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    name: str
    sizes: list


def _cases() -> dict:
    x = torch.ones(2)
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(8)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"(x,)": (x,), "(model, opt, x)": (model, opt, x), "(x, list of 30 tensors)": (x, [x] * 30),
            "(dataclass of 5 fields,)": (Batch(x, x, x, "b", [1, 2, 3]),),
            "(object holding a 1000-entry dict, x)": (types.SimpleNamespace(vocab={str(i): i for i in range(1000)}), x)}


def main() -> None:
    checks = {"this": holds_order_free_argument}
    if len(sys.argv) > 1:
        other = types.ModuleType("other_signature")
        exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), other.__dict__)
        checks = {"other": other.holds_order_free_argument, **checks}
    for name, args in _cases().items():
        best = dict.fromkeys(checks, float("inf"))
        for _ in range(15):
            for label, check in checks.items():
                seconds = timeit.timeit(lambda: check(args, {}), number=2000)
                best[label] = min(best[label], seconds / 2000 * 1e6)
        print(f"{name:40s} " + "  ".join(f"{label} {us:8.2f} us" for label, us in best.items()))


if __name__ == "__main__":
    main()
