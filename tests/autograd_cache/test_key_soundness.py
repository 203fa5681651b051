"""Every code digest that enters the cache key is sound: different behaviour never shares a key.

Regression tests for a false hit: a compiler wrapper (``tests/aot/verify.py``'s ``GraphRecorder``) is a
closure over an object; the old digest wrote any object down as its type name, so wrappers around different
compilers shared a key and one was served the other's entry. Now objects count by class code and whole
state, and what cannot be written down makes the key step bypass the cache with a counted reason.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import textwrap
import threading

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import aotcache
from aotcache.aot import partition
from aotcache.aot.api import AOTOptions
from aotcache.autograd_cache import reachable
from aotcache.autograd_cache.fingerprint import code_fingerprint, fingerprint_call
from aotcache.autograd_cache.key import callable_digest, compute_key, custom_op_digest
from aotcache.autograd_cache.pipeline import compiler_identity, decomposition_identity, partitioner_identity
from aotcache.autograd_cache.safety import BypassAOTAutogradCache
from aotcache.compilers.inductor import inductor_compiler
from aotcache.compilers.nop import nop_compiler
from tests.aot.verify import GraphRecorder
from tests.conftest import run_python

SETTINGS = dict(partitioner_name="default_partition", decomposition_id="none")
X = torch.randn(4, 3)


def body(x):
    return (x * 2).sin()


GRAPH = make_fx(body)(X)


def key_for(compiler):
    """The key of one graph compiled by ``compiler``, its compiler part built as the pipeline builds it."""
    identity = compiler_identity(compiler)
    return compute_key(GRAPH, [X], compiler_name=identity if isinstance(identity, str) else "custom",
                       compiler_options={"forward": identity, "backward": identity, "inference": identity},
                       **SETTINGS)


def scale_outputs(gm: torch.fx.GraphModule, factor: float) -> torch.fx.GraphModule:
    """Multiply every tensor output of ``gm`` by ``factor`` (in place): a compiler that changes results."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    with gm.graph.inserting_before(output):
        scaled = tuple(gm.graph.call_function(torch.ops.aten.mul.Tensor, (value, factor))
                       if isinstance(value, torch.fx.Node) else value for value in values)
    output.args = (scaled,)
    gm.recompile()
    return gm


class Scaling:
    """A compiler wrapper whose behaviour lives in instance state (``factor``), like GraphRecorder's ``inner``."""

    def __init__(self, inner, factor):
        self.inner = inner
        self.factor = factor

    def __call__(self, gm, example_inputs):
        return self.inner(scale_outputs(gm, self.factor), example_inputs)

    def compile(self, gm, example_inputs):
        return self(gm, example_inputs)


def closure_over(state):
    def wrapping_compiler(gm, example_inputs):
        return state.inner(gm, example_inputs)

    return wrapping_compiler


# ----------------------------------------------------------------------------------------------------
# Objects, closures, bound methods, callable objects: their state counts
# ----------------------------------------------------------------------------------------------------


def test_closures_over_objects_with_different_state_never_share_a_key():
    nop_a, nop_b = key_for(closure_over(Scaling(nop_compiler, 1.0))), key_for(closure_over(Scaling(nop_compiler, 1.0)))
    assert nop_a.digest == nop_b.digest  # equal state, rebuilt: the same key (warm starts still hit)
    assert key_for(closure_over(Scaling(nop_compiler, 2.0))).digest != nop_a.digest
    assert key_for(closure_over(Scaling(inductor_compiler, 1.0))).digest != nop_a.digest


def test_graph_recorders_around_different_compilers_differ():
    """The reported false hit: verify(compiler="inductor") then verify(compiler="aoti") shared a key."""
    from aotcache.compilers import get_compiler

    inductor_key = key_for(GraphRecorder(get_compiler("inductor")).compiler_for("forward"))
    aoti_key = key_for(GraphRecorder(get_compiler("aoti")).compiler_for("forward"))
    nop_key = key_for(GraphRecorder(get_compiler("nop")).compiler_for("forward"))
    assert len({inductor_key.digest, aoti_key.digest, nop_key.digest}) == 3
    assert key_for(GraphRecorder(get_compiler("aoti")).compiler_for("forward")).digest == aoti_key.digest


def test_bound_methods_and_callable_objects_count_their_instance_state():
    assert key_for(Scaling(nop_compiler, 2.0).compile).digest != key_for(Scaling(nop_compiler, 3.0).compile).digest
    assert key_for(Scaling(nop_compiler, 2.0)).digest != key_for(Scaling(nop_compiler, 3.0)).digest
    assert key_for(Scaling(nop_compiler, 2.0)).digest == key_for(Scaling(nop_compiler, 2.0)).digest


def test_partial_of_a_named_compiler_is_keyed_by_its_arguments():
    fast = functools.partial(inductor_compiler, options={"max_autotune": False})
    slow = functools.partial(inductor_compiler, options={"max_autotune": True})
    assert key_for(fast).digest == key_for(functools.partial(inductor_compiler, options={"max_autotune": False})).digest
    assert key_for(fast).digest != key_for(slow).digest
    assert key_for(fast).digest != key_for(inductor_compiler).digest


def test_named_compilers_and_partitioners_enter_by_name():
    assert compiler_identity(nop_compiler) == "nop" and compiler_identity("aoti") == "aoti"
    assert compiler_identity(inductor_compiler) == "inductor"
    assert partitioner_identity(partition.default_partition) == "default_partition"
    assert partitioner_identity(None) == "default_partition"

    def my_partition(joint_gm, joint_inputs, *, num_fwd_outputs):
        return partition.default_partition(joint_gm, joint_inputs, num_fwd_outputs=num_fwd_outputs)

    assert partitioner_identity(my_partition).startswith("custom:")
    assert partitioner_identity(functools.partial(Scaling.compile, Scaling(my_partition, 1))) != \
        partitioner_identity(functools.partial(Scaling.compile, Scaling(my_partition, 2)))


# ----------------------------------------------------------------------------------------------------
# User code the callable reaches: classes, modules, constructors
# ----------------------------------------------------------------------------------------------------


class Transform:
    def __init__(self):
        self.factor = 2.0

    def apply(self, gm):
        return scale_outputs(gm, self.factor)


def constructing_compiler(gm, example_inputs):
    return nop_compiler(Transform().apply(gm), example_inputs)


def test_a_user_class_method_or_constructor_change_is_seen(monkeypatch):
    base = callable_digest(constructing_compiler)
    assert callable_digest(constructing_compiler) == base
    monkeypatch.setattr(Transform, "apply", lambda self, gm: scale_outputs(gm, 3.0))
    assert callable_digest(constructing_compiler) != base
    monkeypatch.undo()

    def other_init(self):
        self.factor = 5.0

    monkeypatch.setattr(Transform, "__init__", other_init)  # __init__ runs when the compiler constructs one
    assert callable_digest(constructing_compiler) != base
    monkeypatch.undo()
    assert callable_digest(constructing_compiler) == base


HELPER_MODULE = """
import torch

def helper(gm):
    return gm if {version} > 0 else None

OFFSET = {offset}
"""


def test_a_user_module_helper_change_is_seen(tmp_path, monkeypatch):
    module_path = tmp_path / "aotk_soundness_helpers.py"
    module_path.write_text(HELPER_MODULE.format(version=1, offset=1))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # reloads must read the edited source, not a .pyc
    helpers = importlib.import_module("aotk_soundness_helpers")
    try:
        def closure_compiler(gm, example_inputs):  # the module in a closure cell
            return nop_compiler(helpers.helper(gm), example_inputs)

        namespace = {"__name__": "user_compilers", "helpers": helpers, "nop_compiler": nop_compiler}
        exec("def global_compiler(gm, example_inputs):\n"
             "    return nop_compiler(helpers.helper(gm), example_inputs)\n", namespace)
        compilers = (closure_compiler, namespace["global_compiler"])  # ... and as a module global
        base = [callable_digest(compiler) for compiler in compilers]
        module_path.write_text(HELPER_MODULE.format(version=2, offset=1))  # a changed helper body
        importlib.reload(helpers)
        changed = [callable_digest(compiler) for compiler in compilers]
        assert changed[0] != base[0] and changed[1] != base[1]
        module_path.write_text(HELPER_MODULE.format(version=2, offset=7))  # OFFSET is not used: no change
        importlib.reload(helpers)
        assert [callable_digest(compiler) for compiler in compilers] == changed
    finally:
        sys.modules.pop("aotk_soundness_helpers", None)


# NOTE [Function-body imports]: a compiler that imports inside its body, in a module of its own (argv[1]: its
# directory). Prints its digest before and after ``aotcache.compilers.nop`` is imported, which the first compile
# does: they differed, so the first graph of a process had another key than the later ones.
BODY_IMPORT_DIGESTS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from aotcache.autograd_cache.key import callable_digest
from aotk_body_import import compiler
loaded_before = "aotcache.compilers.nop" in sys.modules
before = callable_digest(compiler)
import aotcache.compilers.nop
print(json.dumps({"loaded_before": loaded_before, "before": before, "after": callable_digest(compiler)}))
"""

BODY_IMPORT_COMPILER = """
def compiler(gm, example_inputs):
    from aotcache.compilers.nop import nop_compiler
    from aotk_body_helper import helper
    return nop_compiler(helper(gm), example_inputs)
"""

BODY_IMPORT_HELPER = """
from aotk_body_deep import scale

def helper(gm):
    return gm if scale() > 0 else None
"""


def test_a_compiler_importing_in_its_body_keeps_its_digest_and_sees_what_it_calls(tmp_path, monkeypatch):
    (tmp_path / "aotk_body_import.py").write_text(BODY_IMPORT_COMPILER)
    (tmp_path / "aotk_body_helper.py").write_text(BODY_IMPORT_HELPER)
    (tmp_path / "aotk_body_deep.py").write_text("def scale():\n    return 1\n")
    runs = [json.loads(run_python(BODY_IMPORT_DIGESTS.replace("sys.argv[1]", repr(str(tmp_path))),
                                  env={"PYTHONDONTWRITEBYTECODE": "1"}).stdout.strip().splitlines()[-1])
            for _ in range(2)]
    assert not runs[0]["loaded_before"]  # the import happened between the two digests
    assert runs[0]["before"] == runs[0]["after"] == runs[1]["before"] == runs[1]["after"]  # and across processes

    # in this process (nop loaded long ago): the same digest; the project modules it imports are read
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    names = ("aotk_body_import", "aotk_body_helper", "aotk_body_deep")
    try:
        compiler = importlib.import_module("aotk_body_import").compiler
        assert "aotk_body_helper" not in sys.modules
        assert callable_digest(compiler) == runs[0]["before"]
        # what it calls through a body import changes: a new digest
        (tmp_path / "aotk_body_deep.py").write_text("def scale():\n    return 2\n")
        for name in names[:0:-1]:
            importlib.reload(sys.modules[name])
        assert callable_digest(compiler) != runs[0]["before"]
        # its own code changes: a new digest
        (tmp_path / "aotk_body_import.py").write_text(BODY_IMPORT_COMPILER.replace("helper(gm)", "helper(gm.eval())"))
        changed = importlib.reload(sys.modules["aotk_body_import"]).compiler
        assert callable_digest(changed) != callable_digest(compiler)
    finally:
        for name in names:
            sys.modules.pop(name, None)


def test_body_imports_read_with_the_names_a_from_import_takes():
    from aotcache.autograd_cache.code_reading import imported_modules

    def body():
        names = ("a", "b")  # a tuple constant that is no fromlist
        import os
        from aotcache.compilers import nop
        return names, os, nop

    assert imported_modules(body) == ["aotcache.compilers", "aotcache.compilers.nop", "os"]


def test_a_from_import_of_a_package_attribute_never_imports_a_submodule_of_that_name(tmp_path, monkeypatch):
    """``from pkg import config`` reads ``pkg.config`` (an object) and imports nothing, even with ``pkg/config.py``
    beside it: importing that for a digest would replace the object with the submodule."""
    package = tmp_path / "aotk_body_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from types import SimpleNamespace\nconfig = SimpleNamespace(scale=1)\n")
    (package / "config.py").write_text("scale = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace = {"__name__": "user_compilers", "__package__": None}
    exec("def compiler(gm, example_inputs):\n    from aotk_body_pkg import config\n    return config.scale\n",
         namespace)
    try:
        callable_digest(namespace["compiler"])
        assert "aotk_body_pkg.config" not in sys.modules
        assert type(sys.modules["aotk_body_pkg"].config).__name__ == "SimpleNamespace"
    finally:
        sys.modules.pop("aotk_body_pkg", None)


def test_a_body_import_of_a_missing_or_failing_project_module():
    namespace = {"__name__": "user_compilers", "__package__": None}
    exec("def absent(gm, example_inputs):\n    import aotk_no_such_module\n", namespace)
    assert callable_digest(namespace["absent"]) == callable_digest(namespace["absent"])  # the import would fail
    exec("def relative(gm, example_inputs):\n    from . import sibling\n", namespace)
    with pytest.raises(BypassAOTAutogradCache, match="import inside function"):
        callable_digest(namespace["relative"])


# ----------------------------------------------------------------------------------------------------
# What cannot be written down bypasses, with a reason; limits are never truncation
# ----------------------------------------------------------------------------------------------------


class HoldsFile:
    def __init__(self, handle):
        self.handle = handle
        self.inner = nop_compiler

    def __call__(self, gm, example_inputs):
        return self.inner(gm, example_inputs)


def test_unreadable_state_bypasses_with_a_reason(tmp_path):
    with open(tmp_path / "log.txt", "w") as handle:
        compiler = HoldsFile(handle)
        with pytest.raises(BypassAOTAutogradCache, match=r"unhashable compiler: opaque object: _io.TextIOWrapper"):
            compiler_identity(compiler)
        with pytest.raises(BypassAOTAutogradCache, match=r"unhashable option: compiler_options.thing: opaque object"):
            compute_key(GRAPH, [X], compiler_name="nop", compiler_options={"thing": threading.Event()}, **SETTINGS)

        # through aot_function: compiled and correct, not cached, and the reason is counted
        cache = fresh_cache()
        compiled = aotcache.aot_function(body, fw_compiler=compiler, cache=cache)
        assert torch.allclose(compiled(X), body(X))
        assert cache.counters["bypass"] == 1 and cache.counters["saved"] == 0
        (reason,) = cache.bypass_reasons
        assert reason.startswith("unhashable compiler: opaque object: _io.TextIOWrapper"), reason


def test_fingerprint_and_key_refuse_the_same_things():
    event = threading.Event()

    def compiler(gm, example_inputs):
        return nop_compiler(gm, example_inputs) if not event.is_set() else None

    flat, spec = torch.utils._pytree.tree_flatten(((X,), {}))
    fingerprint = fingerprint_call(body, flat, spec, AOTOptions(fw_compiler=compiler))
    assert fingerprint.reason == "opaque object: threading.Event"
    with pytest.raises(BypassAOTAutogradCache, match="unhashable compiler: opaque object: threading.Event"):
        compiler_identity(compiler)


def test_unhashable_decompositions_bypass_instead_of_crashing(tmp_path):
    with open(tmp_path / "log.txt", "w") as handle:
        table = {torch.ops.aten.sin.default: HoldsFile(handle)}
        identity, _, _ = decomposition_identity(AOTOptions(decompositions=table), {})
        assert isinstance(identity, BypassAOTAutogradCache)
        assert identity.reason.startswith("unhashable decompositions: opaque object: _io.TextIOWrapper")
        with pytest.raises(BypassAOTAutogradCache, match="unhashable decompositions"):
            compute_key(GRAPH, [X], compiler_name="nop", partitioner_name="default_partition",
                        decomposition_id=identity)

    def sin_decomposition(x):
        return torch.ops.aten.sin.default(x)  # a readable table still keys by content

    first, _, _ = decomposition_identity(AOTOptions(decompositions={torch.ops.aten.sin.default: sin_decomposition}), {})
    assert isinstance(first, str) and first.startswith("table:")


def test_inductor_decomposition_table_forwarded_by_a_wrapper_is_identified():
    """GraphRecorder forwards Inductor's table: every function in it (torch's code) must be identifiable."""
    from aotcache.compilers import get_compiler

    recorder_compiler = GraphRecorder(get_compiler("inductor")).compiler_for("forward")
    identity, table, recapture = decomposition_identity(AOTOptions(fw_compiler=recorder_compiler), {})
    assert isinstance(identity, str) and identity.startswith("table:"), identity
    assert len(table) > 100 and not recapture


def test_size_limits_bypass_rather_than_truncate(monkeypatch):
    nested: list = []
    for _ in range(150):
        nested = [nested]

    def deep(gm, example_inputs):
        return nop_compiler(gm, example_inputs) if nested else None

    with pytest.raises(BypassAOTAutogradCache, match="unhashable compiler: nesting too deep"):
        compiler_identity(deep)
    monkeypatch.setattr(reachable, "_MAX_NODES", 2)
    with pytest.raises(BypassAOTAutogradCache, match="unhashable compiler: too much reachable code"):
        compiler_identity(closure_over(Scaling(constructing_compiler, 1.0)))


def test_code_without_a_module_name_is_read_not_named():
    first, second = {}, {}
    exec("def f(gm, inputs):\n    return gm\n", first)  # a bare namespace: no __name__
    exec("def f(gm, inputs):\n    return inputs\n", second)
    assert first["f"].__module__ is None
    assert callable_digest(first["f"]) != callable_digest(second["f"])
    assert code_fingerprint(first["f"]).digest != code_fingerprint(second["f"]).digest


def test_custom_op_with_tags_is_keyed():
    @torch.library.custom_op("aotk_sound::tagged", mutates_args=(), tags=(torch.Tag.pt2_compliant_tag,))
    def tagged(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @tagged.register_fake
    def _(x):
        return torch.empty_like(x)

    digest = custom_op_digest(torch.ops.aotk_sound.tagged.default)
    assert digest is not None and len(digest) == 64
    assert custom_op_digest(torch.ops.aten.sin.default) is None


# ----------------------------------------------------------------------------------------------------
# End to end, fresh processes sharing one cache dir: the reported scenario
# ----------------------------------------------------------------------------------------------------


def fresh_cache():
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store.factory import open_tiers

    return AOTAutogradCache(open_tiers("memory", namespace="aot"), journal=False)


RECORDED_RUN = textwrap.dedent("""
    import json
    import torch
    import aotcache
    from aotcache.autograd_cache.cache import default_cache
    from aotcache.compilers.nop import nop_compiler
    from tests.aot.verify import GraphRecorder
    from tests.autograd_cache.test_key_soundness import Scaling

    factor = float("FACTOR")
    inner = nop_compiler if factor == 0 else Scaling(nop_compiler, factor)
    recorder = GraphRecorder(inner)
    compiled = aotcache.aot_function(lambda x: (x * 2).sin(), fw_compiler=recorder.compiler_for("inference"))
    x = torch.tensor([[0.5, 1.0, 1.5]])
    out = compiled(x)
    counters = default_cache().counters
    print(json.dumps({"ratio": (out / (x * 2).sin())[0].tolist(),
                      "hit": counters.get("hit", 0), "saved": counters.get("saved", 0),
                      "compiled": recorder.count("inference")}))
""")


def recorded_run(factor: float) -> dict:
    """One fresh process: aot_function through a GraphRecorder around nop (factor 0) or Scaling(factor)."""
    proc = run_python(RECORDED_RUN.replace("FACTOR", str(factor)))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_recorder_wrapping_a_different_compiler_is_not_served_the_first_entry():
    nop_run = recorded_run(0)
    assert nop_run["saved"] == 1 and nop_run["compiled"] == 1
    assert nop_run["ratio"] == pytest.approx([1.0, 1.0, 1.0])
    doubled = recorded_run(2)  # before the fix: a hit on the nop entry, unscaled outputs, nothing compiled
    assert doubled["hit"] == 0 and doubled["compiled"] == 1 and doubled["saved"] == 1
    assert doubled["ratio"] == pytest.approx([2.0, 2.0, 2.0])
    tripled = recorded_run(3)  # a factor held in an object attribute: 2 then 3
    assert tripled["hit"] == 0 and tripled["ratio"] == pytest.approx([3.0, 3.0, 3.0])
    again = recorded_run(2)  # the same wrapper state in a fresh process: a real hit on its own entry
    assert again["hit"] == 1 and again["compiled"] == 0
    assert again["ratio"] == pytest.approx([2.0, 2.0, 2.0])


_CLOSED_OVER_MODEL = textwrap.dedent("""
    import functools, json, sys, torch, aotcache
    from aotcache.autograd_cache.cache import resolve_cache
    torch.manual_seed(int(sys.argv[1]) if len(sys.argv) > 1 else {seed})
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.ones(2, 8)
    compiled = aotcache.compile({target}, compiler="nop")
    with torch.no_grad():
        same = torch.equal(compiled(x), model(x))
    counters = resolve_cache(True).counters
    print(json.dumps({{"same": same, "hit": counters["hit"], "miss": counters["miss"]}}))
""")


@pytest.mark.parametrize("target", ["lambda x: model(x)", "functools.partial(model.forward)"])
def test_a_function_closing_over_a_model_with_other_weights_never_loads_the_first_models_entry(target):
    # NOTE [Closed-over parameters in the key]: the key left the closed-over parameters' values out, so a
    # process with other weights (another seed here; another checkpoint in real use) loaded the first entry and
    # computed with the first model's weights
    runs = [json.loads(run_python(_CLOSED_OVER_MODEL.format(seed=seed, target=target)).stdout.strip().splitlines()[-1])
            for seed in (0, 1, 0)]
    assert runs[0] == {"same": True, "hit": 0, "miss": 1}
    assert runs[1] == {"same": True, "hit": 0, "miss": 1}  # before the fix: a hit, the seed-0 weights' results
    assert runs[2] == {"same": True, "hit": 1, "miss": 0}  # the same weights again: their own entry


def test_a_compiled_bound_method_serves_other_weights_from_one_entry():
    # NOTE [Bound methods of modules]: model.forward is compiled as the module's forward, its parameters graph
    # inputs, so a process with other weights rightly finds the first entry and computes with its own weights
    runs = [json.loads(run_python(_CLOSED_OVER_MODEL.format(seed=seed, target="model.forward"))
                       .stdout.strip().splitlines()[-1]) for seed in (0, 1)]
    assert runs == [{"same": True, "hit": 0, "miss": 1}, {"same": True, "hit": 1, "miss": 0}]


def test_a_closed_over_weight_changed_in_place_is_computed_with_in_process():
    from aotcache.autograd_cache.cache import resolve_cache

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    compiled = aotcache.compile(lambda x: model(x), compiler="nop")
    x = torch.randn(2, 8)
    first = model.weight.detach().clone()
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
        model.weight.add_(1.0)  # the program guards see it and trace again; the key must see it too
        assert torch.equal(compiled(x), model(x))
        model.weight.copy_(first)  # back to the first values: the first entry is the right one
        assert torch.equal(compiled(x), model(x))
    assert resolve_cache(True).counters["miss"] == 2  # the first weights' graph is reused in-process
