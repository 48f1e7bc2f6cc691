"""Files that a reader never sees half-written: write beside the target, fsync, rename over it.

Every stage hands its output to the next as files (shards, manifests, checkpoints, logs, plots), and a job
can be killed at any moment; this is the one place that knows how to replace a file safely.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside `path` for writing; on a clean exit it is fsynced and renamed to `path`,
    on an error it is removed and `path` is left as it was."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
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


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """`payload` as indented JSON at `path`, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
