"""The layering of docs/design.md, checked on the sources: each layer imports only from below."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aotcache"


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names (at any depth: lazy imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package, forbidden", [
    ("store", ("torch", "aotcache.aot", "aotcache.autograd_cache", "aotcache.compilers", "aotcache.api")),
    ("aot", ("aotcache.autograd_cache", "aotcache.api", "aotcache.compile_api", "aotcache.backend",
             "aotcache.cli")),
    ("autograd_cache", ("aotcache.api", "aotcache.compile_api", "aotcache.backend", "aotcache.cli")),
])
def test_a_layer_imports_nothing_from_above(package, forbidden):
    offending = {f"{path.relative_to(PACKAGE)}: {name}"
                 for path in (PACKAGE / package).rglob("*.py") for name in imported_modules(path)
                 if any(name == bad or name.startswith(bad + ".") for bad in forbidden)}
    assert not offending, sorted(offending)


def test_importing_the_aot_core_loads_no_cache_module():
    """``aot/`` gets the cache through its compile services (NOTE [Compile services]); importing it, or
    reading the public names it re-exports lazily, is separate from the cache layer until they are used."""
    code = ("import sys, importlib, pkgutil, aotcache.aot as aot\n"
            "for info in pkgutil.iter_modules(aot.__path__): importlib.import_module('aotcache.aot.' + info.name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('aotcache.autograd_cache')))\n"
            "from aotcache.aot import aot_function\n"
            "import aotcache\n"
            "print(aot_function is aotcache.aot_function)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"
