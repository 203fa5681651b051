"""Activation checkpointing through the Dynamo way (``torch.compile(backend="aotcache")``, and
``aotcache.compile`` of a checkpointing model): the checkpointed regions' activations are recomputed in the
backward, not saved (NOTE [Activation checkpoint regions] in aotcache/aot/partition.py), with eager's results.

Found by bench/loop_utilities.py's checkpoint cases: results equalled eager, but both partitioners ignored the
``recompute`` tags Dynamo puts on a region's nodes and saved every activation (a model with
``torch.utils.checkpoint`` around its blocks kept 28 MiB where eager keeps 2 MiB: what fits in memory with
eager's checkpointing would not fit compiled)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import aotcache
from aotcache.aot.partition import default_partition, min_cut_rematerialization_partition, saved_value_bytes


class Blocks(nn.Module):
    """Residual MLP blocks, each under ``torch.utils.checkpoint`` (non-reentrant) when ``checkpointed``;
    ``dropout`` puts a random op inside each region."""

    def __init__(self, checkpointed: bool, dropout: float = 0.0, width: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(4 * width, width)) for _ in range(3))
        self.head = nn.Linear(width, 5)
        self.checkpointed = checkpointed

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointed:
                x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = x + block(x)
        return self.head(x)


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 64, generator=g), torch.randint(0, 5, (32,), generator=g)


class _Recorder:
    """A partition function that records, per graph, the bytes of the activations the forward saves (not the
    primals: parameters and inputs are alive anyway)."""

    def __init__(self, partition) -> None:
        self.partition = partition
        self.saved: list[float] = []

    def __call__(self, joint_gm, joint_inputs=(), *, num_fwd_outputs):
        fw, bw = self.partition(joint_gm, joint_inputs, num_fwd_outputs=num_fwd_outputs)
        outputs = list(fw.graph.nodes)[-1].args[0][num_fwd_outputs:]
        self.saved.append(sum(saved_value_bytes(node) for node in outputs
                              if node.op != "placeholder" and isinstance(node.meta.get("val"), torch.Tensor)))
        return fw, bw


def _train(model: nn.Module, run, steps: int = 2) -> list[torch.Tensor]:
    """Losses, gradients and parameters after each SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    for step in range(steps):
        x, y = _batch(step)
        loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        records += [loss.detach(), *(p.grad.clone() for p in model.parameters())]
        opt.step()
        opt.zero_grad()
    return records + [p.detach().clone() for p in model.parameters()]


def _assert_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), index  # recomputing runs the same ops on the same values: bitwise eager's


@pytest.mark.parametrize("partition", [default_partition, min_cut_rematerialization_partition],
                         ids=["default", "min_cut"])
def test_checkpointed_regions_are_recomputed_not_saved(partition):
    torch._dynamo.reset()
    saved = {}
    for checkpointed in (False, True):
        recorder = _Recorder(partition)
        model = Blocks(checkpointed)
        backend = functools.partial(aotcache.aotcache_backend, compiler="nop", partition=recorder, cache=False)
        got = _train(model, torch.compile(model, backend=backend))
        reference = Blocks(checkpointed)
        _assert_equal(got, _train(reference, reference))
        saved[checkpointed] = max(recorder.saved)
    # checkpointed: the three block inputs (32 x 64 floats each) and what the head's backward reads; the
    # unchecked model also keeps each block's LayerNorm statistics and 4x-wide hidden activations
    block_input = 32 * 64 * 4
    assert saved[True] <= 4 * block_input < saved[False]


class NoisyBlocks(Blocks):
    """Blocks whose checkpointed regions draw noise with a functional random op (``rand_like``)."""

    def __init__(self) -> None:
        super().__init__(True)
        for block in self.blocks:
            block[3] = _Noise()


class _Noise(nn.Module):
    def forward(self, x):
        return x * (torch.rand_like(x) > 0.3)


def test_a_random_op_inside_a_region_is_saved_and_the_results_are_eagers():
    """Eager's checkpoint replays the RNG state when it recomputes; the compiled backward must not draw again,
    so the noise is saved (and the matmuls around it still recomputed)."""
    torch._dynamo.reset()
    recorder = _Recorder(default_partition)
    model = NoisyBlocks()
    backend = functools.partial(aotcache.aotcache_backend, compiler="nop", partition=recorder, cache=False)
    torch.manual_seed(5)
    got = _train(model, torch.compile(model, backend=backend))
    reference = NoisyBlocks()
    torch.manual_seed(5)
    _assert_equal(got, _train(reference, reference))
    # saved: the block inputs, the head's input and the three draws (the hidden activations are recomputed)
    block_input, draw = 32 * 64 * 4, 32 * 256 * 4
    assert recorder.saved and max(recorder.saved) <= 4 * block_input + 3 * draw + 2048


@pytest.mark.parametrize("entry", ["backend", "compile"])
def test_dropout_inside_a_checkpointed_region_gives_eagers_gradients(entry):
    """Found: dropout inside ``torch.utils.checkpoint`` (non-reentrant) made the capture fail (dropout draws its
    mask in place, which torch's checkpoint refuses under a tracer), reported as *reentrant* checkpointing, and
    the graph ran as Python: ``tag_activation_checkpoint``'s own eager code does not preserve the RNG state, so
    the backward's recomputation drew another mask and the gradients differed from eager's (the loss did not).
    Each region then ran as eager's ``torch.utils.checkpoint`` (NOTE [Checkpointed regions run eagerly]); the
    graph is captured now (NOTE [Checkpointed regions traced in line])."""
    torch._dynamo.reset()
    model = Blocks(True, dropout=0.3)
    if entry == "backend":
        run = torch.compile(model, backend=functools.partial(aotcache.aotcache_backend, compiler="nop", cache=False))
    else:
        run = aotcache.compile(model, compiler="nop", cache=False)
    torch.manual_seed(5)
    got = _train(model, run, steps=3)
    reference = Blocks(True, dropout=0.3)
    torch.manual_seed(5)
    _assert_equal(got, _train(reference, reference, steps=3))


class SelectiveBlocks(Blocks):
    """Blocks checkpointed with a selective-checkpoint policy (saves the matmuls, recomputes the rest)."""

    def forward(self, x):
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        def policy(ctx, op, *args, **kwargs):
            return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.addmm.default \
                else CheckpointPolicy.PREFER_RECOMPUTE

        context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
        for block in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=context_fn)
        return self.head(x)


class _OwnCaching(torch.utils.checkpoint._CachingTorchDispatchMode):
    """A context_fn's own dispatch mode (here torch's caching one, subclassed): aotcache does not know what it
    does, so the region goes through torch's implementation."""


def _own_contexts():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.PREFER_RECOMPUTE

    # torch's own pair gives the storage (its layout and the cached mode's arguments differ between torch 2.11
    # and 2.13); the caching half is replaced by the subclass
    caching, cached = create_selective_checkpoint_contexts(policy)
    return _OwnCaching(policy, caching.storage), cached


class OwnContextBlocks(Blocks):
    def forward(self, x):
        for block in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=_own_contexts)
        return self.head(x)


def test_the_refusal_of_dropout_in_a_region_with_its_own_contexts_names_it_not_reentrant_checkpointing(monkeypatch):
    """The refusal said "reentrant activation checkpointing ... pass use_reentrant=False" to a model that
    passed it already; it names the in-place write (dropout's mask) and the fixes now. Plain and selective regions
    with dropout are captured (tests/test_checkpoint_inplace.py); a region whose context_fn makes its own dispatch
    modes still goes through torch's caching, which refuses the in-place draw (NOTE [In-place ops in a checkpointed
    region]), and trains as eager without strict mode."""
    monkeypatch.setenv("AOTCACHE_STRICT", "1")
    torch._dynamo.reset()
    model = OwnContextBlocks(True, dropout=0.3)
    run = torch.compile(model, backend=functools.partial(aotcache.aotcache_backend, compiler="nop", cache=False))
    with pytest.raises(Exception, match="its own context_fn.*writes in place.*dropout") as info:
        run(_batch(0)[0])
    assert "use_reentrant=True" not in str(info.value)

    monkeypatch.setenv("AOTCACHE_STRICT", "0")
    torch._dynamo.reset()
    run = torch.compile(model, backend=functools.partial(aotcache.aotcache_backend, compiler="nop", cache=False))
    torch.manual_seed(5)
    got = _train(model, run, steps=2) + [torch.get_rng_state()]
    reference = OwnContextBlocks(True, dropout=0.3)
    torch.manual_seed(5)
    _assert_equal(got, _train(reference, reference, steps=2) + [torch.get_rng_state()])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_selective_region_trains_as_eager(dropout):
    """Selective checkpointing stays right, captured with or without dropout (the policy asked per op, NOTE
    [Checkpointed regions traced in line])."""
    torch._dynamo.reset()
    model = SelectiveBlocks(True, dropout=dropout)
    run = torch.compile(model, backend=functools.partial(aotcache.aotcache_backend, compiler="nop", cache=False))
    torch.manual_seed(5)
    got = _train(model, run, steps=2) + [torch.get_rng_state()]
    reference = SelectiveBlocks(True, dropout=dropout)
    torch.manual_seed(5)
    _assert_equal(got, _train(reference, reference, steps=2) + [torch.get_rng_state()])


def test_aotcache_compile_of_a_checkpointing_model_takes_the_dynamo_way_and_recomputes(tmp_path, monkeypatch):
    """The user's view: ``aotcache.compile(model)`` of a model with checkpointed blocks cannot be captured whole
    (the recompute reads parameters after the module call), takes the Dynamo way, trains as eager, and its
    graphs save the block inputs only."""
    monkeypatch.setenv("AOTCACHE_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    recorder = _Recorder(default_partition)
    model = Blocks(True)
    compiled = aotcache.compile(model, compiler="nop", partition_fn=recorder, cache=False)
    got = _train(model, compiled)
    reference = Blocks(True)
    _assert_equal(got, _train(reference, reference))
    assert compiled.route == "dynamo"
    assert recorder.saved and max(recorder.saved) <= 4 * 32 * 64 * 4


class FrozenEmbeddingThenReentrant(nn.Module):
    """transformers' LoRA recipe in small: a frozen embedding whose output a forward hook makes require grad
    (``enable_input_require_grads()``), a trainable block under a reentrant checkpoint, a frozen head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8).requires_grad_(False)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2).requires_grad_(False)
        self.emb.register_forward_hook(lambda module, args, output: output.requires_grad_(True))

    def forward(self, ids):
        hidden = torch.utils.checkpoint.checkpoint(self.block, self.emb(ids), use_reentrant=True)
        return self.head(hidden).sum()


def test_a_hook_that_makes_the_embeddings_require_grad_before_a_reentrant_checkpoint_trains_as_eager():
    """Found (peft LoRA + gradient checkpointing through aotcache.compile): no graph input flows into the reentrant
    checkpoint, so the traced backward (``autograd.grad`` with respect to the inputs) skipped its node, and the
    compiled backward left the block's .grad None where eager computes it: the adapters trained nothing, silently.
    Such a call is refused now (NOTE [Reentrant checkpoints the traced backward skips]) and takes the Dynamo way."""
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    eager = FrozenEmbeddingThenReentrant()
    eager(ids).backward()
    model = FrozenEmbeddingThenReentrant()
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    compiled(ids).backward()
    assert eager.block.weight.grad is not None
    assert model.block.weight.grad is not None and torch.equal(model.block.weight.grad, eager.block.weight.grad)
    assert compiled.route == "dynamo"
    strict = aotcache.aot_module(FrozenEmbeddingThenReentrant(), "nop", cache=False, on_capture_error="raise")
    with pytest.raises(aotcache.aot.CaptureError, match="reentrant activation checkpointing"):
        strict(ids)


class _NormalizedRegion(nn.Module):
    """A BatchNorm inside a checkpointed region: eager's recomputation updates its statistics a second time."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(16, 16)
        self.norm = nn.BatchNorm1d(16)
        self.outer = nn.Linear(16, 16)

    def region(self, x):
        return self.outer(self.norm(self.inner(x)))

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.region, x, use_reentrant=False) + 1


def _train_recording_buffers(model: nn.Module, run, steps: int = 3) -> list[torch.Tensor]:
    records = []
    for step in range(steps):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step), requires_grad=True)
        out = run(x)
        records.append(model.norm.num_batches_tracked.clone())  # after the forward
        out.sum().backward()
        records += [out.detach(), x.grad, *(p.grad.clone() for p in model.parameters()),
                    *(b.clone() for b in model.buffers())]
        model.zero_grad()
    return records


@pytest.mark.parametrize("partition", [default_partition, min_cut_rematerialization_partition],
                         ids=["default", "min_cut"])
def test_a_batchnorm_inside_a_checkpointed_region_trains_as_eager(partition):
    """Found: the region's graph took the BatchNorm's ``num_batches_tracked`` as an input and bumped it in place;
    run as eager's checkpoint (the capture refuses the region), the backward's recomputation failed the saved
    input's version check (RuntimeError where eager trains). NOTE [Buffers written in a checkpointed region]."""
    torch._dynamo.reset()
    model = _NormalizedRegion()
    run = torch.compile(model, backend=functools.partial(aotcache.aotcache_backend, compiler="nop",
                                                         partition=partition, cache=False))
    got = _train_recording_buffers(model, run)
    reference = _NormalizedRegion()
    expected = _train_recording_buffers(reference, reference)
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, msg=str(index))
    assert model.norm.num_batches_tracked.item() == 6  # forward and recomputation, three steps: eager's count


def test_a_batchnorm_inside_a_checkpointed_region_under_aotcache_compile_counts_batches_as_eager():
    """Found: the whole-model capture's traced backward recomputed the region on the real BatchNorm and bumped its
    ``num_batches_tracked`` for real; the capture failed and the Dynamo way ran the step again (one batch counted
    once more than eager). NOTE [Buffers written by a failed capture] in call_state.py."""
    torch._dynamo.reset()
    model = _NormalizedRegion()
    run = aotcache.compile(model, compiler="nop", cache=False)
    got = _train_recording_buffers(model, run)
    reference = _NormalizedRegion()
    expected = _train_recording_buffers(reference, reference)
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, msg=str(index))
    assert run.route == "dynamo" and model.norm.num_batches_tracked.item() == 6


class _UnpreservedNoise(nn.Module):
    """Noise inside a region checkpointed with ``preserve_rng_state=False``: eager's recomputation draws anew."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(16, 16)
        self.outer = nn.Linear(16, 16)

    def region(self, x):
        hidden = self.inner(x)
        return self.outer(hidden * torch.randn_like(hidden))

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.region, x, use_reentrant=False, preserve_rng_state=False) + 1


@pytest.mark.parametrize("entry", ["backend", "compile"])
def test_a_region_without_the_rng_state_draws_anew_in_the_backward_as_eager(entry):
    """Found: the partitioners saved the region's draw, so the compiled backward used the forward's noise and
    left the global generator where the forward did; eager's recomputation draws new noise (other gradients) and
    moves the generator in the backward. NOTE [Checkpointed regions without the RNG state] in checkpoint_refusals.py."""
    torch._dynamo.reset()

    def steps(model, run):
        torch.manual_seed(5)
        records = []
        for step in range(3):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step), requires_grad=True)
            out = run(x)
            out.sum().backward()
            records += [out.detach(), x.grad, *(p.grad.clone() for p in model.parameters()),
                        torch.get_rng_state()]
            model.zero_grad()
        return records

    model = _UnpreservedNoise()
    run = (torch.compile(model, backend=functools.partial(aotcache.aotcache_backend, compiler="nop", cache=False))
           if entry == "backend" else aotcache.compile(model, compiler="nop", cache=False))
    got = steps(model, run)
    reference = _UnpreservedNoise()
    _assert_equal(got, steps(reference, reference))


def test_the_refusal_of_a_batchnorm_in_a_region_names_the_write_not_reentrant_checkpointing(monkeypatch):
    """The capture's refusal said "reentrant activation checkpointing ... pass use_reentrant=False" to a model
    that passed it; it names the region's write into its input now."""
    monkeypatch.setenv("AOTCACHE_STRICT", "1")
    torch._dynamo.reset()
    model = _NormalizedRegion()
    run = torch.compile(model, backend=functools.partial(aotcache.aotcache_backend, compiler="nop", cache=False))
    with pytest.raises(Exception, match="writes in place into one of its inputs.*BatchNorm") as info:
        run(torch.randn(8, 16, requires_grad=True))
    assert "use_reentrant=True" not in str(info.value)
