"""Whose iterator a walk reached (NOTE [Iterators a program advances] in autograd_cache/reachable.py): one the
program's own code holds is refused (the fallback draws once per call, as eager); one reached only through a
library's or a test runner's code and objects (pytest's assertion helpers reaching every collected test's globals,
pytest-xdist's ``__channelexec__`` worker objects) is not, and the warm call keeps its graph."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import aotcache
from aotcache.aot.fallback import fallback_counts
from aotcache.autograd_cache.program_ownership import is_program_module

X = torch.ones(3)


def _module_from_file(monkeypatch, path, name: str, source: str) -> types.ModuleType:
    """Import ``source`` as module ``name`` from a real file at ``path`` (kept in sys.modules for the test)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


_RUNNER_SOURCE = """
    COLLECTED = []  # the runner's state: every collected test function


    def report_failure(x):
        return COLLECTED
"""

_USER_SOURCE = """
    import itertools

    COUNTER = itertools.count()
    DRAWS = (float(k) for k in range(10))


    def scaled_by_the_next_count(x):
        return x * next(COUNTER)


    def scaled_by_the_next_draw(x):
        return x * next(DRAWS)


    class Stepper:
        STEPS = itertools.count()


    def scaled_by_the_class_count(x):
        return x * next(Stepper.STEPS)
"""


def test_a_user_modules_counter_generator_and_class_counter_are_drawn_once_per_call(tmp_path, monkeypatch):
    user = _module_from_file(monkeypatch, tmp_path / "project" / "iter_user_a.py", "iter_user_a", _USER_SOURCE)
    for fn in (user.scaled_by_the_next_count, user.scaled_by_the_next_draw, user.scaled_by_the_class_count):
        compiled = aotcache.aot_function(fn, "nop", cache=False)
        assert [compiled(X)[0].item() for _ in range(3)] == [0.0, 1.0, 2.0], fn  # eager's draws, not the capture's
    assert next(user.COUNTER) == next(user.Stepper.STEPS) == 3 and next(user.DRAWS) == 3.0


def test_a_user_counter_reached_only_through_a_runners_code_keeps_the_graph(tmp_path, monkeypatch):
    """The xdist failure of session 21: a test's forward reached pytest's assertion helpers (site-packages code,
    walked as the program's), whose state holds every collected test, whose globals held another test file's
    ``itertools.count``: the capture was refused."""
    runner = _module_from_file(monkeypatch, tmp_path / "venv" / "lib" / "site-packages" / "iter_runner.py",
                               "iter_runner", _RUNNER_SOURCE)
    user = _module_from_file(monkeypatch, tmp_path / "project" / "iter_user_b.py", "iter_user_b", _USER_SOURCE)
    runner.COLLECTED.append(user.scaled_by_the_next_count)

    def doubled(x):
        if x.shape[-1] != 3:
            runner.report_failure(x)
        return x * 2

    before = fallback_counts().get("partial:unsupported_construct", 0)
    compiled = aotcache.aot_function(doubled, "nop", cache=False)
    torch.testing.assert_close(compiled(X), X * 2)
    walks = compiled.num_program_walks
    torch.testing.assert_close(compiled(X), X * 2)
    assert compiled.num_compiles == 1 and compiled.num_program_walks == walks  # the warm call hits its graph
    assert fallback_counts().get("partial:unsupported_construct", 0) == before
    assert next(user.COUNTER) == 0  # never drawn

    def doubled_and_counted(x):  # the same counter, now read by the program's own code: refused
        if x.shape[-1] != 3:
            runner.report_failure(x)
        return user.scaled_by_the_next_count(x) * 2

    compiled = aotcache.aot_function(doubled_and_counted, "nop", cache=False)
    assert [compiled(X)[0].item() for _ in range(3)] == [2.0, 4.0, 6.0]  # draws 1, 2, 3 (0 drawn above)


def test_an_iterator_of_a_channelexec_object_keeps_the_graph(monkeypatch):
    """pytest-xdist runs its worker code as execnet's ``__channelexec__``, a module without a file."""
    worker_code = types.ModuleType("__channelexec__")
    exec(textwrap.dedent("""
        class WorkerInteractor:
            def __init__(self):
                self.pending = (index for index in range(3))
    """), worker_code.__dict__)
    worker = worker_code.WorkerInteractor()
    monkeypatch.setitem(globals(), "WORKER", worker)

    def doubled(x):
        return x * 2 if WORKER is not None else x

    before = fallback_counts().get("partial:unsupported_construct", 0)
    compiled = aotcache.aot_function(doubled, "nop", cache=False)
    torch.testing.assert_close(compiled(X), X * 2)
    walks = compiled.num_program_walks
    torch.testing.assert_close(compiled(X), X * 2)
    assert compiled.num_compiles == 1 and compiled.num_program_walks == walks
    assert fallback_counts().get("partial:unsupported_construct", 0) == before
    assert next(worker.pending) == 0


def test_program_modules_are_real_files_outside_installed_packages(tmp_path, monkeypatch):
    _module_from_file(monkeypatch, tmp_path / "lib" / "site-packages" / "iter_lib_c.py", "iter_lib_c", "A = 1\n")
    _module_from_file(monkeypatch, tmp_path / "project" / "iter_user_c.py", "iter_user_c", "A = 1\n")
    monkeypatch.setitem(sys.modules, "__channelexec__", types.ModuleType("__channelexec__"))
    assert is_program_module("iter_user_c") and is_program_module(__name__)
    for name in ("iter_lib_c", "__channelexec__", "itertools", "torch.nn", "aotcache.api", "no_such_module", None):
        assert not is_program_module(name), name


def _scaled_by_the_modules_steps(module, args, output):
    return output * next(module.steps)


def test_a_counter_set_on_a_library_classs_module_is_drawn_once_per_call():
    """An iterator the program sets on an ``nn.Sequential`` (a library's class) and its own hook advances: the
    module's attributes are the program's, so the capture is refused (it kept its capture's draw: 3, 3, 3)."""
    sequential = nn.Sequential(nn.Identity())
    sequential.steps = itertools.count()
    sequential.register_forward_hook(_scaled_by_the_modules_steps)
    compiled = aotcache.compile(sequential)
    assert [compiled(X)[0].item() for _ in range(3)] == [0.0, 1.0, 2.0]

    class HoldsAPlainModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Module()
            self.inner.steps = itertools.count()

        def forward(self, x):
            return x * next(self.inner.steps)

    compiled = aotcache.compile(HoldsAPlainModule())
    assert [compiled(X)[0].item() for _ in range(3)] == [0.0, 1.0, 2.0]


_TRAINING_SCRIPT = """
    import sys, types
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    import aotcache
    from aotcache.aot.fallback import fallback_counts

    loader = DataLoader(TensorDataset(torch.arange(24.0).reshape(8, 3)), batch_size=2)
    CFG = types.SimpleNamespace(scale=2.0)
    if sys.argv[1] == "holds_iter":
        CFG.train_iter = iter(loader)  # the loop draws batches; the forward reads only CFG.scale


    def forward(x):
        return x * CFG.scale


    compiled = aotcache.aot_function(forward, "nop", cache=False)
    for (x,) in loader:
        torch.testing.assert_close(compiled(x), x * 2.0)
    assert compiled.num_compiles == 1, compiled.num_compiles
    assert fallback_counts().get("partial:unsupported_construct", 0) == 0, fallback_counts()
"""


@pytest.mark.parametrize("config", [
    "plain",
    "holds_iter",  # NOTE [Iterators held under names no code reads]: counted before, sent to the fallback
])
def test_a_training_scripts_config_holding_its_loader_iterator_keeps_the_graph(tmp_path, config):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_TRAINING_SCRIPT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(aotcache.__file__).parent.parent),
                                                                  os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(script), config], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_counter_the_program_sets_on_a_library_config_object_is_drawn_once_per_call():
    """An object of a library's class the program reaches through its own code holds what the program put there
    (it was taken for the library's, and the graph kept its capture's draw: 3, 3, 3)."""
    transformers = pytest.importorskip("transformers")

    class KeepsItsConfig(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.PretrainedConfig()
            self.config.steps = itertools.count()

        def forward(self, x):
            return x * next(self.config.steps)

    compiled = aotcache.compile(KeepsItsConfig())
    assert [compiled(X)[0].item() for _ in range(3)] == [0.0, 1.0, 2.0]


class _KeepsIterators(nn.Module):
    """A model holding iterators its forward never reads (the training loop's)."""

    def __init__(self):
        super().__init__()
        self.loader_iter = iter([torch.ones(3)] * 4)
        self.pending = {"batches": zip(range(3), range(3))}
        self.steps = itertools.count()

    def forward(self, x):
        return x * 2


class _DrawsFromItsCounter(_KeepsIterators):
    def forward(self, x):
        return x * next(self.steps)


@pytest.mark.parametrize("reads", [False, True])
def test_an_iterator_the_model_keeps_under_a_name_no_code_reads_leaves_the_capture(reads):
    """NOTE [Iterators held under names no code reads], both directions: iterators the forward never names do not
    send the model to the fallback (they did: every iterator a program object held counted); one it draws from
    still does, and the draws are eager's."""
    from aotcache.aot.fallback import fallback_counts

    before = fallback_counts().get("partial:unsupported_construct", 0)
    compiled = aotcache.aot_module((_DrawsFromItsCounter if reads else _KeepsIterators)(), "nop", cache=False)
    values = [compiled(X)[0].item() for _ in range(3)]
    refused = fallback_counts().get("partial:unsupported_construct", 0) - before
    if reads:
        assert values == [0.0, 1.0, 2.0] and refused >= 1
    else:
        assert values == [2.0, 2.0, 2.0] and refused == 0 and compiled.compiled.num_compiles == 1


_LIBRARY_SOURCE = """
    import torch


    class Wrapper:
        def __init__(self, iterator):
            self._iterator = iterator

        def next_value(self):
            return next(self._iterator)


    def draw_from(source):
        return next(source.draws)


    def value_of(source):
        return source.value


    class SourceReader:
        def __init__(self, source):
            self._source = source

        def next_value(self):
            return next(self._source.draws)


    class CountingLayer(torch.nn.Module):
        def __init__(self, iterator):
            super().__init__()
            self._iterator = iterator

        def forward(self, x):
            return x * next(self._iterator)
"""


@pytest.fixture
def installed_library(tmp_path, monkeypatch):
    """A module of an installed distribution (its code is named, not read), imported from a site-packages folder."""
    from aotcache import code_origin

    site = tmp_path / "lib" / "site-packages"
    info = site / "iterlib-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: iterlib\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("aotc_iterlib\n")
    monkeypatch.syspath_prepend(str(site))
    code_origin.installed_distribution.cache_clear()
    code_origin._site_top_level_versions.cache_clear()
    library = _module_from_file(monkeypatch, site / "aotc_iterlib.py", "aotc_iterlib", _LIBRARY_SOURCE)
    assert code_origin.is_library("aotc_iterlib")
    yield library
    code_origin.installed_distribution.cache_clear()
    code_origin._site_top_level_versions.cache_clear()


class _DrawsThroughVars(nn.Module):
    def __init__(self):
        super().__init__()
        self.steps = itertools.count()

    def forward(self, x):
        for value in vars(self).values():
            if isinstance(value, itertools.count):
                return x * next(value)
        return x


class _DrawsThroughItsDictValues(_DrawsThroughVars):
    def forward(self, x):
        return x * next(next(v for v in self.__dict__.values() if isinstance(v, itertools.count)))


class _HoldsDraws:
    """A program object a library object reads an iterator from (``draws``: a name no program code reads)."""

    def __init__(self):
        self.draws = itertools.count()


@pytest.mark.parametrize("reach", ["vars", "dict_values", "library_method", "library_module", "behind_library"])
def test_an_iterator_advanced_without_the_program_naming_it_is_drawn_once_per_call(installed_library, reach):
    """NOTE [Iterators advanced by code the walk does not read]: the forward draws from an iterator whose name no
    program code reads (through ``vars(self)`` / ``self.__dict__``, or a library object's method or forward that
    reads its own attribute); only the program's names were looked at, and the graph kept its capture's draw
    (1, 1, 1)."""
    if reach == "vars":
        model = _DrawsThroughVars()
    elif reach == "dict_values":
        model = _DrawsThroughItsDictValues()
    elif reach == "library_method":
        class CallsALibraryMethod(nn.Module):
            def __init__(self):
                super().__init__()
                self.wrapper = installed_library.Wrapper(itertools.count())

            def forward(self, x):
                return x * self.wrapper.next_value()

        model = CallsALibraryMethod()
    elif reach == "behind_library":
        class ReadsThroughALibraryObject(nn.Module):
            def __init__(self):
                super().__init__()
                self.reader = installed_library.SourceReader(_HoldsDraws())

            def forward(self, x):
                return x * self.reader.next_value()

        model = ReadsThroughALibraryObject()
    else:
        class HoldsALibraryLayer(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = installed_library.CountingLayer(itertools.count())

            def forward(self, x):
                return self.layer(x)

        model = HoldsALibraryLayer()
    compiled = aotcache.aot_module(model, "nop", cache=False)
    assert [compiled(X)[0].item() for _ in range(3)] == [0.0, 1.0, 2.0]


def test_an_iterator_a_library_function_draws_from_a_program_object_is_drawn_once_per_call(installed_library):
    """NOTE [Library functions handed the program's objects]: the library function reads ``source.draws``, a name
    no program code reads (a known gap until session 24: the graph kept its capture's draw, 1, 1, 1)."""
    class PassesItsSource(nn.Module):
        def __init__(self):
            super().__init__()
            self.source = _HoldsDraws()

        def forward(self, x):
            return x * installed_library.draw_from(self.source)

    compiled = aotcache.aot_module(PassesItsSource(), "nop", cache=False)
    assert [compiled(X)[0].item() for _ in range(3)] == [0.0, 1.0, 2.0]


class _HoldsAValue:
    def __init__(self):
        self.value = 3.0


def test_a_library_function_handed_an_object_without_iterators_keeps_the_graph(installed_library):
    """The other direction of NOTE [Library functions handed the program's objects]: nothing to draw, one graph."""
    class PassesItsSource(nn.Module):
        def __init__(self):
            super().__init__()
            self.source = _HoldsAValue()

        def forward(self, x):
            return x * installed_library.value_of(self.source)

    compiled = aotcache.aot_module(PassesItsSource(), "nop", cache=False)
    assert [compiled(X)[0].item() for _ in range(3)] == [3.0, 3.0, 3.0]
    assert compiled.compiled.num_compiles == 1


_EXECD_MODEL_SOURCE = """
import itertools
from torch import nn

STEPS = itertools.count()


def shifted_by_the_next_step(x):
    return next(STEPS) * 10.0


def counted(x):
    return x + shifted_by_the_next_step(x)


class CountsItsCalls(nn.Module):
    def forward(self, x):
        return x + shifted_by_the_next_step(x)


class KeepsItsLoader(nn.Module):
    def __init__(self):
        super().__init__()
        self.loader_iter = iter(range(100))

    def forward(self, x):
        return x * 2
"""


def _execd_module(monkeypatch, registered: bool, name: str) -> types.ModuleType:
    """Model code ``exec``'d into a module object without a file (in ``sys.modules`` or not). Each under its own
    name: Dynamo (the fallback) reads a module it inlines from through its first import of that name, so a module
    replaced in ``sys.modules`` under the same name is read as the old one (torch's own, ``backend="eager"`` too)."""
    cells = types.ModuleType(name)
    if registered:
        monkeypatch.setitem(sys.modules, cells.__name__, cells)
    exec(compile(textwrap.dedent(_EXECD_MODEL_SOURCE), "<cells>", "exec"), cells.__dict__)
    return cells


@pytest.mark.parametrize("registered", [False, True])
@pytest.mark.parametrize("root", ["module", "function"])
def test_an_iterator_of_code_execd_into_a_module_without_a_file_is_drawn_once_per_call(monkeypatch, root, registered):
    """NOTE [The module of the compiled code]: the compiled code's own module counts as the program's, file or
    not (the counter was not counted: 1, 1, 1 where eager gives 1, 11, 21); an iterator held under a name the
    forward never reads still keeps one graph."""
    cells = _execd_module(monkeypatch, registered, f"aotc_execd_cells_{root}_{registered}")
    compiled = (aotcache.aot_module(cells.CountsItsCalls(), "nop", cache=False) if root == "module"
                else aotcache.aot_function(cells.counted, "nop", cache=False))
    assert [compiled(X)[0].item() for _ in range(3)] == [1.0, 11.0, 21.0]
    kept = aotcache.aot_module(cells.KeepsItsLoader(), "nop", cache=False)
    assert [kept(X)[0].item() for _ in range(3)] == [2.0, 2.0, 2.0] and kept.compiled.num_compiles == 1


_MAIN_WITHOUT_A_FILE_SCRIPT = """
import itertools, sys
import torch
from torch import nn
import aotcache

STEPS = itertools.count()


class CountsItsCalls(nn.Module):  # defined in __main__, as in a notebook cell
    def forward(self, x):
        return x + shifted_by_the_next_step(x)


def shifted_by_the_next_step(x):  # a helper of the same cell, reading the cell's global counter
    return next(STEPS) * 10.0


class KeepsItsLoader(nn.Module):
    def __init__(self):
        super().__init__()
        self.loader_iter = iter(range(100))

    def forward(self, x):
        return x * 2


x = torch.ones(3)
compiled = aotcache.compile(CountsItsCalls(), compiler="nop", cache=False)
print([compiled(x)[0].item() for _ in range(3)], compiled.route)
kept = aotcache.compile(KeepsItsLoader(), compiler="nop", cache=False)
print([kept(x)[0].item() for _ in range(3)], kept.route)
"""


@pytest.mark.parametrize("how", ["stdin", "-c"])
def test_an_iterator_of_a_main_module_without_a_file_is_drawn_once_per_call(how, tmp_path):
    """A notebook's cells, ``python -c`` and a script on stdin run as ``__main__`` without a file: their counters
    kept the capture's draw (11, 11, 11 where eager gives 1, 11, 21); an iterator held under a name the
    forward never reads still keeps one graph (NOTE [The main module of a notebook])."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(aotcache.__file__).parent.parent),
                                                                  os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-"] if how == "stdin" else [sys.executable, "-c", _MAIN_WITHOUT_A_FILE_SCRIPT]
    result = subprocess.run(command, input=_MAIN_WITHOUT_A_FILE_SCRIPT if how == "stdin" else None,
                            capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    counted, kept = result.stdout.strip().splitlines()[-2:]
    assert counted == "[1.0, 11.0, 21.0] dynamo"
    assert kept == "[2.0, 2.0, 2.0] aot"
