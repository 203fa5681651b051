"""OpInfo sweep: every PyTorch op that supports float32 on CPU, through aot_function (nop compiler) vs eager.

For each op of ``op_db`` (one test per op name + variant) the first float32 sample input runs through
``verify``: outputs, output aliasing, input mutations and, for differentiable ops, the gradients of every input
that requires grad. Known failures are listed one by one in ``XFAILS`` / ``FLAKY`` with the reason found when
investigating them; the strict ones turn into failures once fixed, so the list has to be kept current.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree

from tests.aot.verify import verify

try:
    from torch.testing._internal.common_methods_invocations import op_db
except ModuleNotFoundError as error:  # expecttest is a test-only dependency of torch.testing._internal
    raise ImportError(
        f"tests/aot/test_opinfo.py needs {error.name!r} to import PyTorch's op database: "
        "`pip install expecttest` (part of the project's test dependencies)") from error

OPINFO_ATOL = 1e-4
OPINFO_RTOL = 1e-4
# NOTE [random ops]
# OpInfo wraps its random ops in ``wrapper_set_seed``: ``torch.manual_seed(42)`` inside ``freeze_rng_state``.
# That seeding is a Python side effect a traced graph cannot replay (and the state is restored after tracing),
# so the compiled graph draws from whatever the global generator holds. Seeding the global generator with
# the same 42 before each call, on both sides, makes eager and compiled draw the same numbers, which checks
# that the graph runs the same random ops in the same order. Since the capture refuses a function that sets the
# generator's state back (NOTE [Generator states set back inside the function] in aotcache/aot/host_random.py: eager
# leaves the generator unmoved, a graph cannot), ``wrapper_set_seed`` is made a plain call while an op runs here.
OPINFO_RNG_SEED = 42


@contextlib.contextmanager
def _opinfo_seeding_off(op: Any) -> Iterator[None]:
    """OpInfo's ``wrapper_set_seed(op, ...)`` as ``op(...)`` in every loaded module of torch's test internals
    (its lambdas read the name at call time) and as ``op``'s gradcheck wrapper; both sides are seeded before each
    call instead (NOTE [random ops])."""
    from torch.testing._internal import common_methods_invocations

    original = getattr(common_methods_invocations, "wrapper_set_seed", None)
    if original is None:
        yield
        return

    def plain_call(op, *args, **kwargs):
        return op(*args, **kwargs)

    patched = [module for name, module in list(sys.modules.items())
               if name.startswith("torch.testing._internal") and getattr(module, "wrapper_set_seed", None) is original]
    for module in patched:
        module.wrapper_set_seed = plain_call
    wrapped = getattr(op, "gradcheck_wrapper", None) is original
    if wrapped:
        op.gradcheck_wrapper = plain_call
    try:
        yield
    finally:
        for module in patched:
            module.wrapper_set_seed = original
        if wrapped:
            op.gradcheck_wrapper = original

_DATA_VALUE = ("returns or branches on a value read from tensor data ({}): a fake-tensor trace cannot know it "
               "(CaptureError, as in PyTorch's AOT Autograd)")
_DATA_SHAPE = ("output shape depends on tensor data ({}): not capturable with static shapes "
               "(CaptureError, as in PyTorch's AOT Autograd)")

# op id -> reason: limitations shared with PyTorch's AOT Autograd, each seen failing here. Strict: a fix
# turns the test into an XPASS failure, and the entry must then be removed.
XFAILS: dict[str, str] = {
    "allclose": _DATA_VALUE.format("aten.allclose returns a Python bool"),
    "equal": _DATA_VALUE.format("aten.equal returns a Python bool"),
    "item": _DATA_VALUE.format("aten._local_scalar_dense"),
    "corrcoef": _DATA_VALUE.format("cov/corrcoef compare their weights with aten.equal"),
    "cov": _DATA_VALUE.format("cov compares its weights with aten.equal"),
    "nn.functional.gaussian_nll_loss": _DATA_VALUE.format("`if torch.any(var < 0)` in Python"),
    "argwhere": _DATA_SHAPE.format("aten.nonzero"),
    "nonzero": _DATA_SHAPE.format("aten.nonzero"),
    "masked_select": _DATA_SHAPE.format("aten.masked_select"),
    "unique": _DATA_SHAPE.format("aten._unique2"),
    "unique_consecutive": _DATA_SHAPE.format("aten.unique_consecutive"),
    "linalg.lstsq": _DATA_SHAPE.format("aten.linalg_lstsq: rank/singular-value outputs depend on the driver"),
    "linalg.lstsq.grad_oriented": _DATA_SHAPE.format("aten.linalg_lstsq"),
    "nn.functional.ctc_loss": _DATA_SHAPE.format("aten._ctc_loss sizes follow the target lengths' values"),
    "tensor_split": _DATA_VALUE.format("split indices given as a tensor are read by the C++ kernel"),
    "sparse.mm.reduce": ("sparse CSR input: fake tensors and functionalization do not support it (PyTorch's AOT "
                         "Autograd fails too); CaptureError naming the argument and its layout"),
    "sparse.sampled_addmm": "sparse CSR input: not supported, as for sparse.mm.reduce",
    "to_sparse": ("sparse COO result: functionalization drops autograd through sparse tensors (PyTorch's AOT "
                  "Autograd silently returns requires_grad=False); aotcache raises a CaptureError naming "
                  "torch.Tensor.to_sparse instead of dropping gradients"),
}

# torch 2.14 changed aten.combinations to select with aten.nonzero_static (its output count, C(n, r), follows
# from the input's shape), no longer with aten.masked_select: from 2.14 it is captured whole, and the sweep
# compares it with eager like any other op.
if torch.__version__ < "2.14":
    XFAILS["combinations"] = _DATA_SHAPE.format("implemented with aten.masked_select before torch 2.14")



def _fake_quantile_reads_data() -> bool:
    """Whether this torch's quantile checks ``q`` against [0, 1] by reading tensor data (torch 2.11's ATen
    kernel compares ``all(0 <= q <= 1)`` with ``aten.equal``, a Python bool); 2.13's does not."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    with FakeTensorMode():
        try:
            torch.quantile(torch.empty(3), 0.5)
        except DataDependentOutputException:
            return True
    return False


# Upstream: a kernel that reads data on a fake tensor is refused with a CaptureError, as in PyTorch's own AOT
# Autograd; the call then runs through the fallback with eager's values.
if _fake_quantile_reads_data():
    for _name in ("quantile", "nanquantile"):
        XFAILS[_name] = _DATA_VALUE.format("this torch's quantile checks q's range with aten.equal (2.11)")


# op id -> reason: bugs in aotcache found by this sweep (reported with reproducers). Not strict while the
# implementation is being fixed; an XPASS here means the entry can be removed.
BUGS: dict[str, str] = {}

# op id -> reason, for failures that come and go (strict=False).
FLAKY: dict[str, str] = {
    name: "returns uninitialized memory: the values differ between any two calls (passes only by chance)"
    for name in ["empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided"]
}


def op_id(op: Any) -> str:
    """``name`` or ``name.variant``, the test id of an OpInfo entry."""
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


# NOTE [jiterator ops]
# The ``jiterator_*`` entries declare float32 support on every device but are CUDA-only kernels (eager
# raises on CPU); they are not ops this CPU sweep can compare, so they are left out rather than xfailed.
OPS = {op_id(op): op for op in op_db
       if torch.float32 in op.supported_dtypes("cpu") and not op.name.startswith("jiterator_")}


def first_sample(op: Any) -> Any:
    """The first float32 CPU sample input of ``op`` (with requires_grad where the op supports autograd)."""
    sample = next(iter(op.sample_inputs("cpu", torch.float32, requires_grad=op.supports_autograd)), None)
    assert sample is not None, f"OpInfo {op_id(op)} has no float32 CPU sample input"
    return sample


def function_of_tensors(op: Any, sample: Any) -> tuple[Callable, list[torch.Tensor]]:
    """Turn ``op(sample.input, *sample.args, **sample.kwargs)`` into ``fn(*tensors)`` with the rest constant."""
    leaves, spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def call_op(*tensors: torch.Tensor) -> Any:
        filled = list(leaves)
        for position, tensor in zip(tensor_positions, tensors):
            filled[position] = tensor
        inp, args, kwargs = pytree.tree_unflatten(filled, spec)
        # as in OpInfo's own gradient tests: the gradcheck wrapper and the sample's output post-processing make
        # ill-defined gradients well-defined (e.g. the phase of linalg.eig's eigenvectors)
        return sample.output_process_fn_grad(op.gradcheck_wrapper(op.op, inp, *args, **kwargs))

    call_op.__name__ = f"opinfo_{op.name.replace('.', '_')}"
    return call_op, [leaves[i] for i in tensor_positions]


def capture_or_raise_api() -> Any:
    """aotcache's API with ``on_capture_error="raise"``: a whole graph or an error, no fallback."""
    import functools

    import aotcache

    return SimpleNamespace(aot_function=functools.partial(aotcache.aot_function, on_capture_error="raise"),
                           aot_module=functools.partial(aotcache.aot_module, on_capture_error="raise"),
                           name="aotcache")


def run_op(op: Any, *, api: Any = None, compiler: Any = None, check_compiled: bool = True) -> None:
    """Verify one op's first sample through AOT Autograd against eager (raises on mismatch)."""
    sample = first_sample(op)
    fn, tensors = function_of_tensors(op, sample)
    with _opinfo_seeding_off(op):  # NOTE [random ops]
        verify(fn, tensors, compiler=compiler, train=op.supports_autograd, steps=1, atol=OPINFO_ATOL,
               rtol=OPINFO_RTOL, api=api, rng_seed=OPINFO_RNG_SEED, check_compiled=check_compiled)


def _params():
    for name in sorted(OPS):
        marks = []
        if name in XFAILS:
            marks.append(pytest.mark.xfail(reason=XFAILS[name], strict=True))
        elif name in BUGS:
            marks.append(pytest.mark.xfail(reason=BUGS[name], strict=False))
        elif name in FLAKY:
            marks.append(pytest.mark.xfail(reason=FLAKY[name], strict=False))
        yield pytest.param(name, id=name, marks=marks)


def test_xfail_lists_name_real_ops() -> None:
    """Every xfail entry names an op of the current op_db (a renamed op must not leave a stale entry)."""
    listed = [*XFAILS, *BUGS, *FLAKY]
    stale = sorted(set(listed) - set(OPS))
    assert not stale, f"xfail entries for ops not in op_db: {stale}"
    assert len(listed) == len(set(listed)), "an op is listed in more than one xfail table"


@pytest.mark.parametrize("name", list(_params()))
def test_aot_matches_eager(name: str) -> None:
    """The op captured as one graph (``on_capture_error="raise"``): XFAILS are whole-capture limitations."""
    run_op(OPS[name], api=capture_or_raise_api())


@pytest.mark.parametrize("name", sorted(XFAILS))
def test_capture_limitations_run_through_the_fallback(name: str) -> None:
    """NOTE [Capture fallback]: with the default ``on_capture_error="fallback"`` the ops that cannot be captured
    whole still give eager's outputs and gradients (partially compiled, or eager)."""
    run_op(OPS[name], check_compiled=False)
