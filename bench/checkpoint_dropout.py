"""A tiny GPT-2 training step with gradient checkpointing and dropout 0.1, side by side in one process:

- ``eager``: the model itself;
- ``before``: ``torch.compile(model, backend="aotcache")`` as before NOTE [Checkpointed regions traced in line]
  (the regions go through torch's own checkpoint caching, the capture is refused, the graph runs eagerly);
- ``after``: the same with the regions traced in line (captured and compiled).

Each way trains its own copy of the model from the same seed. Dynamo keeps its frames per code object, so
``before`` and ``after`` run in two phases (Dynamo reset between), each interleaved step by step with an eager
copy so that the machine's load hits both alike; each line gives the first step's time (the compile), the
median of the later steps and its ratio to the eager copy of its phase, the fallback counts of the first step,
and whether losses and parameters equal eager's bit for bit.

    python bench/checkpoint_dropout.py                    # nop compiler
    python bench/checkpoint_dropout.py --compiler inductor --steps 20

Writes ``bench/results/checkpoint_dropout_<compiler>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib
import statistics
import time

import torch


def _model(layers: int, width: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=1000, n_positions=256)
    model = transformers.GPT2LMHeadModel(config).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@contextlib.contextmanager
def _regions_as_before(enabled: bool):
    """Turn the in-line tracing of checkpointed regions off (the code path before it existed)."""
    import aotcache.aot.dynamo_graph as dynamo_graph

    original = dynamo_graph.has_checkpoint_regions
    if enabled:
        dynamo_graph.has_checkpoint_regions = lambda gm: False
    try:
        yield
    finally:
        dynamo_graph.has_checkpoint_regions = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiler", default="nop")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    import aotcache
    from aotcache.aot.fallback import fallback_counts

    torch.set_num_threads(1)
    ids = torch.randint(0, 1000, (4, args.seq), generator=torch.Generator().manual_seed(0))
    backend = functools.partial(aotcache.aotcache_backend, compiler=args.compiler, cache=False)
    print(f"GPT-2 {args.layers} layers x {args.width}, batch 4 x {args.seq}, gradient checkpointing, dropout 0.1, "
          f"compiler {args.compiler}, torch {torch.__version__}, 1 thread; {args.steps} steps after the first")
    print(f"{'way':8} {'first step s':>13} {'median step ms':>15} {'vs eager':>9}  {'same as eager':>13}  fallbacks")
    rows = []
    for compiled_way in ("before", "after"):  # Dynamo's frames are per code object: a phase each, reset between
        torch._dynamo.reset()
        ways = {}
        for name in ("eager", compiled_way):
            model = _model(args.layers, args.width)
            run = model if name == "eager" else torch.compile(model, backend=backend)
            ways[name] = (model, run, torch.optim.SGD(model.parameters(), lr=0.01))
        times: dict[str, list[float]] = {name: [] for name in ways}
        first: dict[str, float] = {}
        records: dict[str, list] = {name: [] for name in ways}
        counts: dict[str, dict] = {}
        for step in range(args.steps + 1):
            for name, (model, run, opt) in ways.items():
                before_counts = dict(fallback_counts())
                with _regions_as_before(name == "before"):
                    torch.manual_seed(100 + step)
                    start = time.perf_counter()
                    loss = run(input_ids=ids, labels=ids).loss
                    loss.backward()
                    opt.step()
                    elapsed = time.perf_counter() - start
                opt.zero_grad(set_to_none=True)
                if step == 0:
                    first[name] = elapsed
                    counts[name] = {kind: value - before_counts.get(kind, 0)
                                    for kind, value in fallback_counts().items()
                                    if value != before_counts.get(kind, 0)}
                else:
                    times[name].append(elapsed)
                records[name].append(loss.detach())
        params = {name: [p.detach() for p in model.parameters()] for name, (model, _, _) in ways.items()}
        eager_median = statistics.median(times["eager"])
        for name in ways:
            same = all(torch.equal(a, b) for a, b in zip(records[name] + params[name],
                                                         records["eager"] + params["eager"]))
            median = statistics.median(times[name])
            print(f"{name:8} {first[name]:13.2f} {1000 * median:15.1f} {median / eager_median:9.2f}  "
                  f"{str(same):>13}  {counts[name] or '-'}")
            rows.append({"phase": compiled_way, "way": name, "first_step_s": first[name], "median_step_ms":
                         1000 * median, "vs_eager": median / eager_median, "same_as_eager": same,
                         "fallbacks": counts[name]})
    out = pathlib.Path(__file__).parent / "results" / f"checkpoint_dropout_{args.compiler}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
