"""Real transformers models (tiny random configs) through aotcache's public entry points, as a new user runs them:
each test is a bug found that way, kept in the shape it was found (nop compiler, CPU)."""

from __future__ import annotations

import pytest
import torch

import aotcache
from aotcache.autograd_cache.cache import resolve_cache
from tests.aot.tiny_transformers import (tiny_bart, tiny_bigbird_mlm, tiny_llama, tiny_roberta_classifier,
                                        tiny_roberta_model, tiny_t5, tiny_wav2vec2_ctc)


def test_a_warm_start_makes_the_config_change_eager_makes_on_the_first_call_with_labels():
    # NOTE [State changed by the call]: transformers' sequence classifiers set config.problem_type on the first
    # call with labels; a warm start through the fingerprint alias used to skip that, leaving it None for good.
    # Now the alias records the change and a warm start replays it (NOTE [Replaying a call's state change])
    ids, labels = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2])
    cold = aotcache.compile(tiny_roberta_classifier(), compiler="nop")
    cold(input_ids=ids, labels=labels).loss.backward()
    assert cold.config.problem_type == "single_label_classification"
    counters = resolve_cache(True).counters
    assert counters["fingerprint_state_recorded"] == 1 and counters["fingerprint_state_changed"] == 0
    cold(input_ids=ids, labels=labels)  # the new state: traced again (same graph: a hit), its alias recorded
    assert counters["compile"] == 1

    eager, fresh = tiny_roberta_classifier(), tiny_roberta_classifier()  # as in a new process: config unset
    warm = aotcache.compile(fresh, compiler="nop")
    misses = counters["fingerprint_miss"]
    loss = warm(input_ids=ids, labels=labels).loss
    expected = eager(input_ids=ids, labels=labels).loss
    assert fresh.config.problem_type == eager.config.problem_type == "single_label_classification"
    assert torch.allclose(loss, expected) and warm.route == "aot"
    assert counters["fingerprint_replay"] == 1 and counters["fingerprint_miss"] == misses  # no trace
    warm(input_ids=ids, labels=labels)  # the new state's own alias, recorded by the cold model's second call
    assert counters["fingerprint_hit"] == 2 and counters["compile"] == 1


def test_bart_greedy_then_beam_generate_starts_warm_without_tracing():
    # NOTE [Several graphs under one fingerprint]: after greedy generate made the KV length and the batch dynamic,
    # beam search's second step (KV length 1, specialized) and third (length 2, symbolic) were two graphs under
    # one fingerprint; with one alias per fingerprint the third step traced on every warm start
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    settings = [dict(max_new_tokens=4, min_new_tokens=4, num_beams=1, do_sample=False),
                dict(max_new_tokens=3, min_new_tokens=3, num_beams=3, do_sample=False)]
    eager = tiny_bart()
    expected = [eager.generate(input_ids=ids, attention_mask=mask, **kwargs) for kwargs in settings]
    counters = resolve_cache(True).counters
    for run in ("cold", "warm"):  # warm: a new wrapper of a fresh model, as in a new process
        before = dict(counters)
        model = aotcache.compile(tiny_bart(), compiler="nop")
        for kwargs, want in zip(settings, expected):
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), want), (run, kwargs)
        assert model.route == "aot"
        delta = {name: counters[name] - before.get(name, 0) for name in ("compile", "fingerprint_miss",
                                                                         "fingerprint_hit")}
    assert delta == {"compile": 0, "fingerprint_miss": 0, "fingerprint_hit": 6}, delta


def _adamw_steps(model, forward, steps: int = 2) -> list:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(steps):
        ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss = forward(input_ids=ids).last_hidden_state.pow(2).mean()  # the pooler output is left out
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("route", ["compile", "torch.compile", "cache hit"])
def test_parameters_only_an_unused_output_reads_keep_no_gradient_as_in_eager(route):
    # NOTE [Gradients of unused outputs]: the pooler's gradients came back as zeros, so AdamW decayed its weights
    eager = tiny_roberta_model()
    expected = _adamw_steps(eager, eager)
    assert eager.pooler.dense.weight.grad is None
    if route == "cache hit":  # the runtime rebuilt from a stored entry (metadata through JSON) behaves the same
        first = tiny_roberta_model()
        aotcache.compile(first, compiler="nop")(input_ids=torch.ones(2, 8, dtype=torch.long)).last_hidden_state.sum()
    model = tiny_roberta_model()
    if route == "torch.compile":
        compiled = torch.compile(model, backend="aotcache", options={"compiler": "nop"})
    else:
        compiled = aotcache.compile(model, compiler="nop")
    losses = _adamw_steps(model, compiled)
    if route == "cache hit":
        assert resolve_cache(True).counters["compile"] == 1 and resolve_cache(True).counters["hit"] >= 1
    assert model.pooler.dense.weight.grad is None and model.pooler.dense.bias.grad is None
    assert model.embeddings.word_embeddings.weight.grad is not None
    assert torch.allclose(torch.stack(losses), torch.stack(expected), atol=1e-5)
    for (name, want), (_, got) in zip(eager.named_parameters(), model.named_parameters()):
        assert torch.allclose(want, got, atol=1e-5), name
    assert torch.equal(model.pooler.dense.weight, tiny_roberta_model().pooler.dense.weight)  # never decayed


def _wav2vec2_losses(forward, steps: int) -> list:
    np = pytest.importorskip("numpy")
    losses = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        audio, labels = torch.randn(2, 800, generator=generator), torch.randint(1, 16, (2, 5), generator=generator)
        np.random.seed(step), torch.manual_seed(step)  # the time masks come from numpy's generator
        loss = forward(input_values=audio, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    return losses


def test_wav2vec2_training_with_time_masks_through_compile_gives_eager_losses():
    # the masks are numpy draws (NOTE [numpy random under Dynamo]) applied by a boolean-mask assignment, which
    # Dynamo keeps in its graph and aotcache captures as a where (NOTE [Masked assignment as where])
    from aotcache.aot.fallback import fallback_counts

    eager, model = tiny_wav2vec2_ctc(), tiny_wav2vec2_ctc()
    compiled = aotcache.compile(model, compiler="nop")
    regions_before = fallback_counts().get("region", 0)  # process-wide counts: earlier tests add to them
    assert torch.equal(torch.stack(_wav2vec2_losses(compiled, 2)), torch.stack(_wav2vec2_losses(eager, 2)))
    assert compiled.route == "dynamo" and fallback_counts().get("region", 0) == regions_before  # all compiled
    for (name, want), (_, got) in zip(eager.named_parameters(), model.named_parameters()):
        assert (want.grad is None) == (got.grad is None) and (want.grad is None or torch.allclose(want.grad, got.grad,
                                                                                                 atol=1e-6)), name


def test_wav2vec2_training_with_time_masks_runs_through_the_torch_compile_backend():
    # it failed with BackendCompilerFailed (CaptureError: aten.nonzero) where torch.compile's own backends run;
    # the masked assignment is captured now (NOTE [Masked assignment as where])
    import torch._dynamo

    from aotcache.aot.fallback import fallback_counts

    eager, model = tiny_wav2vec2_ctc(), tiny_wav2vec2_ctc()
    compiled = torch.compile(model, backend="aotcache", options={"compiler": "nop"})
    regions_before = fallback_counts().get("region", 0)  # process-wide counts: earlier tests add to them
    with torch._dynamo.config.patch(use_numpy_random_stream=True):  # numpy's draws, to compare with eager's
        losses = _wav2vec2_losses(compiled, 1)
    assert torch.allclose(losses[0], _wav2vec2_losses(eager, 1)[0], rtol=1e-6)
    assert fallback_counts().get("region", 0) == regions_before


def test_transformers_trainer_trains_evaluates_and_saves_a_compiled_model_as_the_eager_one(tmp_path):
    # NOTE [The wrapper's class]: Trainer found no label names on the wrapper's class (evaluation had no
    # eval_loss and returned the loss as predictions) and saved weights without config.json
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 64, (8,), generator=generator), "labels": torch.tensor(i % 3)}
            for i in range(8)]
    results = {}
    for kind in ("eager", "compiled"):
        model = tiny_roberta_classifier()
        if kind == "compiled":
            model = aotcache.compile(model, compiler="nop")
        args = transformers.TrainingArguments(output_dir=str(tmp_path / kind), max_steps=2, seed=0,
                                              per_device_train_batch_size=4, per_device_eval_batch_size=4,
                                              report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3,
                                              disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
        trainer.train()
        metrics = trainer.evaluate()
        predictions = trainer.predict(data[:4])
        trainer.save_model(str(tmp_path / kind))
        results[kind] = (metrics, predictions, sorted(p.name for p in (tmp_path / kind).iterdir()))
    eager_metrics, eager_predictions, eager_files = results["eager"]
    metrics, predictions, files = results["compiled"]
    assert "eval_loss" in metrics and abs(metrics["eval_loss"] - eager_metrics["eval_loss"]) < 1e-5
    assert predictions.predictions.shape == eager_predictions.predictions.shape == (4, 3)
    assert (predictions.label_ids == eager_predictions.label_ids).all()
    assert "config.json" in files and files == eager_files
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "compiled"))
    assert isinstance(reloaded, type(model.orig_module))


def test_t5_with_gradient_checkpointing_trains_as_eager(monkeypatch):
    # NOTE [In-place ops in a checkpointed region]: T5's `relative_buckets += ...` inside a checkpointed layer made
    # the capture of the Dynamo graph raise (torch's checkpoint cache saw its tensor mutated): the job failed where
    # eager runs. The region then ran eagerly, counted as a capture fallback; it is captured now (NOTE
    # [Checkpointed regions traced in line]): no fallback at all, in strict mode too.
    from aotcache.aot.fallback import fallback_counts

    monkeypatch.setenv("AOTCACHE_STRICT", "1")

    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    eager, model = tiny_t5(), tiny_t5()
    for m in (eager, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = sum(fallback_counts().values())
    expected = eager(input_ids=ids, labels=labels).loss
    expected.backward()
    loss = aotcache.compile(model, compiler="nop")(input_ids=ids, labels=labels).loss
    loss.backward()
    assert sum(fallback_counts().values()) == before
    assert torch.allclose(loss, expected, atol=1e-6)
    for (name, want), (_, got) in zip(eager.named_parameters(), model.named_parameters()):
        assert (want.grad is None) == (got.grad is None), name
        if want.grad is not None:
            assert torch.allclose(want.grad, got.grad, atol=1e-6), name


def test_a_forward_that_replaces_its_attention_submodules_on_the_first_call_matches_eager_cold_and_warm():
    # found by bench/hf_sweep.py: BigBird's first call on a short input switches every layer to full attention,
    # swapping the attention submodule for another class. Cold and warm (a fresh model, as in a new process): eager's
    # losses and gradients, the module tree left as eager leaves it; the warm start traces that first call (its
    # state changes: NOTE [State changed by the call]) and serves the next through the new state's alias
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -100)
    counters = resolve_cache(True).counters
    for run in ("cold", "warm"):
        before = dict(counters)
        eager, model = tiny_bigbird_mlm(), tiny_bigbird_mlm()
        compiled = aotcache.compile(model, compiler="nop")
        for step in range(2):
            want, got = eager(input_ids=ids, labels=labels).loss, compiled(input_ids=ids, labels=labels).loss
            want.backward()
            got.backward()
            assert torch.equal(got, want), (run, step)
        for (name, p), q in zip(eager.named_parameters(), model.parameters()):
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
        assert model.bert.attention_type == eager.bert.attention_type == "original_full"
        assert [type(m) for m in model.modules()] == [type(m) for m in eager.modules()]
        assert compiled.route == "aot"
        delta = {name: counters[name] - before.get(name, 0)
                 for name in ("fingerprint_hit", "fingerprint_state_changed")}
        assert delta["fingerprint_state_changed"] == 1, (run, delta)
    assert delta["fingerprint_hit"] == 1 and counters["compile"] == 2, (dict(counters))


def test_the_compile_call_transformers_generate_makes_works_through_aotcache_compile():
    # NOTE [torch.compile's backend names]: generate compiles the forward with
    # torch.compile(model.__call__, **CompileConfig().to_dict()), which always passes backend="inductor" (and mode,
    # options=None); the same call through aotcache.compile raised TypeError where torch.compile works
    from transformers import CompileConfig

    model = tiny_llama()
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    for config in (CompileConfig(), CompileConfig(fullgraph=True, dynamic=False)):
        assert config.to_dict()["backend"] == "inductor"
        compiled = aotcache.compile(model.__call__, compiler="nop", **config.to_dict())
        assert compiled.compiled.options.fw_compiler == "nop"  # compiler= wins over the backend's name
        with torch.no_grad():
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
        assert compiled.route == "aot"


def test_gradients_read_through_orig_mod_after_compile_equal_eager():
    # transformers' test_torch_compile_for_training compiles with fullgraph=True, mode="reduce-overhead" and reads
    # the gradients through model._orig_mod (torch's OptimizedModule's name): an AttributeError on aotcache's wrapper
    model = tiny_llama().train()
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1] * 5 + [0] * 5, [1] * 10])
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    model(**inputs).loss.backward()
    expected = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()

    compiled = aotcache.compile(model, fullgraph=True, mode="reduce-overhead", compiler="nop")
    compiled(**inputs).loss.backward()
    assert compiled._orig_mod is model and compiled.route == "aot"
    for name, param in compiled._orig_mod.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-4)


def test_t5_encoder_with_its_forward_compiled_fullgraph_gives_eager_outputs():
    # transformers' T5 test_compile_static_cache_encoder: model.forward = compile(model.forward, mode="reduce-overhead",
    # fullgraph=True) in grad mode raised a CaptureError (NOTE [Bound methods of modules])
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                   dropout_rate=0.0)
    model = transformers.T5EncoderModel(config).eval()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    expected = model(input_ids=ids, attention_mask=mask)[0]
    model.forward = aotcache.compile(model.forward, mode="reduce-overhead", fullgraph=True, compiler="nop")
    got = model(input_ids=ids, attention_mask=mask)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.requires_grad and model.forward.route == "aot"
