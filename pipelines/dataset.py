"""The data stage as a Ray Data API: a Dataset of documents in, llm.c shards out, any stage of yours between.

    from pipelines.dataset import documents, write_shards

    ds = documents("data/raw/*.parquet", FilterConfig(min_int_score=3))   # read + the built-in filters
    ds = ds.map_batches(MyClassifier, batch_format="pyarrow", ...)        # e.g. a quality classifier
    write_shards(ds, "data/mine", prefix="mine", shard_size=100_000_000)

documents() is the job's own ReadParquet->MapBatches(Filter) (pipelines.stages: read tasks of similar text
bytes, whatever the files' row groups; errors naming the file and row group or line). write_shards() tokenizes
in its write tasks and each task writes its tokens into the output directory itself; the shards are then
assembled in parallel from the exact prefix-summed counts (pipelines.assemble), so no token passes through
the driver. Shards hold EOT + tokens of every document in the Dataset's order (preserve_order is set), so
they are the bytes tokenize.py writes for an input holding the same documents.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import ray
from ray.data import DataContext, Dataset, Datasink
from ray.data.datasource import WriteResult

from pipelines.assemble import assemble_shards
from pipelines.filters import FilterConfig
from pipelines.plan import layout_shards, plan_units, unit_bytes_for
from pipelines.shards import MAX_SHARD_TOKENS, TOKEN_DTYPE
from pipelines.sources import InputError, files_from_glob
from pipelines.stages import Filter, UnitSource, document_columns
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding
from pipelines.workdir import MANIFEST_FILE, PARTS_DIR, OutputDir, shard_pattern, unit_file

ASSEMBLE_SHARDS_PER_TASK = 4


def documents(input: str, filters: FilterConfig | None = None, unit_bytes: int | None = None,
              batch_rows: int = 1024) -> Dataset:
    """The documents of local or fsspec files (parquet or jsonl, a glob) after the built-in filters, in input
    order, as a Dataset with a `text` column (and the score columns the filters use). --dedup needs the
    whole input and is tokenize.py's: refused here."""
    filters = filters or FilterConfig()
    if filters.dedup:
        raise InputError("documents(): dedup is done by tokenize.py --dedup, not per Dataset")
    inputs = files_from_glob(input)
    units = plan_units(inputs, unit_bytes or unit_bytes_for(inputs, int(ray.cluster_resources().get("CPU", 1))))
    DataContext.get_current().execution_options.preserve_order = True  # input order, whatever finishes first
    return ray.data.read_datasource(UnitSource(inputs, document_columns(inputs, filters), units, batch_rows)) \
        .map_batches(Filter(filters, tallies=False), batch_size=None, batch_format="pyarrow")


class ShardSink(Datasink):
    """Each write task tokenizes its blocks and writes tokenize_parts/unit_{task}.tokens; on completion the
    shards are assembled from the tasks' exact counts, in task order (the Dataset's order)."""

    def __init__(self, out: OutputDir, prefix: str, shard_size: int):
        self.out = out
        self.prefix = prefix
        self.shard_size = shard_size
        self.manifest: dict | None = None

    def get_name(self) -> str:
        return "LlmcShards"

    def on_write_start(self, schema=None) -> None:
        self.out.makedirs(PARTS_DIR)

    def write(self, blocks: Iterable, ctx) -> dict:
        encode = functools.partial(gpt2_encoding().encode_to_numpy, disallowed_special=())
        eot = np.array([EOT_TOKEN], dtype=np.uint32)
        pieces, docs = [], 0
        for block in blocks:
            texts = pa.table(block)["text"].to_pylist()
            docs += len(texts)
            for text in texts:
                pieces += (eot, encode(text))
        tokens = np.concatenate(pieces, dtype=TOKEN_DTYPE, casting="unsafe") if pieces else np.zeros(0, TOKEN_DTYPE)
        with self.out.write(unit_file(ctx.task_idx, "tokens")) as f:
            f.write(tokens)
        return {"task": ctx.task_idx, "tokens": int(tokens.size), "docs": docs}

    def on_write_complete(self, write_result: WriteResult) -> None:
        parts = sorted(write_result.write_returns, key=lambda part: part["task"])
        plans = layout_shards([part["tokens"] for part in parts], self.shard_size)
        if not plans:
            raise InputError("write_shards(): no tokens to write: the Dataset holds no documents")
        task_of = [part["task"] for part in parts]  # shard plans count units by position; files by task
        plans = [plan.__class__(plan.index, plan.tokens, tuple((task_of[u], s, e) for u, s, e in plan.ranges))
                 for plan in plans]
        assemble = ray.remote(assemble_shards)
        groups = [plans[i:i + ASSEMBLE_SHARDS_PER_TASK] for i in range(0, len(plans), ASSEMBLE_SHARDS_PER_TASK)]
        shards = [entry for written in ray.get([assemble.remote(self.out, self.prefix, group) for group in groups])
                  for entry in written]
        self.manifest = {"shards": shards, "total_tokens": sum(s["tokens"] for s in shards),
                         "docs": sum(part["docs"] for part in parts)}
        self.out.write_json(MANIFEST_FILE, self.manifest)
        self.out.remove(PARTS_DIR)


def write_shards(ds: Dataset, output_dir: str, prefix: str = "shard", shard_size: int = 100_000_000) -> dict:
    """Tokenize the `text` column of `ds` into llm.c shards in `output_dir` (a fresh directory or URL);
    returns the manifest (also written as output_dir/manifest.json)."""
    if not 1 <= shard_size <= MAX_SHARD_TOKENS:
        raise InputError(f"shard_size must be from 1 to {MAX_SHARD_TOKENS:,}, got {shard_size:,}")
    out = OutputDir(output_dir)
    out.check_directory()
    if out.exists(MANIFEST_FILE) or out.glob(shard_pattern()):
        raise InputError(f"{out}: already holds shards; write_shards() writes into a fresh directory")
    ds.context.execution_options.preserve_order = True  # the shards hold the documents in the Dataset's order
    sink = ShardSink(out, prefix, shard_size)
    ds.write_datasink(sink)
    return sink.manifest
