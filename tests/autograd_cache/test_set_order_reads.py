"""A set's iteration order is part of the program only where the walked code can observe it (NOTE [Sets in their
iteration order] in autograd_cache/set_orders.py, NOTE [Names whose order the code can observe] in code_reading.py).

In-process, ``{0, 8}`` and ``{8, 0}`` (colliding hashes: they iterate in the order they were added) stand for two
processes' orders of a set of str; the cross-process tests run real subprocesses under two hash seeds sharing a
cache directory. Both directions each: a set the code iterates (or may iterate) is another fingerprint, another
graph in-process, and every process gets its own eager result; a set no code reads, or reads only with ``in``,
``sorted``, ``len``, a truth test or a comparison, keeps one fingerprint (a warm start with no trace) and one graph.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import aotcache
from tests.autograd_cache.test_fingerprint import function_fingerprint, module_fingerprint
from tests.conftest import run_python

X = torch.ones(2, 3)


def _zero_first():
    return {0, 8}


def _eight_first():
    shifts = set()
    shifts.add(8)
    shifts.add(0)
    assert list(shifts) == [8, 0] and list(_zero_first()) == [0, 8]
    return shifts


class Holder(nn.Module):
    """A module holding a set under ``self.shifts`` (and an unused one); ``forward`` reads it as a test asks."""

    def __init__(self, shifts, read):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.shifts = shifts
        self.unused = frozenset(shifts)
        self.read = read

    def forward(self, x):
        return self.read(self, self.linear(x))


def read_in(self, x):
    return x + 1.0 if 8 in self.shifts else x


def read_sorted_and_len(self, x):
    for shift in sorted(self.shifts):
        x = x * 0.5 + shift
    return x * len(self.shifts) if self.shifts else x


def read_loop(self, x):
    for shift in self.shifts:
        x = x * 0.5 + shift
    return x


def read_list_to_torch(self, x):
    return x * torch.tensor(list(self.shifts), dtype=x.dtype)[0]


def read_comprehension(self, x):
    return torch.stack([x * shift for shift in self.shifts]).sum(0) + torch.stack([x + s for s in self.shifts])[0]


def read_by_computed_name(self, x):
    name = "".join(("shif", "ts"))
    return read_loop_of(getattr(self, name), x)


def read_through_vars(self, x):
    return read_loop_of(vars(self)["shifts"], x)


def read_through_dict(self, x):
    return read_loop_of(self.__dict__["shifts"], x)


def read_by_getattr_static(self, x):
    import inspect

    return read_loop_of(inspect.getattr_static(self, "".join(("shif", "ts"))), x)


def read_loop_of(shifts, x):
    for shift in shifts:
        x = x * 0.5 + shift
    return x


def read_iterated_elsewhere(self, x):
    return helper_iterating(self, x)


def helper_iterating(holder, x):
    return read_loop_of(holder.shifts, x) if holder.shifts else x


def _digests(read):
    return [module_fingerprint(Holder(shifts, read), X) for shifts in (_zero_first(), _eight_first())]


@pytest.mark.parametrize("read", [read_in, read_sorted_and_len])
def test_a_set_read_only_in_an_order_free_way_keeps_one_fingerprint(read):
    first, second = _digests(read)
    assert first.trusted and second.trusted, (first.reason, second.reason)
    assert first.digest == second.digest  # was another fingerprint per order (a trace per process for str sets)


@pytest.mark.parametrize("read", [read_loop, read_list_to_torch, read_comprehension, read_by_computed_name,
                                  read_through_vars, read_through_dict, read_iterated_elsewhere,
                                  read_by_getattr_static])
def test_a_set_the_code_may_iterate_is_another_fingerprint_in_another_order(read):
    first, second = _digests(read)
    if read is read_through_dict:  # ``self.__dict__`` reads a class's descriptor: untrusted, the full key decides
        assert not first.trusted and not second.trusted
        return
    assert first.trusted and second.trusted, (first.reason, second.reason)
    assert first.digest != second.digest


def test_sets_inside_containers_count_under_the_name_holding_the_container():
    def loop_over_groups(self, x):
        for group in self.groups:
            x = read_loop_of(group, x)
        return x

    def digest(shifts, read, holder_name="groups"):
        model = Holder(set(), read)
        setattr(model, holder_name, [frozenset(shifts), {"nested": (shifts,)}])
        return module_fingerprint(model, X).digest

    zero, eight = frozenset(_zero_first()), frozenset(_eight_first())
    assert list(zero) != list(eight)
    assert digest(zero, loop_over_groups) != digest(eight, loop_over_groups)
    assert digest(zero, read_in, "elsewhere") == digest(eight, read_in, "elsewhere")  # no code reads "elsewhere"


class Tagged(nn.Module):
    """A set held by a library's object (``nn.Identity``)."""

    def __init__(self, shifts):
        super().__init__()
        self.inner = nn.Identity()
        self.inner.shifts = shifts

    def forward(self, x):
        return read_loop_of(self.inner.shifts, self.inner(x))


def test_a_set_on_a_library_object_the_code_iterates_is_another_fingerprint():
    first, second = (module_fingerprint(Tagged(shifts), X) for shifts in (_zero_first(), _eight_first()))
    assert first.trusted and second.trusted, (first.reason, second.reason)
    assert first.digest != second.digest  # a library object's set was written sorted: a false hit across seeds


CONSTANTS = [torch.ones(3)]


def tags_loop(x):
    for constant in CONSTANTS:  # reaches ``tags`` under no name of its holder
        x = read_loop_of(constant.tags, x * constant)
    return x


def tags_in(x):
    return x + 1.0 if 8 in CONSTANTS[0].tags else x


@pytest.mark.parametrize("fn, same", [(tags_in, True), (tags_loop, False)])
def test_a_set_a_tensor_holds_as_an_attribute_counts_under_the_attributes_name(fn, same):
    try:
        CONSTANTS[0].tags = _zero_first()
        first = function_fingerprint(fn, X)
        CONSTANTS[0].tags = _eight_first()
        second = function_fingerprint(fn, X)
    finally:
        del CONSTANTS[0].tags
    assert first.trusted and second.trusted, (first.reason, second.reason)
    assert (first.digest == second.digest) is same


class ClassLevel(nn.Module):
    SHIFTS = {0, 8}

    def forward(self, x):
        for shift in self.SHIFTS:
            x = x * 0.5 + shift
        return x


def test_a_class_level_set_the_forward_iterates_is_another_fingerprint():
    first = module_fingerprint(ClassLevel(), X)
    try:
        ClassLevel.SHIFTS = _eight_first()
        second = module_fingerprint(ClassLevel(), X)
    finally:
        ClassLevel.SHIFTS = _zero_first()
    assert first.trusted and second.trusted, (first.reason, second.reason)
    assert first.digest != second.digest  # the class's token was written with the order left out


LOOKUP = {0, 8}


def global_in(x):
    return x + 1.0 if 8 in LOOKUP else x


def global_loop(x):
    for shift in LOOKUP:
        x = x * 0.5 + shift
    return x


@pytest.mark.parametrize("fn, same", [(global_in, True), (global_loop, False)])
def test_a_global_set_counts_by_how_the_code_reads_it(fn, same):
    global LOOKUP
    try:
        first = function_fingerprint(fn, X)
        LOOKUP = _eight_first()
        second = function_fingerprint(fn, X)
    finally:
        LOOKUP = _zero_first()
    assert first.trusted and second.trusted
    assert (first.digest == second.digest) is same


def _from_source(text: str):
    namespace: dict = {}
    exec(compile(text, "<set-order-test>", "exec"), namespace)  # noqa: S102 - the test's own source
    return namespace["f"]


def test_a_loop_over_a_set_display_is_another_code_digest_in_another_order():
    # ``for s in {8, 0}`` compiles to a frozenset constant iterating 8, 0: a code constant written sorted
    loop_zero = _from_source("def f(x):\n    for s in {0, 8}:\n        x = x * 0.5 + s\n    return x\n")
    loop_eight = _from_source("def f(x):\n    for s in {8, 0}:\n        x = x * 0.5 + s\n    return x\n")
    test_zero = _from_source("def f(x):\n    return x + 1.0 if 8 in {0, 8} else x\n")
    test_eight = _from_source("def f(x):\n    return x + 1.0 if 8 in {8, 0} else x\n")
    assert not torch.equal(loop_zero(X), loop_eight(X))
    assert function_fingerprint(loop_zero, X).digest != function_fingerprint(loop_eight, X).digest
    assert function_fingerprint(test_zero, X).digest == function_fingerprint(test_eight, X).digest


@dataclasses.dataclass
class Settings:
    shifts: set


def test_a_dataclass_read_by_asdict_writes_its_sets_order():
    def by_asdict(self, x):
        return read_loop_of(dataclasses.asdict(self.settings)["".join(("shif", "ts"))], x)

    def digest(shifts):
        model = Holder(set(), by_asdict)
        model.settings = Settings(shifts)
        return module_fingerprint(model, X).digest

    assert digest(_zero_first()) != digest(_eight_first())


# -- in-process: a set refilled in another order --------------------------------------------------------------


def _refill(target: set, items) -> None:
    target.clear()
    for item in items:
        target.add(item)


@pytest.mark.parametrize("route", ["compile", "aot_module"])
@pytest.mark.parametrize("read, retraces", [(read_in, False), (read_sorted_and_len, False), (read_loop, True),
                                            (read_comprehension, True)])
def test_a_set_refilled_in_another_order_retraces_only_where_the_code_iterates_it(route, read, retraces):
    model, eager = Holder({0, 8}, read), Holder({0, 8}, read)
    eager.load_state_dict(model.state_dict())
    compiled = (aotcache.compile(model, compiler="nop", cache=False) if route == "compile"
                else aotcache.aot_module(model, "nop", cache=False))
    assert torch.equal(compiled(X), eager(X))
    for holder in (model, eager):
        _refill(holder.shifts, [8, 0])
    assert list(model.shifts) == [8, 0]
    assert torch.equal(compiled(X), eager(X))
    assert compiled.compiled.num_compiles == (2 if retraces else 1)


# -- across processes: two hash seeds sharing a cache directory ------------------------------------------------

# argv[1]: how the forward reads its set of str; prints the compiled and eager results' equality and the counters
SEED_SCRIPT = r"""
import json, sys, torch
from torch import nn
import aotcache
from aotcache.autograd_cache.cache import default_cache

NAMES = {"alpha", "beta", "gamma", "delta", "eps", "zeta"}
WEIGHTS = {"alpha": 1.0, "beta": 2.0, "gamma": 3.0, "delta": 4.0, "eps": 5.0, "zeta": 6.0,
           "k1": 7.0, "k2": 8.0, "k3": 9.0, "k4": 10.0}
read = sys.argv[1]


class Model(nn.Module):
    KINDS = frozenset({"k1", "k2", "k3", "k4"})

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 3)
        self.skip = {"alpha", "gamma", "zeta", "omega"}
        self.unused = frozenset({"u1", "u2", "u3", "u4", "u5"})
        self.names = set(NAMES)

    def forward(self, x):
        return step(self, self.linear(x))


# each way of reading defined alone: the walk sees only the code the forward reaches
if read == "unread":
    def step(self, x):
        return x * 2.0 if "alpha" in self.skip and len(self.skip) == 4 and "k1" in self.KINDS else x
elif read == "loop":
    def step(self, x):
        for name in self.names:
            x = x * 0.5 + WEIGHTS[name]
        return x
elif read == "class-loop":
    def step(self, x):
        for kind in self.KINDS:
            x = x * 0.5 + WEIGHTS[kind]
        return x
elif read == "display":
    def step(self, x):
        for name in {"alpha", "beta", "gamma", "delta", "eps", "zeta"}:
            x = x * 0.5 + WEIGHTS[name]
        return x
else:
    def step(self, x):
        return torch.cat([x * WEIGHTS[name] for name in self.names], dim=-1)


model = Model()
x = torch.ones(2, 3)
compiled = aotcache.compile(model, compiler="nop")
counters = default_cache().counters
print(json.dumps({"equal": torch.equal(compiled(x), model(x)), "order": list(model.names) + list(Model.KINDS),
                  "fingerprint_hit": counters.get("fingerprint_hit", 0), **default_cache().stats()}))
"""


def _seeded(read: str, seed: str, cache_dir) -> dict:
    env = {"PYTHONHASHSEED": seed, "AOTCACHE_CACHE_DIR": str(cache_dir)}
    code = f"import sys; sys.argv = ['seeded', {read!r}]\n" + SEED_SCRIPT
    return json.loads(run_python(code, env=env).stdout.strip().splitlines()[-1])


def test_a_set_of_str_no_code_iterates_keeps_the_warm_start_under_another_hash_seed(tmp_path):
    cold = _seeded("unread", "1", tmp_path)
    warm = _seeded("unread", "2", tmp_path)
    assert cold["order"] != warm["order"]  # fixed seeds: a deterministic pair of orders
    assert cold["equal"] and cold["compile"] == 1
    assert warm["equal"] and warm["compile"] == 0 and warm["fingerprint_hit"] >= 1, warm  # was a trace per process


@pytest.mark.parametrize("read", ["loop", "comprehension", "class-loop", "display"])
def test_a_set_of_str_the_forward_iterates_gives_each_hash_seed_its_own_result(tmp_path, read):
    cold = _seeded(read, "1", tmp_path)
    other = _seeded(read, "2", tmp_path)
    assert cold["order"] != other["order"]
    assert cold["equal"] and cold["compile"] == 1
    assert other["equal"], f"{read}: loaded the graph of another set order"
    assert other["compile"] == 1 and other["fingerprint_hit"] == 0
    again = _seeded(read, "1", tmp_path)
    assert again["equal"] and again["compile"] == 0 and again["fingerprint_hit"] >= 1  # the same order: warm
