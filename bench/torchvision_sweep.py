"""torchvision's model zoo through ``aotcache.compile`` (nop compiler, CPU): which way each model takes, and whether
training, evaluation and a warm start in a fresh process equal eager.

Needs torchvision, which cannot be installed beside the main env's torch: run it with an interpreter that has both
(e.g. ``PYTHONPATH=$PWD /work/venv214/bin/python bench/torchvision_sweep.py``; ``--models resnet18,vit_tiny``
picks models). Each model runs in two fresh processes sharing one temporary cache dir:

* cold: ``steps`` SGD steps in train mode (losses, gradients, parameters and buffers compared with an eager copy
  under the same seeds, dropout on), then an eval call under ``no_grad`` (outputs compared);
* warm: a new process runs the same steps and eval against its own eager copy, and reports the cache counters
  (``compile`` = graphs compiled, ``fingerprint_hit`` = calls that skipped the trace, ``traces`` = the AOT
  function's trace count).

Writes ``bench/results/torchvision_sweep.json`` (one record per model). ``--zoo timm`` runs 35 timm architectures
the same way (timm installed with ``pip install --no-deps timm`` beside torchvision) into ``timm_sweep.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

RESULT = "RESULT "
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ------------------------------------------------------------------------------------------------------------
# Models: name -> (build, train inputs(step), loss(outputs), eval inputs)
# ------------------------------------------------------------------------------------------------------------


def _image(step: int, shape=(2, 3, 64, 64)):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(100 + step))


def _labels(step: int, n=2, classes=10):
    import torch

    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(200 + step))


def _classifier(factory, size=64, aux=False, **kw):
    import torch.nn.functional as F

    def build():
        import torchvision.models as tvm

        return getattr(tvm, factory)(weights=None, num_classes=10, **kw) if isinstance(factory, str) else factory()

    def train_inputs(step):
        return (_image(step, (2, 3, size, size)),), {}

    def loss(out, step):
        labels = _labels(step)
        if isinstance(out, tuple):  # GoogLeNetOutputs / InceptionOutputs: (logits, aux...)
            return F.cross_entropy(out[0], labels) + 0.3 * sum(F.cross_entropy(a, labels) for a in out[1:]
                                                               if a is not None)
        return F.cross_entropy(out, labels)

    return build, train_inputs, loss, lambda: ((_image(9, (2, 3, size, size)),), {})


def _vit_tiny():
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


def _maxvit_tiny():
    from torchvision.models import MaxVit

    return MaxVit(input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.1, num_classes=10)


def _swin_tiny():
    from torchvision.models import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           stochastic_depth_prob=0.1, num_classes=10)


def _segmentation(factory):
    import torch.nn.functional as F

    def build():
        import torchvision.models.segmentation as seg

        return getattr(seg, factory)(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)

    def loss(out, step):
        import torch

        target = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(300 + step))
        return F.cross_entropy(out["out"], target) + 0.5 * F.cross_entropy(out["aux"], target)

    return build, lambda step: ((_image(step),), {}), loss, lambda: ((_image(9),), {})


def _targets(step: int, n=2, size=64):
    import torch

    g = torch.Generator().manual_seed(400 + step)
    targets = []
    for _ in range(n):
        xy = torch.rand(2, 2, generator=g) * (size / 2)
        wh = torch.rand(2, 2, generator=g) * (size / 2) + 4
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1), "labels": torch.randint(1, 3, (2,), generator=g)})
    return targets


def _with_masks(targets, size=64):
    import torch

    for target in targets:
        masks = torch.zeros(len(target["boxes"]), size, size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(target["boxes"].round().int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        target["masks"] = masks
    return targets


def _detection(factory, masks=False, **kw):
    def build():
        import torchvision.models.detection as det

        return getattr(det, factory)(weights=None, weights_backbone=None, num_classes=3, **kw)

    def train_inputs(step):
        targets = _with_masks(_targets(step)) if masks else _targets(step)
        return ([_image(step, (3, 64, 64)), _image(step + 50, (3, 64, 64))], targets), {}

    def loss(out, step):
        return sum(out.values())

    return build, train_inputs, loss, lambda: (([_image(9, (3, 64, 64)), _image(10, (3, 64, 64))],), {})


def _raft():
    def build():
        from torchvision.models.optical_flow import raft_small

        return raft_small(weights=None)

    shape = (1, 3, 128, 128)  # the smallest its correlation pyramid takes

    def train_inputs(step):
        return (_image(step, shape), _image(step + 50, shape)), {"num_flow_updates": 2}

    def loss(out, step):
        return sum(flow.abs().mean() for flow in out)

    return build, train_inputs, loss, lambda: ((_image(9, shape), _image(10, shape)), {"num_flow_updates": 2})


def _video():
    import torch.nn.functional as F

    def build():
        from torchvision.models.video import r3d_18

        return r3d_18(weights=None, num_classes=10)

    return (build, lambda step: ((_image(step, (2, 3, 4, 32, 32)),), {}),
            lambda out, step: F.cross_entropy(out, _labels(step)), lambda: ((_image(9, (2, 3, 4, 32, 32)),), {}))


MODELS = {
    "resnet18": _classifier("resnet18"),
    "resnet50": _classifier("resnet50"),
    "mobilenet_v2": _classifier("mobilenet_v2"),
    "mobilenet_v3_small": _classifier("mobilenet_v3_small"),
    "efficientnet_b0": _classifier("efficientnet_b0"),
    "shufflenet_v2_x0_5": _classifier("shufflenet_v2_x0_5"),
    "squeezenet1_0": _classifier("squeezenet1_0"),
    "regnet_y_400mf": _classifier("regnet_y_400mf"),
    "mnasnet0_5": _classifier("mnasnet0_5"),
    "densenet121": _classifier("densenet121"),
    "googlenet": _classifier("googlenet", aux_logits=True, init_weights=True),
    "inception_v3": _classifier("inception_v3", size=299, aux_logits=True, init_weights=True),
    "convnext_tiny": _classifier("convnext_tiny"),
    "vit_tiny": _classifier(_vit_tiny, size=32),
    "swin_tiny": _classifier(_swin_tiny),
    "swin_t": _classifier("swin_t"),
    "maxvit_tiny": _classifier(_maxvit_tiny),
    "fcn_resnet50": _segmentation("fcn_resnet50"),
    "deeplabv3_mobilenet_v3_large": _segmentation("deeplabv3_mobilenet_v3_large"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": _detection("fasterrcnn_mobilenet_v3_large_320_fpn"),
    "ssdlite320_mobilenet_v3_large": _detection("ssdlite320_mobilenet_v3_large"),
    "retinanet_resnet50_fpn": _detection("retinanet_resnet50_fpn", min_size=64, max_size=64),
    "maskrcnn_resnet50_fpn": _detection("maskrcnn_resnet50_fpn", masks=True, min_size=64, max_size=64),
    "raft_small": _raft(),
    "r3d_18": _video(),
}



def _timm(name: str, size: int = 64):
    """A timm classifier (random weights, 10 classes) at ``size`` pixels where the model takes an image size."""

    def factory():
        import timm

        try:
            return timm.create_model(name, pretrained=False, num_classes=10, img_size=size)
        except TypeError:  # a convolutional model: any size
            return timm.create_model(name, pretrained=False, num_classes=10)

    return _classifier(factory, size=size)


#: ``--zoo timm``: timm architectures of many kinds (CNNs, ViTs, hybrids, MLP-mixers, RNN-based).
TIMM_MODELS = {f"timm/{name}": _timm(name) for name in (
    "resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224", "regnetx_002", "ghostnet_100", "levit_128s", "poolformer_s12", "xcit_nano_12_p16_224",
    "edgenext_xx_small", "fastvit_t8", "efficientvit_b0", "repvit_m1", "mobilevit_xxs", "dla34", "hrnet_w18_small",
    "lcnet_050", "mnasnet_small", "tinynet_e", "resnest14d", "cspresnet50", "rexnet_100", "mixnet_s",
    "convmixer_768_32", "coatnet_nano_rw_224", "maxvit_nano_rw_256", "swin_tiny_patch4_window7_224",
    "beit_base_patch16_224", "eva02_tiny_patch14_224", "nfnet_l0", "botnet26t_256", "sequencer2d_s",
    "gcvit_xxtiny")}
MODELS.update(TIMM_MODELS)


# ------------------------------------------------------------------------------------------------------------
# One model in one process
# ------------------------------------------------------------------------------------------------------------


def _max_diff(a: Any, b: Any) -> float:
    """The largest difference between two pytrees of tensors, relative to ``1 + |b|`` (inf where the structure, a
    shape or a dtype differs): ``hf_tiny.max_diff``."""
    sys.path.insert(0, HERE)
    from hf_tiny import max_diff

    return max_diff(a, b)


def _state_diff(eager, model) -> tuple[float, float, list[str]]:
    """(parameters and buffers, gradients) max relative differences, and the names whose grad presence differs."""
    import torch

    pdiff, gdiff, presence = 0.0, 0.0, []
    named_e = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        e = named_e[name]
        pdiff = max(pdiff, _max_diff(p, e))
        if (p.grad is None) != (e.grad is None):
            presence.append(name)
        elif p.grad is not None:
            gdiff = max(gdiff, _max_diff(p.grad, e.grad))
    buffers_e = dict(eager.named_buffers())
    for name, b in model.named_buffers():
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            pdiff = max(pdiff, _max_diff(b, buffers_e[name]))
    return pdiff, gdiff, presence


def run_model(name: str, phase: str, steps: int) -> dict:
    import torch

    import aotcache
    from aotcache.aot.fallback import fallback_counts
    from aotcache.autograd_cache.cache import resolve_cache

    build, train_inputs, loss_fn, eval_inputs = MODELS[name]
    record: dict[str, Any] = {"model": name, "phase": phase}
    torch.manual_seed(0)
    eager = build()
    model = copy.deepcopy(eager)
    compiled = aotcache.compile(model, compiler="nop")
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.01, momentum=0.9)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    counters = resolve_cache(True).counters
    stage = "train"
    try:
        eager.train(), compiled.train()
        losses, times = [], []
        for step in range(steps):
            args, kwargs = train_inputs(step)
            pair = []
            for forward, opt in ((eager, opt_e), (compiled, opt_c)):
                opt.zero_grad()
                torch.manual_seed(1000 + step)
                started = time.perf_counter()
                loss = loss_fn(forward(*copy.deepcopy(args), **copy.deepcopy(kwargs)), step)
                loss.backward()
                times.append(time.perf_counter() - started)
                pair.append(float(loss))
            pdiff, gdiff, presence = _state_diff(eager, model)
            opt_e.step(), opt_c.step()
            losses.append(pair)
            record.setdefault("compiles_after_step", []).append(counters.get("compile", 0))
            record.setdefault("grad_diff", []).append(gdiff)
            if presence:
                record["grad_presence_differs"] = presence[:5]
        record["losses"] = losses
        record["param_buffer_diff"] = _state_diff(eager, model)[0]
        record["route_train"] = compiled.route
        record["reason"] = compiled.router.reason
        stage = "eval"
        eager.eval(), compiled.eval()
        args, kwargs = eval_inputs()
        with torch.no_grad():
            torch.manual_seed(7)
            want = eager(*copy.deepcopy(args), **kwargs)
            torch.manual_seed(7)
            got = compiled(*copy.deepcopy(args), **kwargs)
        record["eval_diff"] = _max_diff(got, want)
        record["route"] = compiled.route
        record["reason"] = compiled.router.reason
    except Exception as exc:  # noqa: BLE001 - the sweep records every failure
        record["error"] = f"{stage}: {type(exc).__name__}: {str(exc)[:600]}"
        record["traceback"] = traceback.format_exc()[-3000:]
        record["route"] = compiled.route
        record["reason"] = compiled.router.reason
    record["loss_diff"] = max((abs(a - b) / (1 + abs(b)) for b, a in record.get("losses", [])), default=None)
    record["counters"] = {k: v for k, v in dict(counters).items() if v}
    record["traces"] = compiled.compiled.num_compiles
    record["fallbacks"] = fallback_counts()
    if phase == "warm" and counters.get("miss"):
        from aotcache.autograd_cache.cache import explain_last_miss

        record["last_miss"] = explain_last_miss()[:12]
    return record


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------


def _child(name: str, phase: str, steps: int, cache_dir: str, timeout: float) -> dict:
    env = dict(os.environ, AOTCACHE_CACHE_DIR=cache_dir,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--phase", phase, "--steps", str(steps)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "phase": phase, "error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            record = json.loads(line[len(RESULT):])
            record["wall_s"] = round(time.perf_counter() - started, 1)
            warnings = [ln for ln in proc.stderr.splitlines() if "aotcache" in ln and "WARNING" in ln.upper()]
            record["warnings"] = warnings[:5]
            return record
    return {"model": name, "phase": phase, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated names (default: the whole zoo)")
    parser.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision",
                        help="timm: timm's architectures (needs timm; results to timm_sweep.json)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out")
    parser.add_argument("--no-warm", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--phase", default="cold")
    args = parser.parse_args()
    if args.child:
        print(RESULT + json.dumps(run_model(args.child, args.phase, args.steps), default=str), flush=True)
        return
    zoo = TIMM_MODELS if args.zoo == "timm" else {k: v for k, v in MODELS.items() if k not in TIMM_MODELS}
    args.models = args.models or ",".join(zoo)
    args.out = args.out or os.path.join(HERE, "results", f"{args.zoo}_sweep.json")
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = {r["model"]: r for r in json.load(f).get("models", [])}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="aotcache-tv-") as cache_dir:
            cold = _child(name, "cold", args.steps, cache_dir, args.timeout)
            warm = None if args.no_warm or "error" in cold else _child(name, "warm", args.steps, cache_dir,
                                                                       args.timeout)
        results[name] = {"model": name, "cold": cold, "warm": warm}
        summary = {k: cold.get(k) for k in ("route", "loss_diff", "eval_diff", "param_buffer_diff", "traces",
                                             "error", "wall_s")}
        if warm:
            summary["warm"] = {k: warm.get(k) for k in ("route", "counters", "traces", "error", "loss_diff",
                                                       "eval_diff")}
        print(name, json.dumps(summary, default=str), flush=True)
        import torch

        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "compiler": "nop", "device": "cpu", "steps": args.steps,
                       "models": list(results.values())}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
