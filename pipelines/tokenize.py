"""FineWeb-Edu (or any parquet/jsonl text) -> llm.c uint16 token shards, as a Ray job with no central writer.

    python pipelines/tokenize.py                                   # FineWeb-Edu sample-10BT from the hub
    python pipelines/tokenize.py --input 'data/raw/*.parquet'      # local or s3://, gs://, hf:// files
    python pipelines/tokenize.py --source demo                     # offline smoke corpus (Python's own docs)
    ray job submit --working-dir . -- python pipelines/tokenize.py --name sample-100BT --node-resource data_node

The input is cut into work units of similar size (pipelines.plan). Worker actors (pipelines.worker) each
read a unit, filter and encode it, and write its tokens into the output directory themselves
(pipelines.encode); from the units' exact token counts the shards' global offsets follow, and the workers
assemble the shards in parallel (pipelines.assemble) as soon as the units they cover are done. --dedup is a
hash shuffle over the workers between the two (pipelines.dedup). The driver only schedules and keeps
counters, so the bytes depend on the inputs and flags alone, and a killed job resumes at the unit and shard
it reached.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run as a script, sys.path[0] is pipelines/, where this file would shadow the stdlib's `tokenize`
    # module; put the repository root there instead, then run the code as the module pipelines.tokenize.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from pipelines.tokenize import main

    sys.exit(main())

import functools
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipelines import cli
from pipelines.dedup import find_duplicates
from pipelines.encode import EncodeJob
from pipelines.files import is_url, local_path
from pipelines.filters import DROP_REASONS, FilterConfig
from pipelines.plan import ShardPlan, WorkUnit, layout_shards, plan_units, unit_bytes_for
from pipelines.shards import MAX_SHARD_TOKENS, ShardFormatError, read_header
from pipelines.sources import (
    FINEWEB_EDU_SAMPLES,
    InputError,
    InputFiles,
    files_from_demo,
    files_from_glob,
    files_from_hub,
)
from pipelines.tokenizer import tokenizer_identity
from pipelines.workdir import MANIFEST_FILE, PARTS_DIR, STATE_FILE, OutputDir, shard_pattern, unit_file
from pipelines.worker import TokenizeWorker

ASSEMBLE_TOKENS = 32 << 20  # one assembly task writes consecutive shards up to this many tokens
DEDUP_ROWS_PER_PARTITION = 2_000_000  # 20 bytes each: a few tens of MB per dedup reduce task
NODE_RESOURCE_SHARE = 0.001  # what each actor and task asks of --node-resource: only where it runs matters
MAX_WORKER_REPLACEMENTS = 3  # per worker, on average, before a job whose workers keep dying gives up
PROGRESS_LINE_EVERY_S = 30  # without a terminal (ray job logs), a progress line this often
DEMO_SHARD_SIZE = 100_000
FINEWEB_SHARD_SIZE = 100_000_000
STATE_VERSION = 2  # version 1 state files (one ordered writer) cannot be resumed by this code


@dataclass
class TokenizeConfig:
    source: str = "hub"  # hub | files | demo
    name: str = "sample-10BT"
    input: str | None = None
    output_dir: str | Path | None = None  # a local directory or an fsspec URL
    prefix: str | None = None
    shard_size: int | None = None
    filters: FilterConfig = field(default_factory=FilterConfig)
    num_workers: int | None = None  # default: one tokenizer actor per CPU in the cluster
    cpus_per_worker: float | None = None  # default: the cluster's CPUs shared by the workers, at most 1 each
    batch_size: int = 1024  # rows per parquet read batch
    unit_bytes: int | None = None  # default: unit_bytes_for the input and the workers
    node_resource: str | None = None  # a custom Ray resource: run the work only on nodes that have it
    start_timeout: float = 600.0
    overwrite: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        demo = self.source == "demo"
        if self.output_dir is None:
            billions = self.name.removeprefix("sample-").removesuffix("T")
            self.output_dir = "data/python_docs" if demo else f"data/edu_fineweb{billions}"
        self.output_dir = str(self.output_dir)
        if demo and is_url(self.output_dir):
            raise InputError(f"-o {self.output_dir}: --source demo builds its corpus locally; give a local -o")
        if self.prefix is None:
            self.prefix = "python_docs" if demo else "edu_fineweb"
        if not self.prefix or any(part in self.prefix for part in ("/", "\\", os.sep, "..", "*", "?", "[")):
            raise InputError(f"--prefix {self.prefix!r}: a shard name prefix, not a path (no '/', '..' or "
                             "wildcards); the shards go into -o")
        if self.shard_size is None:
            self.shard_size = DEMO_SHARD_SIZE if demo else FINEWEB_SHARD_SIZE
        if not 1 <= self.shard_size <= MAX_SHARD_TOKENS:
            raise InputError(f"--shard-size must be from 1 to {MAX_SHARD_TOKENS:,} (the shard header counts tokens "
                             f"in an int32), got {self.shard_size:,}")
        for flag, value, lowest in (("--num-workers", self.num_workers, 1), ("--batch-size", self.batch_size, 1),
                                    ("--unit-bytes", self.unit_bytes, 1)):
            if value is not None and value < lowest:
                raise InputError(f"{flag} must be at least {lowest}, got {value}")
        for flag, value in (("--cpus-per-worker", self.cpus_per_worker), ("--start-timeout", self.start_timeout)):
            if value is not None and not value > 0:
                raise InputError(f"{flag} must be positive, got {value:g}")


def _create_output_dir(out: OutputDir) -> None:
    try:
        out.makedirs()
    except OSError as err:
        raise InputError(f"-o {out}: cannot create it ({err.strerror or err})") from err
    out.check_writable()


def resolve_inputs(config: TokenizeConfig) -> InputFiles:
    if config.source == "demo":  # the demo corpus is written into -o
        _create_output_dir(OutputDir(config.output_dir))
        return files_from_demo(local_path(config.output_dir) / "demo_source")
    if config.source == "files":
        return files_from_glob(config.input)
    return files_from_hub(config.name)


# ---- the output directory before a run: refuse, finish, resume or start -------------------------------------

def _shard_files(out: OutputDir, prefix: str = "*") -> list[str]:
    return out.glob(shard_pattern(prefix))


def _refuse_unknown_shards(out: OutputDir) -> None:
    """Shards with neither our manifest nor our state file beside them (llm.c's fineweb.py output, or a run
    whose manifest was deleted) are somebody's data that nothing here can verify: never replace them."""
    if out.exists(MANIFEST_FILE) or out.exists(STATE_FILE):
        return
    if found := _shard_files(out):
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise InputError(f"{out}: already holds shards ({found[0]}{more}) but no {MANIFEST_FILE} or "
                         f"{STATE_FILE} of this pipeline; use another --output-dir, or --overwrite to discard them")


def _discard_previous_run(out: OutputDir) -> None:
    for name in (MANIFEST_FILE, STATE_FILE, PARTS_DIR, *_shard_files(out)):
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


def _finished_manifest(out: OutputDir, fingerprint: dict) -> dict | None:
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


def _recorded_units(out: OutputDir, fingerprint: dict) -> list[WorkUnit] | None:
    """The work units of the unfinished run in `out` (same flags only); None if there is none."""
    if not out.exists(STATE_FILE):
        return None
    state = _read_same_run(out, STATE_FILE, fingerprint, "an unfinished run")
    if state.get("version") != STATE_VERSION:
        raise InputError(f"{out.path(STATE_FILE)}: left by an older version of this pipeline, which cannot "
                         "be resumed; pass --overwrite to start again")
    return [WorkUnit.from_dict(unit) for unit in state["units"]]


def _record_units(out: OutputDir, fingerprint: dict, units: list[WorkUnit]) -> None:
    """Start a run: the state file, written once, names its flags and its work units."""
    out.remove(PARTS_DIR)  # nothing in it can belong to a run without a state file
    out.makedirs(PARTS_DIR)
    out.write_json(STATE_FILE, {"version": STATE_VERSION, "fingerprint": fingerprint,
                                "units": [unit.to_dict() for unit in units]})


# ---- the driver: schedules units and shards, keeps counters --------------------------------------------------

def _suggest_shard_size(total_tokens: int) -> int:
    """About a tenth of the tokens, rounded down to two significant digits: 1 val shard and 9+ train."""
    tenth = max(1, total_tokens // 10)
    scale = 10 ** max(0, len(str(tenth)) - 2)
    return tenth // scale * scale


class _Progress:
    """A bar on a terminal; otherwise (ray job logs) a plain line every PROGRESS_LINE_EVERY_S seconds."""

    def __init__(self, units: int, done: int):
        self.bar = tqdm(total=units, initial=done, desc="tokenize", unit=" units", disable=None, mininterval=1.0,
                        dynamic_ncols=True)
        self.last_line = time.monotonic()

    def update(self, units_done: int, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-9)
        if not self.bar.disable:
            self.bar.n = units_done
            self.bar.set_postfix(tokens=f"{tokens:,}", tok_s=f"{rate:,.0f}")
        elif time.monotonic() - self.last_line >= PROGRESS_LINE_EVERY_S:
            self.last_line = time.monotonic()
            print(f"tokenize: {units_done}/{self.bar.total} units, {tokens:,} tokens this run, {rate:,.0f} tok/s",
                  flush=True)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


class _Driver:
    """Schedules units and shards on the workers and keeps the counters; no token passes through it."""

    def __init__(self, config: TokenizeConfig, out: OutputDir, inputs: InputFiles):
        import ray

        self.ray = ray
        self.config = config
        self.out = out
        self.inputs = inputs
        self.units: list[WorkUnit] = []
        self.counters: dict[int, dict] = {}  # unit -> what its worker reported (done units)
        self.shards: dict[int, dict] = {}  # shard index -> its manifest entry (written shards)
        self.duplicates: dict[int, dict] = {}  # unit -> --dedup's {"docs", "tokens" dropped, "files" naming them}
        self.pending: dict = {}  # ObjectRef -> (worker, WorkUnit) for a unit, (worker, [ShardPlan], dups) for shards
        self.calls: dict = {}  # worker -> calls in flight on it
        self.workers: list = []
        self.num_workers = 0
        self.new_worker = None  # starts one more worker actor
        self.replacements = 0
        self.todo: deque[WorkUnit] = deque()
        self.reserved: dict = {}  # worker -> the unit it is already reading ahead
        self.ordered_units = 0  # units 0..n-1 are all done: their shards' offsets are known
        self.kept_tokens: list[int] = []  # per unit, for units 0..ordered_units-1
        self.unit_ends: list[int] = []  # the end of each of those units in the kept-token stream
        self.shards_launched = 0  # shards 0..n-1 are written or being written
        self.shards_written = 0  # shards 0..n-1 are all written
        self.units_consumed = 0  # units 0..n-1 are in written shards only: their token files are deleted
        self.deleter = ThreadPoolExecutor(4)  # deletions on object stores are requests: off the scheduling loop
        self.tokens_this_run = 0
        self.resumed = {"units": 0, "shards": 0}
        self.remote_args = {"resources": {config.node_resource: NODE_RESOURCE_SHARE}} if config.node_resource else {}

    # ---- resume ------------------------------------------------------------------------------------------
    def load_progress(self) -> None:
        """Units and shards a previous run of the same command finished (re-verified cheaply)."""
        out = self.out
        out.remove_partial_writes(self.config.prefix)

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

        with ThreadPoolExecutor(16) as pool:  # remote storage: many small reads at once
            for counters in pool.map(finished_unit, out.glob(f"{PARTS_DIR}/unit_*.json")):
                if counters is not None:
                    self.counters[counters["unit"]] = counters
            for entries in pool.map(written_shards, out.glob(f"{PARTS_DIR}/shards_*.json")):
                self.shards.update(entries)
        self.resumed = {"units": len(self.counters), "shards": len(self.shards)}

    # ---- workers -----------------------------------------------------------------------------------------
    def size_workers(self) -> None:
        """How many workers, with how many CPUs each; fails at once if no node could ever host one."""
        ray, config = self.ray, self.config
        nodes = [n for n in ray.nodes() if n["Alive"]]
        if config.node_resource:
            nodes = [n for n in nodes if n["Resources"].get(config.node_resource, 0) > 0]
        node_cpus = [n["Resources"].get("CPU", 0) for n in nodes]
        self.num_workers = config.num_workers or int(sum(node_cpus))
        if self.num_workers < 1:
            where = f"no node with the resource {config.node_resource!r} is up yet" if config.node_resource \
                else "the Ray cluster has no CPUs"
            raise InputError(f"--num-workers: {where} to count; give --num-workers")
        self.cpus = config.cpus_per_worker or (1.0 if config.node_resource
                                               else min(1.0, sum(node_cpus) / self.num_workers))
        largest = max(node_cpus, default=0)
        if self.cpus > largest:
            if not config.node_resource:  # no autoscaler adds nodes the job did not ask for by resource
                raise InputError(f"--cpus-per-worker {self.cpus:g}: no node of the cluster has that many CPUs "
                                 f"(the largest has {largest:g}); a worker could never start")
            print(f"note: no node with {config.node_resource!r} and {self.cpus:g} CPUs is up; waiting up to "
                  f"{config.start_timeout:g}s for the autoscaler to start one", flush=True)

    def start_workers(self, columns: list[str]) -> None:
        """Start the actors and wait until each has built its tokenizer; after --start-timeout without any,
        one line says what they need."""
        ray, config, cpus, num_workers = self.ray, self.config, self.cpus, self.num_workers
        job = EncodeJob(self.inputs, self.out, config.filters, columns, config.batch_size)
        self.new_worker = functools.partial(
            ray.remote(TokenizeWorker).options(num_cpus=cpus, **self.remote_args).remote, ray.put(job))
        workers = [self.new_worker() for _ in range(num_workers)]
        asked = {w.ready.remote(): w for w in workers}
        ready, waiting = ray.wait(list(asked), num_returns=len(asked), timeout=config.start_timeout)
        self.workers = [asked[ref] for ref in ready]
        for ref in ready:
            self._result(ref)  # a worker that failed to build its tokenizer (e.g. no vocab) raises here
        for ref in waiting:
            ray.kill(asked[ref])
        if not self.workers:
            raise InputError(f"no tokenizer worker started within --start-timeout {config.start_timeout:g}s: each "
                             f"needs {cpus:g} CPU{' and ' + config.node_resource if config.node_resource else ''}, "
                             "which no node offers (see --cpus-per-worker, --node-resource)")
        if waiting:
            print(f"note: {len(waiting)} of {num_workers} workers did not start within {config.start_timeout:g}s; "
                  f"going on with {len(self.workers)}", flush=True)
        self.calls = dict.fromkeys(self.workers, 0)
        self.num_workers = len(self.workers)
        hosts = set(ray.get(ready))
        print(f"workers: {self.num_workers} x {cpus:g} CPU on {len(hosts)} node(s)", flush=True)

    def stop(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        self.workers, self.pending = [], {}

    def _result(self, ref):
        """ray.get, but an InputError raised in a worker comes back as itself: one line naming the file."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, (InputError, ShardFormatError)):
                raise err.cause from None
            raise

    def _replace(self, lost):
        """A worker died (its node went away, or it ran out of memory): start another in its place."""
        self.replacements += 1
        if self.replacements > MAX_WORKER_REPLACEMENTS * len(self.workers):
            raise RuntimeError(f"tokenizer workers died {self.replacements} times; giving up")
        print("note: a tokenizer worker died; starting another in its place", flush=True)
        worker = self.new_worker()
        self.workers[self.workers.index(lost)] = worker
        self.calls[worker] = self.calls.pop(lost)
        if (reserved := self.reserved.pop(lost, None)) is not None:
            self.todo.appendleft(reserved)
        return worker

    # ---- scheduling --------------------------------------------------------------------------------------
    def _call(self, worker, method: str, *args, payload: tuple) -> None:
        self.pending[getattr(worker, method).remote(*args)] = (worker, *payload)
        self.calls[worker] += 1

    def _dispatch(self, worker) -> None:
        """Give `worker` its next unit, and tell it which one follows so it can read that one ahead."""
        unit = self.reserved.pop(worker, None) or (self.todo.popleft() if self.todo else None)
        if unit is None:
            return
        following = self.todo.popleft() if self.todo else None
        if following is not None:
            self.reserved[worker] = following
        self._call(worker, "encode_unit", unit, following, payload=(unit,))

    def _assemble(self, group: list[ShardPlan], duplicates: dict) -> None:
        worker = min(self.workers, key=self.calls.__getitem__)
        self._call(worker, "assemble_shards", self.config.prefix, group, duplicates, payload=(group, duplicates))

    def _collect(self, timeout: float) -> None:
        done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        for ref in done:
            worker, *payload = self.pending.pop(ref)
            self.calls[worker] -= 1
            try:
                result = self._result(ref)
            except self.ray.exceptions.RayActorError:
                worker = self._replace(worker)
                if len(payload) == 1:
                    self.todo.appendleft(payload[0])
                    self._dispatch(worker)
                else:
                    self._assemble(*payload)
                continue
            if len(payload) == 1:
                self.counters[payload[0].index] = result
                self.tokens_this_run += result["tokens"]
                self._dispatch(worker)
            else:
                self.shards.update({payload[0][0].index + k: entry for k, entry in enumerate(result)})
                self._delete_consumed_units()

    def _delete_consumed_units(self) -> None:
        """Delete the token files of units that only written shards cover, so that -o does not hold every
        token twice until the end (sample-100BT: ~200 GB of shards, and only the units in flight besides)."""
        while self.shards_written in self.shards:
            self.shards_written += 1
        written_tokens = self.shards_written * self.config.shard_size
        while self.units_consumed < self.ordered_units and self.unit_ends[self.units_consumed] <= written_tokens:
            self.deleter.submit(self.out.remove, unit_file(self.units_consumed, "tokens"))
            self.units_consumed += 1

    def _encoding(self) -> bool:
        return any(len(payload) == 1 for _, *payload in self.pending.values())

    def _launch_shards(self, final: bool) -> None:
        """Assemble every shard whose units are all done (all remaining ones if final)."""
        while self.ordered_units < len(self.units) and self.ordered_units in self.counters:
            unit = self.ordered_units
            dropped = self.duplicates.get(unit, {}).get("tokens", 0)
            self.kept_tokens.append(self.counters[unit]["tokens"] - dropped)
            self.unit_ends.append((self.unit_ends[-1] if self.unit_ends else 0) + self.kept_tokens[-1])
            self.ordered_units += 1
        total = sum(self.kept_tokens)
        size = self.config.shard_size
        launch_until = -(-total // size) if final else total // size
        if launch_until <= self.shards_launched:
            return
        plans = [plan for plan in layout_shards(self.kept_tokens, size, range(self.shards_launched, launch_until))
                 if plan.index not in self.shards]
        self.shards_launched = launch_until
        for group in _consecutive_groups(plans, max(1, ASSEMBLE_TOKENS // size)):
            units = {unit for plan in group for unit, _, _ in plan.ranges}
            self._assemble(group, {unit: self.duplicates[unit]["files"] for unit in units & self.duplicates.keys()})

    def run(self, progress: _Progress) -> dict[str, float]:
        """Encode every unit and write every shard; returns the seconds spent encoding and finishing."""
        started = time.monotonic()
        self.todo = deque(unit for unit in self.units if unit.index not in self.counters)
        for worker in self.workers:
            self._dispatch(worker)
        dedup = self.config.filters.dedup
        if not dedup:
            self._launch_shards(final=False)  # what a resumed run can assemble at once
        while self._encoding():
            self._collect(timeout=1.0)
            if not dedup:
                self._launch_shards(final=False)
            progress.update(len(self.counters), self.tokens_this_run, time.monotonic() - started)
        encoded = time.monotonic()
        if dedup:
            kept = sum(c["docs"] - sum(c["dropped"].values()) for c in self.counters.values())
            most = 4 * len(self.workers)
            partitions = max(1, min(most, kept // DEDUP_ROWS_PER_PARTITION))
            self.duplicates = find_duplicates(self.out, [u.index for u in self.units], partitions, self.workers)
        self._launch_shards(final=True)
        while self.pending:
            self._collect(timeout=10.0)
        self.deleter.shutdown()  # waits; a deletion that failed leaves its file to the removal of tokenize_parts/
        return {"tokenize_s": encoded - started, "finish_s": time.monotonic() - encoded}


def _consecutive_groups(plans: list[ShardPlan], most: int) -> list[list[ShardPlan]]:
    groups: list[list[ShardPlan]] = []
    for plan in plans:
        if groups and len(groups[-1]) < most and groups[-1][-1].index + 1 == plan.index:
            groups[-1].append(plan)
        else:
            groups.append([plan])
    return groups


# ---- the job ---------------------------------------------------------------------------------------------------

def tokenize(config: TokenizeConfig) -> dict:
    """Run the job; returns the manifest (also written to OUTPUT_DIR/manifest.json)."""
    from pipelines.cluster import check_address, connect

    started = time.monotonic()
    try:
        check_address(config.address)
    except ConnectionError as err:
        raise InputError(str(err)) from err
    out = OutputDir(config.output_dir)
    out.check_directory()
    inputs = resolve_inputs(config)
    identity = tokenizer_identity()  # also seeds the offline vocab cache before the workers need it
    fingerprint = {"inputs": inputs.paths, "identities": inputs.identities, "shard_size": config.shard_size,
                   "prefix": config.prefix, "filters": config.filters.to_dict(), "tokenizer": identity["ranks_sha256"]}
    _create_output_dir(out)
    if config.overwrite:
        _discard_previous_run(out)
    _refuse_unknown_shards(out)
    if manifest := _finished_manifest(out, fingerprint):
        print(f"already complete: {len(manifest['shards'])} shards, {manifest['total_tokens']:,} tokens "
              f"in {out} (use --overwrite to redo)")
        return manifest
    recorded = _recorded_units(out, fingerprint)  # before Ray starts: a bad state file is a one-line error
    for column in config.filters.threshold_columns():
        if column not in inputs.columns:
            print(f"note: the {column} filter does not apply: {inputs.paths[0]} has no {column!r} column")
    inputs_ready = time.monotonic()

    driver = _Driver(config, out, inputs)
    new_run = False
    try:
        try:
            connect(config.address)
        except ConnectionError as err:
            raise InputError(str(err)) from err
        connected = time.monotonic()
        driver.size_workers()
        if recorded is None:
            recorded = plan_units(inputs, config.unit_bytes or unit_bytes_for(inputs, driver.num_workers))
            _record_units(out, fingerprint, recorded)
            new_run = True
        driver.units = recorded
        driver.load_progress()
        if driver.resumed["units"] or driver.resumed["shards"]:
            print(f"resuming: {driver.resumed['units']}/{len(driver.units)} units and {driver.resumed['shards']} "
                  f"shards already written in {out}")
        driver.start_workers(["text", *[c for c in config.filters.threshold_columns() if c in inputs.columns]])
        workers_ready = time.monotonic()
        with _Progress(len(driver.units), len(driver.counters)) as progress:
            timings = driver.run(progress)
    except BaseException:
        if new_run and not driver.counters:  # a run that failed before any progress leaves -o as it found it
            out.remove(STATE_FILE)
            out.remove(PARTS_DIR)
        raise
    finally:
        driver.stop()

    shards = [driver.shards[index] for index in range(len(driver.shards))]
    if not shards:
        raise InputError("no tokens to write: every document was dropped by the filters")
    total_tokens = sum(s["tokens"] for s in shards)
    timings = {"startup_s": workers_ready - started, "inputs_s": inputs_ready - started,
               "connect_s": connected - inputs_ready, "workers_s": workers_ready - connected, **timings}
    manifest = {
        "fingerprint": fingerprint,
        "source": config.source if config.source != "hub" else f"hf://datasets/HuggingFaceFW/fineweb-edu {config.name}",
        "inputs": inputs.paths,
        "flags": asdict(config),
        "tokenizer": identity,
        "shards": shards,
        "docs": _document_counts(driver),
        "total_tokens": total_tokens,
        "num_workers": driver.num_workers,
        "units": len(driver.units),
        "resumed": driver.resumed,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "wall_time_s": round(time.monotonic() - started, 3),
        "warnings": _warnings(shards, config.shard_size),
    }
    out.write_json(MANIFEST_FILE, manifest)
    out.remove(STATE_FILE)
    out.remove(PARTS_DIR)
    _print_summary(manifest, driver.tokens_this_run, out)
    return manifest


def _document_counts(driver: _Driver) -> dict:
    dropped = {reason: sum(c["dropped"][reason] for c in driver.counters.values()) for reason in DROP_REASONS[1:]}
    dropped["duplicate"] += sum(d["docs"] for d in driver.duplicates.values())  # the workers cannot know these
    read = sum(c["docs"] for c in driver.counters.values())
    return {"read": read, "kept": read - sum(dropped.values()), "dropped": dropped}


def _warnings(shards: list[dict], shard_size: int) -> list[str]:
    if len(shards) > 1:
        return []
    tokens = shards[0]["tokens"]
    return [f"only 1 shard was written: its {tokens:,} tokens (fewer than --shard-size {shard_size:,}) are all in "
            f"the val shard {shards[0]['name']} and there is no train shard, so training's -i would match "
            f"nothing; rerun with --overwrite --shard-size {_suggest_shard_size(tokens)}"]


def _print_summary(manifest: dict, tokens_this_run: int, out: OutputDir) -> None:
    docs, timings, shards = manifest["docs"], manifest["timings_s"], manifest["shards"]
    drops = ", ".join(f"{k} {v:,}" for k, v in docs["dropped"].items() if v) or "none"
    print(f"wrote {len(shards)} shards (1 val + {len(shards) - 1} train), {manifest['total_tokens']:,} tokens from "
          f"{docs['kept']:,}/{docs['read']:,} docs (dropped: {drops}) in {manifest['wall_time_s']:.1f}s -> {out}")
    rate = tokens_this_run / max(timings["tokenize_s"], 1e-9)
    print(f"start-up {timings['startup_s']:.1f}s (inputs {timings['inputs_s']:.1f}s, cluster "
          f"{timings['connect_s']:.1f}s, workers {timings['workers_s']:.1f}s) | tokenizing "
          f"{timings['tokenize_s']:.1f}s at {rate:,.0f} tok/s | finishing {timings['finish_s']:.1f}s")
    for warning in manifest["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)


# ---- command line ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> TokenizeConfig:
    parser = cli.ArgumentParser(prog="tokenize.py", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--name", default="sample-10BT", choices=FINEWEB_EDU_SAMPLES,
                        help="FineWeb-Edu sample on the Hugging Face hub (default sample-10BT)")
    source.add_argument("--input", metavar="GLOB", help="local or cloud parquet / jsonl(.gz) files instead of the hub")
    source.add_argument("--source", choices=["demo"],
                        help="demo: an offline smoke corpus built from this Python's docs (NOT FineWeb)")
    parser.add_argument("-o", "--output-dir",
                        help="where shards go: a directory every node sees, or an s3:// / gs:// URL "
                             "(default data/edu_fineweb10B, or data/python_docs for the demo)")
    parser.add_argument("--prefix", help="shard name prefix (default edu_fineweb; python_docs for the demo)")
    parser.add_argument("--shard-size", type=int, help="tokens per shard (default 100,000,000; 100,000 for the demo)")
    parser.add_argument("--num-workers", type=int, help="tokenizer actors (default: the cluster's CPU count)")
    parser.add_argument("--cpus-per-worker", type=float,
                        help="Ray CPUs per tokenizer actor (default: the cluster's CPUs shared, at most 1)")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per parquet read batch")
    parser.add_argument("--unit-bytes", type=int,
                        help="text bytes per work unit: row groups are merged or cut to this (default: 8 units "
                             "per worker, from 1 to 16 MiB)")
    parser.add_argument("--node-resource", metavar="NAME",
                        help="run only on nodes with this custom Ray resource, e.g. data_node (cluster.yaml's "
                             "CPU data nodes); the job then waits for the autoscaler to start them")
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds to wait for the tokenizer workers to start (default 600)")
    parser.add_argument("--min-int-score", type=int, help="drop docs with int_score below this (if the column exists)")
    parser.add_argument("--min-score", type=float, help="drop docs with score below this (if the column exists)")
    parser.add_argument("--min-language-score", type=float, help="drop docs with language_score below this")
    parser.add_argument("--min-chars", type=int, default=0, help="drop docs shorter than this many characters")
    parser.add_argument("--max-chars", type=int, help="drop docs longer than this many characters")
    parser.add_argument("--dedup", action="store_true", help="drop exact duplicate texts (by 64-bit hash)")
    parser.add_argument("--overwrite", action="store_true", help="discard what a previous run left in --output-dir")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    args = parser.parse_args(argv)
    filters = FilterConfig(min_int_score=args.min_int_score, min_score=args.min_score,
                           min_language_score=args.min_language_score, min_chars=args.min_chars,
                           max_chars=args.max_chars, dedup=args.dedup)
    source = "demo" if args.source else "files" if args.input else "hub"
    return TokenizeConfig(source=source, name=args.name, input=args.input, output_dir=args.output_dir,
                          prefix=args.prefix, shard_size=args.shard_size, filters=filters,
                          num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
                          batch_size=args.batch_size, unit_bytes=args.unit_bytes, node_resource=args.node_resource,
                          start_timeout=args.start_timeout, overwrite=args.overwrite, address=args.address)


def main(argv: list[str] | None = None) -> int:
    # Ray's INFO lines (connecting, packaging the code) would bury a one-line error; the job prints its own.
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    try:
        tokenize(parse_args(argv))
    except (InputError, ShardFormatError) as err:
        print(f"tokenize.py: error: {err}", file=sys.stderr)
        return 2
    return 0
