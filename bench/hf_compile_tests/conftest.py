"""Runs transformers' own compile tests with ``torch.compile`` redirected to aotcache (a check, not a timing).

Copy this file and ``run.sh`` into a directory holding a checkout's ``tests/``, ``utils/test_module/`` and its
root ``conftest.py`` renamed ``hf_root_conftest.py`` (transformers' test files are not vendored here: bench/README.md
says where they came from and the adaptations they needed). ``S13_VARIANT``: ``torch`` (as written),
``backend`` (``torch.compile(m, backend="aotcache", ...)``) or ``compile`` (``aotcache.compile(m, **kw)``, the
keywords as given, ``backend=`` included); ``S13_COMPILER``: ``nop`` (default), ``inductor``, or ``default``
(aotcache's own choice: ``backend=`` then decides); ``S13_LOG``: a file that gets one line per redirected call.
"""
import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "deps"))  # parameterized, installed with --target

import transformers.testing_utils as _tu  # noqa: E402
from huggingface_hub.utils import httpx as _httpx  # noqa: E402

sys.modules.setdefault("httpx", _httpx)  # the installed hub ships httpx as httpx2; the tests import httpx

if not hasattr(_tu, "_TEXT_MODEL_TESTER_DEFAULTS"):  # a name the tests import that 5.25.0 no longer defines
    _defaults = os.path.join(os.path.dirname(__file__), "text_defaults.txt")
    exec(open(_defaults).read(), _tu.__dict__)  # noqa: S102  the dict, as the tests' own checkout defines it

if os.environ.get("S13_CPU_AS_ACCELERATOR") == "1":
    # test_torch_compile_for_training / test_sdpa_can_compile_dynamic are marked for accelerators (and slow):
    # run them on the CPU (with RUN_SLOW=1)
    _tu.require_torch_accelerator = lambda test_case: test_case
    _tu.get_device_properties = lambda: ("cuda", 8, 0)

from hf_root_conftest import *  # noqa: E402,F401,F403  transformers' own root conftest

import torch  # noqa: E402

VARIANT = os.environ.get("S13_VARIANT", "torch")
COMPILER = os.environ.get("S13_COMPILER", "nop")
LOG = os.environ.get("S13_LOG")
_torch_compile = torch.compile


def _log(line):
    if LOG:
        with open(LOG, "a") as f:
            f.write(line + "\n")


if VARIANT != "torch":
    os.environ.setdefault("AOTCACHE_CACHE_DIR", tempfile.mkdtemp(prefix="s13_aotcache_"))
    import aotcache  # noqa: E402

    def _redirected(model=None, **kw):
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        _log(f"{test}\t{VARIANT}\t{sorted(kw.items())!r}")
        if model is None:  # the decorator form
            return lambda m: _redirected(m, **kw)
        if VARIANT == "backend":
            kw.pop("backend", None)
            options = dict(kw.pop("options", None) or {})
            options.setdefault("compiler", COMPILER)
            if kw.get("mode") is not None:  # torch.compile refuses mode with options: the compiler by partial
                from aotcache.backend import aotcache_backend
                return _torch_compile(model, backend=functools.partial(aotcache_backend, **options), **kw)
            return _torch_compile(model, backend="aotcache", options=options, **kw)
        if COMPILER != "default":
            kw.setdefault("compiler", COMPILER)
        return aotcache.compile(model, **kw)

    torch.compile = _redirected
