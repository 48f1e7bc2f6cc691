"""FineWeb-Edu (or any parquet/jsonl text) -> llm.c uint16 token shards, as a streaming Ray Data job.

    python pipelines/tokenize.py                                   # FineWeb-Edu sample-10BT from the hub
    python pipelines/tokenize.py --input 'data/raw/*.parquet'      # local or s3://, gs://, hf:// files
    python pipelines/tokenize.py --source demo                     # offline smoke corpus (Python's own docs)
    ray job submit --working-dir . -- python pipelines/tokenize.py --name sample-100BT

Read -> filter + tokenize on an actor pool (one GPT-2 encoder per actor) -> the driver consumes the blocks in
input order and cuts them into fixed-size shards, so the bytes do not depend on parallelism or scheduling.
Rerunning an interrupted command resumes after the last complete shard; rerunning a finished one is a no-op.
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

import argparse
import hashlib
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from pipelines.filters import DROP_REASONS, FilterConfig, drop_reasons
from pipelines.shards import ShardFormatError, read_header
from pipelines.sources import (
    FINEWEB_EDU_SAMPLES,
    InputError,
    InputFiles,
    files_from_demo,
    files_from_glob,
    files_from_hub,
    read_unit,
)
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding, tokenizer_identity
from pipelines.writer import (
    HASHES_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    Position,
    ShardStream,
    read_json,
    write_json_atomically,
)

# Reading is light next to BPE, so read tasks ask for a sliver of a CPU, and the actor pool leaves some
# unclaimed: a pool that claims every CPU starves the readers and the job stalls without an error.
READ_TASK_CPUS = 0.1
RESERVED_CPUS = 0.2
DEMO_SHARD_SIZE = 100_000
FINEWEB_SHARD_SIZE = 100_000_000


@dataclass
class TokenizeConfig:
    source: str = "hub"  # hub | files | demo
    name: str = "sample-10BT"
    input: str | None = None
    output_dir: Path | None = None
    prefix: str | None = None
    shard_size: int | None = None
    filters: FilterConfig = field(default_factory=FilterConfig)
    num_workers: int | None = None  # default: one tokenizer actor per CPU in the cluster
    cpus_per_worker: float | None = None  # default: the cluster's CPUs less RESERVED_CPUS, shared by the pool
    batch_size: int = 1024
    overwrite: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        demo = self.source == "demo"
        if self.output_dir is None:
            billions = self.name.removeprefix("sample-").removesuffix("T")
            self.output_dir = Path("data/python_docs" if demo else f"data/edu_fineweb{billions}")
        self.output_dir = Path(self.output_dir)
        self.prefix = self.prefix or ("python_docs" if demo else "edu_fineweb")
        self.shard_size = self.shard_size or (DEMO_SHARD_SIZE if demo else FINEWEB_SHARD_SIZE)
        if self.shard_size <= 0:
            raise ValueError(f"--shard-size must be positive, got {self.shard_size}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"--num-workers must be at least 1, got {self.num_workers}")


class TokenizeDocuments:
    """Ray Data actor: filters a batch and encodes the survivors, EOT first, as uint16 bytes per document.

    Dropped documents stay in the output as empty rows carrying their drop reason, so the driver can count
    them and track exactly where in each input file it is.
    """

    def __init__(self, filters: FilterConfig):
        self.filters = filters
        self.encode = gpt2_encoding().encode_ordinary

    def __call__(self, batch: pa.Table) -> pa.Table:
        reasons = drop_reasons(batch, self.filters)
        texts = batch["text"].to_pylist()
        # one uint16 buffer for the whole batch plus offsets: no per-document bytes objects or extra copies
        tokens, offsets = array("H"), array("q", [0])
        for text, reason in zip(texts, reasons, strict=True):
            if not reason:
                tokens.append(EOT_TOKEN)
                tokens.fromlist(self.encode(text))
            offsets.append(2 * len(tokens))
        token_column = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), len(texts), [None, pa.py_buffer(offsets), pa.py_buffer(tokens)])
        columns = {"file": batch["file"], "row": batch["row"], "reason": pa.array(reasons), "tokens": token_column}
        if self.filters.dedup:
            columns["text_hash"] = pa.array(
                [0 if r else int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
                 for t, r in zip(texts, reasons, strict=True)], type=pa.uint64())
        return pa.table(columns)


def resolve_inputs(config: TokenizeConfig) -> InputFiles:
    if config.source == "demo":
        return files_from_demo(config.output_dir / "demo_source")
    if config.source == "files":
        return files_from_glob(config.input)
    return files_from_hub(config.name)


def build_dataset(inputs: InputFiles, start: Position | None, config: TokenizeConfig, num_workers: int,
                  cpus_per_worker: float):
    """Read units -> (read tasks) document batches -> (tokenizer actors) token rows, in input order."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the shard bytes depend on document order
    context.enable_progress_bars = False  # the driver shows one bar for the whole job
    units = [u for u in inputs.read_units() if start is None or not _before(u, start)]
    columns = ["text", *[c for c in config.filters.threshold_columns() if c in inputs.columns]]
    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _read_units,
        fn_kwargs={"filesystem": inputs.filesystem, "columns": columns, "batch_rows": config.batch_size},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=READ_TASK_CPUS,
    ).map_batches(
        TokenizeDocuments,
        fn_constructor_args=(config.filters,),
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=cpus_per_worker,
    )


def _before(unit: dict, start: Position) -> bool:
    """Whether every row of a read unit was already written before the resume position."""
    if unit["file"] != start.file:
        return unit["file"] < start.file
    return unit["rows"] >= 0 and unit["first_row"] + unit["rows"] <= start.row


def _read_units(units: pa.Table, filesystem, columns: list[str], batch_rows: int):
    for unit in units.to_pylist():
        yield from read_unit(unit, filesystem, columns, batch_rows)


def _finished_manifest(out_dir: Path, fingerprint: dict) -> dict | None:
    """The manifest of a finished identical run (shards checked by header and size), if there is one."""
    path = out_dir / MANIFEST_FILE
    if not path.exists():
        return None
    manifest = read_json(path)
    if manifest.get("fingerprint") != fingerprint:
        raise InputError(f"{path}: shards from a run with different inputs or flags are here; "
                         "use another --output-dir or pass --overwrite")
    for shard in manifest["shards"]:
        if read_header(out_dir / shard["name"]) != shard["tokens"]:
            raise ShardFormatError(f"{out_dir / shard['name']}: token count differs from {path}")
    return manifest


def _shard_files(out_dir: Path, prefix: str = "*") -> list[Path]:
    return sorted(out_dir.glob(f"{prefix}_*_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))


def _refuse_unknown_shards(out_dir: Path) -> None:
    """Shards with neither our manifest nor our state file beside them (llm.c's fineweb.py output, or a run
    whose manifest was deleted) are somebody's data that nothing here can verify: never replace them."""
    if (out_dir / MANIFEST_FILE).exists() or (out_dir / STATE_FILE).exists():
        return
    if found := _shard_files(out_dir):
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise InputError(f"{out_dir}: already holds shards ({found[0].name}{more}) but no {MANIFEST_FILE} or "
                         f"{STATE_FILE} of this pipeline; use another --output-dir, or --overwrite to discard them")


def _clear_outputs(out_dir: Path, prefix: str, keep_shards: int) -> None:
    """Remove leftovers of an interrupted run: temp files and shards past the last verified one."""
    for path in out_dir.glob("*.tmp"):
        path.unlink()
    for path in _shard_files(out_dir, prefix):
        if int(path.stem.rsplit("_", 1)[1]) >= keep_shards:
            path.unlink()


def tokenize(config: TokenizeConfig) -> dict:
    """Run the job; returns the manifest (also written to OUTPUT_DIR/manifest.json)."""
    import ray

    from pipelines.cluster import connect

    started = time.time()
    out_dir = config.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = resolve_inputs(config)
    identity = tokenizer_identity()  # also seeds the offline vocab cache before the actors need it
    fingerprint = {"inputs": inputs.paths, "shard_size": config.shard_size, "prefix": config.prefix,
                   "filters": config.filters.to_dict(), "tokenizer": identity["ranks_sha256"]}
    if config.overwrite:
        for name in (MANIFEST_FILE, STATE_FILE, HASHES_FILE):
            (out_dir / name).unlink(missing_ok=True)
        _clear_outputs(out_dir, "*", keep_shards=0)
    _refuse_unknown_shards(out_dir)
    if manifest := _finished_manifest(out_dir, fingerprint):
        print(f"already complete: {len(manifest['shards'])} shards, {manifest['total_tokens']:,} tokens "
              f"in {out_dir} (use --overwrite to redo)")
        return manifest

    for column in config.filters.threshold_columns():
        if column not in inputs.columns:
            print(f"note: the {column} filter does not apply: {inputs.paths[0]} has no {column!r} column")
    stream = ShardStream(out_dir, config.prefix, config.shard_size, fingerprint, inputs.paths)
    resumed_shards = stream.load_state()
    _clear_outputs(out_dir, config.prefix, keep_shards=resumed_shards)
    if resumed_shards:
        print(f"resuming after {resumed_shards} verified shards in {out_dir}")

    connect(config.address)
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    num_workers = config.num_workers or max(1, int(cluster_cpus))
    cpus_per_worker = config.cpus_per_worker or min(1.0, (cluster_cpus - RESERVED_CPUS) / num_workers)
    dataset = build_dataset(inputs, stream.start, config, num_workers, cpus_per_worker)
    tokens_this_run = 0
    with tqdm(desc="tokenize", unit=" docs", mininterval=1.0, dynamic_ncols=True) as progress:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4):
            tokens_this_run += stream.add_batch(batch)
            progress.update(batch.num_rows)
            elapsed = max(time.time() - started, 1e-9)
            progress.set_postfix(tokens=f"{tokens_this_run:,}", tok_s=f"{tokens_this_run / elapsed:,.0f}")
    shards = stream.finish()

    total_tokens = sum(s["tokens"] for s in shards)
    dropped = dict(zip(DROP_REASONS[1:], stream.dropped[1:].tolist(), strict=True))
    wall = time.time() - started
    manifest = {
        "fingerprint": fingerprint,
        "source": config.source if config.source != "hub" else f"hf://datasets/HuggingFaceFW/fineweb-edu {config.name}",
        "inputs": inputs.paths,
        "flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "tokenizer": identity,
        "shards": shards,
        "docs": {"read": stream.docs_read, "kept": stream.docs_read - sum(dropped.values()), "dropped": dropped},
        "total_tokens": total_tokens,
        "num_workers": num_workers,
        "resumed_after_shards": resumed_shards,
        "wall_time_s": round(wall, 3),
    }
    write_json_atomically(out_dir / MANIFEST_FILE, manifest)
    for name in (STATE_FILE, HASHES_FILE):
        (out_dir / name).unlink(missing_ok=True)
    drops = ", ".join(f"{k} {v:,}" for k, v in dropped.items() if v) or "none"
    print(f"wrote {len(shards)} shards (1 val + {len(shards) - 1} train), {total_tokens:,} tokens from "
          f"{manifest['docs']['kept']:,}/{stream.docs_read:,} docs (dropped: {drops}) in {wall:.1f}s "
          f"-> {out_dir}")
    return manifest


def parse_args(argv: list[str] | None = None) -> TokenizeConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--name", default="sample-10BT", choices=FINEWEB_EDU_SAMPLES,
                        help="FineWeb-Edu sample on the Hugging Face hub (default sample-10BT)")
    source.add_argument("--input", metavar="GLOB", help="local or cloud parquet / jsonl(.gz) files instead of the hub")
    source.add_argument("--source", choices=["demo"],
                        help="demo: an offline smoke corpus built from this Python's docs (NOT FineWeb)")
    parser.add_argument("-o", "--output-dir", type=Path,
                        help="where shards go (default data/edu_fineweb10B, or data/python_docs for the demo)")
    parser.add_argument("--prefix", help="shard name prefix (default edu_fineweb; python_docs for the demo)")
    parser.add_argument("--shard-size", type=int, help="tokens per shard (default 100,000,000; 100,000 for the demo)")
    parser.add_argument("--num-workers", type=int, help="tokenizer actors (default: the cluster's CPU count)")
    parser.add_argument("--cpus-per-worker", type=float,
                        help="Ray CPUs per tokenizer actor (default: the cluster's CPUs less 0.2, shared)")
    parser.add_argument("--batch-size", type=int, default=1024, help="documents per actor call")
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
    try:
        return TokenizeConfig(source=source, name=args.name, input=args.input, output_dir=args.output_dir,
                              prefix=args.prefix, shard_size=args.shard_size, filters=filters,
                              num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
                              batch_size=args.batch_size, overwrite=args.overwrite, address=args.address)
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        tokenize(config)
    except (InputError, ShardFormatError, ValueError) as err:
        print(f"tokenize.py: error: {err}", file=sys.stderr)
        return 2
    return 0
