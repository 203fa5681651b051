"""The fake CUDA device guard that torch's FakeTensorMode installs on a machine without a GPU, installed by a
thread that outlives the process's captures (:func:`keep_fake_cuda_guard_alive`).

Below the aot core and the compilers (torch only): both make FakeTensorModes.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["keep_fake_cuda_guard_alive"]

# NOTE [A fake CUDA guard owned by a finished thread]
# Entering a FakeTensorMode where CUDA is not available calls ``torch._C._ensureCUDADeviceGuardSet()``, which, when
# no CUDA guard with devices is registered, makes a fake CUDA device guard and stores its address in c10's global
# guard registry. In torch 2.11 (c10/core/impl/DeviceGuardImplInterface.cpp) that guard is held by a
# *thread_local* pointer: when the thread that entered the first FakeTensorMode ends, the guard is freed and the
# registry keeps its address. The next FakeTensorMode entered in any thread asks that dangling guard for its
# device count and the process dies with SIGSEGV (found with a method mapping a wrapped module over a thread pool
# on torch 2.11.0+cu130 without a GPU: the workers' first calls began a capture, the pool ended, the main thread's
# capture crashed; plain torch crashes the same way with a FakeTensorMode entered in a thread that has ended).
# torch 2.13 does not crash. The fix: before aotcache makes its first FakeTensorMode, the guard is installed from
# the main thread, or, when the first capture runs in another thread, from a daemon thread of aotcache's that
# waits for good, so the registered guard lives as long as the process. Nothing changes where CUDA is available
# (FakeTensorMode installs nothing there) or where torch has no such function; on a torch whose guard is not
# thread-bound the call only installs early what the first FakeTensorMode would have installed.

_guard_kept = False
_guard_lock = threading.Lock()


def keep_fake_cuda_guard_alive() -> None:
    """Install torch's fake CUDA device guard from a thread that lives as long as the process (NOTE [A fake
    CUDA guard owned by a finished thread]); a no-op after the first call and where CUDA is available."""
    global _guard_kept
    if _guard_kept:
        return
    with _guard_lock:
        if _guard_kept:
            return
        _guard_kept = True
        install = getattr(torch._C, "_ensureCUDADeviceGuardSet", None)
        if install is None or torch.cuda.is_available():
            return
        if threading.current_thread() is threading.main_thread():
            install()
            return
        installed = threading.Event()

        def hold_the_guard() -> None:
            try:
                install()
            finally:
                installed.set()
            threading.Event().wait()  # never set: this thread's guard stays registered until the process ends

        threading.Thread(target=hold_the_guard, name="aotcache-fake-cuda-guard", daemon=True).start()
        installed.wait()
