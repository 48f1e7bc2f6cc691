"""HellaSwag throughput: a one-example-at-a-time loop like build-nanogpt's vs ours (batched, K Ray tasks).

Same random model, same synthetic examples (HellaSwag-like lengths: context 20-80 tokens, endings 10-35),
same run. The Ray cluster start and the one-off upload of the batch plan are timed but left out of the
ratio; the eval itself is timed from launch to aggregated result, twice: cold (fresh worker processes
and model load) and warm. Last, run.py -h 1's cost model predicts the same eval's seconds (FLOPs of the
batch plan over the device's peak at a stated efficiency; on CPU the peak is a measured matmul rate), and
the measured warm time is printed against it.

    python bench/hellaswag_bench.py --model d6 --examples 150 --tasks 2
    python bench/hellaswag_bench.py --model d12 --examples 1000 --device cuda --tasks 0   # GPU, no Ray
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from evals.hellaswag_data import Example
from evals.scoring import default_batch_tokens, evaluate, forward_flops, plan_batches
from gpt2.checkpoint import save_checkpoint
from gpt2.interop import load_gpt
from gpt2.model import GPT, GPTConfig, autocast_for
from gpt2.rundir import MODEL_PART, OPTIMIZER_PART, RNG_PART
from training.launcher.placement import EVAL_EFFICIENCY, HellaSwagSettings, cpu_flops_per_second, predicted_seconds
from training.metrics import peak_flops


def synthetic_examples(count: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    tokens = lambda n: tuple(int(t) for t in rng.integers(0, 50257, n))  # noqa: E731
    return [Example(i, tokens(rng.integers(20, 81)), tuple(tokens(rng.integers(10, 36)) for _ in range(4)),
                    int(rng.integers(0, 4))) for i in range(count)]


@torch.no_grad()
def one_at_a_time(model: GPT, examples: list[Example], device: torch.device) -> dict[str, int]:
    """build-nanogpt's loop: per example 4 padded rows, full logits, masked cross-entropy, argmin."""
    correct = correct_norm = 0
    for example in examples:
        rows = [list(example.context) + list(ending) for ending in example.endings]
        width = max(len(row) for row in rows)
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width))
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, len(example.context): len(row)] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast_for(device):
            logits = model(tokens)
        losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                 reduction="none").view(4, -1) * mask[:, 1:]
        total = losses.sum(1)
        correct += int(total.argmin()) == example.label
        correct_norm += int((total / mask[:, 1:].sum(1)).argmin()) == example.label
    return {"num_correct": correct, "num_correct_norm": correct_norm, "num_total": len(examples)}


def counts(result: dict) -> dict[str, int]:
    return {k: result[k] for k in ("num_correct", "num_correct_norm", "num_total")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="d6", help="d6/d12/... or LxHyCz")
    parser.add_argument("--examples", type=int, default=150)
    parser.add_argument("--tasks", type=int, default=2, help="Ray tasks for ours; 0 = batched in this process")
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--gpus-per-task", type=float, default=0.0)
    parser.add_argument("--batch-tokens", type=int, help="padded tokens per forward pass (default by device)")
    parser.add_argument("--device", default="cpu", help="device of the one-at-a-time loop (and of --tasks 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    examples = synthetic_examples(args.examples, args.seed)
    model = GPT(GPTConfig.from_descriptor(args.model), seed=args.seed).eval()
    print(f"model {args.model} ({model.num_parameters() / 1e6:.1f}M params), {len(examples)} examples, "
          f"torch threads {torch.get_num_threads()}, device {device}")
    with tempfile.TemporaryDirectory() as tmp:
        parts = {MODEL_PART: model.state_dict(), OPTIMIZER_PART: {}, RNG_PART: {}}
        checkpoint = save_checkpoint(tmp, 0, parts, {"model_config": model.config.to_dict()})

        model.to(device)
        started = time.perf_counter()
        baseline = one_at_a_time(model, examples, device)
        baseline_seconds = time.perf_counter() - started
        print(f"(a) one-at-a-time loop: {baseline_seconds:.2f} s, {len(examples) / baseline_seconds:.1f} examples/s")

        if args.tasks == 0:
            scoring = load_gpt(checkpoint, device)
            timings = []
            for label in ("cold", "warm"):
                started = time.perf_counter()
                ours = evaluate(scoring, examples, args.batch_tokens)
                timings.append((label, time.perf_counter() - started))
            what = "batched, in process"
        else:
            from common.cluster import connect
            from evals.parallel import launch, prepare

            started = time.perf_counter()
            connect()
            print(f"    ray cluster start: {time.perf_counter() - started:.2f} s (not in the ratio)")
            started = time.perf_counter()
            eval_set = prepare(examples, args.tasks, args.batch_tokens, gpu=args.gpus_per_task > 0)
            print(f"    plan + upload of {len(eval_set.groups)} groups: {time.perf_counter() - started:.2f} s "
                  "(once per run, not in the ratio)")
            timings = []
            for label in ("cold", "warm"):
                started = time.perf_counter()
                ours = launch(checkpoint, eval_set, num_cpus=args.cpus_per_task,
                              num_gpus=args.gpus_per_task).result()
                timings.append((label, time.perf_counter() - started))
            what = f"batched, {args.tasks} Ray tasks x {args.cpus_per_task:g} CPU"
    for label, seconds in timings:
        print(f"(b) ours ({what}, {label}): {seconds:.2f} s, {len(examples) / seconds:.1f} examples/s, "
              f"{baseline_seconds / seconds:.1f}x")
    same = counts(ours) == baseline
    print(f"same predictions' counts: {same} (ours {counts(ours)}, loop {baseline})")
    print(f"speedup (warm): {baseline_seconds / timings[-1][1]:.1f}x")

    gpu = args.tasks == 0 and device.type == "cuda" or args.gpus_per_task > 0
    flops = forward_flops(model.config, plan_batches(examples, args.batch_tokens or default_batch_tokens(
        "cuda" if gpu else "cpu")))
    if gpu:
        peak = peak_flops(torch.cuda.get_device_name() if torch.cuda.is_available() else None, bf16=True)
    else:
        peak = cpu_flops_per_second(max(1, int(args.cpus_per_task)) if args.tasks else torch.get_num_threads())
    if peak is None:
        print("cost model: no peak FLOP/s known for this device")
        return
    settings = HellaSwagSettings(None, "tasks" if args.tasks else "ranks", args.tasks, args.cpus_per_task,
                                 args.gpus_per_task)
    predicted = predicted_seconds(flops, settings, peak, workers=1)
    print(f"cost model: {flops / 1e12:.3g} TFLOP, peak {peak / 1e9:.1f} GFLOP/s per device x "
          f"{EVAL_EFFICIENCY:.0%} -> predicted {predicted:.2f} s; measured (warm) {timings[-1][1]:.2f} s; "
          f"measured / predicted {timings[-1][1] / predicted:.2f}")


if __name__ == "__main__":
    main()
