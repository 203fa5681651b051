"""What a capture refuses about a call's outputs, its grad mode and its backward's writes: the checks the
analysis and the trace run on what the function returned or did, each raising a :class:`CaptureError` that
sends the call to the fallback (eager's results), with the NOTE that explains why."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from aotcache.aot.errors import CaptureError
from aotcache.aot.metadata import OutputInfo, check_json_constant
from aotcache.aot.tangents import is_grad_free_view, is_multi_output_view, made_under_no_grad

__all__ = ["refuse_grad_mode_change", "refuse_retained_gradients", "check_outputs_keep_requires_grad",
           "refuse_history_under_no_grad", "has_autograd_history", "classify_output", "mutation_counts",
           "refuse_backward_mutations", "refuse_tangent_mutations", "check_traced_outputs_require_grad"]


def refuse_grad_mode_change(before: bool, after: bool) -> None:
    """NOTE [Grad mode left switched by the function]
    ``torch.set_grad_enabled(False)`` called inside the function (not as a ``with`` block) leaves the caller's
    grad mode switched: Dynamo keeps that call in its graph (``torch._C._set_grad_enabled``) and eager runs it,
    but a trace runs it once at capture time and records no op, so the compiled function left the caller's grad
    mode as it was (``torch.is_grad_enabled()`` true after the call where eager leaves it false), and judged the
    call's outputs by the mode the function left (an output made before the switch lost its autograd history, or
    a training graph was refused). Found by PyTorch's test_aot_autograd.py (test_aot_grad_mode_mutation). The
    analysis puts the mode back and refuses the capture: the call runs as written (eager's results, eager's
    mode after it)."""
    if before != after:
        raise CaptureError(
            f"aotcache: the function leaves grad mode switched {'on' if after else 'off'} "
            f"(torch.set_grad_enabled({after}) outside a with block); a compiled graph cannot replay that change "
            f"of the caller's state. Use `with torch.no_grad():` / `with torch.enable_grad():` inside the "
            f"function, or switch grad mode around the call.")


def refuse_retained_gradients(flat_outs: Sequence[Any]) -> None:
    """NOTE [Retained gradients of outputs]
    ``h.retain_grad()`` inside the function on a tensor it returns makes eager fill ``h.grad`` at backward (a
    debugging or saliency idiom). The call ran on trace tensors, so the compiled function's output did not
    retain its gradient: ``.grad`` stayed None, silently. Such a capture is refused (the fallback runs the call
    as written, at every call)."""
    for k, out in enumerate(flat_outs):
        if isinstance(out, torch.Tensor) and out.requires_grad and not out.is_leaf and out.retains_grad:
            raise CaptureError(f"aotcache: output {k} was made to retain its gradient (retain_grad()) inside the "
                               f"function; a compiled function's output would not. Call retain_grad() on the "
                               f"output after the compiled call instead.", reason="unsupported_construct")


def check_outputs_keep_requires_grad(outputs: list, needs_autograd: bool, grad_mode: bool) -> None:
    """Refuse outputs that require grad in eager but would come back without it (NOTE [Output requires_grad]).

    Outputs returned as (views of) the real inputs keep the inputs' status; computed outputs require grad at
    runtime only from a training graph, which is traced only when some graph input requires grad.
    """
    if needs_autograd or not grad_mode:
        return
    for k, info in enumerate(outputs):
        if info.requires_grad and info.kind in ("graph", "alias_of_output"):
            raise CaptureError(
                f"aotcache: flat output {k} requires grad, but no graph input requires grad (e.g. a tensor created "
                f"inside the function with requires_grad=True): the compiled "
                f"function would return it without grad. Create that tensor outside and pass it as an argument.")


def refuse_history_under_no_grad(flat_outs: list, outputs: list) -> None:
    """NOTE [Grad enabled inside a no_grad call]: a call under no_grad compiles an inference graph, whose outputs
    carry no autograd history; an output with history here was made where the function enabled grad itself
    (``torch.enable_grad()``), and returning it without grad would drop its gradients."""
    for k, (out, info) in enumerate(zip(flat_outs, outputs)):
        if (info.kind in ("graph", "alias_of_output") and isinstance(out, torch.Tensor) and out.requires_grad
                and has_autograd_history(out)):
            raise CaptureError(
                f"aotcache: flat output {k} requires grad although the call runs under torch.no_grad (the "
                f"function enables grad inside it, e.g. with torch.enable_grad()); an inference graph would "
                f"return it without grad. Call the function with grad enabled, or detach that output.")


def _grad_fn(tensor: torch.Tensor) -> Any:
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    try:
        with FunctionalTensorMode():  # reading grad_fn may rebase a view's history: that runs view ops
            return tensor.grad_fn
    except RuntimeError:
        return None


def has_autograd_history(tensor: torch.Tensor) -> bool:
    """Whether autograd recorded an op producing ``tensor`` (a leaf mutated in place where autograd saw it);
    a mutation through ``.detach()`` leaves functionalization's ``Error`` node, which records nothing."""
    grad_fn = _grad_fn(tensor)
    return grad_fn is not None and type(grad_fn).__name__ != "Error"


def _made_by_custom_autograd_function(out: torch.Tensor) -> bool:
    """Whether ``out``'s grad_fn is a custom autograd.Function (Python, or C++ ``CppFunction``)."""
    grad_fn = _grad_fn(out)
    return isinstance(grad_fn, torch.autograd.function.BackwardCFunction) or type(grad_fn).__name__ == "CppFunction"


def _new_leaf_error(k: int) -> CaptureError:
    """NOTE [Leaf outputs made inside]: an output that is (a view of) a new autograd leaf made by the function."""
    return CaptureError(
        f"aotcache: flat output {k} is a leaf tensor that requires grad created inside the function (e.g. "
        f"x.detach().requires_grad_() or torch.ones(n, requires_grad=True)), or a view of one; a compiled graph "
        f"cannot return a new autograd leaf. Create it outside and pass it as an argument.")


def _no_grad_view(k: int, out: torch.Tensor) -> bool:
    """Whether output ``k``, an alias the runtime regenerates, is a view made under no_grad without history of
    its own (NOTE [Views of inputs made under no_grad] in runtime.py). A view of such a view made with grad
    (``with no_grad(): y = x[1:]`` then ``y.view(-1)``) has an autograd node leading nowhere in eager, which a
    regenerated view cannot have: refused, and the fallback runs the call eagerly."""
    if not made_under_no_grad(out):
        return False
    if _grad_fn(out) is not None:
        raise CaptureError(f"aotcache: flat output {k} is a view, made with grad enabled, of a view made under "
                           f"torch.no_grad(); its autograd history (which eager keeps, leading nowhere) cannot be "
                           f"regenerated by a compiled function. Return the view made under no_grad itself, or "
                           f"detach it.", reason="unsupported_construct", dynamo_safe=False)
    return True


def classify_output(k: int, out: Any, flat_outs: list, probes: list, probe_storages: list,
                     static_views: bool) -> OutputInfo:
    if isinstance(out, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return OutputInfo(kind="graph")
    if not isinstance(out, torch.Tensor):
        return OutputInfo(kind="constant", value=check_json_constant(out, f"flat output {k}"))
    requires_grad = out.requires_grad
    if requires_grad and _made_by_custom_autograd_function(out):
        # NOTE [Custom Function views]: an input (or a view of it) returned by a custom autograd.Function
        # carries that Function's backward, which regenerating the view from the real input would skip;
        # it is a plain graph output, and its gradient goes through the compiled backward (as in PyTorch).
        return OutputInfo(kind="graph", requires_grad=requires_grad)
    for index, probe in enumerate(probes):
        if out is probe:
            return OutputInfo(kind="input", input_index=index, requires_grad=requires_grad)
    if requires_grad and _grad_fn(out) is None and not out._is_view():
        # (a view of an input that requires grad, made under no_grad, is a leaf requiring grad in eager too)
        # NOTE [Leaf outputs made inside]: a leaf that requires grad made by the function (x.detach()
        # .requires_grad_(), torch.ones(3, requires_grad=True)) is its own autograd root in eager: no gradient
        # reaches the inputs through it, and it requires grad even under no_grad. A graph output or a view
        # regenerated from the input has neither property (the view sent gradients into x).
        raise _new_leaf_error(k)
    storage = StorageWeakRef(out.untyped_storage())
    for index, probe in enumerate(probes):
        if (probe_storages[index] is not None and probe_storages[index] == storage and probe.dtype == out.dtype
                and out.is_conj() == probe.is_conj() and out.is_neg() == probe.is_neg()):
            # (a conj / neg view, x.conj(), is not an as_strided of x: a graph output, as other dtype views)
            no_grad_view = _no_grad_view(k, out)
            base = out._base
            if requires_grad and base is not None and base is not probe and _grad_fn(base) is None:
                raise _new_leaf_error(k)  # a view of a new leaf (x.detach().requires_grad_()[1:])
            return OutputInfo(kind="alias_of_input", input_index=index, requires_grad=requires_grad,
                              multi_output_view=requires_grad and is_multi_output_view(out),
                              no_grad_view=no_grad_view)
    if static_views and out._base is not None:
        for j, other in enumerate(flat_outs):
            if (j != k and isinstance(other, torch.Tensor) and other._base is None and other.dtype == out.dtype
                    and StorageWeakRef(other.untyped_storage()) == storage
                    and not any(other is probe for probe in probes)):
                return OutputInfo(kind="alias_of_output", base_output=j, requires_grad=requires_grad,
                                  size=list(out.shape), stride=list(out.stride()),
                                  storage_offset=out.storage_offset(), base_size=list(other.shape),
                                  base_stride=list(other.stride()), no_grad_view=_no_grad_view(k, out))
    return OutputInfo(kind="graph", requires_grad=requires_grad,
                      grad_free_leaf=requires_grad and is_grad_free_view(out))


def mutation_counts(functional: Sequence[Any]) -> list:
    from torch._subclasses.functional_tensor import FunctionalTensor

    return [torch._functionalize_mutation_counter(value.elem) if isinstance(value, FunctionalTensor) else None
            for value in functional]


def refuse_backward_mutations(functional: Sequence[Any], before: list, positions: Sequence[int]) -> None:
    """NOTE [Backward mutations of inputs]: a backward that writes into a forward input (a custom autograd
    function whose backward does ``ctx.saved_input.zero_()``) mutates it in eager when ``backward()`` runs; the
    compiled backward returns gradients only, so the write would be lost. Refused, so the call takes the
    fallback (eager autograd)."""
    for index, (count, after) in enumerate(zip(before, mutation_counts(functional))):
        if count is not None and after != count:
            raise CaptureError(
                f"aotcache: the backward mutates graph input {index} (flat argument {positions[index]}) in place "
                f"(e.g. a custom autograd function's backward writes into a tensor saved from the forward); a "
                f"compiled backward cannot apply that mutation. Mutate it outside the backward, or call the "
                f"function eagerly.")


def refuse_tangent_mutations(functional_tangents: Sequence[Any], before: list) -> None:
    """NOTE [Backward writes into its gradients]: a custom autograd.Function's backward that writes into the
    gradient it is given (``grad.mul_(2)``, ``grad.data.mul_(2)``), for an output the function returns as it is,
    writes in eager into the caller's gradient tensor (``out.backward(g)`` leaves ``g`` doubled; an
    expanded ``sum()`` gradient makes eager raise). The compiled backward gets its own copy of the tangent, so
    the caller's tensor stayed as it was: refused, and the fallback runs the call eagerly."""
    for index, (count, after) in enumerate(zip(before, mutation_counts(functional_tangents))):
        if count is not None and after != count:
            raise CaptureError(
                f"aotcache: the backward writes in place into the gradient of output {index} it is given (e.g. a "
                f"custom autograd function's backward doing grad.mul_(2) or grad.data.mul_(2) on a returned "
                f"output's gradient), which eager applies to the caller's gradient tensor and a compiled backward "
                f"cannot. Compute a new tensor in the backward instead (grad = grad * 2).",
                reason="unsupported_construct", dynamo_safe=False)


def check_traced_outputs_require_grad(fw_outs: list, tangent_indices: Sequence[int]) -> None:
    """A forward output that required grad in the analysis must in the joint trace too: otherwise it would get
    no gradient edge and its tangent would be silently ignored (NOTE [Output requires_grad] in runtime)."""
    for index in tangent_indices:
        value = fw_outs[index]
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            raise CaptureError(
                f"aotcache: forward output {index} requires grad when the function runs eagerly, but not in the "
                f"functionalized trace (an op on its path drops autograd under functionalization), so its "
                f"gradients would be silently lost; this is not supported. Move that op out of the compiled "
                f"function.")
