"""peft (LoRA) and diffusers models through ``aotcache.compile``, checked against eager (tiny configs, CPU, nop).

Each case runs twice in fresh processes sharing one cache dir: cold (compiles) and warm (must load without
tracing: ``fingerprint_hit``). A case compares the compiled model with an eager twin built from the same seed:
losses, gradients, parameters (LoRA and base), outputs, generated tokens, files written; and records the
route (``aot``: whole capture; ``dynamo``), the graphs compiled and the cache counters.

    PYTHONPATH=$PWD python bench/peft_diffusers_sweep.py [--only NAME ...]

writes bench/results/peft_diffusers_sweep.json (docs/models.md, "peft and diffusers").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "peft_diffusers_sweep.json"


# -- models -------------------------------------------------------------------------------------------------

def tiny_llama():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config)


def lora(base: str, dropout: float = 0.0):
    import torch
    from peft import LoraConfig, get_peft_model

    model = tiny_llama() if base == "llama" else tiny_gpt2()
    targets = ["q_proj", "v_proj"] if base == "llama" else ["c_attn"]
    torch.manual_seed(1)  # init_lora_weights=False: B is random too, so the adapters change the outputs
    return get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=dropout,
                                            fan_in_fan_out=base == "gpt2", init_lora_weights=False))


def tiny_unet():
    import diffusers
    import torch

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_vae():
    import diffusers
    import torch

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=16, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))


# -- comparisons -----------------------------------------------------------------------------------------------

def max_diff(a, b) -> float:
    import torch

    if isinstance(a, (list, tuple)):
        return max((max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def compare_parameters(eager, model) -> dict:
    """Largest parameter and gradient differences, and whether the frozen parameters stayed as built."""
    params = max_diff([p.detach() for p in eager.parameters()], [p.detach() for p in model.parameters()])
    grads = max_diff([p.grad for p in eager.parameters()], [p.grad for p in model.parameters()])
    return {"param_diff": params, "grad_diff": grads}


def compile_model(model):
    import aotcache

    return aotcache.compile(model, compiler="nop")


# -- cases (each returns a dict; "ok" is the verdict) -------------------------------------------------------------

def _lm_steps(model, forward, steps: int = 3) -> list:
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(step))
        torch.manual_seed(100 + step)  # LoRA dropout draws
        optimizer.zero_grad()
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def case_lora_train(base: str, dropout: float = 0.0):
    import torch

    def run():
        eager, model = lora(base, dropout).train(), lora(base, dropout).train()
        frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
        expected = _lm_steps(eager, eager)
        compiled = compile_model(model)
        losses = _lm_steps(model, compiled)
        unchanged = all(torch.equal(frozen[name], p) for name, p in model.named_parameters() if name in frozen)
        result = {"loss_diff": max_diff(losses, expected), **compare_parameters(eager, model),
                  "base_unchanged": unchanged, "route": compiled.route, "graphs": compiled.compiled.num_compiles}
        result["ok"] = unchanged and result["loss_diff"] == result["param_diff"] == result["grad_diff"] == 0.0
        return result

    return run


def case_lora_generate():
    import torch

    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    eager, model = lora("llama").eval(), lora("llama").eval()
    compiled = compile_model(model)
    kwargs = {"input_ids": ids, "max_new_tokens": 6, "do_sample": False}
    expected, tokens = eager.generate(**kwargs), compiled.generate(**kwargs)
    return {"tokens_equal": torch.equal(expected, tokens), "route": compiled.route,
            "graphs": compiled.compiled.num_compiles, "ok": torch.equal(expected, tokens)}


def case_lora_adapters():
    """Outputs after add_adapter / set_adapter / disable_adapter() / merge_and_unload follow eager's."""
    import torch
    from peft import LoraConfig

    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def run(model, forward):
        out = {}
        with torch.no_grad():
            out["default"] = forward(input_ids=ids).logits
            torch.manual_seed(7)
            model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
            out["after add_adapter"] = forward(input_ids=ids).logits
            model.set_adapter("second")
            out["set_adapter second"] = forward(input_ids=ids).logits
            with model.disable_adapter():
                out["disable_adapter"] = forward(input_ids=ids).logits
            out["second again"] = forward(input_ids=ids).logits
            model.set_adapter("default")
            out["set_adapter default"] = forward(input_ids=ids).logits
            model.merge_and_unload()
            out["merge_and_unload (wrapper)"] = forward(input_ids=ids).logits
        return out

    eager, model = lora("llama").eval(), lora("llama").eval()
    expected = run(eager, eager)
    compiled = compile_model(model)
    got = run(model, compiled)
    diffs = {key: max_diff(got[key], expected[key]) for key in expected}
    distinct = not torch.equal(expected["default"], expected["set_adapter second"])
    return {"diffs": diffs, "adapters_differ": distinct, "route": compiled.route,
            "graphs": compiled.compiled.num_compiles, "ok": distinct and not any(diffs.values())}


def case_lora_frozen_layer_switch():
    """Frozen adapters (inference), switched layer by layer (``BaseTunerLayer.set_adapter(..., inference_mode=True)``):
    nothing the signature sees changes, only each layer's ``_active_adapter`` list."""
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def build():
        model = lora("llama")
        torch.manual_seed(2)
        model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        return model.eval().requires_grad_(False)

    eager, model = build(), build()
    compiled = compile_model(model)
    diffs = {}
    with torch.no_grad():
        for name in ("default", "second", "default"):
            for layer in (*eager.modules(), *model.modules()):
                if isinstance(layer, BaseTunerLayer):
                    layer.set_adapter(name, inference_mode=True)
            diff = max_diff(compiled(input_ids=ids).logits, eager(input_ids=ids).logits)
            diffs[name] = max(diffs.get(name, 0.0), diff)
    return {"diffs": diffs, "route": compiled.route, "graphs": compiled.compiled.num_compiles,
            "ok": not any(diffs.values())}


def case_lora_print_and_save():
    import torch
    from safetensors.torch import load_file

    eager, model = lora("llama"), lora("llama")
    compiled = compile_model(model)
    texts = []
    for target in (eager, compiled):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            target.print_trainable_parameters()
        texts.append(buffer.getvalue())
    files, weights = [], []
    for target in (eager, compiled):
        folder = tempfile.mkdtemp()
        target.save_pretrained(folder)
        files.append(sorted(os.listdir(folder)))
        weights.append(load_file(os.path.join(folder, "adapter_model.safetensors")))
    same_weights = weights[0].keys() == weights[1].keys() and all(
        torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    return {"printed_equal": texts[0] == texts[1], "files": files[1], "files_equal": files[0] == files[1],
            "weights_equal": same_weights,
            "ok": texts[0] == texts[1] and files[0] == files[1] and same_weights and "adapter_config.json" in files[1]}


def _unet_inputs():
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 3, 16, generator=generator)


def case_unet_eval():
    import torch

    sample, context = _unet_inputs()
    eager, model = tiny_unet().eval(), tiny_unet().eval()
    compiled = compile_model(model)
    with torch.no_grad():
        diff = max_diff(compiled(sample, torch.tensor(10), encoder_hidden_states=context).sample,
                        eager(sample, torch.tensor(10), encoder_hidden_states=context).sample)
    return {"out_diff": diff, "route": compiled.route, "graphs": compiled.compiled.num_compiles, "ok": diff == 0.0}


def case_unet_train():
    import diffusers
    import torch
    import torch.nn.functional as F

    _, context = _unet_inputs()

    def steps(model, forward):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
        losses = []
        for step in range(3):
            generator = torch.Generator().manual_seed(step)
            latents, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
            timesteps = torch.randint(0, 100, (2,), generator=generator)
            optimizer.zero_grad()
            prediction = forward(scheduler.add_noise(latents, noise, timesteps), timesteps,
                                 encoder_hidden_states=context).sample
            loss = F.mse_loss(prediction, noise)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return losses

    eager, model = tiny_unet().train(), tiny_unet().train()
    expected = steps(eager, eager)
    compiled = compile_model(model)
    losses = steps(model, compiled)
    result = {"loss_diff": max_diff(losses, expected), **compare_parameters(eager, model), "route": compiled.route,
              "graphs": compiled.compiled.num_compiles}
    result["ok"] = result["loss_diff"] == result["param_diff"] == result["grad_diff"] == 0.0
    return result


def case_unet_loop(scheduler_name: str, kind: str, steps: int = 5):
    """A denoising loop: the compiled UNet at each timestep (a 0-d tensor or a Python int), the scheduler's step."""
    def run():
        import diffusers
        import torch

        _, context = _unet_inputs()

        def loop(forward):
            scheduler = getattr(diffusers, scheduler_name)(num_train_timesteps=100)
            scheduler.set_timesteps(steps)
            latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
            torch.manual_seed(3)  # DDPM's step adds noise
            with torch.no_grad():
                for t in scheduler.timesteps:
                    eps = forward(latents, int(t) if kind == "int" else t, encoder_hidden_states=context).sample
                    latents = scheduler.step(eps, t, latents).prev_sample
            return latents

        eager, model = tiny_unet().eval(), tiny_unet().eval()
        compiled = compile_model(model)
        diff = max_diff(loop(compiled), loop(eager))
        return {"out_diff": diff, "steps": steps, "route": compiled.route, "graphs": compiled.compiled.num_compiles,
                "ok": diff == 0.0}

    return run


def case_torch_compile_loop(kind: str, steps: int = 5):
    """The same int-timestep loop under torch.compile with a counting backend (graphs Dynamo hands over)."""
    def run():
        import diffusers
        import torch

        _, context = _unet_inputs()
        graphs = []

        def counting(gm, example_inputs):
            graphs.append(gm)
            return gm

        eager = tiny_unet().eval()
        compiled = torch.compile(eager, backend=counting)
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
        scheduler.set_timesteps(steps)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        diff = 0.0
        with torch.no_grad():
            for t in scheduler.timesteps:
                timestep = int(t) if kind == "int" else t
                out = compiled(latents, timestep, encoder_hidden_states=context).sample
                diff = max(diff, max_diff(out, eager(latents, timestep, encoder_hidden_states=context).sample))
        return {"out_diff": diff, "steps": steps, "route": "torch.compile", "graphs": len(graphs), "ok": diff == 0.0}

    return run


def case_vae():
    import torch

    image = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    eager, model = tiny_vae(), tiny_vae()
    compiled = compile_model(model)
    with torch.no_grad():
        diff = max_diff(compiled(image, sample_posterior=False).sample, eager(image, sample_posterior=False).sample)
    expected = eager(image, sample_posterior=False).sample.square().mean()
    expected.backward()
    loss = compiled(image, sample_posterior=False).sample.square().mean()
    loss.backward()
    result = {"out_diff": diff, "loss_diff": max_diff(loss, expected), **compare_parameters(eager, model),
              "route": compiled.route, "graphs": compiled.compiled.num_compiles}
    result["ok"] = result["out_diff"] == result["loss_diff"] == result["param_diff"] == 0.0 and \
        result["grad_diff"] < 1e-6
    return result


CASES = {
    "peft LoRA Llama: 3 AdamW steps": case_lora_train("llama"),
    "peft LoRA GPT-2 (Conv1D, fan_in_fan_out): 3 AdamW steps": case_lora_train("gpt2"),
    "peft LoRA Llama, lora_dropout=0.1, train mode": case_lora_train("llama", 0.1),
    "peft LoRA Llama: greedy generate": case_lora_generate,
    "peft LoRA Llama: add/set/disable adapter, merge_and_unload": case_lora_adapters,
    "peft LoRA Llama: frozen adapters switched layer by layer": case_lora_frozen_layer_switch,
    "peft: print_trainable_parameters, save_pretrained": case_lora_print_and_save,
    "diffusers UNet2DConditionModel: eval": case_unet_eval,
    "diffusers UNet2DConditionModel: 3 AdamW steps (MSE on noise)": case_unet_train,
    "diffusers DDPMScheduler loop, timestep 0-d tensor": case_unet_loop("DDPMScheduler", "tensor"),
    "diffusers DDPMScheduler loop, timestep int": case_unet_loop("DDPMScheduler", "int"),
    "diffusers DDIMScheduler loop, timestep int": case_unet_loop("DDIMScheduler", "int"),
    "diffusers AutoencoderKL (batch 1): eval and a backward": case_vae,
    "reference: torch.compile (counting backend), DDPMScheduler loop, timestep int": case_torch_compile_loop("int"),
    "reference: torch.compile (counting backend), DDPMScheduler loop, timestep 0-d tensor":
        case_torch_compile_loop("tensor"),
}


def run_case(name: str) -> dict:
    """One case in this process (its cache dir set by the caller); the result with the cache counters."""
    import torch

    torch.set_num_threads(1)
    from aotcache.autograd_cache.cache import resolve_cache

    try:
        result = CASES[name]()
    except Exception as exc:  # noqa: BLE001 - a crash is a result of the sweep
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    counters = resolve_cache(True).counters
    result["counters"] = {key: counters[key] for key in ("compile", "hit", "fingerprint_hit", "fingerprint_miss",
                                                         "fingerprint_fallback") if counters.get(key)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="run one case in this process and print its JSON (internal)")
    parser.add_argument("--only", nargs="*", help="substrings of the case names to run")
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case)))
        return
    results = {}
    for name in CASES:
        if args.only and not any(part in name for part in args.only):
            continue
        entry = {}
        with tempfile.TemporaryDirectory() as cache_dir:
            env = {**os.environ, "AOTCACHE_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": "1"}
            for phase in ("cold", "warm"):
                proc = subprocess.run([sys.executable, __file__, "--case", name], env=env, capture_output=True,
                                      text=True, timeout=900)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                entry[phase] = json.loads(lines[-1][7:]) if lines else {
                    "ok": False, "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
        warm = entry["warm"].get("counters", {})
        entry["warm_traced_nothing"] = not warm.get("compile") and not warm.get("fingerprint_miss") and \
            not warm.get("fingerprint_fallback")
        results[name] = entry
        print(f"{name}: cold ok={entry['cold'].get('ok')} route={entry['cold'].get('route')} "
              f"graphs={entry['cold'].get('graphs')} warm ok={entry['warm'].get('ok')} "
              f"warm counters={warm} {entry['cold'].get('error', '')}", flush=True)
    if args.only and RESULTS.exists():  # a partial run updates its cases only
        results = {**json.loads(RESULTS.read_text()), **results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
