"""Files that a reader never sees half-written: write beside the target, fsync, rename over it.

Every stage hands its output to the next as files (shards, manifests, checkpoints, logs, plots), and a job
can be killed at any moment; this is the one place that knows how to replace a file safely. Targets are
local paths (also a shared filesystem mounted on every node) or fsspec URLs (s3://, gs://, ...).
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an fsspec location (scheme://...) rather than a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str | os.PathLike) -> Path:
    """A local path, also from a file:// URL."""
    return Path(str(path).removeprefix("file://"))


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PARTIAL_SUFFIX = ".raygpt2-partial"  # only atomic_write makes names ending so: only those are ever cleaned up


def partial_pattern(name: str) -> str:
    """A glob for the temp files atomic_write leaves beside `name` when it is killed mid-write."""
    return f"{name}.*{PARTIAL_SUFFIX}"


def _partial_name(name: str) -> str:
    # pid alone is not unique on a cluster: a retried task on another node may write the same target
    return f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}"


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside `path` for writing; on a clean exit it is fsynced and renamed to `path`,
    on an error it is removed and `path` is left as it was. On an object store the temp object is moved
    over the target, so the target never holds a partial upload."""
    if is_url(path):
        with _atomic_write_url(str(path), mode) as f:
            yield f
        return
    path = local_path(path)
    partial = path.with_name(_partial_name(path.name))
    try:
        with open(partial, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def _atomic_write_url(url: str, mode: str) -> Iterator[IO[Any]]:
    import fsspec

    fs, target = fsspec.core.url_to_fs(url)
    partial = _partial_name(target)
    try:
        with fs.open(partial, mode) as f:
            yield f
        fs.mv(partial, target)
    except BaseException:
        if fs.exists(partial):
            fs.rm(partial)
        raise


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """`payload` as indented JSON at `path`, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def cache_root() -> Path:
    """Where downloads are cached: $XDG_CACHE_HOME/raygpt2, or ~/.cache/raygpt2 when it is unset or empty (the
    XDG spec treats an empty value as unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raygpt2"


def fetch(url: str, destination: Path, timeout: float = 60.0) -> Path:
    """Download `url` to `destination` through a temp name, so an interrupted download is never mistaken for a
    finished one. Raises OSError (URLError, HTTPError and socket timeouts are all OSErrors)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as response, atomic_write(destination) as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    return destination


def jsonl_records(path: Path, problem_of: Callable[[Any], str | None],
                  error: Callable[[str], Exception]) -> list[tuple[int, Any]]:
    """(line number, record) for each non-blank line of a jsonl file; `error(message)` is raised, the message
    naming the file and line, for an unreadable file, bad JSON or a record `problem_of` finds fault with."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read ({err})") from err
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{number}: bad JSON ({err.msg})") from err
        if problem := problem_of(record):
            raise error(f"{path}:{number}: {problem}")
        records.append((number, record))
    if not records:
        raise error(f"{path}: no examples")
    return records
