"""CORE throughput: nanochat's one-example-at-a-time loop vs our packed batches, and Ray-task scaling 1 -> 2.

A synthetic bundle (multiple choice 0- and 5-shot, schema 1-shot, language modeling 3-shot; random words),
one random model, one run: (a) each example's rows padded and run through the model's full-logits forward,
as nanochat's core_eval does; (b) our plan scored in this process; (c) the same plan in 1 and then 2 Ray
tasks (warm: the second of two runs, so worker start and model load are not in it). The predictions agree
example by example or the bench says so. Last, the cost model's prediction for the full public bundle at
d12 and d48 on H100 and L4, from an assumed bundle shape (ASSUMED_SHAPE) and the cards' bf16 peaks.

    python bench/core_bench.py --model d6 --examples 40
    python bench/core_bench.py --predict-only
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from evals.core_data import Item, read_bundle, tokenize
from evals.core_scoring import example_correct, plan
from evals.scoring import default_batch_tokens, score_live_model
from gpt2.checkpoint import save_checkpoint
from gpt2.model import GPT, GPTConfig, autocast_for
from pipelines.tokenizer import EOT_TOKEN
from training.launcher.placement import EVAL_EFFICIENCY
from training.metrics import peak_flops

WORDS = ("the a man woman dog ball runs jumps kitchen slowly then picks up puts down water bike rope paint brush "
         "knife cuts onto floor table smiles talks camera shows because after before while under over").split()
# label: (type, shots, delimiter, baseline %)
SYNTHETIC = {"mc_zeroshot": ("multiple_choice", 0, " ", 25.0), "mc_fewshot": ("multiple_choice", 5, " ", 25.0),
             "schema": ("schema", 1, " ", 50.0), "lm": ("language_modeling", 3, " ", 0.0)}
# The public bundle's 22 tasks: (type, examples, shots, rows per example, tokens of one solved example, tokens
# of each row's own part). Example counts as nanochat reports them, shots as the DCLM paper lists them; the
# token lengths are ASSUMED (rough reads of each dataset), so the prediction below is as rough as they are.
ASSUMED_SHAPE = {
    "hellaswag_zeroshot": ("mc", 10042, 0, 4, 110, 30), "jeopardy": ("lm", 2117, 10, 1, 45, 5),
    "bigbench_qa_wikidata": ("lm", 20321, 10, 1, 20, 4), "arc_easy": ("mc", 2376, 10, 4, 45, 8),
    "arc_challenge": ("mc", 1172, 10, 4, 50, 10), "copa": ("mc", 100, 0, 2, 20, 8),
    "commonsense_qa": ("mc", 1221, 10, 5, 70, 2), "piqa": ("mc", 1834, 10, 2, 60, 25),
    "openbook_qa": ("mc", 500, 0, 4, 30, 6), "lambada_openai": ("lm", 5153, 0, 1, 80, 2),
    "hellaswag": ("mc", 10042, 10, 4, 110, 30), "winograd": ("schema", 273, 0, 2, 30, 15),
    "winogrande": ("schema", 1267, 0, 2, 35, 15), "bigbench_dyck_languages": ("lm", 1000, 10, 1, 60, 5),
    "agi_eval_lsat_ar": ("mc", 230, 3, 5, 280, 2), "bigbench_cs_algorithms": ("lm", 1320, 10, 1, 40, 3),
    "bigbench_operators": ("lm", 210, 10, 1, 25, 3), "bigbench_repeat_copy_logic": ("lm", 32, 10, 1, 45, 20),
    "squad": ("lm", 10570, 10, 1, 180, 5), "coqa": ("lm", 7983, 0, 1, 400, 4),
    "boolq": ("mc", 3270, 10, 2, 150, 1), "bigbench_language_identification": ("mc", 10000, 10, 11, 100, 3),
}


def write_synthetic_bundle(directory: Path, examples: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    words = lambda low, high: " ".join(rng.choice(WORDS, rng.integers(low, high)))  # noqa: E731
    rows = {"multiple_choice": lambda: {"query": words(15, 60), "choices": [words(3, 25) for _ in range(4)],
                                        "gold": int(rng.integers(0, 4))},
            "schema": lambda: {"context_options": [words(10, 40) for _ in range(2)], "continuation": words(3, 10),
                               "gold": int(rng.integers(0, 2))},
            "language_modeling": lambda: {"context": words(30, 90), "continuation": words(1, 4)}}
    (directory / "eval_data").mkdir(parents=True)
    entries, baselines = [], [["Eval Task", "Random baseline"]]
    for label, (kind, shots, delimiter, baseline) in SYNTHETIC.items():
        lines = "".join(json.dumps(rows[kind]()) + "\n" for _ in range(examples))
        (directory / "eval_data" / f"{label}.jsonl").write_text(lines)
        entries.append({"label": label, "dataset_uri": f"{label}.jsonl", "num_fewshot": [shots],
                        "icl_task_type": kind, "continuation_delimiter": delimiter})
        baselines.append([label, baseline])
    (directory / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    with open(directory / "eval_meta_data.csv", "w", newline="") as f:
        csv.writer(f).writerows(baselines)
    return directory


@torch.no_grad()
def one_at_a_time(model: GPT, items: list[Item], device: torch.device) -> list[bool]:
    """nanochat's loop: per example its rows right-padded with EOT, full logits, per-row losses and argmax."""
    correct = []
    for item in items:
        tokens = torch.full((len(item.rows), max(len(row) for row in item.rows)), EOT_TOKEN, device=device)
        for i, row in enumerate(item.rows):
            tokens[i, : len(row)] = torch.tensor(row)
        with autocast_for(device):
            logits = model(tokens).float()
        if item.gold < 0:
            (start, end), = item.spans
            correct.append(bool((logits[0, start - 1: end - 1].argmax(-1) == tokens[0, start:end]).all()))
            continue
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        means = [losses[i, start - 1: end - 1].mean().item() for i, (start, end) in enumerate(item.spans)]
        correct.append(means.index(min(means)) == item.gold)
    return correct


def full_bundle_flops(config: GPTConfig) -> float:
    """Forward FLOPs of the public bundle under ASSUMED_SHAPE, counted as evals.scoring.forward_flops counts a
    plan: each example packed (shared prompt once, then each row's own part), or, when the prompt is cut to
    the context, every row as its own sequence (rows cut by different amounts share no positions; this
    assumes they were, the costlier case)."""
    layers, channels, vocab, context = config.n_layer, config.n_embd, config.vocab_size, config.block_size
    total = 0.0
    for _kind, examples, shots, rows, solved, own in ASSUMED_SHAPE.values():
        length = 1 + (shots + 1) * solved  # EOT, the shots, the example itself
        if length > context:  # rows cut apart: one sequence of `context` tokens per row
            tokens, width = rows * context, context
        else:  # one packed sequence
            tokens = width = length + (rows - 1) * own
        scored = rows * own
        total += examples * (tokens * (24 * layers * channels**2 + 4 * layers * width * channels)
                             + 2 * channels * vocab * scored)
    return total


def predict(efficiency: float = EVAL_EFFICIENCY) -> None:
    examples = sum(shape[1] for shape in ASSUMED_SHAPE.values())
    print(f"cost model, full CORE ({len(ASSUMED_SHAPE)} tasks, {examples} examples, ASSUMED token lengths), "
          f"at {efficiency:.0%} of bf16 peak — a prediction, not a measurement:")
    for model in ("d12", "d48"):
        flops = full_bundle_flops(GPTConfig.from_descriptor(model))
        for card in ("H100", "L4"):
            print(f"  {model} on one {card}: {flops / 1e15:.3g} PFLOP -> "
                  f"{flops / (peak_flops(card, bf16=True) * efficiency):.0f} s")


def timed(run) -> tuple[object, float]:
    started = time.perf_counter()
    out = run()
    return out, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="d6", help="d6/d12/... or LxHyCz")
    parser.add_argument("--examples", type=int, default=40, help="examples per synthetic task (4 tasks)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-tokens", type=int, help="padded tokens per forward pass (default by device)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray scaling part (a machine without Ray)")
    parser.add_argument("--predict-only", action="store_true", help="only print the full-bundle prediction")
    args = parser.parse_args(argv)
    if args.predict_only:
        predict()
        return

    device = torch.device(args.device)
    model = GPT(GPTConfig.from_descriptor(args.model), seed=args.seed).eval().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = read_bundle(write_synthetic_bundle(Path(tmp) / "bundle", args.examples, args.seed))
        items = [item for task in tasks for item in tokenize(task, model.config.block_size)]
        core_plan = plan(tasks, model.config.block_size, args.batch_tokens or default_batch_tokens(device))
        tokens = sum(batch.tokens.size for batch in core_plan.batches)
        print(f"model {args.model} ({model.num_parameters() / 1e6:.1f}M params), {len(items)} examples in "
              f"{len(tasks)} tasks, {len(core_plan.batches)} batches ({tokens} padded tokens), device {device}, "
              f"torch threads {torch.get_num_threads()}; machine shared with other jobs: figures measured under load")
        reference, loop_seconds = timed(lambda: one_at_a_time(model, items, device))
        print(f"(a) one-at-a-time loop:      {loop_seconds:7.2f} s  {len(items) / loop_seconds:7.1f} examples/s")
        rows, batched_seconds = timed(lambda: score_live_model(model, core_plan.batches))
        same = list(example_correct(rows)) == reference
        print(f"(b) packed batches, in process: {batched_seconds:5.2f} s  {len(items) / batched_seconds:7.1f} "
              f"examples/s  {loop_seconds / batched_seconds:.1f}x  (same predictions: {same})")
        if not args.no_ray:
            from common.cluster import connect
            from evals.parallel import EvalSet, deal, launch

            connect()
            checkpoint = save_checkpoint(tmp, 0, {"model.pt": model.state_dict(), "optimizer.pt": {}, "rng.pt": {}},
                                         {"model_config": model.config.to_dict()})
            expected = core_plan.summarize(rows)
            for count in (1, 2):
                eval_set = EvalSet(deal(core_plan.batches, count), core_plan.summarize)
                for _ in ("cold", "warm"):
                    result, seconds = timed(lambda s=eval_set: launch(checkpoint, s, num_cpus=args.cpus_per_task)
                                            .result())
                print(f"(c) {count} Ray task(s) x {args.cpus_per_task:g} CPU, warm: {seconds:5.2f} s  "
                      f"{len(items) / seconds:7.1f} examples/s  (same result: {result == expected})")
    predict()


if __name__ == "__main__":
    main()
