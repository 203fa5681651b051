"""Activation-checkpointed regions that write in place into values they computed (dropout drawing its mask in
place, T5's ``buckets += ...``) are captured, not run eagerly: each region's body is traced in line under the
capture's functionalization and tagged for recomputation (NOTE [Checkpointed regions traced in line] in
aotcache/aot/checkpoint_regions.py).

Found: every model trained with ``gradient_checkpointing_enable()`` and dropout (the usual Hugging Face fine-tuning
setup) ran eagerly under aotcache: torch's checkpoint caching sat above aotcache's functionalization and refused
the in-place draw. Each test compares the compiled steps with eager's (loss, every gradient, the generator's
state after the step), checks that no capture fell back (strict mode and the fallback counters), and that the
forward saves less with checkpointing than without it."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import aotcache
from aotcache.aot.fallback import fallback_counts
from aotcache.aot.partition import default_partition, min_cut_rematerialization_partition, saved_value_bytes


class _Recorder:
    """A partition function that records the bytes of the activations each forward saves (not its primals)."""

    def __init__(self, partition=default_partition) -> None:
        self.partition = partition
        self.saved: list[int] = []

    def __call__(self, joint_gm, joint_inputs=(), *, num_fwd_outputs):
        fw, bw = self.partition(joint_gm, joint_inputs, num_fwd_outputs=num_fwd_outputs)
        outputs = list(fw.graph.nodes)[-1].args[0][num_fwd_outputs:]
        self.saved.append(sum(saved_value_bytes(node) for node in outputs
                              if node.op != "placeholder" and isinstance(node.meta.get("val"), torch.Tensor)))
        return fw, bw


def _assert_equal(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), index  # recomputing replays the saved draws on the same values: eager's bits


def _steps(model: nn.Module, run, batches, loss_of, steps: int = 3) -> list[torch.Tensor]:
    """Per step: the loss, every parameter's gradient and the global generator's state after the step."""
    torch.manual_seed(1)
    records = []
    for step in range(steps):
        loss = loss_of(run, batches(step))
        loss.backward()
        records += [loss.detach(), *(p.grad.clone() for p in model.parameters()), torch.get_rng_state()]
        model.zero_grad(set_to_none=True)
    return records


def _no_fallback(monkeypatch) -> dict:
    monkeypatch.setenv("AOTCACHE_STRICT", "1")  # a capture failure raises instead of running eagerly
    torch._dynamo.reset()
    return dict(fallback_counts())


def _assert_no_new_fallback(before: dict, allowed: tuple = ()) -> None:
    after = fallback_counts()
    changed = {kind: after[kind] - before.get(kind, 0) for kind in after
               if after[kind] != before.get(kind, 0) and not kind.startswith(allowed)}
    assert not changed, changed


# -- a hand-written region: checkpoint(dropout(linear)) ---------------------------------------------------------


class DropoutRegions(nn.Module):
    def __init__(self, checkpointed: bool = True, p: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Dropout(p), nn.Linear(128, 32))
                                    for _ in range(2))
        self.head = nn.Linear(32, 4)
        self.checkpointed = checkpointed

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointed:
                x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = x + block(x)
        return self.head(x)


def _dense_batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)


def _dense_loss(run, batch):
    x, y = batch
    return nn.functional.cross_entropy(run(x), y)


def _backend(partition=default_partition):
    return functools.partial(aotcache.aotcache_backend, compiler="nop", partition=partition, cache=False)


@pytest.mark.parametrize("partition", [default_partition, min_cut_rematerialization_partition],
                         ids=["default", "min_cut"])
def test_dropout_in_a_checkpointed_region_is_captured_with_eagers_gradients(partition, monkeypatch):
    before = _no_fallback(monkeypatch)
    recorder = _Recorder(partition)
    model = DropoutRegions()
    got = _steps(model, torch.compile(model, backend=_backend(recorder)), _dense_batch, _dense_loss)
    _assert_no_new_fallback(before)
    reference = DropoutRegions()
    _assert_equal(got, _steps(reference, reference, _dense_batch, _dense_loss))
    assert recorder.saved  # the graph was captured and partitioned

    unchecked = _Recorder(partition)
    plain = DropoutRegions(checkpointed=False)
    _steps(plain, torch.compile(plain, backend=_backend(unchecked)), _dense_batch, _dense_loss, steps=1)
    # checkpointed: the block inputs and the dropout masks; unchecked: also each block's 4x-wide hidden values
    assert max(recorder.saved) < max(unchecked.saved)


def test_the_captured_regions_recompute_their_internals_and_save_their_draws(monkeypatch):
    """The forward of the captured graph saves each region's mask (a draw: never drawn again) and no 4x-wide
    activation other than it: the linear and GELU outputs are recomputed in the backward."""
    _no_fallback(monkeypatch)
    graphs = []

    def partition(joint_gm, joint_inputs=(), *, num_fwd_outputs):
        fw, bw = default_partition(joint_gm, joint_inputs, num_fwd_outputs=num_fwd_outputs)
        graphs.append((fw, num_fwd_outputs))
        return fw, bw

    model = DropoutRegions()
    _steps(model, torch.compile(model, backend=_backend(partition)), _dense_batch, _dense_loss, steps=1)
    (fw, num_fwd_outputs), = graphs
    saved = [node for node in list(fw.graph.nodes)[-1].args[0][num_fwd_outputs:] if node.op != "placeholder"]
    wide = [node for node in saved if tuple(node.meta["val"].shape) == (16, 128)]
    assert len(wide) == 2, [node.format_node() for node in wide]  # one mask per region
    assert all("bernoulli" in str(node.target) or "bernoulli" in str(node.args[0].target)
               or any("bernoulli" in str(arg.target) for arg in node.all_input_nodes) for node in wide)


@pytest.mark.parametrize("entry", ["compile", "aot_module"])
def test_the_other_routes_capture_the_regions_with_eagers_gradients(entry, monkeypatch):
    """``aotcache.compile`` takes the Dynamo way for a checkpointing model (its recomputation reads parameters
    after the module call) and ``aot_module`` falls back to Dynamo's graphs for the same reason; either way the
    graphs with the regions are captured now, not run eagerly."""
    monkeypatch.setenv("AOTCACHE_STRICT", "0")
    torch._dynamo.reset()
    before = dict(fallback_counts())
    model = DropoutRegions()
    if entry == "compile":
        run = aotcache.compile(model, compiler="nop", cache=False)
    else:
        run = aotcache.aot_module(model, fw_compiler="nop", cache=False)
    got = _steps(model, run, _dense_batch, _dense_loss)
    reference = DropoutRegions()
    _assert_equal(got, _steps(reference, reference, _dense_batch, _dense_loss))
    after = fallback_counts()
    assert after.get("region", 0) == before.get("region", 0)  # no Dynamo graph ran eagerly
    if entry == "compile":
        assert run.route == "dynamo"
    else:  # the module as a whole is refused (checkpointing) and its Dynamo graphs are captured
        assert sum(after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("partial:")) == 1
        assert not any(after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("eager:"))


# -- selective checkpointing: the policy's choices kept ------------------------------------------------------------


class SelectiveDropoutRegions(DropoutRegions):
    """``DropoutRegions`` under ``context_fn=create_selective_checkpoint_contexts(policy)``: the matmuls saved."""

    def forward(self, x):
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        def policy(ctx, op, *args, **kwargs):
            return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.addmm.default \
                else CheckpointPolicy.PREFER_RECOMPUTE

        context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
        for block in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=context_fn)
        return self.head(x)


@pytest.mark.parametrize("partition", [default_partition, min_cut_rematerialization_partition],
                         ids=["default", "min_cut"])
def test_a_selective_region_with_dropout_is_captured_with_its_policy(partition, monkeypatch):
    """The policy is asked about each op (above the functionalization, as torch's mode does, caching nothing):
    the forward saves the matmuls it asks to save (more than plain checkpointing) and recomputes the rest (less
    than without checkpointing, with the default partitioner)."""
    before = _no_fallback(monkeypatch)
    saved = {}
    for name, cls, kwargs in (("selective", SelectiveDropoutRegions, {}), ("plain", DropoutRegions, {}),
                              ("none", DropoutRegions, {"checkpointed": False})):
        torch._dynamo.reset()
        recorder = _Recorder(partition)
        model = cls(**kwargs)
        got = _steps(model, torch.compile(model, backend=_backend(recorder)), _dense_batch, _dense_loss)
        reference = cls(**kwargs)
        _assert_equal(got, _steps(reference, reference, _dense_batch, _dense_loss))
        saved[name] = sum(recorder.saved)
    _assert_no_new_fallback(before)
    assert saved["plain"] < saved["selective"] <= saved["none"], saved
    if partition is default_partition:  # min-cut without checkpointing recomputes what the policy recomputes
        assert saved["selective"] < saved["none"], saved


# -- T5-style `+=` on a value computed inside the region --------------------------------------------------------


class BucketRegion(nn.Module):
    """Relative-position buckets built with ``+=`` inside a checkpointed region (as T5's attention does)."""

    def __init__(self, checkpointed: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bias = nn.Embedding(16, 2)
        self.proj = nn.Linear(8, 8)
        self.checkpointed = checkpointed

    def region(self, x):
        length = x.shape[1]
        relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        buckets = (relative > 0).to(torch.long) * 8
        buckets += torch.abs(relative).clamp(max=7)  # in place into a value the region computed
        scores = torch.einsum("bid,bjd->bij", x, self.proj(x)) + self.bias(buckets).sum(-1)
        return nn.functional.dropout(scores.softmax(-1), 0.1, self.training) @ x

    def forward(self, x):
        if self.checkpointed:
            return torch.utils.checkpoint.checkpoint(self.region, x, use_reentrant=False)
        return self.region(x)


def _sequence_batch(step: int):
    return torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(step), requires_grad=True)


def _sequence_loss(run, x):
    return run(x).pow(2).mean()


def test_an_in_place_add_in_a_region_is_captured_with_eagers_gradients(monkeypatch):
    before = _no_fallback(monkeypatch)
    recorder = _Recorder()
    model = BucketRegion()
    got = _steps(model, torch.compile(model, backend=_backend(recorder)), _sequence_batch, _sequence_loss)
    _assert_no_new_fallback(before)
    reference = BucketRegion()
    _assert_equal(got, _steps(reference, reference, _sequence_batch, _sequence_loss))

    unchecked = _Recorder()
    plain = BucketRegion(checkpointed=False)
    _steps(plain, torch.compile(plain, backend=_backend(unchecked)), _sequence_batch, _sequence_loss, steps=1)
    assert recorder.saved and max(recorder.saved) < max(unchecked.saved)


# -- GPT-2 (transformers) with gradient_checkpointing_enable() and dropout 0.1 ---------------------------------


def _gpt2(checkpointed: bool = True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)  # dropout 0.1 (resid, embd, attn): GPT-2's defaults
    model.train()
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _ids(step: int):
    return torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(step))


def _lm_loss(run, ids):
    return run(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("entry", ["backend", "compile"])
def test_gpt2_with_gradient_checkpointing_and_dropout_is_captured_with_eagers_gradients(entry, monkeypatch):
    before = _no_fallback(monkeypatch)
    recorder = _Recorder()
    model = _gpt2()
    if entry == "backend":
        run = torch.compile(model, backend=_backend(recorder))
    else:
        run = aotcache.compile(model, compiler="nop", partition_fn=recorder, cache=False)
    got = _steps(model, run, _ids, _lm_loss)
    _assert_no_new_fallback(before, allowed=("partial:",))  # aotcache.compile's choice of the Dynamo way
    reference = _gpt2()
    _assert_equal(got, _steps(reference, reference, _ids, _lm_loss))
    assert recorder.saved
    if entry == "compile":
        assert run.route == "dynamo"

    unchecked = _Recorder()
    plain = _gpt2(checkpointed=False)
    _steps(plain, torch.compile(plain, backend=_backend(unchecked)), _ids, _lm_loss, steps=1)
    # over all graphs of a step (checkpointing adds a graph break); untagged regions saved about as much as the
    # unchecked model (534 KiB + 47 KiB vs 568 KiB + 13 KiB), recomputed ones a fifth of it
    assert 2 * sum(recorder.saved) < sum(unchecked.saved)  # each graph compiled once (same shapes each step)


def test_a_region_without_the_rng_state_and_dropout_stays_refused(monkeypatch):
    """NOTE [Checkpointed regions without the RNG state]: the region traced in line would save its mask, where
    eager's recomputation draws a new one."""
    monkeypatch.setenv("AOTCACHE_STRICT", "1")
    torch._dynamo.reset()

    class Unpreserved(DropoutRegions):
        def forward(self, x):
            return self.head(x + torch.utils.checkpoint.checkpoint(self.blocks[0], x, use_reentrant=False,
                                                                   preserve_rng_state=False))

    model = Unpreserved()
    with pytest.raises(Exception, match="preserve_rng_state=False"):
        torch.compile(model, backend=_backend())(_dense_batch(0)[0])


def test_a_captured_region_graph_is_stored_and_a_warm_start_loads_it_with_eagers_gradients(monkeypatch):
    """The captured graph goes to the compiled-graph cache like any other; a later compile of the same model loads
    it (a hit, nothing traced) and trains as eager."""
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store.memory import InMemoryCache
    from aotcache.store.tiered import TieredCache

    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)
    reference = DropoutRegions()
    expected = _steps(reference, reference, _dense_batch, _dense_loss)
    for start in ("cold", "warm"):
        before = _no_fallback(monkeypatch)  # resets Dynamo: the warm start compiles its graph again
        counters = dict(cache.counters)
        model = DropoutRegions()
        backend = functools.partial(aotcache.aotcache_backend, compiler="nop", cache=cache)
        _assert_equal(_steps(model, torch.compile(model, backend=backend), _dense_batch, _dense_loss), expected)
        _assert_no_new_fallback(before)
        kind = "saved" if start == "cold" else "hit"
        assert cache.counters.get(kind, 0) == counters.get(kind, 0) + 1, (start, dict(cache.counters))


# -- review findings (s12-review-ck) ---------------------------------------------------------------------------


def _save_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) \
        else CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_everything(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_RECOMPUTE


class _PolicyRegion(nn.Module):
    """One region checkpoint(dropout MLP) with the given selective-checkpoint policy (None: no context_fn)."""

    def __init__(self, policy=None, p: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Dropout(p), nn.Linear(128, 32))
        self.policy = policy

    def forward(self, x):
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs = {} if self.policy is None else {
            "context_fn": functools.partial(create_selective_checkpoint_contexts, self.policy)}
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False, **kwargs)


def test_a_changed_selective_checkpoint_policy_is_a_cache_miss(monkeypatch):
    """Found in review: the policy lives in the region body's meta, not in its graph text, so a model whose policy
    changed was served the entry captured for another one (other saved values than asked). Now the context_fn's
    digest is in the key: a new policy misses, the same one hits (NOTE [A checkpoint's context_fn in the key])."""
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store.memory import InMemoryCache
    from aotcache.store.tiered import TieredCache

    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)
    outcomes = []
    for policy in (None, _save_matmuls, _save_matmuls, _recompute_everything, None):
        before = _no_fallback(monkeypatch)
        counters = dict(cache.counters)
        model = _PolicyRegion(policy)
        backend = functools.partial(aotcache.aotcache_backend, compiler="nop", cache=cache)
        _steps(model, torch.compile(model, backend=backend), _dense_batch, _dense_loss, steps=1)
        _assert_no_new_fallback(before)
        outcomes.append("hit" if cache.counters.get("hit", 0) > counters.get("hit", 0) else "miss")
    assert outcomes == ["miss", "miss", "hit", "miss", "hit"], outcomes


class _RandRegion(nn.Module):
    """A region drawing with torch.rand directly (no dropout module): under a whole capture its recomputation
    would draw anew."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def region(self, x):
        return self.linear(x) * torch.rand(x.shape) + torch.randn_like(x)

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.region, x, use_reentrant=False))


@pytest.mark.parametrize("entry", ["aotcache.compile", "aot_module"])
def test_a_region_drawing_with_torch_rand_captured_whole_trains_as_eager(entry):
    """Found in review (also on main): aotcache.compile's AOT way captured the model whole, and the traced
    recomputation drew fresh numbers (other gradients and generator state than eager's, no fallback counted).
    Such a capture is refused now (NOTE [Checkpoint recomputations replaying draws]): aotcache.compile takes its
    Dynamo way, aot_module runs eagerly; both give eager's bits."""
    torch._dynamo.reset()
    model = _RandRegion()
    if entry == "aotcache.compile":
        run = aotcache.compile(model, compiler="nop", cache=False)
    else:
        run = aotcache.aot_module(model, fw_compiler="nop", cache=False)
    got = _steps(model, run, _dense_batch, _dense_loss)
    reference = _RandRegion()
    _assert_equal(got, _steps(reference, reference, _dense_batch, _dense_loss))
    if entry == "aotcache.compile":
        assert run.route == "dynamo", run.route


def test_dropout_in_a_region_with_dynamic_shapes_is_captured_and_a_changed_p_recompiles(monkeypatch):
    """Found in review: with ``dynamic=True`` Dynamo passes a Dropout's ``p`` as a float input read in the region's
    body, which its restart does not specialize: every such graph ran eagerly (a 'region' fallback). Now the float
    is specialized and guarded (NOTE [Float inputs read in a checkpointed region]): captured, eager's bits, and a
    changed ``p`` compiles again rather than reusing the old one."""
    before = _no_fallback(monkeypatch)
    model = _PolicyRegion(p=0.3)
    run = torch.compile(model, backend=_backend(), dynamic=True)
    reference = _PolicyRegion(p=0.3)
    _assert_equal(_steps(model, run, _dense_batch, _dense_loss), _steps(reference, reference, _dense_batch,
                                                                        _dense_loss))
    for module in (model, reference):
        module.block[2].p = 0.6
    _assert_equal(_steps(model, run, _dense_batch, _dense_loss), _steps(reference, reference, _dense_batch,
                                                                        _dense_loss))
    _assert_no_new_fallback(before)


def test_eager_checkpoints_in_another_thread_during_a_capture_stay_eager():
    """Review check: while one thread is inside a capture, in the middle of a region traced in line (its policy
    blocks there), another thread's eager checkpoint sees no capture (capturing_in_this_thread is per thread),
    no dispatch mode of the capture, and trains with eager's bits; after the capture nothing is left installed."""
    import threading

    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    from torch.utils.checkpoint import CheckpointPolicy

    from aotcache.aot.capture_threads import capturing_in_this_thread

    inside, release = threading.Event(), threading.Event()
    blocked_in_capture = []

    def blocking_policy(ctx, op, *args, **kwargs):
        if not inside.is_set():
            blocked_in_capture.append(capturing_in_this_thread())
            inside.set()
            assert release.wait(120)
        return CheckpointPolicy.PREFER_RECOMPUTE

    def eager_records():
        model = DropoutRegions()
        return _steps(model, model, _dense_batch, _dense_loss, steps=2)

    expected = eager_records()
    torch._dynamo.reset()
    compiled_model = _PolicyRegion(blocking_policy)
    failures = []

    def compile_in_thread():
        try:
            run = torch.compile(compiled_model, backend=_backend())
            _steps(compiled_model, run, _dense_batch, _dense_loss, steps=1)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
            inside.set()

    thread = threading.Thread(target=compile_in_thread)
    thread.start()
    assert inside.wait(120)
    try:
        assert not failures, failures
        assert blocked_in_capture == [True]  # the other thread waits inside its capture
        assert not capturing_in_this_thread()
        assert not _get_current_dispatch_mode_stack()
        _assert_equal(eager_records(), expected)
    finally:
        release.set()
        thread.join(300)
    assert not failures, failures
    assert not _get_current_dispatch_mode_stack() and not capturing_in_this_thread()
    _assert_equal(eager_records(), expected)


class _SelectiveNormRegion(nn.Module):
    """A selective-checkpoint region with a BatchNorm in train mode and dropout: refused (its statistics)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Dropout(0.2), nn.Linear(32, 4))

    def forward(self, x):
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False, context_fn=functools.partial(
            create_selective_checkpoint_contexts, _save_matmuls))


def test_a_capture_refused_inside_a_selective_region_leaves_nothing_behind():
    """Review check: the refusal of a region writing into its inputs comes while the capture traces the region in
    line under the policy's dispatch mode; the graph then runs eagerly with eager's bits (statistics included),
    and no mode or capture state is left for later eager checkpoints."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from aotcache.aot.capture_threads import capturing_in_this_thread

    torch._dynamo.reset()
    before = dict(fallback_counts())
    model = _SelectiveNormRegion()
    got = _steps(model, torch.compile(model, backend=_backend()), _dense_batch, _dense_loss)
    got += [buffer.clone() for buffer in model.buffers()]
    assert fallback_counts().get("region", 0) == before.get("region", 0) + 1, dict(fallback_counts())
    assert not _get_current_dispatch_mode_stack() and not capturing_in_this_thread()
    reference = _SelectiveNormRegion()
    expected = _steps(reference, reference, _dense_batch, _dense_loss)
    _assert_equal(got, expected + [buffer.clone() for buffer in reference.buffers()])
    later = DropoutRegions()
    again = DropoutRegions()
    _assert_equal(_steps(later, later, _dense_batch, _dense_loss), _steps(again, again, _dense_batch, _dense_loss))


class _NestedRegions(nn.Module):
    """Three checkpointed dropout blocks, inside one outer checkpoint when ``outer``."""

    def __init__(self, outer: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Dropout(0.1),
                                                  nn.Linear(128, 32)) for _ in range(3))
        self.head = nn.Linear(32, 4)
        self.outer = outer

    def body(self, x):
        for block in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x

    def forward(self, x):
        x = torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False) if self.outer else self.body(x)
        return self.head(x)


@pytest.mark.parametrize("partition", [default_partition, min_cut_rematerialization_partition],
                         ids=["default", "min_cut"])
def test_nested_regions_recompute_the_outer_region_as_eager(partition, monkeypatch):
    """Found in review: an inner region traced in line had its own ac_graph_id, so its inputs and outputs were
    internal to neither region and saved: the outer checkpoint saved nothing more than the inner ones alone. Now
    the inner region takes the outer one's id (NOTE [Nested regions traced in line]): less saved, eager's bits."""
    saved = {}
    for outer in (False, True):
        before = _no_fallback(monkeypatch)
        recorder = _Recorder(partition)
        model = _NestedRegions(outer)
        got = _steps(model, torch.compile(model, backend=_backend(recorder)), _dense_batch, _dense_loss)
        _assert_no_new_fallback(before)
        reference = _NestedRegions(outer)
        _assert_equal(got, _steps(reference, reference, _dense_batch, _dense_loss))
        saved[outer] = recorder.saved[0]
    assert saved[True] < saved[False], saved


def test_regions_traced_in_line_share_torchs_region_ids(monkeypatch):
    """Found in review: regions traced in line counted their ac_graph_id from 1 on their own, torch's implementation
    (regions with a context_fn of their own modes) from 0 on its own, so one graph could hold two regions with one
    id, which the partitioners take for one region. Both now draw from torch's counter."""
    from torch._higher_order_ops import wrap

    from aotcache.aot import checkpoint_regions

    monkeypatch.setattr(wrap, "uid", __import__("itertools").count(5))
    ids = [checkpoint_regions._new_region_id(), next(wrap.uid), checkpoint_regions._new_region_id()]
    assert ids == [5, 6, 7]
