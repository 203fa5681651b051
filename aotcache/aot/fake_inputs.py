"""The fake (and symbolic) counterparts of a capture's flat arguments (:func:`make_fake_inputs`).

Tensors become fake tensors of a new FakeTensorMode, static or with the dimensions a dynamic spec names as
symbols; a marked int or float argument becomes its own SymInt / SymFloat (NOTE [Integer arguments], NOTE [Float
arguments] in dynamic_dims.py); inputs Dynamo made fake keep their mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aotcache.aot.cache_objects import CacheInt
from aotcache.aot.errors import CaptureError
from aotcache.aot.unsupported_tensors import tensor_subclass_error, unsupported_layout_error
from aotcache.aot.tensor_subclasses import refuse_nested_int_inputs
from aotcache.fake_device_guard import keep_fake_cuda_guard_alive

__all__ = ["make_fake_inputs", "refuse_script_object_inputs"]

# NOTE [TorchScript objects as inputs]
# A torchbind object (``torch.ScriptObject``: a C++ class registered with TorchScript, e.g. a tensor queue) reaches a
# capture as a graph input when Dynamo lifts one (an argument, a global or a module attribute whose methods the code
# calls: ``call_torchbind`` nodes). The capture passed it on as it is, so its trace ran the object's methods on the
# real object with fake tensors: a ``push`` left a fake tensor in the caller's queue and a ``pop`` took a real one
# out during the trace, and a later compiled call popped that fake tensor and returned it (found with PyTorch's
# test/export/test_torchbind.py, session 24: eager and ``aot_eager`` return real tensors). torch's own AOT Autograd
# traces a fake copy of such an object (its registered fake class). aotcache refuses them instead (a CaptureError
# before anything is traced: the backend runs the Dynamo graph as Python, ``aot_function`` falls back), so no trace
# touches the object.


def refuse_script_object_inputs(flat_args: Sequence[Any]) -> None:
    """Refuse TorchScript (torchbind) objects among a capture's inputs (NOTE [TorchScript objects as inputs]).

    :raises CaptureError: naming the argument position and the object's class.
    """
    from torch._library.fake_class_registry import FakeScriptObject

    for position, arg in enumerate(flat_args):
        if isinstance(arg, (torch.ScriptObject, FakeScriptObject)):
            qualified = arg._type().qualified_name() if isinstance(arg, torch.ScriptObject) else arg.script_class_name
            raise CaptureError(f"aotcache: flat argument {position} is a TorchScript object ({qualified}); a capture "
                               f"would run its methods on the object itself while tracing, so it is not captured",
                               reason="unsupported_construct")


def make_fake_inputs(flat_args: Sequence[Any], *, dynamic: bool | tuple) -> tuple[Any, list]:
    """Fake counterparts of ``flat_args`` (non-tensors unchanged) and the FakeTensorMode that owns them.

    Inputs that are already fake (Dynamo's example inputs) keep their mode and symbols. Otherwise a new mode is
    made; with ``dynamic`` every dimension gets its own symbol (no duck sizing), guarded after tracing; with a
    spec (a tuple per argument, NOTE [Dynamic dimensions] in dynamic_dims.py) only the dimensions it names.
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    refuse_script_object_inputs(flat_args)  # NOTE [TorchScript objects as inputs]
    for position, arg in enumerate(flat_args):
        if isinstance(arg, torch.Tensor) and arg.layout != torch.strided:
            raise unsupported_layout_error(f"flat argument {position}", arg.layout)
        if is_traceable_wrapper_subclass(arg):  # NOTE [Tensor subclass arguments]
            raise tensor_subclass_error(f"flat argument {position}", type(arg))
    existing = detect_fake_mode(list(flat_args))
    keep_fake_cuda_guard_alive()  # NOTE [A fake CUDA guard owned by a finished thread]
    if existing is not None:
        fakes = [existing.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in flat_args]
        return existing, fakes
    if not dynamic:
        refuse_nested_int_inputs(flat_args)  # NOTE [Offsets of nested tensors as inputs]
        # real tensors read from closures / globals become graph constants (NOTE [closed-over tensors] in refusals.py)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        return mode, [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a
                      for a in flat_args]

    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    # data-dependent ops raise (and are explained) instead of allocating unbacked symbols
    shape_env = ShapeEnv(allow_scalar_outputs=False, allow_dynamic_output_shape_ops=False)
    mode = FakeTensorMode(shape_env=shape_env, static_shapes=False, allow_non_fake_inputs=True)
    fakes = []
    for position, arg in enumerate(flat_args):
        if type(arg) is CacheInt and (dynamic[position] if isinstance(dynamic, tuple) else True):
            fakes.append(_symbolic_int(shape_env, int(arg), f"aot_input_{position}"))  # NOTE [Cache integers]
            continue
        if type(arg) is int and isinstance(dynamic, tuple) and dynamic[position]:  # NOTE [Integer arguments]
            fakes.append(_symbolic_int(shape_env, arg, f"aot_input_{position}", plain=True))
            continue
        if type(arg) is float and isinstance(dynamic, tuple) and dynamic[position]:  # NOTE [Float arguments]
            fakes.append(_symbolic_float(shape_env, arg, f"aot_input_{position}"))
            continue
        if isinstance(arg, torch.Tensor):
            dims = dynamic[position] if isinstance(dynamic, tuple) else range(arg.dim())
            if isinstance(dynamic, tuple) and not dims:  # a static argument of a spec (a module's weights):
                fakes.append(mode.from_tensor(arg, static_shapes=True))  # no symbols to create (~25 ms each)
                continue
            context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC if dim in dims else DimDynamic.STATIC
                                                              for dim in range(arg.dim())])
            arg = mode.from_tensor(arg, static_shapes=False, source=ConstantSource(f"aot_input_{position}"),
                                   symbolic_context=context)
        fakes.append(arg)
    return mode, fakes


def _symbolic_int(shape_env: Any, value: int, name: str, plain: bool = False) -> Any:
    """A SymInt input of ``value`` (its own symbol). For a cache integer 0 and 1 stay ints, as torch specializes
    sizes (the signature keeps those values: NOTE [Cache integers]); a ``plain`` int argument is a symbol for
    every value, of either sign, as torch.compile traces an int input (NOTE [Integer arguments])."""
    if value in (0, 1) and not plain:
        return value
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    source = ConstantSource(name)
    symbol = shape_env.create_symbol(value, source=source, dynamic_dim=DimDynamic.DYNAMIC,
                                     positive=None if plain else True, do_not_specialize_zero_one=plain)
    return shape_env.create_symintnode(symbol, hint=value, source=source)


def _symbolic_float(shape_env: Any, value: float, name: str) -> Any:
    """A SymFloat input of ``value`` (its own symbol), as torch.compile traces a float input (NOTE [Float
    arguments] in dynamic_dims.py)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    source = ConstantSource(name)
    # positive=None: either sign (the default, positive, let sympy decide ``s > 0`` without a guard)
    symbol = shape_env.create_symbol(value, source=source, dynamic_dim=DimDynamic.DYNAMIC, positive=None)
    return shape_env.create_symfloatnode(symbol, hint=value, source=source)
