"""Shard assembly: a Ray task copies the exact token ranges of its shards out of the units' outputs.

Shard boundaries come from exact per-unit counts (pipelines.plan), so any number of these tasks write
shards at once, each one whole (temp name, fsync, rename) with its sha256 computed on the way, and record
what they wrote; the ShardAssembler (in the job's WriteShards stage) only launches them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines.dedup import duplicate_docs, read_rows
from pipelines.plan import ShardPlan, layout_shards
from pipelines.shards import TOKEN_DTYPE, ShardFormatError, shard_name, write_shard_chunks
from pipelines.sources import InputError
from pipelines.workdir import OutputDir, shard_record_file, unit_file

READ_TOKENS = 16 << 20  # largest single read: bounds a task's memory whatever the shard and unit sizes
ASSEMBLE_TOKENS = 32 << 20  # one assembly task writes consecutive shards up to this many tokens
ASSEMBLE_CPUS = 0.1  # assembly copies bytes: it runs beside the Tokenize actors
DEDUP_ROWS_PER_PARTITION = 2_000_000  # 20 bytes each: a few tens of MB per dedup reduce task


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


class ShardAssembler:
    """Launches the assembly tasks as units are done: a shard is written as soon as every unit it covers is
    (with --dedup, once all are and the duplicates are known), and a unit's token file is deleted as soon as
    the shards it went into are written. Lives in the job's WriteShards stage (or the driver, on a resume that
    has no unit left to encode); no token passes through it."""

    def __init__(self, out: OutputDir, prefix: str, shard_size: int, units: int, dedup: bool,
                 counters: dict[int, dict], shards: dict[int, dict], workers: int, remote_args: dict):
        import ray

        self.ray = ray
        self.out = out
        self.prefix = prefix
        self.shard_size = shard_size
        self.units = units
        self.dedup = dedup
        self.counters = dict(counters)  # unit -> its counters (done units)
        self.shards = dict(shards)  # shard index -> its manifest entry (written shards)
        self.workers = workers
        self.remote_args = remote_args  # custom resources of --node-resource
        self.duplicates: dict[int, dict] = {}  # unit -> --dedup's {"docs", "tokens" dropped, "files" naming them}
        self.assembling: dict = {}  # ObjectRef -> the first shard index of the group it writes
        self.ordered_units = 0  # units 0..n-1 are all done: their shards' offsets are known
        self.kept_tokens: list[int] = []  # per unit, for units 0..ordered_units-1
        self.unit_ends: list[int] = []  # the end of each of those units in the kept-token stream
        self.shards_launched = 0  # shards 0..n-1 are written or being written
        self.shards_written = 0  # shards 0..n-1 are all written
        self.units_consumed = 0  # units 0..n-1 are in written shards only: their token files are deleted
        self.deleter = ThreadPoolExecutor(4)  # deletions on object stores are requests: off the launching path
        if not dedup:
            self._launch(final=False)  # what a resumed run can assemble at once

    def add(self, counters: dict) -> None:
        """A unit is done: launch the shards it completes; the whole rest once it is the last."""
        self.counters[counters["unit"]] = counters
        if not self.dedup:
            self._launch(final=False)
        self._collect(timeout=0)

    def finish(self) -> None:
        """Every unit is done: find the duplicates (--dedup), write the remaining shards, wait for all."""
        from pipelines.dedup import find_duplicates

        if self.dedup:
            kept = sum(c["docs"] - sum(c["dropped"].values()) for c in self.counters.values())
            partitions = max(1, min(4 * self.workers, kept // DEDUP_ROWS_PER_PARTITION))
            self.duplicates = find_duplicates(self.out, list(range(self.units)), partitions,
                                              num_cpus=ASSEMBLE_CPUS, **self.remote_args)
        self._launch(final=True)
        while self.assembling:
            self._collect(timeout=10.0)
        self.deleter.shutdown()  # waits; a deletion that failed leaves its file to the removal of tokenize_parts/

    @property
    def all_units_done(self) -> bool:
        return len(self.counters) == self.units

    def _assemble(self, group: list[ShardPlan], duplicates: dict) -> None:
        task = self.ray.remote(assemble_shards).options(num_cpus=ASSEMBLE_CPUS, **self.remote_args)
        self.assembling[task.remote(self.out, self.prefix, group, duplicates)] = group[0].index

    def _collect(self, timeout: float) -> None:
        done, _ = self.ray.wait(list(self.assembling), num_returns=len(self.assembling), timeout=timeout)
        for ref in done:
            first = self.assembling.pop(ref)
            try:
                written = self.ray.get(ref)
            except Exception as err:
                if (cause := _input_error_within(err)) is not None:
                    raise cause from None
                raise
            self.shards.update({first + k: entry for k, entry in enumerate(written)})
        self._delete_consumed_units()

    def _delete_consumed_units(self) -> None:
        """Delete the token files of units that only written shards cover, so that -o does not hold every
        token twice until the end (sample-100BT: ~200 GB of shards, and only the units in flight besides)."""
        while self.shards_written in self.shards:
            self.shards_written += 1
        written_tokens = self.shards_written * self.shard_size
        while self.units_consumed < self.ordered_units and self.unit_ends[self.units_consumed] <= written_tokens:
            self.deleter.submit(self.out.remove, unit_file(self.units_consumed, "tokens"))
            self.units_consumed += 1

    def _launch(self, final: bool) -> None:
        """Assemble every shard whose units are all done (all remaining ones if final)."""
        while self.ordered_units < self.units and self.ordered_units in self.counters:
            unit = self.ordered_units
            dropped = self.duplicates.get(unit, {}).get("tokens", 0)
            self.kept_tokens.append(self.counters[unit]["tokens"] - dropped)
            self.unit_ends.append((self.unit_ends[-1] if self.unit_ends else 0) + self.kept_tokens[-1])
            self.ordered_units += 1
        total = sum(self.kept_tokens)
        size = self.shard_size
        launch_until = -(-total // size) if final else total // size
        if launch_until <= self.shards_launched:
            return
        plans = [plan for plan in layout_shards(self.kept_tokens, size, range(self.shards_launched, launch_until))
                 if plan.index not in self.shards]
        self.shards_launched = launch_until
        for group in _consecutive_groups(plans, max(1, ASSEMBLE_TOKENS // size)):
            units = {unit for plan in group for unit, _, _ in plan.ranges}
            self._assemble(group, {unit: self.duplicates[unit]["files"] for unit in units & self.duplicates.keys()})


def _input_error_within(err: BaseException) -> InputError | ShardFormatError | None:
    """The InputError (or ShardFormatError) a Ray task or a Ray Data stage raised, however Ray wrapped it."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (InputError, ShardFormatError)):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else (seen.__cause__ or seen.__context__)
    return None


def _consecutive_groups(plans: list[ShardPlan], most: int) -> list[list[ShardPlan]]:
    groups: list[list[ShardPlan]] = []
    for plan in plans:
        if groups and len(groups[-1]) < most and groups[-1][-1].index + 1 == plan.index:
            groups[-1].append(plan)
        else:
            groups.append([plan])
    return groups
