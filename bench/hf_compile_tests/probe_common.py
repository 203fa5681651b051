"""What the compile-pattern probes of this folder share: the three ways of compiling they compare, one line per
check, and a training comparison against an eager copy of the model."""
import functools
import os
import traceback

import torch

_torch_compile = torch.compile  # before any redirect


def compiler_for(variant):
    """``C(fn, **kw)`` for a variant: ``torch`` (torch.compile, aot_eager), ``backend`` (torch.compile with
    aotcache's backend, nop) or ``compile`` (aotcache.compile, nop)."""
    def compiled(fn, **kw):
        if variant == "torch":
            return _torch_compile(fn, backend="aot_eager", **{k: v for k, v in kw.items() if k != "mode"})
        import aotcache
        if variant == "backend":
            from aotcache.backend import aotcache_backend
            return _torch_compile(fn, backend=functools.partial(aotcache_backend, compiler="nop"), **kw)
        return aotcache.compile(fn, compiler="nop", **kw)
    return compiled


def check(name, fn):
    """Print ``name: ok``, ``WRONG <why>`` (``fn`` returned something other than True) or ``ERROR``; ``TB=1``
    prints the traceback. Dynamo is reset after each check."""
    try:
        ok = fn()
        print(f"{name}: {'ok' if ok is True else 'WRONG ' + str(ok)}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}", flush=True)
        if os.environ.get("TB"):
            traceback.print_exc()
    torch._dynamo.reset()


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def compare_training(model, reference, compiled, inputs, steps=2):
    """``steps`` training steps of ``compiled`` (made from ``model``) and of its eager copy ``reference`` on
    ``inputs()`` (keyword arguments): the loss and every gradient compared, then an SGD step on both, so the next
    call sees new weights. True, or what differed."""
    for step in range(steps):
        kwargs = inputs()
        got, want = compiled(**kwargs), reference(**kwargs)
        got.loss.backward()
        want.loss.backward()
        if not close(got.loss, want.loss):
            return f"step {step} loss {got.loss.item()} vs {want.loss.item()}"
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if (p.grad is None) != (q.grad is None) or (p.grad is not None and not close(p.grad, q.grad, 1e-4)):
                return f"step {step} grad of {name}"
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters()):
                if p.grad is not None:
                    p -= 0.1 * p.grad
                    q -= 0.1 * q.grad
                p.grad = None
                q.grad = None
    return True
