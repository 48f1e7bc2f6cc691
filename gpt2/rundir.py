"""The training run directory (`-o` of training/train.py and training/run.py): the one module that names what
is in it, claims it for one writer, and cleans only what it recognises as the product's.

    RUN/
      main.log                          llm.c's log (gpt2/mainlog.py writes it)
      ckpt_XXXXXXXX/                    checkpoint after X steps: model.pt optimizer.pt rng.pt state.json
      .ckpt_XXXXXXXX.raygpt2-*          a checkpoint being written or swapped out (gpt2/checkpoint.py)
      hellaswag.jsonl                   run.py -h 1's eval records
      core.jsonl                        run.py --core-every's eval records
      summary.json                      run.py's end-of-run summary
      main.png                          training/plot.py's default plot
      checkpoint_manager_snapshot.json  Ray Train's list of the checkpoints it registered (run.py)
      .validate_storage_marker          Ray Train's probe that every node sees the storage
      .raygpt2.lock                     the live writer: pid, host and start time

The run directory is a local path or an fsspec URL (file://, s3://, gs://); both are checked the same way
here. A URL -o is written from a staging directory private to the run (`make_staging`), which is never read
back as the run's state: a resume reads the real -o.

A new run (no -y 1) refuses a used directory unless --overwrite says to discard it; --overwrite deletes only
after every check passed, and only the entries above, so a user's own files in -o survive it. A second live
writer is refused by the lock (common.lock); a lock whose process is gone from this host is stale and taken
over.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.files import is_url
from common.lock import DirectoryLock, held_by

MAIN_LOG = "main.log"
HELLASWAG_RECORDS = "hellaswag.jsonl"
CORE_RECORDS = "core.jsonl"
SUMMARY = "summary.json"
PLOT = "main.png"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
RAY_STORAGE_MARKER = ".validate_storage_marker"
MODEL_PART, OPTIMIZER_PART, RNG_PART = "model.pt", "optimizer.pt", "rng.pt"
CHECKPOINT_PARTS = (MODEL_PART, OPTIMIZER_PART, RNG_PART)
CHECKPOINT_STATE = "state.json"
RUN_LOGS = (MAIN_LOG, HELLASWAG_RECORDS, CORE_RECORDS)  # a URL -o gets them with every checkpoint
# Files that say "a run wrote here" when not empty; the plot and Ray's marker do not make a run.
RUN_RECORDS = (MAIN_LOG, HELLASWAG_RECORDS, CORE_RECORDS, SUMMARY, RAY_SNAPSHOT)
PRODUCT_FILES = (*RUN_RECORDS, PLOT, RAY_STORAGE_MARKER)
_CHECKPOINT = re.compile(r"^ckpt_(\d{8})$")
_CHECKPOINT_TEMP = re.compile(r"^\.ckpt_\d{8}\.raygpt2-(partial|old)-[0-9a-f-]+$")
STAGING_PREFIX = "raygpt2-staging-"


class RunDirError(ValueError):
    """A run directory this run may not use as asked; the message names -o and what to do."""


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / checkpoint_name(step)


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint directory's name, None for any other name."""
    match = _CHECKPOINT.match(name)
    return int(match[1]) if match else None


def checkpoint_temp_dir(final: Path, kind: str) -> Path:
    """A unique name beside checkpoint directory `final` for its `kind` ("partial": being written, "old": being
    replaced); named so that only this module's cleaning recognises it."""
    return final.with_name(f".{final.name}.raygpt2-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories in the local `run_dir`, oldest first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p.name) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p.name))


def make_staging() -> Path:
    """A fresh local directory, readable by this user only, that a URL -o's rank 0 writes into before each
    upload. Unique per run, so nothing another run or user left can be taken for this run's state."""
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX))


class RunDir:
    """One run directory, local or URL, as given to `flag`."""

    def __init__(self, location: str, flag: str = "-o"):
        import fsspec

        self.location, self.flag = location.rstrip("/") or location, flag
        self.fs, self.root = fsspec.core.url_to_fs(self.location)
        self.local = not is_url(location)
        self.lock = DirectoryLock(self.fs, self.root)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _fail(self, why: str) -> RunDirError:
        return RunDirError(f"{self.flag} {self.location}: {why}")

    def _entries(self) -> dict[str, dict[str, Any]]:
        """{name: fsspec info} of what the directory holds; {} when it does not exist."""
        try:
            if not self.fs.exists(self.root):
                return {}
            if not self.fs.isdir(self.root):
                raise self._fail("exists and is not a directory")
            return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry
                    for entry in self.fs.ls(self.root, detail=True)}
        except OSError as err:
            raise self._fail(f"cannot be read ({err})") from err

    def _size(self, entry: dict[str, Any]) -> int:
        return entry.get("size") or 0

    def earlier_run(self) -> list[str]:
        """What an earlier run left here (for messages): its records and checkpoints; [] for an unused -o."""
        entries = self._entries()
        checkpoints = [name for name in entries if checkpoint_step(name) is not None]
        held = [name for name in RUN_RECORDS if name in entries and self._size(entries[name])]
        return held + ([f"{len(checkpoints)} checkpoint(s)"] if checkpoints else [])

    def _not_ours(self, name: str, entry: dict[str, Any]) -> str | None:
        """Why --overwrite must not delete entry `name`, for entries that look like the product's; None: ours."""
        if entry.get("islink"):
            return f"{name} is a symbolic link, not a checkpoint this program wrote"
        if checkpoint_step(name) is None:
            return None
        if entry["type"] != "directory":
            return f"{name} is not a checkpoint directory"
        inside = {e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.path(name), detail=False)}
        foreign = sorted(inside - {*CHECKPOINT_PARTS, CHECKPOINT_STATE})
        return f"{name} holds files a checkpoint does not ({', '.join(foreign[:3])})" if foreign else None

    def _product_entries(self) -> dict[str, dict[str, Any]]:
        entries = self._entries()
        return {name: entry for name, entry in entries.items()
                if name in PRODUCT_FILES or checkpoint_step(name) is not None or _CHECKPOINT_TEMP.match(name)}

    def check(self, resume: bool, overwrite: bool) -> None:
        """Everything that can refuse this run, before anything is written: a live writer, an earlier run
        (without -y 1 or --overwrite), and, for --overwrite, any entry it could not tell for the product's."""
        if not self.lock.held and (holder := self.lock.holder()):
            raise self._fail(f"in use by a live run ({held_by(holder)}); wait for it, or if it is dead delete "
                             f"{self.lock.path}")
        if CHECKPOINT_STATE in self._entries():
            raise self._fail("is a checkpoint directory; give the run directory that holds it (or a new one)")
        if resume:
            return
        held = self.earlier_run()
        if not held:
            return
        if not overwrite:
            raise self._fail(f"holds an earlier run ({', '.join(held)}); continue it with -y 1, or pass "
                             "--overwrite to discard it and start over")
        for name, entry in self._product_entries().items():
            if why := self._not_ours(name, entry):
                raise self._fail(f"--overwrite: {why}; move it away first (nothing was deleted)")

    def _lock(self) -> None:
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            if not self.lock.acquire():  # won by a writer that started after our check
                raise self._fail("taken by another run that started at the same time")
        except OSError as err:
            raise self._fail(f"cannot be written ({type(err).__name__}: {err})") from err

    @contextmanager
    def claimed(self, resume: bool, overwrite: bool) -> Iterator[RunDir]:
        """Check, take the lock, and with --overwrite (no -y 1) discard the earlier run; the lock is released
        on leaving. Call once every other input of the run has been checked: this is the first write."""
        self.check(resume, overwrite)
        self._lock()
        try:
            self.check(resume, overwrite)  # again under the lock: a run may have finished here meanwhile
            if overwrite and not resume:
                self._discard_earlier_run()
            yield self
        finally:
            self.lock.release()

    def _discard_earlier_run(self) -> None:
        for name, entry in self._product_entries().items():
            try:
                if entry["type"] == "directory":
                    self.fs.rm(self.path(name), recursive=True)
                else:
                    self.fs.rm_file(self.path(name))
            except OSError as err:
                raise self._fail(f"--overwrite: cannot delete {name} ({err})") from err

    def snapshot_checkpoints(self) -> tuple[list[str], str | None]:
        """(checkpoint names Ray Train's snapshot registered, the latest of them); ([], None) without one."""
        try:
            snapshot = json.loads(self.fs.cat_file(self.path(RAY_SNAPSHOT)))
        except FileNotFoundError:
            return [], None
        except (OSError, ValueError) as err:
            raise self._fail(f"{RAY_SNAPSHOT}: unreadable ({err})") from err
        names = [result.get("checkpoint_dir_name") for result in snapshot.get("checkpoint_results") or []]
        latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        return [name for name in names if name], latest

    def latest_checkpoint(self) -> str | None:
        """Name of the checkpoint a -y 1 resume of run.py continues from: Ray's latest registered one, else the
        highest step here."""
        registered, latest = self.snapshot_checkpoints()
        missing = [name for name in registered if name not in self._entries()]
        if missing:
            raise self._fail(f"-y 1: {RAY_SNAPSHOT} registers {', '.join(missing[:3])}, missing from this "
                             "directory; continue from a checkpoint that is there with --resume-from, or start "
                             "over with --overwrite")
        if latest:
            return latest
        steps = sorted(step for name in self._entries() if (step := checkpoint_step(name)) is not None)
        return checkpoint_name(steps[-1]) if steps else None

    def read_text(self, name: str) -> str:
        return self.fs.cat_file(self.path(name)).decode()
