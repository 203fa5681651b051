"""A torchbind object (``torch.ScriptObject``) a Dynamo graph takes as input is not traced through: the trace ran its
methods on the caller's object with fake tensors, and a later call returned a fake tensor (NOTE [TorchScript objects
as inputs] in aotcache/aot/script_objects.py)."""

from __future__ import annotations

import pytest
import torch

torchbind_impls = pytest.importorskip("torch.testing._internal.torchbind_impls")


@pytest.fixture
def tensor_queue_class():
    """torch's test torchbind library with a fake class for its tensor queue (as PyTorch's own tests register)."""
    try:
        torchbind_impls.init_torchbind_implementations()
    except Exception as exc:  # noqa: BLE001 - a torch build without the test library
        pytest.skip(f"torch's torchbind test library is not available: {exc}")
    name = "_TorchScriptTesting::_TensorQueue"

    class FakeTensorQueue:
        def __init__(self, queue):
            self.queue = queue

        @classmethod
        def __obj_unflatten__(cls, flattened):
            return cls(**dict(flattened))

        def push(self, x):
            self.queue.append(x)

        def pop(self):
            return self.queue.pop(0)

        def size(self):
            return len(self.queue)

    torch._library.register_fake_class(name, FakeTensorQueue)
    torch._dynamo.reset()
    yield torchbind_impls._empty_tensor_queue
    torch._library.fake_class_registry.deregister_fake_class(name)
    torch._dynamo.reset()


def _assert_real_queue(queue, expected):
    items = queue.clone_queue()
    assert [type(t) for t in items] == [torch.Tensor] * len(expected)
    for got, want in zip(items, expected):
        torch.testing.assert_close(got, want)


def test_a_queue_read_by_a_compiled_function_keeps_real_tensors_and_eagers_pops(tensor_queue_class):
    queue = tensor_queue_class()

    def push_then_pop(x):
        queue.push(x.sin())
        return queue.pop()

    compiled = torch.compile(push_then_pop, backend="aotcache")
    x = torch.randn(3)
    torch.testing.assert_close(compiled(x), x.sin())
    _assert_real_queue(queue, [])
    queue.push(x.cos())  # the next call pops the item already queued, as eager does
    got = compiled(x)
    assert type(got) is torch.Tensor
    torch.testing.assert_close(got, x.cos())
    _assert_real_queue(queue, [x.sin()])


def test_a_queue_argument_pushed_and_popped_gives_eagers_results(tensor_queue_class):
    def step(queue, x):
        queue.push(x.cos())
        queue.push(x.sin())
        return queue.pop() - queue.size(), queue

    compiled = torch.compile(step, backend="aotcache")
    for n in (0, 1, 1):
        x = torch.randn(2, 3)
        mine, theirs = tensor_queue_class(), tensor_queue_class()
        for _ in range(n):
            mine.push(torch.ones(2, 3))
            theirs.push(torch.ones(2, 3))
        got, want = compiled(mine, x)[0], step(theirs, x)[0]
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, want)
        _assert_real_queue(mine, theirs.clone_queue())


def test_a_global_queue_read_by_a_whole_call_capture_keeps_real_tensors_and_eagers_pops(tensor_queue_class):
    import aotcache

    global _GLOBAL_QUEUE
    _GLOBAL_QUEUE = tensor_queue_class()

    def push_then_pop(x):
        _GLOBAL_QUEUE.push(x.sin())
        return _GLOBAL_QUEUE.pop()

    compiled = aotcache.compile(push_then_pop, compiler="nop")
    x = torch.randn(3)
    torch.testing.assert_close(compiled(x), x.sin())
    _assert_real_queue(_GLOBAL_QUEUE, [])
    _GLOBAL_QUEUE.push(x.cos())
    got = compiled(x)
    assert type(got) is torch.Tensor
    torch.testing.assert_close(got, x.cos())
    _assert_real_queue(_GLOBAL_QUEUE, [x.sin()])



def test_captures_in_threads_and_nested_put_the_script_method_call_back():
    """NOTE [One refusing ScriptMethod call for every capture]: two threads whose captures overlap (the first to
    start ends first), one nesting a second capture, leave ``torch.ScriptMethod.__call__`` as it was."""
    import threading

    from aotcache.aot.script_objects import refusing_script_object_calls

    original = torch.ScriptMethod.__call__
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with refusing_script_object_calls():
            first_in.set()
            second_in.wait(30)
            with refusing_script_object_calls():  # nested
                seen["nested_patched"] = torch.ScriptMethod.__call__ is not original
            seen["after_nested_patched"] = torch.ScriptMethod.__call__ is not original
        first_out.set()

    def second():
        first_in.wait(30)
        with refusing_script_object_calls():
            second_in.set()
            first_out.wait(30)
            seen["second_patched_after_first"] = torch.ScriptMethod.__call__ is not original

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert seen == {"nested_patched": True, "after_nested_patched": True, "second_patched_after_first": True}
    assert torch.ScriptMethod.__call__ is original
