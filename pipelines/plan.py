"""The job's two plans: work units over the input, and shards over the tokens the units produce.

Work units are sized by text bytes, whatever the files' row groups: small row groups (and small files) are
coalesced, a huge row group is cut into row ranges and a big jsonl file into byte ranges (each piece
reads the lines that start in its range), so every unit is a similar amount of BPE and the
per-unit overhead stays small next to it. The order of units is the order of documents.

Shards are laid out from exact counts: the kept tokens of each unit, prefix-summed, give every unit's global
offset, and shard i is the global range [i * shard_size, (i + 1) * shard_size) — so each shard can be
assembled on its own, in parallel, once the units it covers are done.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipelines.sources import InputFiles, Piece

MAX_UNIT_BYTES = 16 << 20  # ~4M tokens of English, a second or two of BPE on one core
MIN_UNIT_BYTES = 1 << 20  # below this the per-unit overhead (files, calls) starts to show
UNITS_PER_WORKER = 8  # so that the last units, which some workers wait for, are a small part of the job


def unit_bytes_for(inputs: InputFiles, workers: int) -> int:
    """A unit size that gives every worker several units, within [MIN_UNIT_BYTES, MAX_UNIT_BYTES]."""
    text_bytes = sum(size for groups in inputs.row_groups for _, size in groups)
    return int(min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, text_bytes / (UNITS_PER_WORKER * max(1, workers)))))


@dataclass(frozen=True)
class WorkUnit:
    index: int
    pieces: tuple[Piece, ...]
    text_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> WorkUnit:
        pieces = tuple(Piece(**{**p, "row_groups": tuple(p["row_groups"]),
                                "byte_range": tuple(p["byte_range"]) if p.get("byte_range") else None})
                       for p in payload["pieces"])
        return cls(index=payload["index"], pieces=pieces, text_bytes=payload["text_bytes"])


def _segments(inputs: InputFiles, unit_bytes: int):
    """(piece, text_bytes) in document order: parquet row groups, big ones cut into row ranges; jsonl files
    cut into byte ranges (a gzip file cannot be entered mid-stream: whole)."""
    for file, row_groups in enumerate(inputs.row_groups):
        first_row = 0
        for group, (rows, text_bytes) in enumerate(row_groups):
            whole = rows < 0 and inputs.paths[file].endswith(".gz")
            parts = 1 if whole else max(1, round(text_bytes / unit_bytes))
            if rows >= 0:
                parts = max(1, min(rows, parts))
            bounds = np.linspace(0, text_bytes if rows < 0 else rows, parts + 1).round().astype(int).tolist()
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                if rows < 0:
                    yield Piece(file, (), 0, -1, 0, None if whole else (start, end)), end - start
                else:
                    yield (Piece(file, (group,), start, end - start, first_row + start),
                           text_bytes * (end - start) // max(rows, 1))
            first_row += max(rows, 0)


def plan_units(inputs: InputFiles, unit_bytes: int) -> list[WorkUnit]:
    """Cut the input into work units of about `unit_bytes` of text each, in document order."""
    units: list[WorkUnit] = []
    pieces: list[Piece] = []
    size = 0

    def close_unit() -> None:
        nonlocal pieces, size
        if pieces:
            units.append(WorkUnit(len(units), tuple(pieces), size))
        pieces, size = [], 0

    for piece, text_bytes in _segments(inputs, unit_bytes):
        last = pieces[-1] if pieces else None
        if (last is not None and last.file == piece.file and last.rows >= 0 and piece.rows >= 0
                and last.first_row + last.rows == piece.first_row):
            # the next rows of the same file: extend the piece (a new row group, or the same one's next cut)
            groups = last.row_groups if last.row_groups[-1] == piece.row_groups[0] else \
                (*last.row_groups, *piece.row_groups)
            pieces[-1] = Piece(last.file, groups, last.skip, last.rows + piece.rows, last.first_row)
        else:
            pieces.append(piece)
        size += text_bytes
        if size >= unit_bytes:
            close_unit()
    close_unit()
    return units


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index`: tokens [start, end) of the kept-token stream of each unit in `ranges`, in order."""

    index: int
    tokens: int
    ranges: tuple[tuple[int, int, int], ...]  # (unit, start, end)


def layout_shards(unit_tokens: list[int], shard_size: int, indices: range | None = None) -> list[ShardPlan]:
    """Cut the concatenation of the units' kept tokens into shards of `shard_size` (the last one shorter);
    `indices` limits it to some shards (those must lie within the tokens counted so far)."""
    counts = np.asarray(unit_tokens, dtype=np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    total = int(ends[-1]) if ends.size else 0
    shards = []
    for index in indices if indices is not None else range(-(-total // shard_size)):
        shard_start = index * shard_size
        shard_end = min(shard_start + shard_size, total)
        first = int(np.searchsorted(ends, shard_start, side="right"))  # the unit holding the first token
        last = int(np.searchsorted(starts, shard_end, side="left"))  # units that start before the shard ends
        ranges = tuple((unit, max(shard_start, int(starts[unit])) - int(starts[unit]),
                        min(shard_end, int(ends[unit])) - int(starts[unit]))
                       for unit in range(first, last) if counts[unit])
        shards.append(ShardPlan(index, shard_end - shard_start, ranges))
    return shards
