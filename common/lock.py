"""One live writer per output directory: a lock file in it, made by an exclusive create.

Training's run directory (gpt2.rundir) and the tokenize job's -o (pipelines.workdir) each hold it while they
write, so a second command into the same directory (a job submitted twice, a run started again in another
terminal) is refused instead of deleting or overwriting the first one's files. A lock whose process is gone
from this host is stale and taken over; one left by a process on another host cannot be checked from here,
and its error says which file to delete.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

LOCK_NAME = ".raygpt2.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def held_by(record: dict[str, Any] | None) -> str:
    """Who holds a lock, for messages."""
    record = record or {}
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"


class DirectoryLock:
    """The lock of `directory`, a path on the fsspec filesystem `fs` (local or an object store)."""

    def __init__(self, fs: Any, directory: str):
        self.fs = fs
        self.path = f"{directory.rstrip('/')}/{LOCK_NAME}"
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        """The lock's record when a live writer holds it; None when free (or the lock is stale)."""
        try:
            record = json.loads(self.fs.cat_file(self.path))
        except (OSError, ValueError):  # none, or one cut short by a crash while it was being written
            return None
        if not isinstance(record, dict):
            return None
        if record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", 0))):
            return None
        return record

    def acquire(self) -> bool:
        """Take the lock; False when a live writer holds it. Raises OSError when the directory cannot take it."""
        try:
            self._write()
        except FileExistsError:
            if self.holder() is not None:
                return False
            print(f"note: {self.path}: stale lock of a process that no longer runs; taken over", flush=True)
            self.fs.rm_file(self.path)
            self._write()
        self.held = True
        return True

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.fs.rm_file(self.path)
            except OSError:
                pass  # a directory gone or turned read-only under the writer: the next one finds a stale lock

    def _write(self) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with self.fs.open(self.path, "xb") as f:  # exclusive: of two writers, one gets it
            f.write(json.dumps(record).encode())
