"""The tokenize job's output directory (-o): final shards and manifest, and the work in progress.

    manifest.json                        written last: the run is complete
    {prefix}_{val|train}_{i:06d}.bin     the shards
    tokenize_state.json                  written once when a run starts: its fingerprint and work units
    tokenize_parts/unit_{u:06d}.tokens   one unit's kept documents, EOT first, as uint16 (deleted once in shards)
    tokenize_parts/unit_{u:06d}.json     ... its counters; written after the tokens, so it marks the unit done
    tokenize_parts/unit_{u:06d}.hashes.npy          --dedup: hash and length of each of its documents
    tokenize_parts/duplicates_{p:05d}.npy           --dedup: (unit, doc) repeating an earlier text, per partition
    tokenize_parts/shards_{i:06d}-{j:06d}.json      shards i..j are written: names, token counts, sha256

Every file is written whole or not at all (common.files), each by the task that produced it, so a
killed job is resumed by looking at what exists; no file is ever rewritten as the job progresses.
-o is a local directory (on a multi-node cluster: a filesystem every node mounts at the same path) or an
fsspec URL (s3://, gs://, ...), since the workers, not the driver, write into it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import fsspec

from common.files import atomic_write, is_url, local_path, partial_pattern, write_json
from common.lock import DirectoryLock, held_by
from pipelines.plan import WorkUnit
from pipelines.shards import ShardFormatError, read_header
from pipelines.sources import InputError

MANIFEST_FILE = "manifest.json"
STATE_FILE = "tokenize_state.json"
PARTS_DIR = "tokenize_parts"
STATE_VERSION = 2  # version 1 state files (one ordered writer) cannot be resumed by this code


def shard_pattern(prefix: str = "*") -> str:
    """A glob for the shards named by pipelines.shards.shard_name with `prefix`."""
    return f"{prefix}_*_[0-9][0-9][0-9][0-9][0-9][0-9].bin"


def unit_file(unit: int, kind: str) -> str:
    """kind: tokens | json | hashes.npy"""
    return f"{PARTS_DIR}/unit_{unit:06d}.{kind}"


def shard_record_file(first: int, last: int) -> str:
    return f"{PARTS_DIR}/shards_{first:06d}-{last:06d}.json"


class OutputDir:
    """A directory addressed by name, on the local disk or behind an fsspec URL; picklable for workers."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location).rstrip("/") if is_url(location) else str(local_path(location))

    def __reduce__(self):
        return OutputDir, (self.location,)

    def __str__(self) -> str:
        return self.location

    @cached_property
    def _fs_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(self.location)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_root[0]

    def path(self, name: str = "") -> str:
        """Where `name` lives, as a local path or a URL (what common.files and pyarrow accept)."""
        return f"{self.location}/{name}" if name else self.location

    def _target(self, name: str) -> str:
        root = self._fs_root[1]
        return f"{root}/{name}" if name else root

    def check_directory(self) -> None:
        if self.fs.exists(self._target("")) and not self.fs.isdir(self._target("")):
            raise InputError(f"-o {self.location}: is a file, not a directory")

    def check_writable(self) -> None:
        """A local -o that cannot take a file is one line before the job starts (an unnamed temp file, so
        nothing appears in it); an object store says so at the first write."""
        if is_url(self.location):
            return
        try:
            tempfile.TemporaryFile(dir=self.location).close()
        except OSError as err:
            raise InputError(f"-o {self.location}: cannot write there ({err.strerror or err})") from err

    def remove_partial_writes(self, prefix: str) -> None:
        """Remove the temp files that writes of a killed run left (common.files names them so), beside the
        names this pipeline writes and nowhere else: anything else in -o is not ours to delete."""
        for name in (MANIFEST_FILE, STATE_FILE, shard_pattern(prefix), f"{PARTS_DIR}/*"):
            for partial in self.glob(partial_pattern(name)):
                self.remove(partial)

    def makedirs(self, name: str = "") -> None:
        self.fs.makedirs(self._target(name), exist_ok=True)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._target(name))

    def size(self, name: str) -> int:
        return self.fs.size(self._target(name))

    def read_bytes(self, name: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(self._target(name), start=start, end=end)

    def open(self, name: str, mode: str = "rb"):
        return self.fs.open(self._target(name), mode)

    def glob(self, pattern: str) -> list[str]:
        """Names (relative to the directory) matching `pattern`, sorted."""
        root = self._fs_root[1]
        return sorted(p[len(root) + 1:] for p in self.fs.glob(self._target(pattern)))

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self._target(name), recursive=True)

    def write(self, name: str, mode: str = "wb"):
        return atomic_write(self.path(name), mode)

    def write_json(self, name: str, payload: Any) -> None:
        write_json(self.path(name), payload)

    def read_json(self, name: str) -> dict:
        """A JSON file of ours; a truncated or hand-edited one is an InputError naming it."""
        path = self.path(name)
        try:
            with self.open(name, "rb") as f:
                payload = json.loads(f.read())
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: unreadable ({err}); fix or delete it, or pass --overwrite") from err
        if not isinstance(payload, dict):
            raise InputError(f"{path}: not a JSON object; fix or delete it, or pass --overwrite")
        return payload


# ---- -o before a run: refuse, finish, resume or start ----------------------------------------------------------

@contextmanager
def claimed(out: OutputDir, name: str = "-o") -> Iterator[None]:
    """-o for this job alone while it writes: a second job into the same -o (a command run twice, a job
    submitted again) is refused while this one lives, before it could delete or rewrite anything. `name`: how
    errors name the directory (the flag, or the API's argument)."""
    lock = DirectoryLock(out.fs, out._target(""))
    try:
        acquired = lock.acquire()
    except OSError as err:
        raise InputError(f"{name} {out}: cannot be written ({err.strerror or err})") from err
    if not acquired:
        raise InputError(f"{name} {out}: in use by a live job ({held_by(lock.holder())}); wait for it, or if it is "
                         f"dead delete {lock.path}")
    try:
        yield
    finally:
        lock.release()


def refuse_unknown_shards(out: OutputDir) -> None:
    """Shards with neither our manifest nor our state file beside them (llm.c's fineweb.py output, or a run
    whose manifest was deleted) are somebody's data that nothing here can verify: never replace them."""
    if out.exists(MANIFEST_FILE) or out.exists(STATE_FILE):
        return
    if found := out.glob(shard_pattern()):
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise InputError(f"{out}: already holds shards ({found[0]}{more}) but no {MANIFEST_FILE} or "
                         f"{STATE_FILE} of this pipeline; use another --output-dir, or --overwrite to discard them")


def discard_previous_run(out: OutputDir) -> None:
    for name in (MANIFEST_FILE, STATE_FILE, PARTS_DIR, *out.glob(shard_pattern())):
        out.remove(name)


def _read_same_run(out: OutputDir, name: str, fingerprint: dict, what: str) -> dict:
    """JSON file `name` of `out`, refused unless it was written by a run with these inputs and flags."""
    payload = out.read_json(name)
    recorded = payload.get("fingerprint")
    if recorded != fingerprint:
        if isinstance(recorded, dict) and {**recorded, "identities": None} == {**fingerprint, "identities": None}:
            changed = next((path for path, was, now in zip(fingerprint["inputs"], recorded["identities"] or [],
                                                            fingerprint["identities"], strict=False) if was != now),
                           fingerprint["inputs"][0])
            raise InputError(f"{changed}: changed (size or modification time) since {what} in {out} read it; "
                             "pass --overwrite to tokenize the inputs again")
        raise InputError(f"{out.path(name)}: {what} with different inputs or flags is here; "
                         "use another --output-dir or pass --overwrite")
    return payload


def finished_manifest(out: OutputDir, fingerprint: dict) -> dict | None:
    """The manifest of a finished identical run (shards checked by header and size), if there is one."""
    if not out.exists(MANIFEST_FILE):
        return None
    manifest = _read_same_run(out, MANIFEST_FILE, fingerprint, "a finished run")
    for shard in manifest["shards"]:
        if read_header(out.path(shard["name"])) != shard["tokens"]:
            raise ShardFormatError(f"{out.path(shard['name'])}: token count differs from {out.path(MANIFEST_FILE)}")
    for leftover in (STATE_FILE, PARTS_DIR):  # a run killed after its manifest was written
        out.remove(leftover)
    return manifest


def recorded_units(out: OutputDir, fingerprint: dict) -> list[WorkUnit] | None:
    """The work units of the unfinished run in `out` (same flags only); None if there is none."""
    if not out.exists(STATE_FILE):
        return None
    state = _read_same_run(out, STATE_FILE, fingerprint, "an unfinished run")
    if state.get("version") != STATE_VERSION:
        raise InputError(f"{out.path(STATE_FILE)}: left by an older version of this pipeline, which cannot "
                         "be resumed; pass --overwrite to start again")
    return [WorkUnit.from_dict(unit) for unit in state["units"]]


def record_units(out: OutputDir, fingerprint: dict, units: list[WorkUnit]) -> None:
    """Start a run: the state file, written once, names its flags and its work units."""
    out.remove(PARTS_DIR)  # nothing in it can belong to a run without a state file
    out.makedirs(PARTS_DIR)
    out.write_json(STATE_FILE, {"version": STATE_VERSION, "fingerprint": fingerprint,
                                "units": [unit.to_dict() for unit in units]})


def finished_work(out: OutputDir) -> tuple[dict[int, dict], dict[int, dict]]:
    """What a killed run left done, re-verified cheaply: unit -> its counters (tokens file whole, or deleted
    after its shards were written) and shard index -> its manifest entry (header matching the record)."""

    def finished_unit(name: str) -> dict | None:
        counters = out.read_json(name)
        tokens = unit_file(counters["unit"], "tokens")
        if not out.exists(tokens):  # its counters came after it: deleted once its shards were written
            return counters
        return counters if out.size(tokens) == 2 * counters["tokens"] else None

    def written_shards(name: str) -> dict[int, dict]:
        record = out.read_json(name)
        entries = {record["first"] + k: entry for k, entry in enumerate(record["shards"])}
        try:
            if all(read_header(out.path(e["name"])) == e["tokens"] for e in entries.values()):
                return entries
        except ShardFormatError:
            pass
        return {}

    units: dict[int, dict] = {}
    shards: dict[int, dict] = {}
    with ThreadPoolExecutor(16) as pool:  # remote storage: many small reads at once
        for counters in pool.map(finished_unit, out.glob(f"{PARTS_DIR}/unit_*.json")):
            if counters is not None:
                units[counters["unit"]] = counters
        for entries in pool.map(written_shards, out.glob(f"{PARTS_DIR}/shards_*.json")):
            shards.update(entries)
    return units, shards
