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
from aotcache.aot.script_objects import refuse_script_object_inputs
from aotcache.aot.unsupported_tensors import tensor_subclass_error, unsupported_layout_error
from aotcache.aot.tensor_subclasses import refuse_nested_int_inputs
from aotcache.fake_device_guard import keep_fake_cuda_guard_alive

__all__ = ["make_fake_inputs"]


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
