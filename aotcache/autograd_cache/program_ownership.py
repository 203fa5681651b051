"""Which of the objects a walk reaches are the program's own, by positive evidence (NOTE [Iterators a program
advances] in reachable.py): code from a real source file outside the installed packages, the standard library,
torch and aotcache, reached from the walk's roots without passing through another's code."""

from __future__ import annotations

import argparse
import os
import sys
import types
from collections.abc import Collection
from typing import Any

import torch

from aotcache.autograd_cache.code_reading import computed_getattr
from aotcache.code_origin import defining_module, is_library

def is_program_module(module_name: str | None) -> bool:
    """Whether ``module_name`` is a module of the program's own source: loaded from a real file that is not
    under site-packages / dist-packages, and neither torch, aotcache, the standard library nor an installed
    distribution; or the interpreter's ``__main__`` without a file (NOTE [The main module of a notebook]). Another
    module without a real file (execnet's ``__channelexec__``, code exec'd from ``<string>``) is not counted here:
    nothing shows whose it is (the module of the compiled code is: NOTE [The module of the compiled code])."""
    if not module_name or is_library(module_name):
        return False
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not os.path.isfile(path):
        return module_name == "__main__" and module is not None
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return "site-packages" not in parts and "dist-packages" not in parts


# NOTE [The module of the compiled code]
# Code ``exec``'d into a module object of the program's making (``mod = types.ModuleType("cells"); exec(source,
# mod.__dict__)``: a notebook extension, a config system compiling model code from a string, a test building a
# model from source) has no file either, and nothing in general shows whose it is: its iterators were not counted, so
# a model class defined there whose helper draws from the module's ``itertools.count`` kept its capture's draw (a
# known gap until session 24). The code the user compiled is the program's by construction: the module defining a
# root (the compiled function, the compiled module's class) counts as the program's, whatever its file, unless it
# is a library's. Other fileless modules (execnet's ``__channelexec__``) still count only as ``__main__`` does.
def root_module(value: Any) -> str | None:
    """The module defining a walk's root, counted as the program's (NOTE [The module of the compiled code])."""
    if isinstance(value, types.MethodType):
        value = value.__func__
    if isinstance(value, (types.FunctionType, torch.nn.Module)):
        name = _module_of(value)
        return name if name and not is_library(name) else None
    return None


# NOTE [The main module of a notebook]
# A notebook's cells (IPython, Jupyter), the interactive interpreter, ``python -c`` and a script read from stdin
# (``python - <<EOF``, whose ``__file__`` is ``<stdin>``) run as ``__main__`` with no file: code that is the user's
# by construction, which a library never is (a runner's main module has its file: ``python -m pytest`` runs
# ``pytest/__main__.py``, pytest-xdist's workers run as ``__channelexec__``). It counts as the program's, so a notebook model's ``next(self.steps)`` is
# refused as a script's is; before, it kept its capture's draw (1, 1, 1 where eager gives 0, 1, 2).


def _module_of(value: Any) -> str | None:
    """The module whose source defines ``value``: a module itself, a function's, a class's, or an object's class."""
    if isinstance(value, types.ModuleType):
        return value.__name__
    if isinstance(value, types.FunctionType):
        return defining_module(value)
    if isinstance(value, type):
        return getattr(value, "__module__", None)
    return type(value).__module__


# NOTE [Iterators held under names no code reads]
# The walk writes down a program object whole (an ``nn.Module``'s or a config bag's every attribute), so an
# iterator the training loop keeps there (``CFG.train_iter = iter(loader)``, ``self.loader_iter``) was counted
# though the function never reads it, and its capture went to the fallback for nothing (found in the session 22
# review). An object's iterator counts only when some name on its path in the object's ``__dict__`` (the
# attribute, and a string key of a dict held there) is among the names the walked code reads (its attribute
# names and string constants: ``next(self.steps)``, ``self.counters["a"]``). Where that cannot be told it counts:
# an iterator held deeper or in a slot, or any walked function reading an attribute by a computed name
# (``getattr(self, name)``). Code's own iterators (a module's or function's globals, cells, defaults) are read
# through names the walk already follows, so they always count.
# NOTE [Iterators advanced by code the walk does not read]
# The names are those of the program's code only. A library's method the forward calls reads its own object's
# attributes unseen (``self.wrapper.next_batch()`` advancing ``wrapper._it``; a library ``nn.Module``'s forward
# drawing from its own counter), and the program's code can read attributes without naming them (``vars(self)``,
# ``self.__dict__.values()``, ``operator.attrgetter(name)``, ``dataclasses.asdict(self)``): the graph kept its capture's draw (1, 1, 1; session 22
# review). So an iterator counts whatever its name when its holder's class has a library class other than
# ``object``, ``nn.Module`` or a plain attribute bag in its MRO, or is reached from such an object (a library
# reader over the program's own source object), or when the code reads attributes that way.
# NOTE [Library functions handed the program's objects]
# The program's code may pass one of its objects to a library's function, class or method (``lib.draw_from(
# self.source)``, ``lib.Reader(self.source).next_value()``), whose code (named, not read) then reads the object's
# attributes by names the program never uses: an iterator held there kept its capture's draw (1, 1, 1; a known gap
# until session 24). Which objects a call hands over cannot be told without running the code, so when the walk
# reaches any code of an installed distribution other than torch and the standard library (a function, a class, an
# object of such a class), an object's iterator counts whatever its name. torch's and the standard library's code
# is left out: it takes tensors and plain values, and reads iterators it is handed (``itertools.islice(self.it,
# 2)``) under the program's own name for them. The cost: a program using such a library that keeps an iterator in a
# reached object under a name no code reads (a training loop's) runs through the fallback.
UNNAMED_ATTRIBUTE_READS = frozenset({"__dict__", "vars", "__getattribute__", "attrgetter", "getmembers", "asdict",
                                     "astuple", "getattr_static", "__getstate__"})
_METHODLESS_LIBRARY_CLASSES = frozenset({object, torch.nn.Module, types.SimpleNamespace, argparse.Namespace})


def _library_code_reads_holder(holder: Any) -> bool:
    """Whether a library class's methods may read ``holder``'s attributes (NOTE [Iterators advanced by code the
    walk does not read])."""
    return any(cls not in _METHODLESS_LIBRARY_CLASSES and is_library(getattr(cls, "__module__", None))
               for cls in type(holder).__mro__)


def _held_under_a_read_name(holder: Any, iterator: Any, names: Collection[str]) -> bool:
    """Whether ``holder`` keeps ``iterator`` under a name the code reads, or somewhere this cannot tell."""
    if _library_code_reads_holder(holder) or not UNNAMED_ATTRIBUTE_READS.isdisjoint(names):
        return True
    attributes = getattr(holder, "__dict__", None)
    if not isinstance(attributes, dict):
        return True
    paths = []
    for name, value in list(attributes.items()):
        if value is iterator:
            paths.append((name,))
        elif isinstance(value, dict):
            paths.extend((name, key) for key, member in list(value.items()) if member is iterator)
        elif isinstance(value, (list, tuple)) and any(member is iterator for member in value):
            paths.append((name,))
    if not paths:
        return True
    return any(all(part in names for part in path if isinstance(part, str)) for path in paths)


def is_code(value: Any) -> bool:
    """A function, class or module: its state (globals, closure cells, class attributes) belongs to the code
    that defines it."""
    return isinstance(value, (types.FunctionType, type, types.ModuleType))


class ProgramOwnership:
    """The edges between a walk's nodes and the iterators each node holds; :meth:`program_iterators` keeps those
    held by the program's own code, reached from the roots through the program's code only.

    NOTE [Iterators a program advances] (the ownership half): a node's state belongs to the program when some
    path from a root reaches it without entering code that is not the program's (a library's function, class or
    module), and the node is the program's code (a function, class or module of a program module) or any object:
    an object on such a path holds what the program put there, whoever's class it is (an ``nn.Sequential`` with
    a counter the program's hook draws from, a transformers config the program keeps a counter on). An object's
    iterator counts only under a name the walked code reads (NOTE [Iterators held under names no code reads]).
    """

    def __init__(self) -> None:
        self._children: dict[int | None, set[int]] = {}  # node index (None: a root) -> nodes its token names
        self._iterators: dict[int | None, list[Any]] = {}  # node index (None: a root) -> iterators it holds
        self._is_program: dict[int, bool] = {}
        self._program_modules: dict[str | None, bool] = {}

    def root(self, value: Any) -> None:
        """A root of the walk: the module defining it is the program's (NOTE [The module of the compiled code])."""
        name = root_module(value)
        if name is not None:
            self._program_modules[name] = True
            self._is_program.clear()

    def edge(self, holder: int | None, index: int) -> None:
        self._children.setdefault(holder, set()).add(index)

    def iterator(self, holder: int | None, iterator: Any) -> None:
        self._iterators.setdefault(holder, []).append(iterator)

    def program_iterators(self, objects: list[Any], names: Collection[str] = (), *, any_name: bool = False
                          ) -> list[Any]:
        """The iterators held by nodes the program owns (a root's own iterators count: the program passed them)
        under a name the walked code reads (``names``; NOTE [Iterators held under names no code reads]), or under
        any name (``any_name``: NOTE [Library functions handed the program's objects])."""
        if not self._iterators:
            return []
        owned: set[int] = set()
        queue: list[int | None] = [None]
        while queue:
            holder = queue.pop()
            for child in self._children.get(holder, ()):
                # entering code that is not the program's (a library's function, class or module) cuts the path
                if child not in owned and (not is_code(objects[child]) or self._program_node(objects, child)):
                    owned.add(child)
                    queue.append(child)
        # what a library object's methods may read, whatever its name: the object and all it reaches (NOTE
        # [Iterators advanced by code the walk does not read])
        library_read = {index for index in owned
                        if not is_code(objects[index]) and _library_code_reads_holder(objects[index])}
        queue = list(library_read)
        while queue:
            for child in self._children.get(queue.pop(), ()):
                if child in owned and child not in library_read:
                    library_read.add(child)
                    queue.append(child)
        held = list(self._iterators.get(None, ()))
        computed = True if any_name else None
        for index in owned:
            holder = objects[index]
            # an object on a path through the program's code holds what the program put there, whoever's class
            # it is (a transformers config the program keeps counters on); code holds its own module's state
            if is_code(holder) and not self._program_node(objects, index):
                continue
            for iterator in self._iterators.get(index, ()):
                if computed is None and not is_code(holder):
                    computed = any(isinstance(o, types.FunctionType) and computed_getattr(o.__code__)
                                   and self._program_node(objects, i) for i, o in enumerate(objects))
                if is_code(holder) or computed or index in library_read or \
                        _held_under_a_read_name(holder, iterator, names):
                    held.append(iterator)
        return held

    def _program_node(self, objects: list[Any], index: int) -> bool:
        """Whether code node ``index`` (a function, class or module) is the program's own."""
        known = self._is_program.get(index)
        if known is None:
            module_name = _module_of(objects[index])
            if module_name not in self._program_modules:
                self._program_modules[module_name] = is_program_module(module_name)
            known = self._program_modules[module_name]
            self._is_program[index] = known
        return known
