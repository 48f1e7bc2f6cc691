"""Score a GPT-2 on CORE (DCLM's 22 in-context tasks, as nanochat computes it), fanned out over K Ray tasks.

    python evals/core.py --checkpoint out/ckpt_00001000 --tasks 4
    python evals/core.py --checkpoint gpt2.bin --bundle eval_bundle/ --tasks 0   # no Ray, this process
    python evals/core.py --checkpoint out/ --max-per-task 100 --only hellaswag_zeroshot,piqa   # a quick look

The checkpoint is one of ours (ckpt_XXXXXXXX/ or a run directory: its latest), an exported Hugging Face GPT-2
directory, or an llm.c model .bin. Without --bundle, nanochat's eval_bundle.zip is downloaded once into
--data-dir. The whole plan (rendered, tokenized, batched) is made and checked here before any cluster is
touched; each Ray task scores a share of the batches (examples of one task at a time) with the model it
loads itself. Prints each task's accuracy and centered accuracy, CORE, and all of it as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import cli
from evals.core_data import BUNDLE_URL, CoreFormatError, default_data_dir, locate_bundle, read_bundle
from evals.core_scoring import plan
from evals.parallel import (
    ClusterTooSmall,
    EvalSet,
    add_fanout_flags,
    check_fanout_flags,
    connect_for_tasks,
    deal,
    launch,
)
from evals.scoring import Result, default_batch_tokens, score_live_model
from gpt2.interop import ModelSourceError, load_gpt, read_model_config, resolve_model_source
from gpt2.model import pick_device


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description="CORE (DCLM's in-context suite, as nanochat scores it) of a GPT-2")
    parser.add_argument("--checkpoint", required=True,
                        help="ckpt_XXXXXXXX dir, run dir (its latest checkpoint), HF GPT-2 dir or llm.c model .bin")
    parser.add_argument("--bundle", help="an unzipped CORE eval_bundle directory instead of the download")
    parser.add_argument("--data-dir", default=str(default_data_dir()), help="cache for the downloaded bundle")
    parser.add_argument("--url", default=BUNDLE_URL, help="where to download eval_bundle.zip from")
    parser.add_argument("--max-per-task", type=int, default=0,
                        help="score the first N examples of each task (after the seeded shuffle); 0 = all")
    parser.add_argument("--only", help="comma-separated task labels to score (CORE is then their mean)")
    add_fanout_flags(parser)
    return parser


def run(args: argparse.Namespace) -> Result:
    try:
        checkpoint = resolve_model_source(args.checkpoint)
        context_length = read_model_config(checkpoint).block_size
    except ModelSourceError as err:
        raise ModelSourceError(f"--checkpoint {err}") from err
    bundle = locate_bundle(args.bundle, args.data_dir, args.url)
    labels = args.only.split(",") if args.only else None
    tasks = read_bundle(bundle, args.max_per_task or None, labels)
    device = pick_device(args.device) if args.tasks == 0 else ("cuda" if args.gpus_per_task > 0 else "cpu")
    core_plan = plan(tasks, context_length, args.batch_tokens or default_batch_tokens(device))
    if args.tasks == 0:
        model = load_gpt(checkpoint, device)
        started = time.perf_counter()
        result = core_plan.summarize(score_live_model(model, core_plan.batches))
    else:
        connect_for_tasks(args.address, args.cpus_per_task, args.gpus_per_task)
        eval_set = EvalSet(deal(core_plan.batches, args.tasks), core_plan.summarize)
        started = time.perf_counter()  # scoring only: the cluster start and data upload are not the eval
        result = launch(checkpoint, eval_set, num_cpus=args.cpus_per_task, num_gpus=args.gpus_per_task).result()
    return {**result, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> Result:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_fanout_flags(parser, args)
    if args.max_per_task < 0:
        parser.error(f"--max-per-task must be 0 (all) or more, got {args.max_per_task}")
    if args.only is not None and not all(args.only.split(",")):
        parser.error(f"--only {args.only!r}: expected comma-separated task labels")
    try:
        result = run(args)
    except (CoreFormatError, ModelSourceError, ConnectionError, ClusterTooSmall) as err:
        print(f"core.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    width = max(len(label) for label in result["tasks"])
    for label, task in result["tasks"].items():
        print(f"{label:<{width}} | accuracy {task['accuracy']:.4f} | centered {task['centered']:+.4f} | "
              f"{task['num_total']} examples")
    print(f"CORE {result['core']:.4f} | {len(result['tasks'])} tasks, {result['num_total']} examples | "
          f"{result['seconds']:.1f} s")
    print(json.dumps(result))
    return result


def command() -> None:
    """The console script (raygpt2-core); main() returns the result for callers in Python, which as a script's
    return value would be taken for an exit status."""
    main()


if __name__ == "__main__":
    command()
