"""The tokenize job: the input's work units through a Ray Data pipeline, then shards assembled in parallel.

The input is cut into work units of similar text bytes (pipelines.plan), recorded once in -o's state file.
The units not yet done flow through a Ray Data Dataset, FromItems -> MapBatches(Tokenize): each actor of the
Tokenize stage reads a unit, filters and encodes it and writes its tokens into -o itself (pipelines.encode),
returning a few counters. From the units' exact token counts the shards' global offsets follow, and Ray
tasks assemble the shards (pipelines.assemble) as soon as the units they cover are done. --dedup is a hash
shuffle of Ray tasks between the two (pipelines.dedup). No token passes through the driver, the bytes depend
on the inputs and flags alone, and a killed job resumes at the unit and shard it reached (pipelines.workdir).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from pipelines.assemble import assemble_shards
from pipelines.config import TokenizeConfig, create_output_dir, resolve_inputs
from pipelines.dedup import find_duplicates
from pipelines.encode import EncodeJob, Tokenize
from pipelines.filters import DROP_REASONS
from pipelines.plan import ShardPlan, WorkUnit, layout_shards, plan_units, unit_bytes_for
from pipelines.shards import ShardFormatError
from pipelines.sources import InputError, InputFiles
from pipelines.tokenizer import tokenizer_identity
from pipelines.workdir import (
    MANIFEST_FILE,
    PARTS_DIR,
    STATE_FILE,
    OutputDir,
    discard_previous_run,
    finished_manifest,
    finished_work,
    record_units,
    recorded_units,
    refuse_unknown_shards,
    unit_file,
)

ASSEMBLE_TOKENS = 32 << 20  # one assembly task writes consecutive shards up to this many tokens
ASSEMBLE_CPUS = 0.1  # assembly copies bytes: it runs beside the Tokenize actors
DEDUP_ROWS_PER_PARTITION = 2_000_000  # 20 bytes each: a few tens of MB per dedup reduce task
NODE_RESOURCE_SHARE = 0.001  # what each actor and task asks of --node-resource: only where it runs matters


# ---- the driver: feeds the Dataset, launches shard assembly, keeps counters ------------------------------

class Driver:
    """Feeds the job's units to the Ray Data pipeline, launches the shard assembly tasks as the counters come
    back, and keeps the counters; no token passes through it."""

    def __init__(self, config: TokenizeConfig, out: OutputDir, inputs: InputFiles):
        import ray

        self.ray = ray
        self.config = config
        self.out = out
        self.inputs = inputs
        self.units: list[WorkUnit] = []
        self.counters: dict[int, dict] = {}  # unit -> what its Tokenize actor reported (done units)
        self.shards: dict[int, dict] = {}  # shard index -> its manifest entry (written shards)
        self.duplicates: dict[int, dict] = {}  # unit -> --dedup's {"docs", "tokens" dropped, "files" naming them}
        self.assembling: dict = {}  # ObjectRef -> the first shard index of the group it writes
        self.num_workers = 0
        self.cpus = 1.0
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

    def load_progress(self) -> None:
        """Units and shards a previous run of the same command finished (re-verified cheaply)."""
        self.out.remove_partial_writes(self.config.prefix)
        self.counters, self.shards = finished_work(self.out)
        self.resumed = {"units": len(self.counters), "shards": len(self.shards)}

    # ---- the Tokenize actors -----------------------------------------------------------------------------
    def size_workers(self) -> None:
        """How many Tokenize actors, with how many CPUs each; fails at once if no node could ever host one."""
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
        # Below a whole CPU each by default, so that the actors never hold every CPU and the assembly tasks
        # (and Ray Data's own) still run beside them: a pool holding all CPUs of 2 stalls (shared/notes).
        self.cpus = config.cpus_per_worker or (1.0 if config.node_resource
                                               else min(1.0, sum(node_cpus) / self.num_workers) * 0.9)
        largest = max(node_cpus, default=0)
        if self.cpus > largest:
            if not config.node_resource:  # no autoscaler adds nodes the job did not ask for by resource
                raise InputError(f"--cpus-per-worker {self.cpus:g}: no node of the cluster has that many CPUs "
                                 f"(the largest has {largest:g}); a worker could never start")
            print(f"note: no node with {config.node_resource!r} and {self.cpus:g} CPUs is up; waiting up to "
                  f"{config.start_timeout:g}s for the autoscaler to start one", flush=True)

    def wait_for_a_node(self) -> None:
        """Ask for one worker's resources (an autoscaler starts a node for that) and wait up to --start-timeout;
        one line says what a worker needs if none comes. Ray Data's own wait would end in a long trace."""
        probe = self.ray.remote(_hostname).options(num_cpus=self.cpus, **self.remote_args).remote()
        ready, _ = self.ray.wait([probe], timeout=self.config.start_timeout)
        if not ready:
            self.ray.cancel(probe, force=True)
            need = f"{self.cpus:g} CPU{' and ' + self.config.node_resource if self.config.node_resource else ''}"
            raise InputError(f"no tokenizer worker started within --start-timeout {self.config.start_timeout:g}s: "
                             f"each needs {need}, which no node offers (see --cpus-per-worker, --node-resource)")

    def dataset(self, todo: list[WorkUnit], columns: list[str]):
        """FromItems(units) -> MapBatches(Tokenize): one unit per block, so the actors share them evenly."""
        from ray.data import ActorPoolStrategy

        job = EncodeJob(self.inputs, self.out, self.config.filters, columns, self.config.batch_size)
        items = [{"unit": json.dumps(unit.to_dict())} for unit in todo]
        return self.ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            Tokenize, fn_constructor_args=(job,), batch_size=1, compute=ActorPoolStrategy(size=self.num_workers),
            num_cpus=self.cpus, **self.remote_args)

    def _results(self, ds):
        """The counters of each unit as it is done; an input error met in an actor ends the job as one line."""
        for row in ds.iter_rows():
            if row["error"]:
                raise InputError(row["error"])
            yield json.loads(row["counters"])

    # ---- shards ------------------------------------------------------------------------------------------
    def _assemble(self, group: list[ShardPlan], duplicates: dict) -> None:
        task = self.ray.remote(assemble_shards).options(num_cpus=ASSEMBLE_CPUS, **self.remote_args)
        self.assembling[task.remote(self.out, self.config.prefix, group, duplicates)] = group[0].index

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
        written_tokens = self.shards_written * self.config.shard_size
        while self.units_consumed < self.ordered_units and self.unit_ends[self.units_consumed] <= written_tokens:
            self.deleter.submit(self.out.remove, unit_file(self.units_consumed, "tokens"))
            self.units_consumed += 1

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

    def run(self, columns: list[str]) -> dict[str, float]:
        """Encode every unit and write every shard; returns the seconds spent encoding and finishing."""
        started = time.monotonic()
        dedup = self.config.filters.dedup
        if not dedup:
            self._launch_shards(final=False)  # what a resumed run can assemble at once
        if todo := [unit for unit in self.units if unit.index not in self.counters]:
            self.wait_for_a_node()
            for counters in self._results(self.dataset(todo, columns)):
                self.counters[counters["unit"]] = counters
                self.tokens_this_run += counters["tokens"]
                if not dedup:
                    self._launch_shards(final=False)
                self._collect(timeout=0)
        encoded = time.monotonic()
        if dedup:
            kept = sum(c["docs"] - sum(c["dropped"].values()) for c in self.counters.values())
            partitions = max(1, min(4 * self.num_workers, kept // DEDUP_ROWS_PER_PARTITION))
            self.duplicates = find_duplicates(self.out, [u.index for u in self.units], partitions,
                                              num_cpus=ASSEMBLE_CPUS, **self.remote_args)
        self._launch_shards(final=True)
        while self.assembling:
            self._collect(timeout=10.0)
        self.deleter.shutdown()  # waits; a deletion that failed leaves its file to the removal of tokenize_parts/
        return {"tokenize_s": encoded - started, "finish_s": time.monotonic() - encoded}


def _hostname() -> str:
    return socket.gethostname()


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


# ---- the job ------------------------------------------------------------------------------------------------

def tokenize(config: TokenizeConfig) -> dict:
    """Run the job; returns the manifest (also written to OUTPUT_DIR/manifest.json)."""
    from common.cluster import check_address, connect

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
    create_output_dir(out)
    if config.overwrite:
        discard_previous_run(out)
    refuse_unknown_shards(out)
    if manifest := finished_manifest(out, fingerprint):
        print(f"already complete: {len(manifest['shards'])} shards, {manifest['total_tokens']:,} tokens "
              f"in {out} (use --overwrite to redo)")
        return manifest
    recorded = recorded_units(out, fingerprint)  # before Ray starts: a bad state file is a one-line error
    for column in config.filters.threshold_columns():
        if column not in inputs.columns:
            print(f"note: the {column} filter does not apply: {inputs.paths[0]} has no {column!r} column")
    inputs_ready = time.monotonic()

    driver = Driver(config, out, inputs)
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
            record_units(out, fingerprint, recorded)
            new_run = True
        driver.units = recorded
        driver.load_progress()
        if driver.resumed["units"] or driver.resumed["shards"]:
            print(f"resuming: {driver.resumed['units']}/{len(driver.units)} units and {driver.resumed['shards']} "
                  f"shards already written in {out}")
        timings = driver.run(["text", *[c for c in config.filters.threshold_columns() if c in inputs.columns]])
    except BaseException:
        if new_run and not driver.counters:  # a run that failed before any progress leaves -o as it found it
            out.remove(STATE_FILE)
            out.remove(PARTS_DIR)
        raise

    shards = [driver.shards[index] for index in range(len(driver.shards))]
    if not shards:
        raise InputError("no tokens to write: every document was dropped by the filters")
    total_tokens = sum(s["tokens"] for s in shards)
    timings = {"startup_s": connected - started, "inputs_s": inputs_ready - started,
               "connect_s": connected - inputs_ready, **timings}
    manifest = {
        "fingerprint": fingerprint,
        "source": config.source if config.source != "hub" else f"hf://datasets/{config.dataset} {config.name}",
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


def _document_counts(driver: Driver) -> dict:
    dropped = {reason: sum(c["dropped"][reason] for c in driver.counters.values()) for reason in DROP_REASONS[1:]}
    dropped["duplicate"] += sum(d["docs"] for d in driver.duplicates.values())  # the workers cannot know these
    read = sum(c["docs"] for c in driver.counters.values())
    return {"read": read, "kept": read - sum(dropped.values()), "dropped": dropped}


def _suggest_shard_size(total_tokens: int) -> int:
    """About a tenth of the tokens, rounded down to two significant digits: 1 val shard and 9+ train."""
    tenth = max(1, total_tokens // 10)
    scale = 10 ** max(0, len(str(tenth)) - 2)
    return tenth // scale * scale


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
          f"{timings['connect_s']:.1f}s) | tokenizing (Tokenize actors' start-up included) "
          f"{timings['tokenize_s']:.1f}s at {rate:,.0f} tok/s | finishing {timings['finish_s']:.1f}s")
    for warning in manifest["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
