"""Shard assembly: a Ray task copies the exact token ranges of its shards out of the units' outputs.

Shard boundaries come from exact per-unit counts (pipelines.plan), so any number of these tasks write
shards at once, each one whole (temp name, fsync, rename) with its sha256 computed on the way, and record
what they wrote; the driver only launches them.
"""

from __future__ import annotations

import numpy as np

from pipelines.dedup import duplicate_docs, read_rows
from pipelines.plan import ShardPlan
from pipelines.shards import TOKEN_DTYPE, shard_name, write_shard_chunks
from pipelines.sources import InputError
from pipelines.workdir import OutputDir, shard_record_file, unit_file

READ_TOKENS = 16 << 20  # largest single read: bounds a task's memory whatever the shard and unit sizes


class _UnitTokens:
    """Reads token ranges of units; a unit --dedup found duplicates in is read whole and compacted."""

    def __init__(self, out: OutputDir, duplicates: dict[int, tuple[str, ...]]):
        self.out = out
        self.duplicates = duplicates
        self.compacted: dict[int, np.ndarray] = {}

    def read(self, unit: int, start: int, end: int):
        if unit not in self.duplicates:
            size = TOKEN_DTYPE.itemsize
            return self.out.read_bytes(unit_file(unit, "tokens"), start * size, end * size)
        if unit not in self.compacted:
            self.compacted = {unit: self._without_duplicates(unit)}  # shards run through units in order
        return self.compacted[unit][start:end]

    def _without_duplicates(self, unit: int) -> np.ndarray:
        with self.out.open(unit_file(unit, "tokens")) as f:
            tokens = np.frombuffer(f.read(), dtype=TOKEN_DTYPE)
        lengths = read_rows(self.out, unit_file(unit, "hashes.npy"))["tokens"]
        keep = np.ones(lengths.size, dtype=bool)
        keep[duplicate_docs(self.out, unit, self.duplicates[unit])] = False
        return tokens[np.repeat(keep, lengths)]


def assemble_shards(out: OutputDir, prefix: str, shards: list[ShardPlan],
                    duplicates: dict[int, tuple[str, ...]] | None = None) -> list[dict]:
    """Write consecutive shards, then a record of them (name, split, tokens, sha256) that resume trusts.
    `duplicates`: for --dedup, unit -> the files that list its duplicate documents."""
    reader = _UnitTokens(out, duplicates or {})
    written = []
    for shard in shards:
        name = shard_name(prefix, shard.index)
        chunks = (reader.read(unit, offset, min(offset + READ_TOKENS, end))
                  for unit, start, end in shard.ranges for offset in range(start, end, READ_TOKENS))
        try:
            sha256 = write_shard_chunks(out.path(name), shard.tokens, chunks)
        except FileNotFoundError as err:  # a unit's tokens are deleted once the shards they go into are written
            raise InputError(f"{out.path(name)}: missing or damaged, and the unit tokens it was assembled from were "
                             f"deleted after it was written ({err.filename}); pass --overwrite to start again") from err
        written.append({"name": name, "split": "val" if shard.index == 0 else "train", "tokens": shard.tokens,
                        "sha256": sha256})
    out.write_json(shard_record_file(shards[0].index, shards[-1].index), {"first": shards[0].index, "shards": written})
    return written
