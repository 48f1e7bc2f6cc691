"""FineWeb-Edu (or any parquet/jsonl text) -> llm.c uint16 token shards, as a Ray Data job with no central writer.

    python pipelines/tokenize.py                                   # FineWeb-Edu sample-10BT from the hub
    python pipelines/tokenize.py --input 'data/raw/*.parquet'      # local or s3://, gs://, hf:// files
    python pipelines/tokenize.py --source demo                     # offline smoke corpus (Python's own docs)
    ray job submit --working-dir . -- python pipelines/tokenize.py --name sample-100BT --node-resource data_node

The job (pipelines.job) cuts the input into work units, tokenizes them in a Ray Data pipeline whose actors
write the tokens into -o themselves, and assembles the shards in parallel from the exact token counts; a
killed job resumes at the unit and shard it reached. From Python, pipelines.dataset gives the documents as a
Ray Data Dataset and writes shards from any Dataset with a `text` column.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run as a script, sys.path[0] is pipelines/, where this file would shadow the stdlib's `tokenize`
    # module; put the repository root there instead, then run the code as the module pipelines.tokenize.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from pipelines.tokenize import main

    sys.exit(main())

from common import cli
from pipelines.config import TokenizeConfig
from pipelines.filters import FilterConfig
from pipelines.job import tokenize
from pipelines.shards import ShardFormatError
from pipelines.sources import FINEWEB_EDU_REPO, InputError

__all__ = ["TokenizeConfig", "main", "parse_args", "tokenize"]


# ---- command line ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> TokenizeConfig:
    parser = cli.ArgumentParser(prog="tokenize.py", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    parser.add_argument("--dataset", metavar="REPO",
                        help=f"a dataset on the Hugging Face hub (default {FINEWEB_EDU_REPO})")
    parser.add_argument("--name", metavar="CONFIG",
                        help="its config, as `datasets` names it (default sample-10BT)")
    source.add_argument("--input", metavar="GLOB", help="local or cloud parquet / jsonl(.gz) files instead of the hub")
    source.add_argument("--source", choices=["demo"],
                        help="demo: an offline smoke corpus built from this Python's docs (NOT FineWeb)")
    parser.add_argument("-o", "--output-dir",
                        help="where shards go: a directory every node sees, or an s3:// / gs:// URL "
                             "(default data/edu_fineweb10B, or data/python_docs for the demo)")
    parser.add_argument("--prefix", help="shard name prefix (default edu_fineweb; python_docs for the demo)")
    parser.add_argument("--shard-size", type=int, help="tokens per shard (default 100,000,000; 100,000 for the demo)")
    parser.add_argument("--num-workers", type=int, help="tokenizer actors (default: the cluster's CPU count)")
    parser.add_argument("--cpus-per-worker", type=float,
                        help="Ray CPUs per tokenizer actor (default: the cluster's CPUs shared, at most 1)")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per parquet read batch")
    parser.add_argument("--unit-bytes", type=int,
                        help="text bytes per work unit: row groups are merged or cut to this (default: 8 units "
                             "per worker, from 1 to 16 MiB)")
    parser.add_argument("--node-resource", metavar="NAME",
                        help="run only on nodes with this custom Ray resource, e.g. data_node (cluster.yaml's "
                             "CPU data nodes); the job then waits for the autoscaler to start them")
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds to wait for the tokenizer workers to start (default 600)")
    parser.add_argument("--min-int-score", type=int, help="drop docs with int_score below this (if the column exists)")
    parser.add_argument("--min-score", type=float, help="drop docs with score below this (if the column exists)")
    parser.add_argument("--min-language-score", type=float, help="drop docs with language_score below this")
    parser.add_argument("--min-chars", type=int, default=0, help="drop docs shorter than this many characters")
    parser.add_argument("--max-chars", type=int, help="drop docs longer than this many characters")
    parser.add_argument("--dedup", action="store_true", help="drop exact duplicate texts (by 64-bit hash)")
    parser.add_argument("--overwrite", action="store_true", help="discard what a previous run left in --output-dir")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    args = parser.parse_args(argv)
    filters = FilterConfig(min_int_score=args.min_int_score, min_score=args.min_score,
                           min_language_score=args.min_language_score, min_chars=args.min_chars,
                           max_chars=args.max_chars, dedup=args.dedup)
    source = "demo" if args.source else "files" if args.input else "hub"
    if source != "hub" and (args.dataset or args.name):
        parser.error(f"{'--dataset' if args.dataset else '--name'} names a hub dataset: not with --input or --source")
    return TokenizeConfig(source=source, dataset=args.dataset or FINEWEB_EDU_REPO, name=args.name or "sample-10BT",
                          input=args.input, output_dir=args.output_dir,
                          prefix=args.prefix, shard_size=args.shard_size, filters=filters,
                          num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
                          batch_size=args.batch_size, unit_bytes=args.unit_bytes, node_resource=args.node_resource,
                          start_timeout=args.start_timeout, overwrite=args.overwrite, address=args.address)


def main(argv: list[str] | None = None) -> int:
    # Ray's INFO lines (connecting, packaging the code) would bury a one-line error; the job prints its own.
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    try:
        tokenize(parse_args(argv))
    except (InputError, ShardFormatError) as err:
        print(f"tokenize.py: error: {err}", file=sys.stderr)
        return 2
    return 0
