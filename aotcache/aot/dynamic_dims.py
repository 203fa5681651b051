"""Which input dimensions a capture traces as symbols: ``dynamic`` (True, False, None) resolved per call.

NOTE [Dynamic dimensions]
``dynamic`` of ``aot_function`` / ``aot_module`` is True, False or None (the default), and is resolved per
call into a *dimension spec*: per flat argument, the tuple of its dimensions traced as symbols (``()`` for a
static argument or a non-tensor; ``(0,)`` for an integer of a KV-cache object traced as a symbol, NOTE [Cache
integers] in cache_objects.py). The spec takes the place of the flag in the options a compile sees
(``AOTOptions.dynamic``), in the in-memory signature (masked sizes) and in the call fingerprint:

- False: no spec; every size is part of the signature (one graph per shape).
- True: every dimension of every tensor argument, except an ``aot_module``'s parameters (and the weights an
  ``aot_function`` call names: NOTE [Weights named by num_params_buffers]), which stay static as in
  ``torch.compile`` (weights do not change size between calls; symbolic weights made captures many times
  slower and guard expressions ten times longer), and its buffers, which are automatic as under None (NOTE
  [Buffers that change size]).
- None, automatic as in ``torch.compile``: static first. A later call with the same structure, dtypes and
  ranks whose sizes differ from the first call's marks the differing dimensions dynamic (for good, logged at
  INFO); the next compile traces them as symbols, and calls that differ only in marked dimensions reuse that
  graph while its guards hold. The graphs compiled before stay in use for their own shapes. An
  ``aot_module``'s buffers take part (NOTE [Buffers that change size]), its parameters do not.

A masked signature leaves out the marked sizes only: every other size, and the strides and storage offsets
of tensors with marked dimensions, are checked by the graph's guards (produced with ``ignore_static=False``).

NOTE [Buffers that change size]
A forward may rebind a buffer to a tensor of another size at every call (a growing history, ``self.cache =
torch.cat([self.cache, x])``, a KV cache kept on the module by custom decoding code: NOTE [Buffers and parameters
rebound by forward] in module_state.py), or the caller may replace a buffer between calls. Buffers used to stay
static like parameters, so such a module traced a graph per call until the recompile limit sent it to eager.
Under automatic dynamic shapes a buffer is compared with its first call's sizes like a caller's tensor, and its
changed dimensions are marked dynamic: the loop compiles two graphs (the first size, then the symbolic one).
Parameters stay static (an optimizer holds them; a size change is a replaced layer, one graph per shape). The
marked buffer is a symbolic input as any other: a branch on its size is a guard of the graph (another size
that takes the other branch traces again), its sizes are masked in the signature and the call fingerprint, and
its strides and storage offset are checked by the guards. Under ``dynamic=True`` buffers are automatic too
(static at first, marked once they change), where torch.compile keeps them static in both modes: torch 2.13's
Dynamo reads a buffer through the module's ``_buffers`` and ``force_parameter_static_shapes`` (default True)
makes every tensor read that way static, buffers and parameters alike, so the loop above compiles 8 graphs
there and then runs eagerly at its recompile limit (with ``force_parameter_static_shapes=False`` it compiles 2,
parameters made automatic as well). ``dynamic=True`` must not be less dynamic than the default, and marking
only what changed costs nothing for the usual buffer that keeps its size (a BatchNorm's statistics, RoPE's
``inv_freq``).

NOTE [Weights named by num_params_buffers]
``aot_function(f, ..., num_params_buffers=n)`` says that the first ``n`` flat arguments are a model's parameters
and buffers (PyTorch's ModuleInfo tests pass ``functional_call``'s weights so). PyTorch's ``aot_function`` keeps
their sizes static under ``dynamic=True`` (``static_weight_shapes``); aotcache ignored the number and traced
every dimension of every weight as its own symbol. Each size relation a layer needs (``in_proj_weight`` is
three times ``d_model``, a view's product equals the numel) then became a guard for the ShapeEnv to prove or
simplify: the symbolic TransformerDecoderLayer test's inputs without a batch dimension captured 3-4 times
slower than PyTorch's (CPU time), the whole test ran past 25 minutes on a loaded machine, and a model's weights
never change size between calls anyway. Those arguments are now static as an ``aot_module``'s parameters are
(``num_state = num_params = n`` for :meth:`DynamicDims.spec`): never marked, under ``dynamic=True`` and
``None`` alike, their sizes kept in the signature and checked by the guards, so a weight of another size
traces a graph of its own. Only ``aot_function`` reads the number (an ``aot_module`` knows its weights).

NOTE [Integer arguments]
A plain ``int`` argument is a constant of the graph, compared by value, until it changes: under automatic
dynamic shapes a later call whose int differs from the first call's marks it dynamic like a tensor dimension
(its value is its one "dimension" here), and the next compile traces it as a symbol (a graph input; branches
on it become guards; 0, 1 and negative values included, as torch.compile traces an int input). A diffusion
loop passing its timestep as an int compiled a graph per step; torch.compile compiles two (static, then
dynamic), and so does aotcache now. ``torch.tensor([t])`` of such a symbol is built as graph ops (NOTE
[Tensors made from symbolic scalars] in symbolic_scalars.py), or the trace would specialize on the value.
``dynamic=True`` leaves plain ints constants (only tensors and cache integers are dynamic from the start);
``bool`` is never a symbol.

NOTE [Float arguments]
A plain ``float`` argument (a temperature, a noise level, a loss weight, ``model(x, scale)``) is handled as an
int is (NOTE [Integer arguments]): a constant, compared by its bits (NOTE [Floats by bits] in exact_values.py),
until a later call passes another value; then, under automatic dynamic shapes, it is marked dynamic and the next
compile traces it as a float symbol (``ShapeEnv.create_symbol`` of the float, a ``SymFloat`` graph input).
Later values reuse that graph while its guards hold: a branch on it (``if scale > 0``) becomes a guard, and
``float(scale)``, ``math.*`` of it or a size computed from it specialize the graph (a guard ``scale == 0.5``:
correct, that graph then serves that value only). A loop passing a new float every call traced (and stored) a
graph per value, forever; torch.compile compiles two. NaN and the infinities stay constants (as torch.compile
keeps them; guards cannot compare them), and so do 0.0 and -0.0: a guard ``scale == 0.0`` of a graph that
specialized on a zero would admit the other zero, whose results differ (``1 / scale``: NOTE [Floats by bits]).
``dynamic=True`` leaves floats constants as it leaves ints, and ``bool`` is never a symbol. Only compilers that
take a float graph input get float symbols (``AOTOptions.float_symbols``: the nop compiler, a user's compiler
callable, and Inductor, as a 0-d float64 tensor: NOTE [Float inputs for Inductor] in compilers/float_inputs.py;
where that rewrite is refused, :meth:`DynamicDims.drop_float_symbols` makes the function's floats constants for
good). AOTInductor takes tensors and ints only, so with it a float stays a constant per value, bounded by the
recompile limit (NOTE [Recompile limit] in recompile_limit.py). A float symbol takes eager's type promotion:
``int_tensor * scale`` is float32 (the default dtype), ``half_tensor * scale`` half, as with the Python float. Where torch
cannot trace the symbol (``(1 - scale) ** 2``: a symbolic power needs a base it can prove >= 0), the compile
with symbols fails and the function gives up automatic dynamic shapes, as for any failed dynamic compile
(:meth:`DynamicDims.abandon`): a graph per value, bounded by the recompile limit, eager's results.

NOTE [The first shape keeps its graph]
A call whose sizes equal the first call's takes the static spec even after dimensions were marked, so it
reuses the static graph compiled for it. Otherwise a DataLoader epoch whose last batch has one sample
compiled three graphs per mode: the static batch, the "dynamic" one for the last batch (sizes 0 and 1 are
specialized, so it holds only that size), and a third, dynamic one for the full batch of the next epoch
(torch.compile compiles two there as well).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Sequence
from typing import Any

import torch

from aotcache.aot.cache_objects import CacheInt
from aotcache.aot.exact_values import float_bits
from aotcache.aot.scalar_type_checks import ScalarTypeChecked
from aotcache.logs import log_once, logger

__all__ = ["DimSpec", "check_dynamic", "float_stays_constant", "masked_shape", "DynamicDims"]

#: Per flat argument, the dimensions traced as symbols.
DimSpec = tuple[tuple[int, ...], ...]


def check_dynamic(dynamic: Any, api: str) -> None:
    """:raises TypeError: ``dynamic`` is not True, False or None (a string such as ``"true"`` included)."""
    if dynamic is not None and not isinstance(dynamic, bool):
        raise TypeError(f"aotcache.{api}: dynamic must be True, False or None (automatic: static first, a "
                        f"dimension that changes size becomes dynamic), got {dynamic!r} of type "
                        f"{type(dynamic).__name__}")


def masked_shape(tensor: torch.Tensor, dims: Sequence[int]) -> tuple:
    """The tensor's sizes with the dynamic ``dims`` replaced by None (the part a masked signature keeps)."""
    return tuple(None if dim in dims else size for dim, size in enumerate(tensor.shape))


def _sizes(arg: Any, floats: bool = False) -> tuple | None:
    """What automatic dynamic shapes compare: a tensor's sizes, a cache integer's value as its one "dimension"
    (NOTE [Cache integers] in cache_objects.py), a plain int's value, a plain float's bits where ``floats``
    (NOTE [Float arguments]), None for anything else."""
    if isinstance(arg, torch.Tensor):
        return tuple(arg.shape)
    if type(arg) is CacheInt:
        return (int(arg),)
    if type(arg) is int:  # NOTE [Integer arguments]
        return (arg,)
    if floats and type(arg) is float:  # NOTE [Float arguments]
        return (float_bits(arg),)
    return None


def _label(position: int, dim: int, num_state: int, num_params: int, buffer_names: Sequence[str]) -> str:
    """How the log names a marked dimension: ``argument:dim`` counted from the caller's first argument, or
    ``buffer <name>:dim`` for a module's buffer (NOTE [Buffers that change size])."""
    if position >= num_state:
        return f"{position - num_state}:{dim}"
    index = position - num_params
    return f"buffer {buffer_names[index] if 0 <= index < len(buffer_names) else index}:{dim}"


def float_stays_constant(value: float) -> bool:
    """Whether a marked float argument still stays a constant: NaN, the infinities and the two zeros (NOTE [Float
    arguments])."""
    return not math.isfinite(value) or value == 0.0


def _all_dims(flat_args: Sequence[Any], num_state: int) -> DimSpec | bool:
    spec = tuple(tuple(range(len(sizes))) if position >= num_state and type(arg) is not int
                 and type(arg) is not float and (sizes := _sizes(arg)) is not None else ()
                 for position, arg in enumerate(flat_args))
    return spec if any(spec) else False


class DynamicDims:
    """The dynamic-dimension policy of one compiled function (NOTE [Dynamic dimensions]); thread-safe."""

    def __init__(self, dynamic: bool | None, float_symbols: bool = False) -> None:
        self.dynamic = dynamic
        self.float_symbols = float_symbols  # NOTE [Float arguments]: the compilers take float symbols
        self.int_symbols = True  # NOTE [Integer arguments]; False once the code checks an int's type
        self._first: dict[Any, tuple] = {}  # automatic: per rank signature, the sizes of its first call
        self._marked: dict[Any, frozenset[tuple[int, int]]] = {}  # automatic: (position, dim) marked dynamic
        self._options: dict[tuple, Any] = {}
        self._specs: dict[tuple, DimSpec] = {}  # automatic: the spec of (marked dimensions, argument count)
        self._abandoned = False  # automatic: a dynamic compile failed once, so every compile is static now
        # dynamic=True: per spec that marks buffers, the same spec without those marks (NOTE [Buffers that change
        # size]), for the retry of a failed compile
        self._without_buffer_marks: dict[DimSpec, DimSpec | bool] = {}
        self._lock = threading.Lock()

    def automatic(self, spec: DimSpec | bool) -> bool:
        """Whether ``spec`` came from automatic dynamic shapes and marks dimensions (``dynamic=None``; with
        ``dynamic=True``, a spec that marks buffers: NOTE [Buffers that change size])."""
        return isinstance(spec, tuple) and (self.dynamic is None or spec in self._without_buffer_marks)

    def retry_spec(self, spec: DimSpec | bool) -> DimSpec | bool:
        """The spec a call compiles with after its automatic dynamic compile under ``spec`` failed: static
        (``dynamic=None``), or ``dynamic=True``'s own spec without the buffers' marks."""
        return self._without_buffer_marks.get(spec, False) if self.dynamic is True else False  # type: ignore[arg-type]

    def abandon(self, spec: DimSpec | bool, exc: BaseException, name: str) -> bool:
        """After a failed compile under ``spec``: True if it was an automatic dynamic one, now given up (the
        caller compiles statically instead, or with ``dynamic=True`` with static buffers); False if the error is
        the caller's to raise."""
        if not self.automatic(spec):
            return False
        self._abandoned = True
        log_once(logging.WARNING, f"dynamic:abandoned:{name}",
                 "aotcache: %s: compiling with dynamic dimensions failed (%s: %s); compiling a graph per %s "
                 "instead. Pass dynamic=False to skip the attempt.", name, type(exc).__name__,
                 str(exc).splitlines()[0] if str(exc) else "", "buffer shape" if self.dynamic else "shape")
        return True

    def drop_float_symbols(self, exc: BaseException, name: str) -> bool:
        """After a compile whose compiler could not take a float symbol (NOTE [Float inputs for Inductor]): True
        if floats were symbols, now constants for good (the caller compiles the call again); else False."""
        if not self.float_symbols:
            return False
        self.float_symbols = False
        log_once(logging.INFO, f"dynamic:floats:{name}",
                 "aotcache: %s: the compiler cannot take a float argument as a symbol here (%s); floats are "
                 "constants of its graphs from now on (a graph per value, up to the recompile limit)", name, exc)
        return True

    def drop_scalar_symbols(self, exc: ScalarTypeChecked, name: str) -> bool:
        """After a capture whose code may check the type of an int or float argument traced as a symbol (NOTE
        [Type checks on scalar symbols]): True if that kind was traced as symbols, now constants for good (the
        caller compiles the call again); else False."""
        dropped = False
        if "float" in exc.kinds and self.float_symbols:
            self.float_symbols, dropped = False, True
        if "int" in exc.kinds and self.int_symbols:
            self.int_symbols, dropped = False, True
        if dropped:
            log_once(logging.INFO, f"dynamic:scalars:{name}",
                     "aotcache: %s: %s; such arguments are constants of its graphs from now on (a graph per value, "
                     "up to the recompile limit)", name, exc)
        return dropped

    def spec(self, flat_args: Sequence[Any], rank_key: Any, num_state: int = 0, name: str = "function",
             num_params: int | None = None, buffer_names: Sequence[str] = ()) -> DimSpec | bool:
        """The spec of this call: False (static), or the dims to trace as symbols.

        ``rank_key`` identifies the call up to sizes (its signature with ranks only; under ``dynamic=True``, the
        buffers' ranks); ``num_state`` leading arguments are a module's parameters and buffers, of which the first
        ``num_params`` (all by default) are parameters, always static; buffers are automatic under ``dynamic=None``
        and ``dynamic=True`` alike (NOTE [Buffers that change size]); ``buffer_names`` label them in the log.
        """
        if self.dynamic is False:
            return False
        num_params = num_state if num_params is None else num_params
        if self.dynamic is True:
            spec = _all_dims(flat_args, num_state)
            if num_params == num_state or self._abandoned:
                return spec
            buffers = self._automatic(flat_args, rank_key, num_params, num_state, num_state, name, buffer_names)
            if not buffers:
                return spec
            merged = (buffers if not spec else  # type: ignore[arg-type]
                      tuple(dims or marked for dims, marked in zip(spec, buffers)))
            if merged not in self._without_buffer_marks:
                with self._lock:
                    if len(self._without_buffer_marks) >= 256:
                        self._without_buffer_marks.clear()
                    self._without_buffer_marks[merged] = spec  # type: ignore[index]
            return merged
        if self._abandoned:
            return False
        return self._automatic(flat_args, rank_key, num_params, len(flat_args), num_state, name, buffer_names)

    def _automatic(self, flat_args: Sequence[Any], rank_key: Any, start: int, stop: int, num_state: int, name: str,
                   buffer_names: Sequence[str]) -> DimSpec | bool:
        """Automatic dynamic shapes over the arguments ``start:stop`` (NOTE [Dynamic dimensions]): marks what
        changed since the first call of ``rank_key``, and returns the spec of the marked dimensions (False while
        nothing is marked or the call has its first sizes)."""
        # NOTE [Per-call cost of automatic dynamic shapes]
        # This runs at every call that misses the hot paths (a KV-cache decoding step did, until the call hot path
        # took keyword arguments and cache objects: NOTE [Call hot path]), so it reads the sizes of the arguments
        # after the module's parameters only (they stay static: a tiny Llama's 21, beside its 2 buffers, which are
        # compared: NOTE [Buffers that change size]), and the spec of a set of marked dimensions is built once (it
        # was a loop over every argument and every mark, at every call).
        floats = self.float_symbols
        shapes = tuple(_sizes(arg, floats) for arg in flat_args[start:stop])
        with self._lock:
            first = self._first.setdefault(rank_key, shapes)
            marked = self._marked.get(rank_key, frozenset())
            changed = {(start + position, dim) for position, (now, then) in enumerate(zip(shapes, first))
                       if now is not None and then is not None
                       for dim, (size, first_size) in enumerate(zip(now, then)) if size != first_size}
            new = changed - marked
            if new:
                marked = marked | new
                self._marked[rank_key] = marked
        if new:
            logger.info("aotcache: %s: input dimension(s) %s changed size since the first call; compiling them "
                        "as dynamic (automatic dynamic shapes, dynamic=%s)", name,
                        ", ".join(_label(position, dim, num_state, start, buffer_names)
                                  for position, dim in sorted(new)), self.dynamic)
        if not marked or not changed:  # NOTE [The first shape keeps its graph]
            return False
        found = self._specs.get((marked, len(flat_args)))
        if found is None:
            found = tuple(tuple(sorted(dim for position, dim in marked if position == index))
                          for index in range(len(flat_args)))
            with self._lock:
                if len(self._specs) >= 256:
                    self._specs.clear()
                self._specs[(marked, len(flat_args))] = found
        # NOTE [Float arguments], NOTE [Type checks on scalar symbols]: marked scalars that stay constants
        constants = {position for position, _ in marked
                     if (type(flat_args[position]) is float and (not floats or float_stays_constant(flat_args[position])))
                     or (type(flat_args[position]) is int and not self.int_symbols)}
        if constants:
            spec = tuple(() if index in constants else dims for index, dims in enumerate(found))
            return spec if any(spec) else False  # (only scalars marked, and each a constant now)
        return found

    def options_for(self, options: Any, spec: DimSpec | bool) -> Any:
        """``options`` with ``dynamic`` set to ``spec`` (memoized: the same object for the same spec)."""
        if spec is options.dynamic:
            return options
        found = self._options.get(spec)  # type: ignore[arg-type]
        if found is None:
            found = dataclasses.replace(options, dynamic=spec)
            with self._lock:
                self._options[spec] = found  # type: ignore[index]
        return found

