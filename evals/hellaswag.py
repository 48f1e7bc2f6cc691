"""Score a GPT-2 checkpoint on HellaSwag (validation, 10,042 examples), fanned out over K Ray tasks.

    python evals/hellaswag.py --checkpoint out/ckpt_00001000 --tasks 4
    python evals/hellaswag.py --checkpoint hf_gpt2/ --file hellaswag_val.bin --tasks 0   # no Ray, this process

The checkpoint is one of ours (ckpt_XXXXXXXX/), an exported Hugging Face GPT-2 directory, or an llm.c model
.bin. Without --file the validation jsonl is downloaded once into --data-dir. Prints acc, acc_norm and counts,
and the same as one JSON line for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import cli
from evals.hellaswag_data import CANONICAL_URL, HellaSwagFormatError, check_fits, default_data_dir, load_examples
from evals.parallel import ClusterTooSmall, add_fanout_flags, check_fanout_flags, connect_for_tasks, launch, prepare
from evals.scoring import evaluate
from gpt2.interop import ModelSourceError, block_size_of, load_gpt, resolve_model_source
from gpt2.model import pick_device


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description="HellaSwag acc / acc_norm of a GPT-2 checkpoint, as llm.c scores it")
    parser.add_argument("--checkpoint", required=True,
                        help="ckpt_XXXXXXXX dir, run dir (its latest checkpoint), HF GPT-2 dir or llm.c model .bin")
    parser.add_argument("--file", help="HellaSwag jsonl or llm.c eval .bin (magic 20240522) instead of the download")
    parser.add_argument("--data-dir", default=str(default_data_dir()),
                        help="cache for the downloaded validation set (default: $XDG_CACHE_HOME or ~/.cache, "
                             "then raygpt2/hellaswag)")
    parser.add_argument("--url", default=CANONICAL_URL, help="where to download the validation jsonl from")
    add_fanout_flags(parser)
    return parser


def run(args: argparse.Namespace) -> dict[str, float | int]:
    try:
        checkpoint = resolve_model_source(args.checkpoint)
    except ModelSourceError as err:
        raise ModelSourceError(f"--checkpoint {err}") from err
    examples = load_examples(args.file, args.data_dir, args.url)
    check_fits(examples, block_size_of(checkpoint), args.file or args.url)  # before any cluster starts
    started = time.perf_counter()
    if args.tasks == 0:
        result = evaluate(load_gpt(checkpoint, pick_device(args.device)), examples, args.batch_tokens)
    else:
        connect_for_tasks(args.address, args.cpus_per_task, args.gpus_per_task)
        eval_set = prepare(examples, args.tasks, args.batch_tokens, gpu=args.gpus_per_task > 0)
        started = time.perf_counter()  # scoring only: the cluster start and data upload are not the eval
        handle = launch(checkpoint, eval_set, num_cpus=args.cpus_per_task, num_gpus=args.gpus_per_task)
        result = handle.result()
    return {**result, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> dict[str, float | int]:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_fanout_flags(parser, args)
    try:
        result = run(args)
    except (HellaSwagFormatError, ModelSourceError, ConnectionError, ClusterTooSmall) as err:
        print(f"hellaswag.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(f"HellaSwag {result['num_total']} examples | acc {result['acc']:.4f} ({result['num_correct']}) | "
          f"acc_norm {result['acc_norm']:.4f} ({result['num_correct_norm']}) | {result['seconds']:.1f} s")
    print(json.dumps(result))
    return result


def command() -> None:
    """The console script (raygpt2-hellaswag); main() returns the result for callers in Python, which as a script's
    return value would be taken for an exit status."""
    main()


if __name__ == "__main__":
    command()
