"""The compiled-graph cache in one process: hits, every result-changing perturbation misses, bypasses, slots.

Each ``aot_function`` here is a fresh one, so its in-memory reuse never hides the cache; the cache has only
the disk tier (no memory tier), so a hit is a real load from bytes. The nop compiler throughout.
"""

from __future__ import annotations

import json

import pytest
import torch

from aotcache import config
from aotcache.aot import aot_function, aot_module
from aotcache.aot.partition import min_cut_rematerialization_partition
from aotcache.autograd_cache.cache import AOTAutogradCache, entry_store_key, resolve_cache
from aotcache.autograd_cache.entry import pack_entry, unpack_entry
from aotcache.compilers.nop import nop_compiler
from aotcache.store.factory import open_tiers

# module-level constant read by the custom op below: changing it changes the op's code digest
SCALE_FACTOR = 2.0


@pytest.fixture
def cache():
    return AOTAutogradCache(open_tiers("disk", namespace="aot"), journal=False)


def body(x, w):
    return (x @ w).sin().sum() * 2


def run(fn, args, cache, *, backward=True, **options):
    """A fresh aot_function of ``fn`` called once; (output, grads of args requiring grad, counter deltas)."""
    before = cache.stats()
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.grad is not None:
            arg.grad = None
    out = aot_function(fn, options.pop("fw_compiler", "nop"), cache=cache, **options)(*args)
    grads = []
    if backward and isinstance(out, torch.Tensor) and out.requires_grad:
        out.backward()
        grads = [arg.grad.clone() for arg in args if isinstance(arg, torch.Tensor) and arg.requires_grad]
    after = cache.stats()
    delta = {name: after[name] - before[name] for name in after if name != "bypass_reasons" and after[name] != before[name]}
    return out, grads, delta


def inputs():
    torch.manual_seed(0)
    return [torch.randn(4, 3), torch.randn(3, 5, requires_grad=True)]


def test_second_function_hits_with_identical_outputs_and_gradients(cache):
    args = inputs()
    cold_out, cold_grads, cold = run(body, args, cache)
    assert cold == {"miss": 1, "compile": 1, "saved": 1, "compile_s": cold["compile_s"]}
    warm_out, warm_grads, warm = run(body, args, cache)
    assert warm["hit"] == 1 and "compile" not in warm and "miss" not in warm
    assert warm["time_saved_s"] == pytest.approx(cold["compile_s"])
    assert torch.equal(cold_out, warm_out)
    assert all(torch.equal(a, b) for a, b in zip(cold_grads, warm_grads))
    eager = body(args[0], args[1].detach().requires_grad_())
    torch.testing.assert_close(warm_out, eager)
    [listing] = cache.list_entries()
    assert listing.tiers == ["disk"] and listing.manifest["summary"]["name"] == "body"
    assert listing.manifest["compilers"] == {"forward": "nop", "backward": "nop"}
    assert cache.load_manifest(listing.digest[:10])[0]["digest"] == listing.digest


def _perturbations():
    def other_op(x, w):
        return (x @ w).cos().sum() * 2

    def with_constant(x, w, scale):
        return (x @ w).sin().sum() * scale

    @torch.library.custom_op("aotcache_test_cache::scale", mutates_args=())
    def scale(x: torch.Tensor) -> torch.Tensor:
        return x * SCALE_FACTOR

    @scale.register_fake
    def _(x):
        return torch.empty_like(x)

    def with_custom_op(x, w):
        return scale(x @ w.detach()).sum()

    def tagging_compiler(flag):
        def compiler(gm, example_inputs):
            return nop_compiler(gm, example_inputs) if flag else nop_compiler(gm, example_inputs)
        return compiler

    def set_global(value):
        global SCALE_FACTOR
        SCALE_FACTOR = value

    base = inputs()
    # name: (base call, perturbed call, the key part the explanation must name)
    return {
        "dtype": (lambda c: run(body, base, c), lambda c: run(body, [a.double().detach().requires_grad_(
            a.requires_grad) for a in base], c), "input metadata"),
        "shape": (lambda c: run(body, base, c), lambda c: run(body, [torch.randn(6, 3), base[1]], c), "input metadata"),
        "stride": (lambda c: run(body, base, c), lambda c: run(body, [base[0].t().contiguous().t(), base[1]], c),
                   "input metadata"),
        "requires_grad": (lambda c: run(body, base, c),
                          lambda c: run(body, [base[0].requires_grad_(False), base[1].detach()], c), "input metadata"),
        "constant": (lambda c: run(with_constant, [*base, 2.0], c), lambda c: run(with_constant, [*base, 3.0], c),
                     "graph"),
        "op": (lambda c: run(body, base, c), lambda c: run(other_op, base, c), "graph"),
        "grad_mode": (lambda c: run(body, base, c), lambda c: _no_grad(lambda: run(body, base, c)), "grad mode"),
        "autocast": (lambda c: run(body, base, c), lambda c: _autocast(lambda: run(body, base, c, backward=False)),
                     "autocast"),
        "partitioner": (lambda c: run(body, base, c),
                        lambda c: run(body, base, c, partition_fn=min_cut_rematerialization_partition), "partitioner"),
        "compiler_option": (lambda c: run(body, base, c, fw_compiler=tagging_compiler(True)),
                            lambda c: run(body, base, c, fw_compiler=tagging_compiler(False)), "compiler"),
        "custom_op_body": (lambda c: (set_global(2.0), run(with_custom_op, base, c))[1],
                           lambda c: (set_global(3.0), run(with_custom_op, base, c))[1], "custom code"),
    }


def _no_grad(call):
    with torch.no_grad():
        return call()


def _autocast(call):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return call()


PERTURBATIONS = _perturbations()


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_result_changing_perturbations_miss_and_are_explained(cache, name):
    base_call, perturbed_call, part = PERTURBATIONS[name]
    _, _, first = base_call(cache)
    assert first.get("miss") == 1 and first.get("saved") == 1
    _, _, again = base_call(cache)
    assert again.get("hit") == 1, f"{name}: the unperturbed call must hit"
    _, _, perturbed = perturbed_call(cache)
    assert perturbed.get("miss") == 1 and perturbed.get("compile") == 1, f"{name}: {perturbed}"
    explanation = "\n".join(cache.explain_miss())
    assert part in explanation, explanation


def test_simulated_torch_version_misses(cache, monkeypatch):
    args = inputs()
    run(body, args, cache)
    monkeypatch.setattr(torch, "__version__", "2.13.0+simulated")
    _, _, delta = run(body, args, cache)
    assert delta.get("miss") == 1
    assert any("system differs" in line and "torch" in line for line in cache.explain_miss())


def test_changes_that_do_not_change_the_result_hit(cache, tmp_path, monkeypatch):
    args = inputs()
    run(body, args, cache)

    def renamed(alpha, beta):
        return (alpha @ beta).sin().sum() * 2

    assert run(renamed, args, cache)[2].get("hit") == 1, "placeholder names must not matter"
    monkeypatch.chdir(tmp_path)
    assert run(body, args, cache)[2].get("hit") == 1, "the working directory must not matter"
    other_values = [torch.randn(4, 3), torch.randn(3, 5, requires_grad=True)]
    out, grads, delta = run(body, other_values, cache)
    assert delta.get("hit") == 1, "input values must not matter"
    torch.testing.assert_close(out, body(other_values[0], other_values[1].detach()))


def test_module_parameter_values_do_not_matter(cache):
    torch.manual_seed(1)
    first, second = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    aot_module(first, "nop", cache=cache)(x).sum().backward()
    compiled = aot_module(second, "nop", cache=cache)
    out = compiled(x)
    assert cache.stats()["hit"] == 1 and cache.stats()["compile"] == 1
    torch.testing.assert_close(out, second(x))
    out.sum().backward()
    torch.testing.assert_close(second.weight.grad, x.sum(0).expand(2, 3))


def test_unsafe_graph_bypasses_with_reason_and_runs_correctly(cache):
    library = torch.library.Library("aotcache_test_opaque", "DEF")
    library.define("twice(Tensor x) -> Tensor")
    library.impl("twice", lambda x: x * 2, "CPU")
    library.impl("twice", lambda x: torch.empty_like(x), "Meta")

    def fn(x):
        return torch.ops.aotcache_test_opaque.twice(x).sin()

    x = torch.randn(4)
    for _ in range(2):
        out, _, delta = run(fn, [x], cache)
        assert delta == {"bypass": 1}, "bypassed before any lookup or save"
        torch.testing.assert_close(out, (x * 2).sin())
    assert cache.stats()["bypass_reasons"] == {"opaque custom op: aotcache_test_opaque::twice": 2}
    assert cache.list_entries() == []


def test_compiler_output_without_artifact_bypasses(cache):
    def graph_module_compiler(gm, example_inputs):
        return gm  # runs fine, but nothing to store

    out, _, delta = run(body, inputs(), cache, fw_compiler=graph_module_compiler)
    assert delta.get("bypass") == 1 and delta.get("compile") == 1 and "saved" not in delta
    assert list(cache.stats()["bypass_reasons"]) == ["compiler output not storable: GraphModule has no artifact()"]
    torch.testing.assert_close(out, body(*inputs()))


def test_dynamic_entry_serves_several_sizes(cache):
    def fn(x):
        return (x * 2).sin().sum(0)

    compiles = 0
    for rows in (5, 7, 9, 30):
        x = torch.randn(rows, 3, requires_grad=True)
        out, grads, delta = run(lambda x: fn(x).sum(), [x], cache, dynamic=True)
        compiles += delta.get("compile", 0)
        torch.testing.assert_close(grads[0], (2 * (x.detach() * 2).cos()))
    assert compiles == 1 and cache.stats()["hit"] == 3
    [listing] = cache.list_entries()
    assert "L['t0'].size()[0]" in listing.manifest["guards"]


def test_failing_guard_is_a_guard_miss_that_adds_a_slot(cache):
    def fn(x):
        return (x * 2).sin().sum()

    run(fn, [torch.randn(7, 3, requires_grad=True)], cache, dynamic=True)
    [listing] = cache.list_entries()
    # narrow slot 0's guards to "at least 6 rows" (as if it had been compiled under that assumption)
    store_key = entry_store_key(listing.digest, 0)
    entry = unpack_entry(cache.tiers.get(store_key))
    entry.guards = f"({entry.guards}) and L['t0'].size()[0] >= 6"
    cache.delete(store_key)
    assert cache.tiers.insert(store_key, pack_entry(entry))

    x5 = torch.randn(5, 3, requires_grad=True)
    _, grads, delta = run(fn, [x5], cache, dynamic=True)
    assert delta.get("guard_miss") == 1 and delta.get("compile") == 1 and delta.get("saved") == 1
    torch.testing.assert_close(grads[0], 2 * (x5.detach() * 2).cos())
    assert [(item.slot, ">= 6" in item.manifest["guards"]) for item in cache.list_entries()] == [(0, True), (1, False)]
    assert run(fn, [torch.randn(8, 3, requires_grad=True)], cache, dynamic=True)[2].get("hit") == 1
    assert run(fn, [torch.randn(4, 3, requires_grad=True)], cache, dynamic=True)[2].get("hit") == 1
    assert cache.stats()["compile"] == 2


def test_cache_argument_forms(cache):
    args = inputs()
    out = aot_function(body, "nop", cache=False)(*args)
    torch.testing.assert_close(out, body(*args))
    assert cache.stats()["miss"] == 0
    assert resolve_cache(True) is resolve_cache(True), "one default cache per configuration"
    with pytest.raises(TypeError, match="cache must be True, False or an AOTAutogradCache"):
        aot_function(body, "nop", cache="yes")(*args)
    with config.patch(enabled=False):
        disabled = resolve_cache(True)
        assert not disabled.enabled
        torch.testing.assert_close(aot_function(body, "nop")(*args), body(*args))
        assert disabled.stats()["miss"] == 0


def test_default_cache_uses_memory_and_disk_and_journal():
    args = inputs()
    aot_function(body, "nop")(*args)
    cache = resolve_cache(True)
    assert list(cache.tiers.labels) == ["memory", "disk"]
    aot_function(body, "nop")(*args)
    assert cache.stats()["hit"] == 1
    pending = cache.journal.pending()
    assert pending["autograd"]["hit"] == 1 and pending["autograd"]["miss"] == 1
    assert pending["tier:memory"]["hits"] >= 1


def test_export_import_and_clear(cache, tmp_path, monkeypatch):
    args = inputs()
    run(body, args, cache)
    [listing] = cache.list_entries()
    blob = cache.export_entry(listing.digest)
    assert cache.clear() == 1 and cache.list_entries() == []
    assert cache.import_entry(blob) == entry_store_key(listing.digest, 0)
    assert cache.import_entry(blob) is None, "the same entry is not imported twice"
    assert run(body, args, cache)[2].get("hit") == 1
    with pytest.raises(KeyError, match="no compiled-graph entry"):
        cache.export_entry("0" * 64)


def test_public_hooks_count_record_hit_and_on_key():
    from aotcache.aot.api import AOTOptions
    from aotcache.autograd_cache.cache import CompileResult, LoadResult
    from aotcache.autograd_cache.pipeline import compile_function_cached
    from aotcache.autograd_cache.safety import BypassAOTAutogradCache

    cache = AOTAutogradCache(open_tiers("disk", namespace="aot"))  # with the default stats journal
    cache.count(custom_event=2)
    assert cache.counters["custom_event"] == 2 and cache.journal.pending()["autograd"]["custom_event"] == 2

    args = inputs()
    keys = []
    options = AOTOptions(fw_compiler="nop")
    compile_function_cached(cache, body, args, options, on_key=keys.append)
    runtime = compile_function_cached(cache, body, args, options, on_key=keys.append)
    [listing] = cache.list_entries()
    assert [key.digest for key in keys] == [listing.digest, listing.digest]
    assert cache.stats()["hit"] == 1
    torch.testing.assert_close(runtime(*args), body(*args))

    result = cache.try_load(keys[0], args)
    assert result.hit and cache.stats()["hit"] == 1, "try_load counts nothing but faults"
    assert cache.record_hit(result) is result.runtime
    assert cache.stats()["hit"] == 2
    assert cache.stats()["time_saved_s"] == pytest.approx(2 * result.entry.compile_seconds)
    with pytest.raises(ValueError, match="record_hit needs a hit"):
        cache.record_hit(LoadResult("miss"))

    def bypassing_key():
        raise BypassAOTAutogradCache("test reason")

    seen = []
    marker = object()
    assert cache.load_or_compile(bypassing_key, lambda: CompileResult(marker), on_key=seen.append) is marker
    assert seen == [] and cache.stats()["bypass_reasons"] == {"test reason": 1}


EFFECTFUL_INVERSE = """
import json, torch
from aotcache.aot import aot_function
from aotcache.autograd_cache.cache import default_cache

def fn(x):
    return torch.linalg.inv(x) * 2

torch.manual_seed(0)
x = (torch.randn(3, 3) + 3 * torch.eye(3)).requires_grad_()
out = aot_function(fn, "nop")(x)
out.sum().backward()
reference = x.detach().clone().requires_grad_()
fn(reference).sum().backward()
torch.testing.assert_close(out, fn(reference))
torch.testing.assert_close(x.grad, reference.grad)
print(json.dumps({"out": out.tolist(), "grad": x.grad.tolist(), **default_cache().stats()}))
"""


def test_effectful_op_graph_is_stored_and_hits_in_a_fresh_process():
    """``torch.linalg.inv`` traces to a ``with_effects`` node (effect token); the nop artifact stores it."""
    from tests.conftest import run_python

    cold = json.loads(run_python(EFFECTFUL_INVERSE).stdout.strip().splitlines()[-1])
    warm = json.loads(run_python(EFFECTFUL_INVERSE).stdout.strip().splitlines()[-1])
    assert cold["bypass"] == 0 and cold["saved"] == 1 and cold["compile"] == 1
    assert warm["hit"] == 1 and warm["compile"] == 0 and warm["load_error"] == 0
    assert warm["out"] == cold["out"] and warm["grad"] == cold["grad"]


def test_graph_form_names_only_allowlisted_higher_order_ops():
    from aotcache.compilers.base import ArtifactError
    from aotcache.compilers.graph_serde import GraphSerializationError, deserialize_graph, resolve_target, target_name

    with_effects = torch.ops.higher_order.with_effects
    assert target_name(with_effects) == "higher_order::with_effects"
    assert resolve_target("higher_order::with_effects") is with_effects
    assert resolve_target(target_name(torch.ops.higher_order.cond)) is torch.ops.higher_order.cond
    with pytest.raises(GraphSerializationError, match="cannot store"):
        target_name(torch.ops.higher_order.out_dtype)
    with pytest.raises(ArtifactError, match="not one of the storable"):
        resolve_target("higher_order::out_dtype")
    # an operator passed as a value resolves from torch.ops only, never to a higher-order operator
    nodes = [{"name": "x", "op": "placeholder", "target": "x"},
             {"name": "y", "op": "call_function", "target": "aten::neg.default",
              "args": {"tuple": [{"node": "x"}, {"op": "higher_order::with_effects"}]}, "kwargs": {"dict": []}},
             {"name": "output", "op": "output", "args": {"tuple": [{"node": "y"}]}}]
    with pytest.raises(ArtifactError, match="unknown operator"):
        deserialize_graph({"format": 1, "nodes": nodes}, {})


class KeyValueHolder:
    """An output object: its template stays in the process, so the entry is not stored."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key, value


def test_object_output_bypasses_with_its_type_and_runs_correctly(cache):
    def holder(x, w):
        return KeyValueHolder(x @ w, (x @ w).sin())

    compiled = aot_function(holder, "nop", cache=cache)
    x, w = inputs()
    got = compiled(x, w)
    assert cache.stats()["bypass_reasons"] == {f"object output: {__name__}.KeyValueHolder": 1}
    assert cache.stats()["saved"] == 0
    torch.testing.assert_close(got.value, (x @ w).sin())
    assert compiled(x, w).key is not got.key and compiled.num_compiles == 1  # in-process reuse still works


def _transpose_in_place(x, y):
    x.t_()
    return x * y


def _transpose_out_of_place(x, y):
    return x.t() * y


def test_metadata_mutation_is_part_of_the_key(cache):
    """The two functions trace to the same graph; only one transposes its input in place (NOTE [Metadata
    mutations]): sharing an entry would transpose the caller's tensor, or fail to."""
    x, y = torch.randn(3, 3), torch.randn(3, 3)
    mutated = x.clone()
    aot_function(_transpose_in_place, "nop", cache=cache)(mutated, y)
    assert mutated.stride() == (1, 3)
    kept = x.clone()
    got = aot_function(_transpose_out_of_place, "nop", cache=cache)(kept, y)
    assert kept.stride() == (3, 1), "the out-of-place function must not replay the other one's mutation"
    torch.testing.assert_close(got, x.t() * y)
    assert cache.stats()["saved"] == 2
