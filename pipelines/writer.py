"""Cuts the ordered stream of tokenized documents into fixed-size shards, resumably.

The driver feeds batches in input order. After every shard it records, atomically, where in the input the
next token comes from (file, row in file, tokens of that row already written) together with the counters
up to that row, so a killed run restarts from the last complete shard and produces the same bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.filters import DROP_REASONS, DUPLICATE
from pipelines.shards import TOKEN_DTYPE, file_sha256, shard_name, write_shard
from pipelines.sources import InputError

STATE_FILE = "tokenize_state.json"
HASHES_FILE = "tokenize_dedup_hashes.u64"
MANIFEST_FILE = "manifest.json"


def write_json_atomically(path: Path, payload: dict) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)


def read_json(path: Path) -> dict:
    """A JSON state file of ours; a truncated or hand-edited one is an InputError naming it."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable ({err}); fix or delete it, or pass --overwrite") from err
    if not isinstance(payload, dict):
        raise InputError(f"{path}: not a JSON object; fix or delete it, or pass --overwrite")
    return payload


@dataclass(frozen=True)
class Position:
    """Rows before (file, row) are fully written; row (file, row) has had its first `consumed` tokens written."""

    file: int
    row: int
    consumed: int


class ShardStream:
    def __init__(self, out_dir: Path, prefix: str, shard_size: int, fingerprint: dict, input_paths: list[str]):
        self.out_dir = out_dir
        self.prefix = prefix
        self.shard_size = shard_size
        self.fingerprint = fingerprint
        self.input_paths = input_paths
        self.buffer = np.empty(shard_size, dtype=TOKEN_DTYPE)
        self.filled = 0
        self.shards: list[dict] = []
        self.docs_read = 0
        self.dropped = np.zeros(len(DROP_REASONS), dtype=np.int64)
        self.seen_hashes: set[int] = set()
        self.hashes_on_disk = 0
        self.start: Position | None = None  # None: a fresh run, nothing to skip
        self.last_key = -1  # (file << 40) + row of the last document seen

    # ---- resume -----------------------------------------------------------------------------------------
    def load_state(self) -> int:
        """Restore from the last shard whose bytes verify; returns how many shards are kept."""
        state_path = self.out_dir / STATE_FILE
        if not state_path.exists():
            return 0
        state = read_json(state_path)
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"{state_path}: an unfinished run with different inputs or flags is here; "
                "use another --output-dir or pass --overwrite"
            )
        for shard in state["shards"]:
            path = self.out_dir / shard["name"]
            if not path.exists() or file_sha256(path) != shard["sha256"]:
                break
            self.shards.append(shard)
        if self.shards:
            resume = self.shards[-1]["resume"]
            self.start = Position(resume["file"], resume["row"], resume["consumed"])
            self.docs_read = resume["docs_read"]
            self.dropped = np.array([resume["dropped"].get(r, 0) for r in DROP_REASONS], dtype=np.int64)
            self._restore_hashes(resume["hashes"])
        return len(self.shards)

    def _restore_hashes(self, count: int) -> None:
        path = self.out_dir / HASHES_FILE
        if not self.fingerprint["filters"]["dedup"]:
            return
        with open(path, "r+b") as f:
            f.truncate(count * 8)
        self.seen_hashes = set(np.fromfile(path, dtype="<u8").tolist())
        self.hashes_on_disk = count

    # ---- streaming --------------------------------------------------------------------------------------
    def add_batch(self, batch: pa.Table) -> int:
        """Consume one tokenized batch (columns file, row, reason, tokens[, text_hash]); returns tokens added."""
        files = np.asarray(batch["file"], dtype=np.int64)
        rows = np.asarray(batch["row"], dtype=np.int64)
        self._check_order(files, rows)
        if self.start is None:
            before_start = at_start = np.zeros(len(files), dtype=bool)
        else:
            before_start = (files < self.start.file) | ((files == self.start.file) & (rows < self.start.row))
            at_start = (files == self.start.file) & (rows == self.start.row)
        counted = ~(before_start | at_start)

        reasons = np.asarray(batch["reason"], dtype=np.int8).copy()
        tokens = batch["tokens"].combine_chunks()
        offsets = np.frombuffer(tokens.buffers()[1], dtype=np.int64)[tokens.offset:tokens.offset + len(tokens) + 1]
        starts, ends = offsets[:-1] // 2, offsets[1:] // 2
        values = tokens.buffers()[2]
        all_tokens = np.frombuffer(values, dtype=TOKEN_DTYPE) if values else np.zeros(0, TOKEN_DTYPE)

        new_hashes: list[int] = []
        if self.fingerprint["filters"]["dedup"]:
            for i in np.flatnonzero(counted & (reasons == 0)):
                text_hash = int(batch["text_hash"][int(i)].as_py())
                if text_hash in self.seen_hashes:
                    reasons[i] = DUPLICATE
                else:
                    self.seen_hashes.add(text_hash)
                    new_hashes.append(text_hash)
        hash_rows = np.flatnonzero(counted & (reasons == 0)) if new_hashes else np.zeros(0, dtype=np.int64)
        hashes_before_batch = self.hashes_on_disk

        skip = np.where(at_start, self.start.consumed if self.start else 0, 0)
        lengths = np.where(before_start | (reasons != 0), 0, ends - starts - skip)
        row_ends = np.cumsum(lengths)
        stream = self._gather(all_tokens, starts + skip, lengths)

        written = 0
        while written < stream.size:
            take = min(self.shard_size - self.filled, stream.size - written)
            self.buffer[self.filled:self.filled + take] = stream[written:written + take]
            self.filled += take
            written += take
            if self.filled == self.shard_size:
                # the cut falls inside (or at the end of) the first row whose tokens reach `written`
                row = int(np.searchsorted(row_ends, written, side="left"))
                self._persist_hashes(new_hashes, hashes_before_batch, int(np.sum(hash_rows <= row)))
                through = counted & (np.arange(len(reasons)) <= row)
                tokens_of_row_written = int(skip[row] + lengths[row] - (row_ends[row] - written))
                resume = {
                    "file": int(files[row]), "row": int(rows[row]), "consumed": tokens_of_row_written,
                    "docs_read": self.docs_read + int(np.sum(through)),
                    "dropped": self._dropped_as_dict(self.dropped + np.bincount(reasons[through],
                                                                                minlength=len(DROP_REASONS))),
                    "hashes": self.hashes_on_disk,
                }
                self._flush(resume)

        self.docs_read += int(np.sum(counted))
        self.dropped += np.bincount(reasons[counted], minlength=len(DROP_REASONS))
        self._persist_hashes(new_hashes, hashes_before_batch, len(new_hashes))
        return int(stream.size)

    def _check_order(self, files: np.ndarray, rows: np.ndarray) -> None:
        """Shard bytes are only reproducible if documents arrive in input order; refuse anything else."""
        keys = (files << 40) + rows
        if keys.size and (keys[0] <= self.last_key or np.any(np.diff(keys) <= 0)):
            raise RuntimeError(f"documents arrived out of input order near {self.input_paths[int(files[0])]}")
        if keys.size:
            self.last_key = int(keys[-1])

    @staticmethod
    def _dropped_as_dict(dropped: np.ndarray) -> dict[str, int]:
        return dict(zip(DROP_REASONS, dropped.tolist(), strict=True))

    @staticmethod
    def _gather(all_tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        kept = np.flatnonzero(lengths)
        if kept.size == 0:
            return np.zeros(0, dtype=TOKEN_DTYPE)
        first, last = kept[0], kept[-1]
        if np.all(starts[kept[1:]] == starts[kept[:-1]] + lengths[kept[:-1]]):
            return all_tokens[starts[first]:starts[last] + lengths[last]]  # common case: one zero-copy slice
        return np.concatenate([all_tokens[starts[i]:starts[i] + lengths[i]] for i in kept])

    def _persist_hashes(self, batch_hashes: list[int], hashes_before_batch: int, count: int) -> None:
        """Make the first `count` of this batch's new hashes durable before a state that counts them."""
        already = self.hashes_on_disk - hashes_before_batch
        if count > already:
            with open(self.out_dir / HASHES_FILE, "ab") as f:
                f.write(np.asarray(batch_hashes[already:count], dtype="<u8").tobytes())
                f.flush()
                os.fsync(f.fileno())
            self.hashes_on_disk = hashes_before_batch + count

    def _flush(self, resume: dict | None) -> None:
        index = len(self.shards)
        name = shard_name(self.prefix, index)
        sha256 = write_shard(self.out_dir / name, self.buffer[:self.filled])
        shard = {"name": name, "split": "val" if index == 0 else "train", "tokens": int(self.filled),
                 "sha256": sha256}
        if resume is not None:
            shard["resume"] = resume
        self.shards.append(shard)
        self.filled = 0
        state = {"fingerprint": self.fingerprint, "shards": self.shards}
        write_json_atomically(self.out_dir / STATE_FILE, state)

    # ---- end --------------------------------------------------------------------------------------------
    def finish(self) -> list[dict]:
        if self.filled:
            self._flush(None)
        if not self.shards:
            raise ValueError("no tokens to write: every document was dropped by the filters")
        for shard in self.shards:
            shard.pop("resume", None)
        return self.shards
