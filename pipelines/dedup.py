"""--dedup as a distributed step: exact duplicates by text hash, the first occurrence in input order kept.

Every unit wrote (hash, unit, doc, tokens) for each document that passed the filters. A hash shuffle over
Ray's object store, in Ray tasks, brings all copies of a text together: map calls split groups
of units' rows into partitions by hash, and each reduce call sorts one partition by (hash, unit, doc) —
input order — and marks every copy after the first. Each reduce writes its duplicates (unit, doc) to one
file and returns per-unit counts, so no process ever holds the set of hashes; the result equals a
sequential pass that keeps each text the first time it sees it.
"""

from __future__ import annotations

import numpy as np

from pipelines.workdir import PARTS_DIR, OutputDir, unit_file

HASH_ROW = np.dtype([("hash", "<u8"), ("unit", "<i4"), ("doc", "<i4"), ("tokens", "<i4")])
DUPLICATE_ROW = np.dtype([("unit", "<i4"), ("doc", "<i4")])


def read_rows(out: OutputDir, name: str) -> np.ndarray:
    with out.open(name) as f:
        return np.load(f)


def partition_hashes(out: OutputDir, units: list[int], partitions: int) -> list[np.ndarray] | np.ndarray:
    """The hash rows of some units, split into `partitions` by hash (one Ray object each)."""
    rows = np.concatenate([read_rows(out, unit_file(unit, "hashes.npy")) for unit in units])
    bucket = rows["hash"] % np.uint64(partitions)
    order = np.argsort(bucket, kind="stable")
    parts = np.split(rows[order], np.cumsum(np.bincount(bucket, minlength=partitions))[:-1])
    return parts if partitions > 1 else parts[0]  # Ray wants a bare value for num_returns=1


def later_copies(out: OutputDir, partition: int, *parts: np.ndarray) -> dict:
    """Mark the rows of one hash partition whose text occurred earlier in the input; write them out."""
    rows = np.concatenate(parts)
    rows = rows[np.lexsort((rows["doc"], rows["unit"], rows["hash"]))]
    repeats = rows[1:][rows["hash"][1:] == rows["hash"][:-1]]
    if repeats.size == 0:
        return {"file": None, "units": {}}
    repeats = repeats[np.lexsort((repeats["doc"], repeats["unit"]))]
    name = f"{PARTS_DIR}/duplicates_{partition:05d}.npy"
    with out.write(name) as f:
        np.save(f, repeats[["unit", "doc"]].astype(DUPLICATE_ROW))
    units, starts = np.unique(repeats["unit"], return_index=True)
    tokens = np.add.reduceat(repeats["tokens"].astype(np.int64), starts)
    docs = np.diff(np.append(starts, repeats.size))
    return {"file": name, "units": {u: (d, t) for u, d, t in zip(units.tolist(), docs.tolist(), tokens.tolist(),
                                                                strict=True)}}


def duplicate_docs(out: OutputDir, unit: int, files: tuple[str, ...]) -> np.ndarray:
    """Indices of a unit's documents that repeat an earlier text, from the files find_duplicates named."""
    rows = np.concatenate([read_rows(out, name) for name in files])
    return rows["doc"][rows["unit"] == unit]


def count_duplicates(out: OutputDir) -> int:
    """How many documents the duplicates files of find_duplicates list (0 without --dedup)."""
    return sum(read_rows(out, name).size for name in out.glob(f"{PARTS_DIR}/duplicates_*.npy"))


def find_duplicates(out: OutputDir, units: list[int], partitions: int, **remote_args) -> dict[int, dict]:
    """unit -> {"docs", "tokens" (dropped), "files" (holding its duplicates)}, for units with duplicates.
    The map and reduce steps are Ray tasks with `remote_args` (CPUs, custom resources)."""
    import ray

    for name in out.glob(f"{PARTS_DIR}/duplicates_*.npy"):  # an earlier attempt's, perhaps partitioned otherwise
        out.remove(name)
    groups = [g.tolist() for g in np.array_split(np.asarray(units), min(len(units), partitions)) if g.size]
    split = ray.remote(partition_hashes).options(num_returns=partitions, **remote_args)
    mapped = [split.remote(out, group, partitions) for group in groups]
    mapped = [refs if partitions > 1 else [refs] for refs in mapped]
    reduce = ray.remote(later_copies).options(**remote_args)
    reduced = [reduce.remote(out, p, *[refs[p] for refs in mapped]) for p in range(partitions)]
    found: dict[int, dict] = {}
    for result in ray.get(reduced):
        for unit, (docs, tokens) in result["units"].items():
            entry = found.setdefault(unit, {"docs": 0, "tokens": 0, "files": ()})
            entry["docs"] += docs
            entry["tokens"] += tokens
            entry["files"] += (result["file"],)
    return found
