"""Real-world uses not covered by the other sweeps, each checked against eager: diffusers transformers (DiT, SD3,
Flux) and UNet timestep kinds through both routes, the transformers ``Trainer`` (``torch_compile_backend`` and a
compiled model passed in), ``accelerate`` bf16, generation variants through ``torch.compile(backend="aotcache")``,
eval/train alternation, bf16 autocast training.

Every case runs in a fresh subprocess with its own cache dir (nop compiler unless the case name says Inductor)
and compares with an eager twin built from the same seed: outputs, losses, parameters, token ids. Status:
``equal``, ``mismatch``, ``error`` (raised where eager does not), ``fallback`` (equal, but some call ran a
fallback: ``aotcache.aot.fallback.fallback_counts()``) or ``as-ref`` (differs from eager exactly as
``torch.compile(backend="eager")`` does: the model's own compile-aware code path, not aotcache).

    PYTHONPATH=$PWD python bench/real_use_sweep.py [--only SUBSTRING ...] [--no-inductor]

writes bench/results/real_use_sweep.json (bench/README.md, "real_use_sweep").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.peft_diffusers_sweep import tiny_unet, tiny_vae  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "real_use_sweep.json"


# -- helpers ------------------------------------------------------------------------------------------------------

def max_diff(a, b) -> float:
    """Largest absolute difference over (nested) tensors; inf on a shape or None mismatch."""
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return float("inf")
        return max((max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    if a.shape != b.shape:
        return float("inf")
    if torch_equal(a, b):  # also where both hold the same infinities (masked scores)
        return 0.0
    return (a.double() - b.double()).abs().nan_to_num(nan=float("inf")).max().item()


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def param_diff(eager, model) -> float:
    return max_diff([p.detach() for p in eager.parameters()], [p.detach() for p in model.parameters()])


def wrap(model, route: str, compiler: str = "nop"):
    """``route``: "compile" (aotcache.compile) or "backend" (torch.compile(backend="aotcache"))."""
    import torch

    import aotcache

    if route == "compile":
        return aotcache.compile(model, compiler=compiler)
    return torch.compile(model, backend="aotcache", options={"compiler": compiler})


def route_of(compiled, route: str) -> str:
    return getattr(compiled, "route", None) or route


# -- models (tiny configs, random weights, no download) ---------------------------------------------------------------

def tiny_dit():
    import diffusers
    import torch

    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                           sample_size=8, patch_size=2, num_embeds_ada_norm=100, norm_num_groups=4)


def tiny_sd3():
    import diffusers
    import torch

    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                           pos_embed_max_size=16)


def tiny_flux():
    import diffusers
    import torch

    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4))


def tiny_gpt2(dropout: float = 0.0):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config)


def tiny_bert(dropout: float = 0.1):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config._attn_implementation = "eager"
    return transformers.BertForSequenceClassification(config)


def tiny_llama():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights: tokens that differ step to step, a sharper check
        for p in model.parameters():
            p.normal_(0, 1.0 if p.dim() > 1 else 0.1)
    return model


def tiny_t5():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(config)


def tiny_bart():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                                     forced_eos_token_id=None)
    return transformers.BartForConditionalGeneration(config)


# -- diffusers cases ------------------------------------------------------------------------------------------------

def case_unet_timesteps(route: str):
    """UNet eval with the timestep as a Python int, a Python float, a 0-d tensor and a per-sample tensor."""
    def run():
        import torch

        g = torch.Generator().manual_seed(0)
        sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g)
        eager, model = tiny_unet().eval(), tiny_unet().eval()
        compiled = wrap(model, route)
        diffs = {}
        with torch.no_grad():
            for kind, t in (("int", 10), ("int2", 20), ("float", 10.5), ("float2", 3.25), ("tensor0d", torch.tensor(7)),
                            ("tensor_batch", torch.tensor([3, 50])), ("tensor_float", torch.tensor(12.5))):
                diffs[kind] = max_diff(compiled(sample, t, encoder_hidden_states=context).sample,
                                       eager(sample, t, encoder_hidden_states=context).sample)
        return {"route": route_of(compiled, route), "diffs": diffs, "equal": not any(diffs.values())}

    return run


def _noise_steps(forward, model, make_inputs, steps: int = 3, autocast: bool = False):
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        inputs, noise = make_inputs(step)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            prediction = forward(**inputs).sample
            loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def case_diffusers_train(build, make_inputs, route: str, compiler: str = "nop"):
    """Three AdamW steps of a noise-prediction MSE loss; losses and parameters against eager."""
    def run():
        eager, model = build().train(), build().train()
        expected = _noise_steps(eager, eager, make_inputs)
        compiled = wrap(model, route, compiler)
        losses = _noise_steps(compiled, model, make_inputs)
        result = {"route": route_of(compiled, route), "loss_diff": max_diff(losses, expected),
                  "param_diff": param_diff(eager, model)}
        tolerance = 0.0 if compiler == "nop" else 1e-4
        result["equal"] = result["loss_diff"] <= tolerance and result["param_diff"] <= tolerance
        if compiler != "nop":  # a real compiler rounds differently: torch.compile's own distance from eager, beside
            import torch

            reference = build().train()
            ref_losses = _noise_steps(torch.compile(reference), reference, make_inputs)
            result["torch_compile_loss_diff"] = max_diff(ref_losses, expected)
            result["torch_compile_param_diff"] = param_diff(eager, reference)
            result["equal"] = result["equal"] or (
                result["loss_diff"] <= 10 * result["torch_compile_loss_diff"] + 1e-6
                and result["param_diff"] <= 10 * result["torch_compile_param_diff"] + 1e-6)
        return result

    return run


def _unet_train_inputs(step):
    import diffusers
    import torch

    g = torch.Generator().manual_seed(step)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.randint(0, 100, (2,), generator=g)
    noisy = diffusers.DDPMScheduler(num_train_timesteps=100).add_noise(latents, noise, timesteps)
    return {"sample": noisy, "timestep": timesteps, "encoder_hidden_states": torch.randn(2, 3, 16, generator=g)}, noise


def _dit_inputs(step):
    import torch

    g = torch.Generator().manual_seed(step)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.randint(0, 100, (2,), generator=g),
            "class_labels": torch.randint(0, 10, (2,), generator=g)}, noise


def _sd3_inputs(step):
    import torch

    g = torch.Generator().manual_seed(step)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
            "pooled_projections": torch.randn(2, 8, generator=g),
            "timestep": torch.rand(2, generator=g) * 1000}, noise


def _flux_inputs(step):
    import torch

    g = torch.Generator().manual_seed(step)
    tokens, text = 16, 5  # a 4x4 latent of 4 channels, packed (patch 1)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(tokens, 3)
    noise = torch.randn(2, tokens, 4, generator=g)
    return {"hidden_states": torch.randn(2, tokens, 4, generator=g),
            "encoder_hidden_states": torch.randn(2, text, 16, generator=g),
            "pooled_projections": torch.randn(2, 8, generator=g), "timestep": torch.rand(2, generator=g),
            "img_ids": img_ids, "txt_ids": torch.zeros(text, 3)}, noise


def case_diffusers_eval(build, make_inputs, route: str):
    """Eval forwards of two input draws (the second must reuse or retrace correctly)."""
    def run():
        import torch

        eager, model = build().eval(), build().eval()
        compiled = wrap(model, route)
        diffs = []
        with torch.no_grad():
            for step in range(2):
                inputs, _ = make_inputs(step)
                diffs.append(max_diff(compiled(**inputs).sample, eager(**inputs).sample))
        return {"route": route_of(compiled, route), "diffs": diffs, "equal": not any(diffs)}

    return run


def case_vae_encode_decode(route: str):
    """``encode(x).latent_dist.sample(generator)`` then ``decode(z)`` through the compiled wrapper's methods."""
    def run():
        import torch

        image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        eager, model = tiny_vae().eval(), tiny_vae().eval()
        compiled = wrap(model, route)

        def go(target):
            with torch.no_grad():
                dist = target.encode(image).latent_dist
                z = dist.sample(generator=torch.Generator().manual_seed(1)) * 0.18215
                return [dist.mean, z, target.decode(z / 0.18215).sample, target(image).sample]

        expected = go(eager)
        # diffusers' documented way, vae.decode = torch.compile(vae.decode): the bound methods compiled as
        # functions (the wrapper's own encode / decode would run the module's methods eagerly)
        model.encode, model.decode = wrap(model.encode, route), wrap(model.decode, route)
        got = go(model)
        with torch.no_grad():
            got[-1] = compiled(image).sample
        diff = max_diff(got, expected)
        return {"route": route_of(compiled, route), "diff": diff, "equal": diff == 0.0}

    return run


# -- transformers Trainer -------------------------------------------------------------------------------------------

def _trainer_run(build, how: str, steps: int = 3, accumulate: int = 2, backend: str | None = None,
                 compiler: str = "nop", **extra):
    """A ``Trainer`` run: ``how`` is "eager", "backend" (torch_compile=True), "compiled" (aotcache.compile'd
    model passed in) or "backend_model" (torch.compile(model, backend="aotcache") passed in). Returns (losses
    logged, model, trainer)."""
    import torch
    import transformers

    import aotcache

    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(0)
    kind = type(model).__name__
    data = []
    for _ in range(16):
        ids = torch.randint(3, 64, (8,), generator=g)
        labels = torch.randint(0, 3, ()) if "Classification" in kind else ids.clone()
        data.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels})
    folder = tempfile.mkdtemp()
    kwargs = {"output_dir": folder, "max_steps": steps, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": accumulate, "learning_rate": 1e-3, "logging_steps": 1, "seed": 0,
              "report_to": [], "save_strategy": "no", "use_cpu": True, "dataloader_num_workers": 0,
              "disable_tqdm": True, **extra}
    if how in ("backend_model", "reference"):
        # OptimizedModule.forward is (*args, **kwargs): the Trainer would drop every column
        kwargs["remove_unused_columns"] = False
    if how == "backend":
        kwargs.update(torch_compile=True, torch_compile_backend=backend)
    args = transformers.TrainingArguments(**kwargs)
    passed = model
    if how == "compiled":
        passed = aotcache.compile(model, compiler="nop")
    elif how == "backend_model":  # an OptimizedModule passed in (the way around accelerate's backend enum)
        passed = torch.compile(model, backend="aotcache", options={"compiler": compiler})
    elif how == "reference":  # Dynamo alone, no aotcache: what the model's compile-aware code paths give
        passed = torch.compile(model, backend="eager")
    trainer = transformers.Trainer(model=passed, args=args, train_dataset=data,
                                   eval_dataset=data[:4] if extra.get("eval_strategy") else None)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, model, trainer


def case_trainer(build, how: str, backend: str | None = None, compiler: str = "nop", reference: bool = False,
                 **extra):
    """A Trainer run against the eager Trainer's; with ``reference``, also against
    ``torch.compile(model, backend="eager")`` passed in (a difference both show is the model's compile path)."""
    def run():
        expected, eager, eager_trainer = _trainer_run(build, "eager", **extra)
        losses, model, trainer = _trainer_run(build, how, backend=backend, compiler=compiler, **extra)
        if extra.get("eval_strategy"):  # the eval losses logged between steps too
            expected = expected + [e["eval_loss"] for e in eager_trainer.state.log_history if "eval_loss" in e]
            losses = losses + [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
        tolerance = 0.0 if compiler == "nop" else 1e-4
        result = {"route": how if how != "backend" else f"Trainer torch_compile ({backend})",
                  "losses": losses, "eager_losses": expected,
                  "loss_diff": max(abs(a - b) for a, b in zip(losses, expected)) if len(losses) == len(expected)
                  else float("inf"), "param_diff": param_diff(eager, model)}
        result["equal"] = result["loss_diff"] <= tolerance and result["param_diff"] <= tolerance
        if reference and not result["equal"]:
            ref_losses, ref_model, _ = _trainer_run(build, "reference", **extra)
            result["reference_loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses))
            result["reference_param_diff"] = param_diff(ref_model, model)
            result["as_reference"] = result["reference_loss_diff"] == result["reference_param_diff"] == 0.0
        return result

    return run


def case_trainer_eval_predict():
    """``trainer.evaluate()`` and ``trainer.predict()`` after training with a compiled model passed in."""
    def run():
        import torch

        _, eager, eager_trainer = _trainer_run(tiny_bert, "eager")
        _, model, trainer = _trainer_run(tiny_bert, "compiled")
        data = eager_trainer.train_dataset[:6]
        m_eager, m_ours = eager_trainer.evaluate(data), trainer.evaluate(data)
        p_eager, p_ours = eager_trainer.predict(data), trainer.predict(data)
        diff = max_diff(torch.as_tensor(p_ours.predictions), torch.as_tensor(p_eager.predictions))
        loss_diff = abs(m_eager["eval_loss"] - m_ours["eval_loss"])
        return {"route": "compiled", "pred_diff": diff, "eval_loss_diff": loss_diff,
                "equal": diff == 0.0 and loss_diff == 0.0}

    return run


def case_trainer_save_reload():
    """``trainer.save_model()`` of a compiled model: the files and tensors equal the eager run's, and
    ``from_pretrained`` of them loads without missing or unexpected keys."""
    def run():
        import torch
        import transformers
        from safetensors.torch import load_file

        _, _, eager_trainer = _trainer_run(tiny_gpt2, "eager")
        _, _, trainer = _trainer_run(tiny_gpt2, "compiled")
        saved = []
        for t in (eager_trainer, trainer):
            folder = tempfile.mkdtemp()
            t.save_model(folder)
            saved.append((sorted(os.listdir(folder)), load_file(os.path.join(folder, "model.safetensors")), folder))
        same = saved[0][0] == saved[1][0] and saved[0][1].keys() == saved[1][1].keys() and all(
            torch.equal(saved[0][1][k], saved[1][1][k]) for k in saved[0][1])
        _, info = transformers.GPT2LMHeadModel.from_pretrained(saved[1][2], output_loading_info=True)
        clean = not info["missing_keys"] and not info["unexpected_keys"]
        return {"route": "compiled", "files": saved[1][0], "same_files_and_tensors": same, "load_info": info,
                "equal": same and clean}

    return run


# -- accelerate ----------------------------------------------------------------------------------------------------

def case_accelerate_bf16(route: str):
    """``Accelerator(mixed_precision="bf16", cpu=True)``: prepare the compiled model, 3 steps with
    ``accelerator.backward``, accumulation 2; losses and parameters against the eager twin."""
    def run():
        import accelerate
        import torch

        def steps(wrap_model: bool):
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True, gradient_accumulation_steps=2)
            model = tiny_gpt2().train()
            forward = wrap(model, route) if wrap_model else model
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
                losses.append(loss.detach().float())
            return losses, model, forward

        expected, eager, _ = steps(False)
        losses, model, forward = steps(True)
        result = {"route": route_of(forward, route), "loss_diff": max_diff(losses, expected),
                  "param_diff": param_diff(eager, model), "loss_dtype_ok": True}
        result["equal"] = result["loss_diff"] == 0.0 and result["param_diff"] == 0.0
        return result

    return run


# -- generation ---------------------------------------------------------------------------------------------------

def case_generate(build, route: str, encoder_decoder: bool = False, **gen):
    def run():
        import torch

        eager, model = build().eval(), build().eval()
        compiled = wrap(model, route)
        ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 6, **gen}
        torch.manual_seed(11)
        expected = eager.generate(**kwargs)
        # torch.compile returns an OptimizedModule whose forward is compiled; generate is the module's, calling
        # self(...), i.e. eager. The documented way is model.forward = torch.compile(model.forward).
        target = compiled
        if route == "backend":
            model.forward = compiled
            target = model
        torch.manual_seed(11)
        tokens = target.generate(**kwargs)
        equal = tokens.shape == expected.shape and torch.equal(tokens, expected)
        return {"route": route_of(compiled, route), "tokens": tokens.tolist()[0], "equal": equal,
                "distinct_tokens": len(set(expected.flatten().tolist()))}

    return run


def case_generate_assisted(route: str):
    """Assisted decoding: a compiled main model with a compiled smaller assistant (greedy)."""
    def run():
        import torch
        import transformers

        def assistant():
            torch.manual_seed(5)
            config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
            return transformers.LlamaForCausalLM(config).eval()

        eager, model = tiny_llama().eval(), tiny_llama().eval()
        ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(0))
        kwargs = {"input_ids": ids, "max_new_tokens": 8, "do_sample": False}
        expected = eager.generate(**kwargs, assistant_model=assistant())
        compiled, helper = wrap(model, route), wrap(assistant(), route)
        tokens = compiled.generate(**kwargs, assistant_model=helper)
        equal = tokens.shape == expected.shape and torch.equal(tokens, expected)
        return {"route": route_of(compiled, route), "equal": equal}

    return run


def case_generate_scores(route: str):
    """Sampling with ``num_return_sequences=2``, ``output_scores`` and ``return_dict_in_generate``."""
    def run():
        import torch

        eager, model = tiny_llama().eval(), tiny_llama().eval()
        compiled = wrap(model, route)
        ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
        kwargs = {"input_ids": ids, "max_new_tokens": 6, "do_sample": True, "num_return_sequences": 2,
                  "output_scores": True, "output_logits": True, "return_dict_in_generate": True}
        torch.manual_seed(4)
        expected = eager.generate(**kwargs)
        torch.manual_seed(4)
        got = compiled.generate(**kwargs)
        diff = max(max_diff(list(got.scores), list(expected.scores)), max_diff(list(got.logits), list(expected.logits)))
        equal = torch.equal(got.sequences, expected.sequences) and diff == 0.0
        return {"route": route_of(compiled, route), "score_diff": diff, "equal": equal}

    return run


# -- diffusers: changes after compile (must never run a stale graph) ------------------------------------------------

def case_unet_changes_after_compile(route: str):
    """After the first call: ``set_attn_processor(AttnProcessor())``, ``fuse_qkv_projections()``, then a LoRA
    adapter added with ``add_adapter``, ``set_adapters(weights=0.5)``, ``disable_adapters()``; each output
    against the eager twin that made the same change."""
    def run():
        import torch
        from diffusers.models.attention_processor import AttnProcessor
        from peft import LoraConfig

        g = torch.Generator().manual_seed(0)
        sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g)
        eager, model = tiny_unet().eval(), tiny_unet().eval()
        compiled = wrap(model, route)

        def change(target, step):
            if step == "attn processor":
                target.set_attn_processor(AttnProcessor())
            elif step == "fuse qkv":
                target.fuse_qkv_projections()
            elif step == "unfuse qkv":
                target.unfuse_qkv_projections()
            elif step == "lora added":
                torch.manual_seed(9)
                target.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False), "a")
            elif step == "lora weight 0.5":
                target.set_adapters(["a"], weights=[0.5])
            elif step == "lora weight 2.0":
                target.set_adapters(["a"], weights=[2.0])
            elif step == "lora disabled":
                target.disable_adapters()
            elif step == "lora enabled":
                target.enable_adapters()

        diffs, outputs = {}, []
        for step in ("first", "attn processor", "fuse qkv", "unfuse qkv", "lora added", "lora weight 0.5",
                     "lora weight 2.0", "lora disabled", "lora enabled"):
            change(eager, step)
            change(model, step)
            with torch.no_grad():
                want = eager(sample, 10, encoder_hidden_states=context).sample
                diffs[step] = max_diff(compiled(sample, 10, encoder_hidden_states=context).sample, want)
            outputs.append(want)
        distinct = not torch.equal(outputs[5], outputs[6])  # the weights change the output
        return {"route": route_of(compiled, route), "diffs": diffs, "weights_change_output": distinct,
                "equal": distinct and not any(diffs.values())}

    return run


def case_unet_lora_scale_kwarg(route: str):
    """A LoRA adapter on the UNet, scaled per call through ``cross_attention_kwargs={"scale": s}``."""
    def run():
        import torch
        from peft import LoraConfig

        g = torch.Generator().manual_seed(0)
        sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g)
        eager, model = tiny_unet().eval(), tiny_unet().eval()
        for target in (eager, model):
            torch.manual_seed(9)
            target.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False), "a")
        compiled = wrap(model, route)
        diffs, outs = {}, {}
        with torch.no_grad():
            for scale in (1.0, 0.5, 0.0, 0.5, 2.0):
                kwargs = {"encoder_hidden_states": context, "cross_attention_kwargs": {"scale": scale}}
                want, got = eager(sample, 10, **kwargs).sample, compiled(sample, 10, **kwargs).sample
                diffs[str(scale)] = max(diffs.get(str(scale), 0.0), max_diff(got, want))
                outs[scale] = want
        distinct = not torch.equal(outs[0.5], outs[2.0])
        return {"route": route_of(compiled, route), "diffs": diffs, "scale_changes_output": distinct,
                "equal": distinct and not any(diffs.values())}

    return run


def tiny_unet_sdxl():
    import diffusers
    import torch

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
        transformer_layers_per_block=(1, 1), use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _sdxl_inputs(step):
    import torch

    g = torch.Generator().manual_seed(step)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.randint(0, 100, (2,), generator=g),
            "encoder_hidden_states": torch.randn(2, 3, 16, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 8, generator=g),
                                  "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2)}}, noise


def case_vae_slicing_tiling(route: str):
    """``enable_slicing()`` then ``enable_tiling()`` (small tiles) after the first compiled encode/decode: each
    output against the eager twin in the same state (tiled output differs from untiled: a stale graph shows)."""
    def run():
        import torch

        image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        eager, model = tiny_vae().eval(), tiny_vae().eval()
        compiled = model  # the bound methods compiled as functions (vae.decode = torch.compile(vae.decode))
        model.encode, model.decode = wrap(model.encode, route), wrap(model.decode, route)

        def go(target):
            with torch.no_grad():
                z = target.encode(image).latent_dist.mode()
                return [z, target.decode(z).sample]

        diffs, outs = {}, {}
        for state in ("plain", "slicing", "tiling", "tiling off"):
            for target in (eager, model):
                if state == "slicing":
                    target.enable_slicing()
                elif state == "tiling":
                    target.enable_tiling()  # tiles of the config's sample_size (16): a 32x32 image is tiled
                elif state == "tiling off":
                    target.disable_tiling()
            outs[state] = go(eager)
            diffs[state] = max_diff(go(compiled), outs[state])
        tiled_differs = max_diff(outs["tiling"], outs["plain"]) > 0
        return {"route": route_of(model.encode, route), "diffs": diffs, "tiling_changes_output": tiled_differs,
                "equal": tiled_differs and not any(diffs.values())}

    return run


def case_unet_gradient_checkpointing(route: str):
    def run():
        def build():
            model = tiny_unet()
            model.enable_gradient_checkpointing()
            return model

        return case_diffusers_train(build, _unet_train_inputs, route)()

    return run


def case_ddpm_pipeline(route: str):
    """``DDPMPipeline(unet=compiled, scheduler)``: 3 denoising steps, the images against eager's."""
    def run():
        import diffusers
        import numpy as np
        import torch

        def unet():
            torch.manual_seed(0)
            return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                         layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
                                         down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                         up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()

        def images(model):
            pipe = diffusers.DDPMPipeline(unet=model, scheduler=diffusers.DDPMScheduler(num_train_timesteps=50))
            pipe.set_progress_bar_config(disable=True)
            return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                        output_type="np").images

        expected = images(unet())
        model = unet()
        compiled = wrap(model, route)
        got = images(compiled)
        diff = float(np.abs(got - expected).max())
        return {"route": route_of(compiled, route), "diff": diff, "equal": diff == 0.0}

    return run


# -- loops --------------------------------------------------------------------------------------------------------

def case_eval_train_alternation(route: str, dropout: float = 0.1):
    """Each step: eval forward under no_grad, then train mode and an SGD step (dropout on)."""
    def run():
        import torch

        def loop(model, forward):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            evals, losses = [], []
            for step in range(3):
                ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(step))
                model.eval()
                with torch.no_grad():
                    evals.append(forward(input_ids=ids).logits)
                model.train()
                torch.manual_seed(50 + step)
                loss = forward(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.detach())
            return evals, losses

        eager, model = tiny_gpt2(dropout), tiny_gpt2(dropout)
        expected = loop(eager, eager)
        compiled = wrap(model, route)
        got = loop(model, compiled)
        result = {"route": route_of(compiled, route), "eval_diff": max_diff(got[0], expected[0]),
                  "loss_diff": max_diff(got[1], expected[1]), "param_diff": param_diff(eager, model)}
        result["equal"] = result["eval_diff"] == result["loss_diff"] == result["param_diff"] == 0.0
        return result

    return run


def case_autocast_train(build, route: str, compiler: str = "nop"):
    """Three AdamW steps with the forward and loss under ``torch.autocast("cpu", dtype=torch.bfloat16)``."""
    def run():
        import torch

        def loop(model, forward):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            losses = []
            for step in range(3):
                ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(step))
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = forward(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.detach().float())
            return losses

        eager, model = build().train(), build().train()
        expected = loop(eager, eager)
        compiled = wrap(model, route, compiler)
        losses = loop(model, compiled)
        result = {"route": route_of(compiled, route), "loss_diff": max_diff(losses, expected),
                  "param_diff": param_diff(eager, model)}
        tolerance = 0.0 if compiler == "nop" else 1e-2  # Inductor may fuse bf16 casts away
        result["equal"] = result["loss_diff"] <= tolerance and result["param_diff"] <= tolerance
        return result

    return run


def case_unet_autocast_train(route: str):
    def run():
        eager, model = tiny_unet().train(), tiny_unet().train()
        expected = _noise_steps(eager, eager, _unet_train_inputs, autocast=True)
        compiled = wrap(model, route)
        losses = _noise_steps(compiled, model, _unet_train_inputs, autocast=True)
        result = {"route": route_of(compiled, route), "loss_diff": max_diff(losses, expected),
                  "param_diff": param_diff(eager, model)}
        result["equal"] = result["loss_diff"] == result["param_diff"] == 0.0
        return result

    return run


CASES = {}
for _route in ("compile", "backend"):
    CASES[f"diffusers UNet eval, timestep int/float/tensor [{_route}]"] = case_unet_timesteps(_route)
    CASES[f"diffusers UNet 3 AdamW steps, noise MSE [{_route}]"] = case_diffusers_train(
        tiny_unet, _unet_train_inputs, _route) if _route == "backend" else None
    CASES[f"diffusers UNet bf16 autocast 3 steps [{_route}]"] = case_unet_autocast_train(_route)
    CASES[f"diffusers DiTTransformer2DModel eval [{_route}]"] = case_diffusers_eval(tiny_dit, _dit_inputs, _route)
    CASES[f"diffusers DiTTransformer2DModel 3 steps [{_route}]"] = case_diffusers_train(tiny_dit, _dit_inputs, _route)
    CASES[f"diffusers SD3Transformer2DModel eval [{_route}]"] = case_diffusers_eval(tiny_sd3, _sd3_inputs, _route)
    CASES[f"diffusers SD3Transformer2DModel 3 steps [{_route}]"] = case_diffusers_train(tiny_sd3, _sd3_inputs, _route)
    CASES[f"diffusers FluxTransformer2DModel eval [{_route}]"] = case_diffusers_eval(tiny_flux, _flux_inputs, _route)
    CASES[f"diffusers FluxTransformer2DModel 3 steps [{_route}]"] = case_diffusers_train(tiny_flux, _flux_inputs,
                                                                                         _route)
    CASES[f"diffusers AutoencoderKL encode/sample/decode [{_route}]"] = case_vae_encode_decode(_route)
CASES = {name: case for name, case in CASES.items() if case is not None}
CASES.update({
    "Trainer GPT-2, torch_compile_backend=aotcache (accelerate's enum)": case_trainer(tiny_gpt2, "backend",
                                                                                      backend="aotcache"),
    "Trainer GPT-2, torch.compile(model, backend=aotcache) passed in, grad accum 2": case_trainer(
        tiny_gpt2, "backend_model"),
    "Trainer GPT-2, aotcache.compile(model) passed in, grad accum 2": case_trainer(tiny_gpt2, "compiled"),
    "Trainer BERT cls (dropout 0.1), aotcache.compile(model) passed in, grad accum 2": case_trainer(tiny_bert,
                                                                                                   "compiled"),
    "Trainer BERT cls, compiled model: evaluate() and predict()": case_trainer_eval_predict(),
    "accelerate bf16 (cpu), GPT-2, accumulate 2 [compile]": case_accelerate_bf16("compile"),
    "accelerate bf16 (cpu), GPT-2, accumulate 2 [backend]": case_accelerate_bf16("backend"),
    "generate Llama static cache [compile]": case_generate(tiny_llama, "compile", cache_implementation="static"),
    "generate Llama static cache [backend]": case_generate(tiny_llama, "backend", cache_implementation="static"),
    "generate Llama num_beams=2 [backend]": case_generate(tiny_llama, "backend", num_beams=2, do_sample=False),
    "generate Llama do_sample seed [backend]": case_generate(tiny_llama, "backend", do_sample=True, top_k=0),
    "generate GPT-2 greedy [backend]": case_generate(tiny_gpt2, "backend", do_sample=False),
    "generate T5 greedy [compile]": case_generate(tiny_t5, "compile", do_sample=False),
    "generate T5 greedy [backend]": case_generate(tiny_t5, "backend", do_sample=False),
    "generate BART num_beams=2 [compile]": case_generate(tiny_bart, "compile", num_beams=2, do_sample=False),
    "generate BART num_beams=2 [backend]": case_generate(tiny_bart, "backend", num_beams=2, do_sample=False),
    "eval/train alternation GPT-2 dropout 0.1 [compile]": case_eval_train_alternation("compile"),
    "eval/train alternation GPT-2 dropout 0.1 [backend]": case_eval_train_alternation("backend"),
    "bf16 autocast 3 AdamW steps GPT-2 [compile]": case_autocast_train(tiny_gpt2, "compile"),
    "bf16 autocast 3 AdamW steps Llama [backend]": case_autocast_train(tiny_llama, "backend"),
    "Trainer GPT-2, compiled model, gradient_checkpointing=True": case_trainer(
        tiny_gpt2, "compiled", gradient_checkpointing=True),
    "Trainer BERT cls, compiled model, bf16=True": case_trainer(tiny_bert, "compiled", bf16=True,
                                                                             reference=True),
    "Trainer GPT-2, compiled model, eval_strategy=steps (eval every step)": case_trainer(
        tiny_gpt2, "compiled", eval_strategy="steps", eval_steps=1),
    "Trainer GPT-2, compiled model, label_smoothing 0.1, max_grad_norm 0.5": case_trainer(
        tiny_gpt2, "compiled", label_smoothing_factor=0.1, max_grad_norm=0.5),
    "Trainer GPT-2, compiled model: save_model, from_pretrained": case_trainer_save_reload(),
    "generate Llama assisted (assistant_model) [compile]": case_generate_assisted("compile"),
    "generate Llama sampling, 2 return sequences, scores [compile]": case_generate_scores("compile"),
    "generate Llama sampling, 2 return sequences, scores [backend]": case_generate_scores("backend"),
    "diffusers UNet: attn processor, fuse qkv, LoRA adapters after compile [compile]":
        case_unet_changes_after_compile("compile"),
    "diffusers UNet: attn processor, fuse qkv, LoRA adapters after compile [backend]":
        case_unet_changes_after_compile("backend"),
    "diffusers UNet + LoRA, cross_attention_kwargs scale per call [compile]": case_unet_lora_scale_kwarg("compile"),
    "diffusers UNet + LoRA, cross_attention_kwargs scale per call [backend]": case_unet_lora_scale_kwarg("backend"),
    "diffusers SDXL-style UNet (added_cond_kwargs) eval [compile]": case_diffusers_eval(tiny_unet_sdxl, _sdxl_inputs,
                                                                                        "compile"),
    "diffusers SDXL-style UNet (added_cond_kwargs) 3 steps [compile]": case_diffusers_train(
        tiny_unet_sdxl, _sdxl_inputs, "compile"),
    "diffusers SDXL-style UNet (added_cond_kwargs) 3 steps [backend]": case_diffusers_train(
        tiny_unet_sdxl, _sdxl_inputs, "backend"),
    "diffusers AutoencoderKL slicing then tiling after compile [compile]": case_vae_slicing_tiling("compile"),
    "diffusers AutoencoderKL slicing then tiling after compile [backend]": case_vae_slicing_tiling("backend"),
    "diffusers UNet gradient checkpointing, 3 steps [compile]": case_unet_gradient_checkpointing("compile"),
    "diffusers DDPMPipeline(unet=compiled UNet2DModel) [compile]": case_ddpm_pipeline("compile"),
    "diffusers DDPMPipeline(unet=compiled UNet2DModel) [backend]": case_ddpm_pipeline("backend"),
    # Inductor (slow here: two cases only)
    "Inductor: Trainer GPT-2, torch.compile(model, backend=aotcache) passed in": case_trainer(
        tiny_gpt2, "backend_model", compiler="inductor"),
    "Inductor: diffusers DiTTransformer2DModel 3 steps [compile]": case_diffusers_train(tiny_dit, _dit_inputs,
                                                                                          "compile", "inductor"),
})


def run_case(name: str) -> dict:
    """One case in this process; its verdict, time and this process's fallback decisions."""
    import traceback

    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        result = CASES[name]()
    except Exception as exc:  # noqa: BLE001 - a crash is a result of the sweep
        text = str(exc).strip().splitlines()
        result = {"error": f"{type(exc).__name__}: {text[0][:300] if text else ''}",
                  "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    from aotcache.aot.fallback import fallback_counts

    result["fallbacks"] = fallback_counts()
    if "error" in result:
        result["status"] = "error"
    elif not result.get("equal"):
        # as_reference: torch.compile(backend="eager") differs from eager exactly as aotcache does
        result["status"] = "as-ref" if result.get("as_reference") else "mismatch"
    elif result["fallbacks"]:
        result["status"] = "fallback"
    else:
        result["status"] = "equal"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="run one case in this process and print its JSON (internal)")
    parser.add_argument("--only", nargs="*", help="substrings of the case names to run")
    parser.add_argument("--no-inductor", action="store_true", help="skip the Inductor cases")
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case), default=str))
        return
    results = {}
    for name in CASES:
        if args.only and not any(part in name for part in args.only):
            continue
        if args.no_inductor and name.startswith("Inductor"):
            continue
        with tempfile.TemporaryDirectory() as cache_dir:
            env = {**os.environ, "AOTCACHE_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": "1",
                   "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_dir, "inductor"), "TOKENIZERS_PARALLELISM": "false"}
            start = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, __file__, "--case", name], env=env, capture_output=True,
                                      text=True, timeout=600)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                entry = json.loads(lines[-1][7:]) if lines else {
                    "status": "error", "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}"}
            except subprocess.TimeoutExpired:
                entry = {"status": "error", "error": "timeout (600 s)"}
            entry["process_seconds"] = round(time.perf_counter() - start, 1)
        results[name] = entry
        detail = entry.get("error", "")
        print(f"{name:<88} {str(entry.get('route', '')):<40} {entry['status']:<9} {entry['process_seconds']:>6.1f}s "
              f"{detail}", flush=True)
    if args.only and RESULTS.exists():  # a partial run updates its cases only
        results = {**json.loads(RESULTS.read_text()), **results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    main()
