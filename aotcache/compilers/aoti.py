"""The ``aoti`` compiler: one AOTInductor shared library per graph, run through torch's AOTI runner.

Loading needs neither ``torch._inductor`` nor a C++ compiler (see :mod:`aotcache.compilers.aoti_lib`). The
artifact carries the files the library reads beside it (GPU kernel binaries AOTInductor did not embed), each
checked against its recorded sha256 at load (NOTE [files beside the library] in ``aoti_lib``).

NOTE [what the library cannot take, Python does]
An AOTInductor library takes only tensors and returns only tensors. Around it, this module:
- specializes int / SymInt graph inputs to their example values (the library is then built for the example
  shapes: "static"); calling with other ints or other tensor shapes raises instead of computing wrong results;
- returns ``None`` and int outputs from a template recorded at compile time.
A graph with only tensor inputs whose placeholders carry symbolic fake values is compiled with dynamic
shapes ("dynamic"), and only dtype, device and rank are checked per call.

NOTE [size inputs read from tensor sizes]
Dynamo passes the sizes a graph reads (a sequence length) as SymInt inputs beside the tensors that have them.
Specialized, such a library ran only for its first length (GPT-2's next decode step raised). A SymInt input
equal to a dimension of a symbolic tensor input is therefore replaced in the graph by ``sym_size`` of that
dimension before the build; when no other int input remains, the build is dynamic. The call still passes the
int: it is checked against that dimension and not given to the library.

NOTE [int inputs the graph never reads]
Once a call passes an input at another storage offset, Dynamo passes that offset as a SymInt input too, and
most graphs never read it (``x + 1``). Specialized like any int input, it made the library static, and a third
call at another size raised ``ValueError`` ("specialized to input 0") where eager runs. An int input without
users in the graph is removed before the build and not checked: the call's value is ignored. An int output
built from its symbol is not pinned by it (NOTE [int outputs the template cannot hold]).

NOTE [int outputs the template cannot hold]
The template holds an int output at its traced value, which is right only while every symbol of it is pinned by
what each call checks: an int input (specialized), or a tensor size of a static build. A dynamic build checks
no size, and nothing checks a tensor's storage offset or strides, so an output built from those changed from
call to call while the template returned the first: ``x[x.shape[0] // 2:]`` under ``dynamic=True`` returned the
first call's half for every length, and ``x[16:32]`` of an input at another offset (``aotcache.compile(fn,
dynamic=True)``) the first offset -- a wrong result, silently. Such a graph is refused
(:class:`UnpinnedIntOutput`): the fallback chain compiles it with ``inductor``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from aotcache.compilers import aoti_lib
from aotcache.compilers.base import Artifact, ArtifactError, pack_artifact
from aotcache.compilers.inductor_decomp import check_supported_ops, inductor_decompositions
from aotcache.compilers.input_layout import InputLayouts, copy_misaligned, expected_layouts

__all__ = ["AOTICompiledGraph", "aoti_compiler", "decompositions", "load"]

COMPILER_NAME = "aoti"
_LIBRARY_BLOB = "library.so"
_FILE_PREFIX = "file:"  # blobs of the files the library reads beside it (NOTE [files beside the library])


def decompositions() -> dict:
    """The inductor compiler's table (Inductor's plus matmul-level LSTM layers); imports Inductor."""
    return inductor_decompositions()


def _same_device(device: torch.device, recorded: str) -> bool:
    """``device`` is the recorded one; an index is compared when both have one (NOTE [a library runs on its
    own device])."""
    wanted = torch.device(recorded)
    if device.type != wanted.type:
        return False
    return wanted.index is None or device.index is None or device.index == wanted.index


def _tensor_spec(value: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(value.dtype).removeprefix("torch."), "device": str(value.device),
            "shape": [aoti_lib.int_hint(size) for size in value.shape],
            "stride": [aoti_lib.int_hint(stride) for stride in value.stride()]}


class AOTICompiledGraph:
    """An AOTInductor library plus the Python-side input checks and output template around it."""

    compiler_name = COMPILER_NAME
    grad_mode_independent = True  # NOTE [Forward under grad mode] in aotcache.aot.runtime

    def __init__(self, runner: Any, so_bytes: bytes, meta: dict[str, Any],
                 files: dict[str, bytes] | None = None) -> None:
        self._runner = runner
        self._so_bytes = so_bytes
        self._files = dict(files or {})
        self._meta = meta
        self._tensor_indices = [int(i) for i in meta["tensor_inputs"]]
        self._int_inputs = {int(i): int(v) for i, v in meta["int_inputs"].items()}
        self._unused_ints = len(meta.get("unused_int_inputs", ()))  # NOTE [int inputs the graph never reads]
        self._size_inputs = {int(i): (int(t), int(d)) for i, (t, d) in meta.get("size_inputs", {}).items()}
        self._specs = meta["input_specs"]
        self._static = bool(meta["static"])
        self._template = meta["outputs"]
        # per tensor input; NOTE [compiled code assumes input strides]. Static builds: the example strides.
        self._layouts = meta.get("input_layouts") or [
            {"stride": spec["stride"]} if self._static else None for spec in self._specs]
        self._conform = InputLayouts(self._layouts).conform
        # NOTE [Misaligned inputs]: a GPU library may assume aligned tensor inputs; the CPU one assumes nothing
        self._aligned = list(range(len(self._tensor_indices))) if str(meta["device"]).startswith("cuda") else []

    def _check(self, args: Sequence[Any]) -> None:
        count = len(self._tensor_indices) + len(self._int_inputs) + len(self._size_inputs) + self._unused_ints
        if len(args) != count:
            raise TypeError(f"aoti compiled graph takes {count} inputs, got {len(args)}")
        for index, (tensor_index, dim) in self._size_inputs.items():  # NOTE [size inputs read from tensor sizes]
            tensor = args[tensor_index]
            if not isinstance(tensor, torch.Tensor) or tensor.dim() <= dim or int(args[index]) != tensor.shape[dim]:
                raise ValueError(f"aoti compiled graph input {index} must equal dimension {dim} of input "
                                 f"{tensor_index}, got {args[index]}")
        for index, expected in self._int_inputs.items():
            if int(args[index]) != expected:
                raise ValueError(f"aoti compiled graph was specialized to input {index} == {expected}, got "
                                 f"{args[index]}; compile again for this value (or use the inductor compiler)")
        for index, spec in zip(self._tensor_indices, self._specs):
            value = args[index]
            if not isinstance(value, torch.Tensor) or str(value.dtype).removeprefix("torch.") != spec["dtype"] \
                    or not _same_device(value.device, spec["device"]) or value.dim() != len(spec["shape"]):
                raise ValueError(f"aoti compiled graph input {index} must be a {spec['dtype']} tensor of rank "
                                 f"{len(spec['shape'])} on {spec['device']}, got {value!r:.80}")
            if self._static and list(value.shape) != spec["shape"]:
                raise ValueError(f"aoti compiled graph was built for input {index} of shape {spec['shape']}, got "
                                 f"{list(value.shape)}; compile again for these shapes")

    def __call__(self, *args: Any) -> Sequence[Any]:
        self._check(args)
        # the library reads its inputs with the strides it was built for and checks none: arguments with other
        # strides are copied into those first (NOTE [compiled code assumes input strides])
        tensors = self._conform([args[index] for index in self._tensor_indices])
        if self._aligned:
            copy_misaligned(tensors, self._aligned)
        results = iter(self._runner.run(tensors))
        return tuple(next(results) if entry == "tensor" else entry["const"] for entry in self._template)

    def run(self, args: Sequence[Any]) -> Sequence[Any]:
        """Call with the inputs as one sequence (the sequence is not modified)."""
        return self(*args)

    def artifact(self) -> bytes:
        """The library bytes and the files beside it, plus the build identity and calling metadata (JSON)."""
        blobs = {_LIBRARY_BLOB: self._so_bytes}
        blobs.update({_FILE_PREFIX + name: data for name, data in sorted(self._files.items())})
        return pack_artifact(Artifact(COMPILER_NAME, dict(self._meta), blobs))


def _specialize(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[dict[str, int], list[int], list]:
    """Replace int placeholders by their example values and non-tensor outputs by a template (in place).

    Returns (int inputs by position, tensor input positions, output template).
    """
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(f"aoti_compiler: the graph has {len(placeholders)} inputs but {len(example_inputs)} "
                         "example inputs were given")
    int_inputs: dict[str, int] = {}
    tensor_inputs: list[int] = []
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.Tensor):
            tensor_inputs.append(index)
            continue
        if not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool):
            raise ValueError(f"aoti_compiler: graph input {node.name!r} is a {type(value).__name__}; only tensors "
                             "and ints are supported")
        concrete = aoti_lib.int_hint(value)
        int_inputs[str(index)] = concrete
        for user in list(node.users):
            user.args = torch.fx.node.map_arg(user.args, lambda arg, n=node, c=concrete: c if arg is n else arg)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda arg, n=node, c=concrete: c if arg is n else arg)
        gm.graph.erase_node(node)
    (output_node,) = [node for node in gm.graph.nodes if node.op == "output"]
    outputs = output_node.args[0]
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    template: list = []
    tensor_outputs = []
    for value in outputs:
        known = value.meta.get("val") if isinstance(value, torch.fx.Node) else value
        if isinstance(value, torch.fx.Node) and (known is None or isinstance(known, torch.Tensor)):
            template.append("tensor")
            tensor_outputs.append(value)
        elif known is None or isinstance(known, (bool, int, float, torch.SymInt)):
            template.append({"const": aoti_lib.int_hint(known) if isinstance(known, torch.SymInt) else known})
        else:
            raise ValueError(f"aoti_compiler: graph output {value!r} is a {type(known).__name__}; only tensors, "
                             "None and ints are supported")
    output_node.args = (tuple(tensor_outputs),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return int_inputs, tensor_inputs, template


def _drop_unused_int_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[int]:
    """Remove int placeholders nothing in the graph reads (in place); returns their positions.
    NOTE [int inputs the graph never reads]"""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return []
    unused = [index for index, (node, value) in enumerate(zip(placeholders, example_inputs))
              if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool) and not node.users]
    for index in unused:
        gm.graph.erase_node(placeholders[index])
    if unused:
        gm.recompile()
    return unused


def _read_sizes_from_tensors(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[int, tuple[int, int]]:
    """Replace SymInt inputs equal to a symbolic tensor input's dimension by ``sym_size`` of it (in place).

    Returns {int input position: (tensor input position, dim)}; nothing when some other int input remains (the
    build is then static anyway). NOTE [size inputs read from tensor sizes]
    """
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return {}
    dims: dict[Any, tuple[int, int]] = {}
    for index, value in enumerate(example_inputs):
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt):
                    dims.setdefault(size.node.expr, (index, dim))
    found: dict[int, tuple[int, int]] = {}
    for index, value in enumerate(example_inputs):
        if isinstance(value, torch.Tensor):
            continue
        source = dims.get(value.node.expr) if isinstance(value, torch.SymInt) else None
        if source is None:
            return {}
        found[index] = source
    if not found:
        return {}
    first_op = next(node for node in gm.graph.nodes if node.op != "placeholder")
    for index, (tensor_index, dim) in found.items():
        node = placeholders[index]
        with gm.graph.inserting_before(first_op):
            size = gm.graph.call_function(torch.ops.aten.sym_size.int, (placeholders[tensor_index], dim))
        size.meta["val"] = example_inputs[tensor_index].shape[dim]
        node.replace_all_uses_with(size)
        gm.graph.erase_node(node)
    gm.recompile()
    return found


def _runner_device(tensors: Sequence[torch.Tensor]) -> str:
    """The device the library runs on: the first CUDA input's, with its index, else ``"cpu"``.

    NOTE [a library runs on its own device]: the CUDA runner launches on the device it was created for; a
    runner for ``cuda`` (the current device) fed tensors on ``cuda:1`` would touch the wrong device. So the
    index is recorded and the runner is created for it at load (entries of other devices have other keys:
    input devices are key parts), and calls with tensors on another device are refused.
    """
    for value in tensors:
        if value.device.type == "cuda":
            index = value.device.index if value.device.index is not None else torch.cuda.current_device()
            return f"cuda:{index}"
    return "cpu"


class UnpinnedIntOutput(ValueError):
    """An int output that calls may change but the library cannot return (NOTE [int outputs the template cannot
    hold])."""


def _refuse_unpinned_int_outputs(gm: torch.fx.GraphModule, inputs: Sequence[Any], dynamic: bool) -> None:
    """:raises UnpinnedIntOutput: an int output with a symbol no call check pins (``inputs``: the example inputs and
    placeholder values the library is built from, size inputs left out)."""
    pinned: set = set()
    for value in inputs:
        if isinstance(value, torch.SymInt):
            pinned.add(value.node.expr)
        elif isinstance(value, torch.Tensor) and not dynamic:
            pinned.update(size.node.expr for size in value.shape if isinstance(size, torch.SymInt))
    (output_node,) = [node for node in gm.graph.nodes if node.op == "output"]
    for value in torch.fx.node.map_aggregate(output_node.args[0], lambda n: n):
        known = value.meta.get("val") if isinstance(value, torch.fx.Node) else value
        if not isinstance(known, torch.SymInt) or known.node.expr.is_number:
            continue
        unpinned = known.node.expr.free_symbols - pinned
        if unpinned:
            raise UnpinnedIntOutput(
                f"aoti_compiler: graph output {value} = {known.node.expr} changes with "
                f"{', '.join(sorted(map(str, unpinned)))}, which no call check pins (a tensor's storage offset or "
                f"stride, or a size of a dynamic build); the library cannot return it (NOTE [int outputs the "
                f"template cannot hold])")


def _is_symbolic(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in (*value.shape,
                                                                                         *value.stride()))


def aoti_compiler(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                  options: dict[str, Any] | None = None) -> AOTICompiledGraph:
    """Compile ``gm`` into an AOTInductor library (``options``: ``torch._inductor.config`` overrides).

    See NOTE [what the library cannot take, Python does] for int inputs and non-tensor outputs.
    """
    check_supported_ops(gm, COMPILER_NAME)
    graph_module = aoti_lib.copy_graph_module(gm)
    placeholder_values = [node.meta.get("val") for node in graph_module.graph.nodes if node.op == "placeholder"]
    unused = _drop_unused_int_inputs(graph_module, example_inputs)  # NOTE [int inputs the graph never reads]
    present = [index for index in range(len(example_inputs)) if index not in unused]
    size_inputs = {present[index]: (present[tensor], dim) for index, (tensor, dim)
                   in _read_sizes_from_tensors(graph_module, [example_inputs[i] for i in present]).items()}
    kept = [index for index in present if index not in size_inputs]
    has_ints = any(not isinstance(example_inputs[index], torch.Tensor) for index in kept)
    _refuse_unpinned_int_outputs(graph_module, [example_inputs[index] for index in kept]
                                 + [placeholder_values[index] for index in kept if index < len(placeholder_values)],
                                 dynamic=not has_ints and any(_is_symbolic(value) for value in placeholder_values))
    int_inputs, tensor_inputs, template = _specialize(graph_module, [example_inputs[index] for index in kept])
    int_inputs = {str(kept[int(index)]): value for index, value in int_inputs.items()}
    tensor_inputs = [kept[index] for index in tensor_inputs]
    tensors = [example_inputs[index] for index in tensor_inputs]
    dynamic = not has_ints and any(_is_symbolic(value) for value in placeholder_values)
    if not dynamic:
        # NOTE [static build]: drop the (possibly symbolic) fake values so Inductor re-traces the graph on
        # concrete example tensors and bakes their shapes in.
        for node in graph_module.graph.nodes:
            node.meta.pop("val", None)
        tensors = aoti_lib.materialize_example_inputs(tensors)
    # the strides the library reads: the example strides (static), or derived from the placeholders' symbolic
    # sizes (dynamic)
    layouts = expected_layouts([placeholder_values[index] for index in tensor_inputs] if dynamic else tensors)
    build = aoti_lib.build_library(graph_module, tensors, options=options)
    device = _runner_device(tensors)
    meta = {"identity": aoti_lib.build_identity(device), "device": device, "static": not dynamic,
            "int_inputs": int_inputs, "tensor_inputs": tensor_inputs, "outputs": template,
            "input_specs": [_tensor_spec(value) for value in tensors], "input_layouts": layouts}
    if size_inputs:
        meta["size_inputs"] = {str(index): list(source) for index, source in size_inputs.items()}
    if unused:
        meta["unused_int_inputs"] = unused
    if build.files:
        meta["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(build.files.items())}
        meta["library_name"] = build.library_name
    runner = aoti_lib.load_library(build.library, device=device, files=build.files,
                                   library_name=build.library_name)
    return AOTICompiledGraph(runner, build.library, meta, build.files)


aoti_compiler.decompositions = decompositions  # type: ignore[attr-defined]


def warm_up(example_inputs: Sequence[Any]) -> bool:
    """Start Inductor's compile worker pool for a GPU graph (NOTE [warming the compile workers] in inductor.py)."""
    from aotcache.compilers.inductor import warm_up as inductor_warm_up

    return inductor_warm_up(example_inputs)


aoti_compiler.warm_up = warm_up  # type: ignore[attr-defined]


def load(artifact: Artifact) -> AOTICompiledGraph:
    """Rebuild from an unpacked artifact: no Inductor import, no C++ compiler.

    :raises ArtifactError: malformed artifact, or a library built for another torch / ISA / GPU arch.
    """
    meta = artifact.meta
    try:
        so_bytes = artifact.blobs[_LIBRARY_BLOB]
        identity, device = dict(meta["identity"]), str(meta["device"])
        for key in ("tensor_inputs", "int_inputs", "outputs", "input_specs", "static"):
            meta[key]  # noqa: B018 - presence check
        library_name = str(meta.get("library_name", aoti_lib.LIBRARY_NAME))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"aoti artifact is incomplete: {exc}") from exc
    files = {name[len(_FILE_PREFIX):]: data for name, data in artifact.blobs.items() if name.startswith(_FILE_PREFIX)}
    if files or "files" in meta:  # NOTE [files beside the library]: every recorded file, each as recorded
        aoti_lib.verify_side_files(files, meta.get("files"))
    runner = aoti_lib.load_library(so_bytes, device=device, identity=identity, files=files,
                                   library_name=library_name)
    return AOTICompiledGraph(runner, so_bytes, meta, files)
