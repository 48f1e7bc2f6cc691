"""Where documents come from: the FineWeb-Edu hub dataset or local or cloud files (the demo corpus: demo.py).

Every source resolves to a sorted list of parquet or jsonl files plus the filesystem to read them with, so the
job has one code path and a stable document order. Every remote call here is retried (pipelines.retries), and
an error that is not transient becomes one InputError naming the file and, where known, the row or line.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.cli import InputError
from pipelines.retries import is_transient, with_retries

FINEWEB_EDU_REPO = "HuggingFaceFW/fineweb-edu"
PARQUET_SUFFIXES = (".parquet",)
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# Filter columns and their Arrow types; jsonl is parsed against these alone, so other fields never matter.
SCORE_COLUMNS = {"int_score": pa.int64(), "score": pa.float64(), "language_score": pa.float64()}
JSON_BLOCK_BYTES = 1 << 20  # Arrow's default block; a block is made bigger where one line is longer
INSPECT_THREADS = 16  # footers are tiny remote reads: latency-bound, so many at once
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, pa.ArrowException)  # what corrupt input raises

@dataclass(frozen=True)
class Piece:
    """Consecutive rows of one input file: the rows of `row_groups` after skipping `skip`, `rows` of them.
    `first_row` is the file row of the first one, for error messages. A jsonl piece has `rows` -1: the
    lines that start within `byte_range` [start, end) of the file, or the whole file if None (gzip)."""

    file: int
    row_groups: tuple[int, ...]
    skip: int
    rows: int
    first_row: int
    byte_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class InputFiles:
    paths: list[str]
    format: str  # "parquet" or "json"
    filesystem: fsspec.AbstractFileSystem
    columns: list[str]  # columns present in the first file, for the filters that depend on them
    # per file: (rows, uncompressed text bytes) of each parquet row group; one (-1, file bytes) for jsonl
    row_groups: list[list[tuple[int, int]]]
    identities: list[dict]  # per file: what tells a changed file from the one a run began with (file_identity)

    def read(self, piece: Piece, columns: list[str], batch_rows: int) -> pa.Table:
        """The piece's rows (text and the filter columns), retried while the storage fails transiently."""
        path = self.paths[piece.file]
        if self.format == "parquet":
            def read() -> pa.Table:
                return _read_parquet(self.filesystem, path, piece, columns, batch_rows)
        else:
            def read() -> pa.Table:
                return _read_json(self.filesystem, path, columns, piece.byte_range)
        table = with_retries(read, f"reading {path}")
        if (row := _first_invalid_utf8(table)) is not None:  # neither reader checks string contents
            located = _locate_json_error(self.filesystem, path, ["text"]) if self.format == "json" else None
            raise InputError(f"{path}: {located or f'row {piece.first_row + row}: text is not valid UTF-8'}")
        return table


def _first_invalid_utf8(table: pa.Table) -> int | None:
    """The row of the first text that is not valid UTF-8 (Arrow only checks it on request)."""
    offset = 0
    for chunk in table["text"].chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid as err:
            found = re.search(r"string index (\d+)", str(err))
            return offset + (int(found.group(1)) if found else 0)
        offset += len(chunk)
    return None


def _format_of(path: str) -> str:
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if path.endswith(JSON_SUFFIXES):
        return "json"
    raise InputError(f"{path}: unsupported file type (expected {', '.join(PARQUET_SUFFIXES + JSON_SUFFIXES)})")


def _open_text_lines(fs: fsspec.AbstractFileSystem, path: str):
    raw = fs.open(path, "rb")
    return gzip.open(raw) if path.endswith(".gz") else raw


def _first_json_record(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    with _open_text_lines(fs, path) as stream:
        line = stream.readline()
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: line 1 is not JSON ({getattr(err, 'msg', err)})") from err
    if not isinstance(record, dict):
        raise InputError(f"{path}: line 1 is not a JSON object")
    return record


def _check_text_type(path: str, text_type: pa.DataType) -> None:
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_null(text_type)):
        raise InputError(f"{path}: column 'text' is {text_type}, not a string")


IDENTITY_FIELDS = ("mtime", "ETag", "etag", "md5Hash", "generation", "blob_id", "LastModified", "last_modified")


def file_identity(info: dict) -> dict:
    """Size and whatever the filesystem changes when the content changes: a local file's modification time,
    an object's etag or generation, a hub file's blob id and LFS sha256."""
    identity = {"size": info.get("size")}
    identity.update({key: str(info[key]) for key in IDENTITY_FIELDS if info.get(key) is not None})
    if isinstance(info.get("lfs"), dict) and info["lfs"].get("sha256"):
        identity["sha256"] = info["lfs"]["sha256"]
    return identity


def _inspect(fs: fsspec.AbstractFileSystem, path: str, file_format: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Columns and row-group sizes, from the parquet footer or the first json line; errors name the file."""
    try:
        if file_format == "json":
            columns = list(_first_json_record(fs, path))
            row_groups = [(-1, fs.size(path))]
        else:
            with fs.open(path, "rb") as f:
                metadata = pq.ParquetFile(f).metadata
            schema = metadata.schema.to_arrow_schema()
            columns = schema.names
            text = columns.index("text") if "text" in columns else 0
            row_groups = [(metadata.row_group(i).num_rows, metadata.row_group(i).column(text).total_uncompressed_size)
                          for i in range(metadata.num_row_groups)]
    except InputError:
        raise
    except READ_ERRORS as err:
        if is_transient(err):
            raise
        raise InputError(f"{path}: unreadable ({_first_line(err)})") from err
    if "text" not in columns:
        raise InputError(f"{path}: no 'text' column (columns: {', '.join(columns) or 'none'})")
    if file_format == "parquet":
        _check_text_type(path, schema.field("text").type)
    return columns, row_groups


def _read_parquet(fs: fsspec.AbstractFileSystem, path: str, piece: Piece, columns: list[str],
                  batch_rows: int) -> pa.Table:
    with fs.open(path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except READ_ERRORS as err:
            if is_transient(err):
                raise
            raise InputError(f"{path}: unreadable ({_first_line(err)})") from err
        present = [c for c in columns if c in parquet.schema_arrow.names]
        batches, to_skip, wanted = [], piece.skip, piece.rows
        for group in piece.row_groups:  # one at a time, so that an error names its row group
            try:
                # streamed, so a piece cut from a huge row group decodes no further than its own last row
                for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=present,
                                                  use_threads=False):
                    if to_skip >= batch.num_rows:
                        to_skip -= batch.num_rows
                        continue
                    batch = batch.slice(to_skip, wanted)
                    to_skip, wanted = 0, wanted - batch.num_rows
                    batches.append(batch)
                    if wanted == 0:
                        break
            except READ_ERRORS as err:
                if is_transient(err):
                    raise
                first = sum(parquet.metadata.row_group(g).num_rows for g in range(group))
                last = first + parquet.metadata.row_group(group).num_rows - 1
                raise InputError(f"{path}: row group {group} (rows {first}-{last}): unreadable "
                                 f"({_first_line(err)})") from err
            if wanted == 0:
                break
    if wanted:
        raise InputError(f"{path}: {wanted} rows fewer than its footer says, near row {piece.first_row}")
    table = pa.Table.from_batches(batches, schema=batches[0].schema) if batches else \
        parquet.schema_arrow.empty_table().select(present)
    _check_text_type(path, table.schema.field("text").type)
    return table


def _line_start(f, offset: int) -> int:
    """Where the first line that starts at or after byte `offset` of the open file `f` starts."""
    if offset == 0:
        return 0
    f.seek(offset - 1)
    return offset - 1 + len(f.readline())


def _read_json(fs: fsspec.AbstractFileSystem, path: str, columns: list[str],
               byte_range: tuple[int, int] | None) -> pa.Table:
    import pyarrow.json as pj

    schema = pa.schema([("text", pa.string())] + [(c, SCORE_COLUMNS[c]) for c in columns if c in SCORE_COLUMNS])
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        if byte_range is None:
            with _open_text_lines(fs, path) as stream:
                lines = stream.read()
        else:
            with fs.open(path, "rb") as f:
                start, end = (_line_start(f, offset) for offset in byte_range)
                f.seek(start)
                lines = f.read(end - start)
        if not lines:  # a range inside one long line holds no line start: no rows
            return schema.empty_table()
        # Arrow parses in blocks and refuses a line longer than one: make a block hold the longest line
        block_size = max(JSON_BLOCK_BYTES, _longest_line(lines) + 1)
        return pj.read_json(pa.BufferReader(lines), parse_options=options,
                            read_options=pj.ReadOptions(block_size=block_size))
    except READ_ERRORS as err:
        if is_transient(err):
            raise
        raise InputError(f"{path}: {_locate_json_error(fs, path, schema.names) or _first_line(err)}") from err


def _longest_line(data: bytes) -> int:
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    return int(np.diff(ends, prepend=-1, append=len(data)).max())


def _locate_json_error(fs: fsspec.AbstractFileSystem, path: str, columns: list[str]) -> str | None:
    """Arrow's JSON errors count rows per block, or not at all; find the first bad line ourselves.
    None if no line is at fault (or the stream itself is corrupt, e.g. a broken gzip)."""
    try:
        return _first_bad_line(fs, path, columns)
    except READ_ERRORS:
        return None


def _first_bad_line(fs: fsspec.AbstractFileSystem, path: str, columns: list[str]) -> str | None:
    with _open_text_lines(fs, path) as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})"
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                return f"line {number}, column {err.colno}: not JSON ({err.msg})"
            if not isinstance(record, dict):
                return f"line {number}: not a JSON object"
            for column in columns:
                value = record.get(column)
                expected = str if column == "text" else (int, float)
                if value is not None and (not isinstance(value, expected) or isinstance(value, bool)):
                    return f"line {number}: '{column}' is {type(value).__name__} {json.dumps(value)[:40]}, " \
                           f"expected {'a string' if column == 'text' else 'a number'}"
    return None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)


def checked_files(fs: fsspec.AbstractFileSystem, paths: list[str]) -> InputFiles:
    formats = {_format_of(p) for p in paths}
    if len(formats) > 1:
        raise InputError(f"inputs mix parquet and json files ({paths[0]} ...): give one format per run")
    (file_format,) = formats

    def inspect(path: str) -> tuple[list[str], list[tuple[int, int]], dict]:
        columns, row_groups = with_retries(lambda: _inspect(fs, path, file_format), f"reading the footer of {path}")
        return columns, row_groups, file_identity(with_retries(lambda: fs.info(path), f"looking up {path}"))

    with ThreadPoolExecutor(min(INSPECT_THREADS, len(paths))) as pool:
        inspected = list(pool.map(inspect, paths))
    return InputFiles(
        paths=paths if _is_local(fs) else [fs.unstrip_protocol(p) for p in paths],
        format=file_format,
        filesystem=fs,
        columns=inspected[0][0],
        row_groups=[row_groups for _, row_groups, _ in inspected],
        identities=[identity for _, _, identity in inspected],
    )


def files_from_glob(pattern: str) -> InputFiles:
    """Local or fsspec (s3://, gs://, hf://, ...) glob, sorted; every file is opened once to check it."""
    if "://" in pattern:
        fs, _ = fsspec.core.url_to_fs(pattern)
        matches = sorted(with_retries(lambda: fs.glob(pattern), f"listing {pattern}"))
    else:
        fs = fsspec.filesystem("file")
        matches = sorted(str(Path(p).resolve()) for p in glob.glob(pattern, recursive=True))
    matches = [m for m in matches if not fs.isdir(m)]
    if not matches:
        raise InputError(f"--input {pattern!r} matched no files")
    return checked_files(fs, matches)


def files_from_hub(repo: str = FINEWEB_EDU_REPO, name: str = "sample-10BT", split: str = "train") -> InputFiles:
    """The data files of the hub dataset `repo`, builder config `name`, as the `datasets` library resolves
    them (the `configs:` of the dataset card, or its folder layout), e.g. FineWeb-Edu's sample-10BT ->
    sample/10BT/*.parquet; read by the job like any files. The hub is huggingface_hub's endpoint (HF_ENDPOINT,
    default huggingface.co) as the driver sees it."""
    import datasets
    from huggingface_hub import HfFileSystem, constants

    where = f"--dataset {repo} --name {name}"
    try:
        builder = with_retries(lambda: datasets.load_dataset_builder(repo, name=name), f"resolving {where}")
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{where}: cannot resolve it on the hub at {constants.ENDPOINT} ({_first_line(err)}); "
                         "use --input for local files") from err
    data_files = builder.config.data_files or {}
    found = data_files.get(split) or [f for files in data_files.values() for f in files]
    # unpinned paths (the fingerprint holds each file's blob id): the manifest names files as the hub does
    paths = sorted(re.sub(r"^hf://|@[0-9a-f]{40}(?=/)", "", str(f)) for f in found)
    if not paths:
        raise InputError(f"{where}: no data files in that config")
    # A fresh instance: the cached default one would pickle without its endpoint, and a worker that
    # unpickles it would talk to its own default hub instead.
    return checked_files(HfFileSystem(endpoint=constants.ENDPOINT, skip_instance_cache=True), paths)
