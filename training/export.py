"""Export a checkpoint as an llm.c model file and/or a Hugging Face `transformers` GPT-2 directory.

    python training/export.py out/ckpt_00001000 --llmc model.bin --dtype bf16 --hf hf_gpt2/
    python training/export.py out/                --llmc model.bin          # a run dir: its latest checkpoint

The formats themselves live in gpt2/interop.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from common import cli
from gpt2.interop import ModelSourceError, export_hf, load_gpt, resolve_model_source, write_llmc


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description="Export a checkpoint to llm.c .bin and/or a HF GPT-2 directory")
    parser.add_argument("source", help="checkpoint dir (ckpt_XXXXXXXX), run dir (its latest), llm.c .bin or HF dir")
    parser.add_argument("--llmc", help="write an llm.c model file here")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="llm.c file precision")
    parser.add_argument("--hf", help="write a Hugging Face transformers GPT-2 directory here")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --llmc file / write into a non-empty --hf directory")
    args = parser.parse_args(argv)
    if not args.llmc and not args.hf:
        parser.error("nothing to do: give --llmc and/or --hf")
    if args.llmc and args.hf and Path(args.llmc).resolve().is_relative_to(Path(args.hf).resolve()):
        parser.error(f"--llmc {args.llmc}: inside --hf {args.hf}; write them apart")
    try:
        source = resolve_model_source(args.source)
    except ModelSourceError as err:
        parser.error(str(err))
    problems = [p for p in (args.llmc and cli.output_problem("--llmc", args.llmc, args.overwrite, reads=(source,)),
                            args.hf and cli.output_problem("--hf", args.hf, args.overwrite, directory=True,
                                                           reads=(source,))) if p]
    if problems:
        parser.error(problems[0])
    try:
        model = load_gpt(source)
        if args.llmc:
            write_llmc(model, args.llmc, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
            print(f"wrote {args.llmc}")
        if args.hf:
            export_hf(model, args.hf)
            print(f"wrote {args.hf}/")
    except ModelSourceError as err:
        print(f"export.py: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only or full target: the atomic writes left nothing half-written
        print(f"export.py: error: cannot write the export ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
