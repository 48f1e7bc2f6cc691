"""Where documents come from: the FineWeb-Edu hub dataset, local or cloud files, or the offline demo corpus.

Every source resolves to a sorted list of parquet or jsonl files plus the filesystem to read them with, so the
Ray Data job has one code path and a stable document order.
"""

from __future__ import annotations

import ast
import glob
import gzip
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

FINEWEB_EDU_REPO = "HuggingFaceFW/fineweb-edu"
FINEWEB_EDU_SAMPLES = ("sample-10BT", "sample-100BT", "sample-350BT")
PARQUET_SUFFIXES = (".parquet",)
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
DEMO_FILES = 4


class InputError(ValueError):
    """Unusable input; the message names the file or flag."""


@dataclass(frozen=True)
class InputFiles:
    paths: list[str]
    format: str  # "parquet" or "json"
    filesystem: fsspec.AbstractFileSystem
    columns: list[str]  # columns present in the first file, for the filters that depend on them
    row_groups: list[list[int]]  # rows in each parquet row group, per file; [] for json files

    def read_units(self) -> list[dict]:
        """The job's units of reading, in document order: a parquet row group, or a whole json file.

        Each knows its first row, so the job can tell exactly which document every token came from.
        """
        units = []
        for file, path in enumerate(self.paths):
            if self.format == "json":
                units.append({"file": file, "path": path, "row_group": -1, "first_row": 0, "rows": -1})
                continue
            first_row = 0
            for row_group, rows in enumerate(self.row_groups[file]):
                units.append({"file": file, "path": path, "row_group": row_group, "first_row": first_row,
                              "rows": rows})
                first_row += rows
        return units


def _format_of(path: str) -> str:
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if path.endswith(JSON_SUFFIXES):
        return "json"
    raise InputError(f"{path}: unsupported file type (expected {', '.join(PARQUET_SUFFIXES + JSON_SUFFIXES)})")


def _first_json_record(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    with fs.open(path, "rb") as raw:
        stream = gzip.open(raw) if path.endswith(".gz") else raw
        line = stream.readline()
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: line 1 is not JSON ({err.msg})") from err
    if not isinstance(record, dict):
        raise InputError(f"{path}: line 1 is not a JSON object")
    return record


def _inspect(fs: fsspec.AbstractFileSystem, path: str, file_format: str) -> tuple[list[str], list[int]]:
    """Columns and row-group sizes, from the parquet footer or the first json line; errors name the file."""
    row_groups: list[int] = []
    try:
        if file_format == "parquet":
            with fs.open(path, "rb") as f:
                metadata = pq.ParquetFile(f).metadata
                columns = metadata.schema.to_arrow_schema().names
                row_groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        else:
            columns = list(_first_json_record(fs, path))
    except InputError:
        raise
    except (OSError, pa.ArrowException, EOFError) as err:
        raise InputError(f"{path}: unreadable ({err})") from err
    if "text" not in columns:
        raise InputError(f"{path}: no 'text' column (columns: {', '.join(columns) or 'none'})")
    return columns, row_groups


def read_unit(unit: dict, filesystem: fsspec.AbstractFileSystem, columns: list[str], batch_rows: int):
    """Yield a read unit's documents as Arrow tables of at most batch_rows rows, tagged with file and row."""
    path = unit["path"]
    try:
        with filesystem.open(path, "rb") as f:
            if unit["row_group"] >= 0:
                table = pq.ParquetFile(f).read_row_group(unit["row_group"], columns=columns)
            else:
                import pyarrow.json as pj

                table = pj.read_json(gzip.open(f) if path.endswith(".gz") else f)
    except (OSError, pa.ArrowException, EOFError) as err:
        raise InputError(f"{path}: unreadable ({err})") from err
    if "text" not in table.column_names:
        raise InputError(f"{path}: no 'text' column (columns: {', '.join(table.column_names) or 'none'})")
    table = table.select([c for c in columns if c in table.column_names])
    rows = pa.array(range(unit["first_row"], unit["first_row"] + table.num_rows), type=pa.int64())
    table = table.append_column("file", pa.array([unit["file"]] * table.num_rows, type=pa.int32()))
    table = table.append_column("row", rows)
    for start in range(0, table.num_rows, batch_rows):
        yield table.slice(start, batch_rows)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)


def _checked(fs: fsspec.AbstractFileSystem, paths: list[str]) -> InputFiles:
    formats = {_format_of(p) for p in paths}
    if len(formats) > 1:
        raise InputError(f"inputs mix parquet and json files ({paths[0]} ...): give one format per run")
    (file_format,) = formats
    inspected = [_inspect(fs, p, file_format) for p in paths]
    return InputFiles(
        paths=paths if _is_local(fs) else [fs.unstrip_protocol(p) for p in paths],
        format=file_format,
        filesystem=fs,
        columns=inspected[0][0],
        row_groups=[row_groups for _, row_groups in inspected],
    )


def files_from_glob(pattern: str) -> InputFiles:
    """Local or fsspec (s3://, gs://, hf://, ...) glob, sorted; every file is opened once to check it."""
    if "://" in pattern:
        fs, _ = fsspec.core.url_to_fs(pattern)
        matches = sorted(fs.glob(pattern))
    else:
        fs = fsspec.filesystem("file")
        matches = sorted(str(Path(p).resolve()) for p in glob.glob(pattern, recursive=True))
    matches = [m for m in matches if not fs.isdir(m)]
    if not matches:
        raise InputError(f"--input {pattern!r} matched no files")
    return _checked(fs, matches)


def files_from_hub(name: str, repo: str = FINEWEB_EDU_REPO) -> InputFiles:
    """The parquet files of a FineWeb-Edu sample (e.g. sample-10BT -> sample/10BT/*.parquet) on the hub."""
    from huggingface_hub import HfFileSystem

    if not name.startswith("sample-"):
        raise InputError(f"--name {name!r}: expected one of {', '.join(FINEWEB_EDU_SAMPLES)}")
    fs = HfFileSystem()
    folder = f"datasets/{repo}/sample/{name.removeprefix('sample-')}"
    try:
        matches = sorted(fs.glob(f"{folder}/*.parquet"))
    except OSError as err:
        raise InputError(f"hf://{folder}: cannot list the hub dataset ({err}); use --input for local files") from err
    if not matches:
        raise InputError(f"hf://{folder}: no parquet files (check --name)")
    return _checked(fs, matches)


def python_docs_documents() -> list[dict[str, str]]:
    """Real English prose found on any machine: the installed Python's help topics and stdlib docstrings."""
    from pydoc_data.topics import topics

    documents = [{"id": f"pydoc:{name}", "text": topics[name]} for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skipped_dirs = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    for path in sorted(stdlib.rglob("*.py")):
        if skipped_dirs.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(stdlib).with_suffix("").parts)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    documents.append({"id": f"{module}:{getattr(node, 'name', '')}", "text": docstring})
    return documents


def files_from_demo(directory: Path) -> InputFiles:
    """Write the smoke corpus (NOT FineWeb) as a few parquet files once, then read it like any input."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"python_docs_{i:02d}.parquet" for i in range(DEMO_FILES)]
    if not all(p.exists() for p in paths):
        documents = python_docs_documents()
        per_file = -(-len(documents) // DEMO_FILES)
        for i, path in enumerate(paths):
            part = documents[i * per_file:(i + 1) * per_file]
            partial = path.with_name(path.name + ".tmp")
            table = pa.Table.from_pylist(part, schema=pa.schema([("id", pa.string()), ("text", pa.string())]))
            pq.write_table(table, partial, row_group_size=256)  # small row groups: reads split into many blocks
            partial.replace(path)
    return _checked(fsspec.filesystem("file"), [str(p.resolve()) for p in paths])
