"""The tokenize job: the input's work units through a Ray Data pipeline that tokenizes them and writes shards.

The input is cut into work units of similar text bytes (pipelines.plan), recorded once in -o's state file.
The units not yet done flow through a Ray Data Dataset (pipelines.dataset), a block per unit:
Read{Parquet,JSON}->MapBatches(Filter)->MapBatches(Tokenize) -> MapBatches(WriteShards). Each actor of the
Tokenize stage reads, filters and encodes a unit and writes its tokens into -o itself (pipelines.encode),
passing on a few counters; from the units' exact token counts the shards' global offsets follow, and
WriteShards launches the Ray tasks that assemble the shards (pipelines.assemble) as soon as the units they
cover are done. --dedup is a hash shuffle of Ray tasks before the shards (pipelines.dedup). No token passes
through the driver, the bytes depend on the inputs and flags alone, and a killed job resumes at the unit and
shard it reached (pipelines.workdir).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import asdict

from pipelines.assemble import ShardAssembler
from pipelines.config import TokenizeConfig, create_output_dir, resolve_inputs
from pipelines.dedup import count_duplicates
from pipelines.filters import DROP_REASONS, document_columns
from pipelines.plan import WorkUnit, plan_units, unit_bytes_for
from pipelines.sources import InputError, InputFiles
from pipelines.tokenizer import tokenizer_identity
from pipelines.workdir import (
    MANIFEST_FILE,
    PARTS_DIR,
    STATE_FILE,
    OutputDir,
    claimed,
    discard_previous_run,
    finished_manifest,
    finished_work,
    record_units,
    recorded_units,
    refuse_unknown_shards,
)

TOKENIZE_SHARE = 0.8  # of a CPU per Tokenize actor by default: the rest is for WriteShards and the assembly
LIGHT_CPUS = 0.05  # what WriteShards and the assembly tasks ask for: they are short next to the BPE
NODE_RESOURCE_SHARE = 0.001  # what each actor and task asks of --node-resource: only where it runs matters


# ---- the driver: builds the Dataset, sizes its stages, reads its outcome ---------------------------------

class Driver:
    """Runs the job's units through the Ray Data pipeline (pipelines.dataset) and keeps their counters; no token
    passes through it."""

    def __init__(self, config: TokenizeConfig, out: OutputDir, inputs: InputFiles):
        import ray

        self.ray = ray
        self.config = config
        self.out = out
        self.inputs = inputs
        self.units: list[WorkUnit] = []
        self.counters: dict[int, dict] = {}  # unit -> what its Tokenize actor reported (done units)
        self.shards: dict[int, dict] = {}  # shard index -> its manifest entry (written shards)
        self.duplicate_docs = 0  # documents --dedup dropped
        self.num_workers = 0
        self.cpus = 1.0
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
        # Below a whole CPU each by default, so that the actors never hold every CPU and the read, WriteShards
        # and assembly tasks still run beside them: on a 2-CPU node a pool holding every CPU stalls the pipeline.
        self.cpus = config.cpus_per_worker or (1.0 if config.node_resource
                                               else min(1.0, sum(node_cpus) / self.num_workers) * TOKENIZE_SHARE)
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

    def assembler_args(self) -> dict:
        config = self.config
        return {"out": self.out, "prefix": config.prefix, "shard_size": config.shard_size, "units": len(self.units),
                "dedup": config.filters.dedup, "counters": self.counters, "shards": self.shards,
                "workers": self.num_workers, "remote_args": self.remote_args}

    def dataset(self, todo: list[WorkUnit], columns: list[str]):
        """Read{Parquet,JSON}->MapBatches(Filter)->MapBatches(Tokenize) -> MapBatches(WriteShards), a block per
        unit all the way (a read task per block requested, and a block size limit above any unit's)."""
        from ray.data import ActorPoolStrategy

        from pipelines.dataset import Filter, Tokenize, UnitSource, WriteShards

        # Read and Filter ask for what a Tokenize actor asks, so Ray Data fuses them into the actor pool: each
        # actor reads, filters and encodes its unit, as the BPE needs the CPU anyway. Separate read tasks took
        # CPU from the BPE in processes of their own and sent every document through the object store.
        tokenize = {"num_cpus": self.cpus, **self.remote_args}
        actors = min(self.num_workers, len(todo))  # an actor without a unit would only start up
        source = UnitSource(self.inputs, columns, todo, self.config.batch_size)
        ds = self.ray.data.read_datasource(source, override_num_blocks=len(todo), **tokenize) \
            .map_batches(Filter(self.config.filters), batch_size=None, batch_format="pyarrow", **tokenize) \
            .map_batches(Tokenize, fn_constructor_args=(self.out, self.config.filters.dedup), batch_size=None,
                         batch_format="pyarrow", compute=ActorPoolStrategy(size=actors), **tokenize) \
            .map_batches(WriteShards, fn_constructor_args=(self.assembler_args(),), batch_size=None,
                         compute=ActorPoolStrategy(size=1), num_cpus=LIGHT_CPUS, **self.remote_args)
        # a unit must stay one block (its Tokenize call writes its file): no size limit may split it
        largest = max(unit.text_bytes for unit in todo)
        ds.context.target_max_block_size = max(ds.context.target_max_block_size or 0, 2 * largest)
        return ds

    def run(self, columns: list[str]) -> dict[str, float]:
        """Encode every unit and write every shard; returns the seconds spent encoding and finishing."""
        started = encoded = time.time()  # wall clock: the Tokenize actors stamp their counters with it
        if todo := [unit for unit in self.units if unit.index not in self.counters]:
            self.wait_for_a_node()
            for row in self.dataset(todo, columns).iter_rows():
                if row["error"]:  # an input error met in a stage ends the job as one line
                    raise InputError(row["error"])
                counters = json.loads(row["counters"])
                encoded = max(encoded, counters.pop("encoded_at"))
                self.counters[counters["unit"]] = counters
                self.tokens_this_run += counters["tokens"]
        else:  # a resume with every unit done: only shards are left
            ShardAssembler(**self.assembler_args()).finish()
        encoded = min(encoded, time.time())
        self.counters, self.shards = finished_work(self.out)
        self.duplicate_docs = count_duplicates(self.out)
        return {"tokenize_s": encoded - started, "finish_s": time.time() - encoded}


def _hostname() -> str:
    return socket.gethostname()


# ---- the job ------------------------------------------------------------------------------------------------

def tokenize(config: TokenizeConfig) -> dict:
    """Run the job; returns the manifest (also written to OUTPUT_DIR/manifest.json)."""
    from common.cluster import check_address

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
    with claimed(out):
        return _tokenize_into(out, config, inputs, identity, fingerprint, started)


def _tokenize_into(out: OutputDir, config: TokenizeConfig, inputs: InputFiles, identity: dict, fingerprint: dict,
                   started: float) -> dict:
    """The job once -o is this job's alone (its lock held): resume, finish or start, and write the manifest."""
    from common.cluster import connect

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
        timings = driver.run(document_columns(inputs.columns, config.filters))
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
    dropped["duplicate"] += driver.duplicate_docs  # the Tokenize actors cannot know these
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
