"""Real-world uses checked against eager (found by ``bench/real_use_sweep.py``; tiny random configs, nop compiler):
diffusers timestep kinds, per-call LoRA scales and module settings changed after compile (never a stale graph),
the transformers ``Trainer`` and ``accelerate`` (bf16) with a compiled model, ``generate`` with a static cache
through ``torch.compile(backend="aotcache")``."""

from __future__ import annotations

import tempfile

import pytest
import torch

import aotcache

transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config)


def tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 3, 16, generator=generator)


def test_unet_timestep_as_int_float_and_tensors_gives_eager_outputs():
    sample, context = unet_inputs()
    eager, model = tiny_unet().eval(), tiny_unet().eval()
    compiled = aotcache.compile(model, compiler="nop")
    with torch.no_grad():
        for t in (10, 10.5, 3.25, torch.tensor(7), torch.tensor([3, 50])):
            want = eager(sample, t, encoder_hidden_states=context).sample
            assert torch.equal(compiled(sample, t, encoder_hidden_states=context).sample, want), t
    assert compiled.route == "aot"


def test_unet_lora_scale_per_call_and_adapter_changes_never_run_a_stale_graph():
    peft = pytest.importorskip("peft")
    sample, context = unet_inputs()
    eager, model = tiny_unet().eval(), tiny_unet().eval()
    for target in (eager, model):
        torch.manual_seed(9)
        target.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False), "a")
    compiled = aotcache.compile(model, compiler="nop")
    seen = []
    with torch.no_grad():
        for step, scale in (("call", 1.0), ("call", 0.5), ("call", 2.0), ("weights 0.5", 1.0), ("disable", 1.0),
                            ("enable", 1.0)):
            for target in (eager, model):
                if step == "weights 0.5":
                    target.set_adapters(["a"], weights=[0.5])
                elif step == "disable":
                    target.disable_adapters()
                elif step == "enable":
                    target.enable_adapters()
            kwargs = {"encoder_hidden_states": context, "cross_attention_kwargs": {"scale": scale}}
            want = eager(sample, 10, **kwargs).sample
            assert torch.equal(compiled(sample, 10, **kwargs).sample, want), (step, scale)
            seen.append(want)
    assert not torch.equal(seen[1], seen[2]) and not torch.equal(seen[0], seen[4])  # each change shows


def test_vae_methods_compiled_as_functions_follow_slicing_and_tiling():
    diffusers = pytest.importorskip("diffusers")

    def vae():
        torch.manual_seed(0)
        return diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
            norm_num_groups=4, sample_size=16, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")).eval()

    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    eager, model = vae(), vae()
    # diffusers' way: vae.decode = torch.compile(vae.decode); the settings are read from the bound self
    model.encode = aotcache.compile(model.encode, compiler="nop")
    model.decode = aotcache.compile(model.decode, compiler="nop")
    outputs = {}
    for state in ("plain", "slicing", "tiling", "tiling off"):
        for target in (eager, model):
            {"plain": lambda: None, "slicing": target.enable_slicing, "tiling": target.enable_tiling,
             "tiling off": target.disable_tiling}[state]()
        with torch.no_grad():
            want = eager.decode(eager.encode(image).latent_dist.mode()).sample
            got = model.decode(model.encode(image).latent_dist.mode()).sample
        assert torch.equal(got, want), state
        outputs[state] = want
    assert not torch.equal(outputs["tiling"], outputs["plain"])  # a stale untiled graph would show


def _trainer_losses_and_model(compile_model):
    torch.manual_seed(0)
    model = tiny_gpt2()
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(12):
        ids = torch.randint(3, 64, (8,), generator=generator)
        data.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids.clone()})
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=1, seed=0, report_to=[], save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    passed = aotcache.compile(model, compiler="nop") if compile_model else model
    trainer = transformers.Trainer(model=passed, args=args, train_dataset=data)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], model


def test_trainer_with_a_compiled_model_and_gradient_accumulation_matches_eager():
    pytest.importorskip("accelerate")
    want_losses, eager = _trainer_losses_and_model(False)
    losses, model = _trainer_losses_and_model(True)
    assert len(losses) == 3 and losses == want_losses
    assert all(torch.equal(a, b) for a, b in zip(eager.parameters(), model.parameters()))


def test_accelerate_bf16_with_a_compiled_model_matches_eager():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    def steps(compile_model):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True, gradient_accumulation_steps=2)
        model = tiny_gpt2().train()
        forward = aotcache.compile(model, compiler="nop") if compile_model else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        forward, optimizer = accelerator.prepare(forward, optimizer)
        losses = []
        for step in range(4):
            ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(step))
            with accelerator.accumulate(forward):
                loss = forward(input_ids=ids, labels=ids).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.detach())
        return losses, model

    want_losses, eager = steps(False)
    losses, model = steps(True)
    assert all(torch.equal(a, b) for a, b in zip(losses, want_losses))
    assert all(torch.equal(a, b) for a, b in zip(eager.parameters(), model.parameters()))


def test_static_cache_generate_through_the_backend_gives_eager_tokens():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    eager = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights: tokens that change step to step
        for p in eager.parameters():
            p.normal_(0, 1.0 if p.dim() > 1 else 0.1)
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(eager.state_dict())
    model.forward = torch.compile(model.forward, backend="aotcache", options={"compiler": "nop"})
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "do_sample": False,
              "cache_implementation": "static"}
    want = eager.generate(**kwargs)
    assert torch.equal(model.generate(**kwargs), want)
    assert len(set(want[:, 6:].flatten().tolist())) > 1
