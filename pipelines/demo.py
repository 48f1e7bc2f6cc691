"""The offline smoke corpus (NOT FineWeb): real English prose found on any machine, as a few parquet files."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from common.files import atomic_write
from pipelines.sources import InputFiles, checked_files

DEMO_FILES = 4


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
            table = pa.Table.from_pylist(part, schema=pa.schema([("id", pa.string()), ("text", pa.string())]))
            with atomic_write(path) as f:
                pq.write_table(table, f, row_group_size=256)  # small row groups, as real dumps often have
    return checked_files(fsspec.filesystem("file"), [str(p.resolve()) for p in paths])
