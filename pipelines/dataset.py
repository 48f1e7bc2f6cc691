"""The data stage as a Ray Data API: a Dataset of documents in, llm.c shards out, any stage of yours between.

    from pipelines.dataset import documents, write_shards

    ds = documents("data/raw/*.parquet", FilterConfig(min_int_score=3))   # read + the built-in filters
    ds = ds.map_batches(MyClassifier, batch_format="pyarrow", ...)        # e.g. a quality classifier
    write_shards(ds, "data/mine", prefix="mine", shard_size=100_000_000)

documents() is the job's own ReadParquet->MapBatches(Filter) (below: read tasks of similar text
bytes, whatever the files' row groups; errors naming the file and row group or line). write_shards() tokenizes
in its write tasks and each task writes its tokens into the output directory itself; the shards are then
assembled in parallel from the exact prefix-summed counts (pipelines.assemble), so no token passes through
the driver. Shards hold EOT + tokens of every document in the Dataset's order (preserve_order is set), so
they are the bytes tokenize.py writes for an input holding the same documents.

The tokenize job (pipelines.job) runs its units through these stages, as the dashboard names them:

    Read{Parquet,JSON}->MapBatches(Filter)->MapBatches(Tokenize) -> MapBatches(WriteShards)

* Read: a custom Datasource with one read task per work unit (pipelines.plan: similar text bytes, whatever the
  files' row groups); each yields its unit as one block, a `unit` column naming it.
* Filter: the built-in filters (pipelines.filters). Kept documents go on; the dropped ones go on as one tally
  row per reason (`docs` documents dropped for `reason`), so that the counts per reason reach the unit's
  counters and a unit never vanishes, even with nothing kept or nothing read.
* Tokenize: an actor pool, one GPT-2 encoder per actor (pipelines.encode); each actor writes its units' tokens
  into -o itself and passes on only the unit's counters, one row. Read and Filter ask for the same resources,
  so Ray Data fuses the three: each actor reads, filters and encodes its units.
* WriteShards: one actor holding the ShardAssembler (pipelines.assemble), which launches the Ray tasks that
  assemble shards as soon as the units they cover are done; its last call waits for every shard.

An input error (a bad file, row group or line) travels down the stages as a row naming it, which the driver
reports as one line: raised inside a Ray Data worker it would end the job with a long trace.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import ray
from ray.data import DataContext, Dataset, Datasink
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask, WriteResult

from pipelines.assemble import ShardAssembler, assemble_shards
from pipelines.encode import UnitEncoder
from pipelines.filters import DROP_REASONS, FilterConfig, document_columns, drop_reasons
from pipelines.plan import WorkUnit, layout_shards, plan_units, unit_bytes_for
from pipelines.shards import MAX_SHARD_TOKENS, TOKEN_DTYPE, ShardFormatError, prefix_problem
from pipelines.sources import InputError, InputFiles, files_from_glob
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding
from pipelines.workdir import MANIFEST_FILE, PARTS_DIR, OutputDir, claimed, shard_pattern, unit_file

ASSEMBLE_SHARDS_PER_TASK = 4


# ---- the job's stages ----------------------------------------------------------------------------------------

# Columns beside the documents' own: the unit a row belongs to, how many input documents it stands for (1 for
# a document, n for a tally row, 0 for a unit's placeholder), why they were dropped (0: kept), an input error.
UNIT, DOCS, REASON, ERROR = "unit", "docs", "reason", "error"


def _rows_like(table_or_schema: pa.Table | pa.Schema, count: int, **columns: pa.Array) -> pa.Table:
    """`count` rows with the given columns, every other column of the schema null."""
    schema = table_or_schema if isinstance(table_or_schema, pa.Schema) else table_or_schema.schema
    return pa.table({field.name: columns.get(field.name, pa.nulls(count, field.type)) for field in schema},
                    schema=schema)


class UnitSource(Datasource):
    """One read task per work unit, yielding the unit's documents as one block."""

    def __init__(self, inputs: InputFiles, columns: list[str], units: list[WorkUnit], batch_rows: int):
        self.inputs = inputs
        self.columns = columns  # text and the filter columns that exist
        self.units = units
        self.batch_rows = batch_rows

    def get_name(self) -> str:
        return "Parquet" if self.inputs.format == "parquet" else "JSON"

    def estimate_inmemory_data_size(self) -> int:
        return sum(unit.text_bytes for unit in self.units)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: DataContext | None = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(self._read_unit, unit),
                         BlockMetadata(num_rows=None, size_bytes=unit.text_bytes, exec_stats=None,
                                       input_files=tuple(self.inputs.paths[p.file] for p in unit.pieces)),
                         per_task_row_limit=per_task_row_limit)
                for unit in self.units]

    def _read_unit(self, unit: WorkUnit) -> Iterable[pa.Table]:
        try:
            tables = [self.inputs.read(piece, self.columns, self.batch_rows) for piece in unit.pieces]
        except (InputError, ShardFormatError) as err:
            yield pa.table({UNIT: pa.array([unit.index], pa.int32()), DOCS: pa.array([0], pa.int32()),
                            ERROR: pa.array([str(err)], pa.string()), "text": pa.nulls(1, pa.string())})
            return
        table = pa.concat_tables(tables, promote_options="permissive").select(self.columns)
        docs = np.ones(table.num_rows, np.int32)
        if table.num_rows == 0:  # a piece of jsonl with no line starting in it: a placeholder keeps the unit
            table, docs = _rows_like(table, 1), np.zeros(1, np.int32)
        rows = table.num_rows
        yield table.append_column(UNIT, pa.array(np.full(rows, unit.index, np.int32))) \
            .append_column(DOCS, pa.array(docs)).append_column(ERROR, pa.nulls(rows, pa.string()))


class Filter:
    """map_batches on tasks: a unit's kept documents, then one tally row per reason documents were dropped.
    With tallies=False (pipelines.dataset's documents()) only the kept documents' own columns, and an input
    error is raised."""

    def __init__(self, filters: FilterConfig, tallies: bool = True):
        self.filters = filters
        self.tallies = tallies

    def __call__(self, table: pa.Table) -> pa.Table:
        if table[ERROR].null_count < table.num_rows:
            if not self.tallies:
                raise InputError(table[ERROR].drop_null()[0].as_py())
            return table.append_column(REASON, pa.array(np.zeros(table.num_rows, np.int8)))
        docs = table[DOCS].to_numpy()
        reasons = drop_reasons(table, self.filters)
        reasons[docs == 0] = 0  # a placeholder stands for no document
        kept = (reasons == 0) & (docs == 1)
        if not self.tallies:
            return table.filter(pa.array(kept)).drop_columns([UNIT, DOCS, ERROR])
        tally = np.bincount(reasons, weights=docs, minlength=len(DROP_REASONS)).astype(np.int32)
        dropped = [reason for reason in range(1, len(DROP_REASONS)) if tally[reason]]
        parts = [table.filter(pa.array(kept)).append_column(REASON, pa.array(np.zeros(kept.sum(), np.int8)))]
        schema = parts[0].schema
        if dropped:
            parts.append(_rows_like(schema, len(dropped), **{
                UNIT: pa.array(np.full(len(dropped), table[UNIT][0].as_py(), np.int32)),
                DOCS: pa.array(tally[dropped]), REASON: pa.array(np.asarray(dropped, np.int8))}))
        elif not kept.any():  # nothing read at all: the placeholder goes on
            parts.append(_rows_like(schema, 1, **{UNIT: table[UNIT].slice(0, 1).combine_chunks(),
                                                  DOCS: pa.array([0], pa.int32()), REASON: pa.array([0], pa.int8())}))
        return pa.concat_tables(parts)


def _outcome(counters: list[str], errors: list[str]) -> dict[str, np.ndarray]:
    return {"counters": np.array(counters, dtype=object), ERROR: np.array(errors, dtype=object)}


class Tokenize:
    """map_batches on an actor pool: a unit's filtered documents in, its counters out (its tokens go to -o)."""

    def __init__(self, out: OutputDir, dedup: bool):
        self.encoder = UnitEncoder(out, dedup)

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        errors = table[ERROR].drop_null().to_pylist()
        if errors:
            return _outcome([""], errors[:1])
        unit = table[UNIT][0].as_py()
        docs, reasons = table[DOCS].to_numpy(), table[REASON].to_numpy()
        dropped = np.bincount(reasons, weights=docs, minlength=len(DROP_REASONS)).astype(np.int64)
        texts = table["text"].filter(pa.array((reasons == 0) & (docs == 1))).to_pylist()
        counters = self.encoder.encode_unit(unit, texts, int(docs.sum()), dropped)
        return _outcome([json.dumps({**counters, "encoded_at": time.time()})], [""])


class WriteShards:
    """map_batches on one actor: units' counters in, shards written as their units are done; passes the
    counters on. The call that brings the last unit writes every remaining shard before it returns."""

    def __init__(self, assembler_args: dict):
        self.assembler = ShardAssembler(**assembler_args)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if any(batch[ERROR]):
            return _outcome([""], [next(e for e in batch[ERROR] if e)])
        try:
            for counters in batch["counters"]:
                self.assembler.add(json.loads(counters))
            if self.assembler.all_units_done:
                self.assembler.finish()
        except (InputError, ShardFormatError) as err:
            return _outcome([""], [str(err)])
        return _outcome(list(batch["counters"]), [""] * len(batch["counters"]))


# ---- the API ---------------------------------------------------------------------------------------------------


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
    return ray.data.read_datasource(UnitSource(inputs, document_columns(inputs.columns, filters), units, batch_rows)) \
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
    if why := prefix_problem(prefix):
        raise InputError(f"write_shards(): prefix {prefix!r}: {why}")
    out = OutputDir(output_dir)
    out.check_directory()
    out.makedirs()
    # a directory holding no shards yet can still be another writer's, just started
    with claimed(out, "write_shards(): output_dir"):
        if out.exists(MANIFEST_FILE) or out.glob(shard_pattern()):
            raise InputError(f"{out}: already holds shards; write_shards() writes into a fresh directory")
        ds.context.execution_options.preserve_order = True  # the shards hold the Dataset's order
        sink = ShardSink(out, prefix, shard_size)
        ds.write_datasink(sink)
    return sink.manifest
