"""Evals beside training, placed once at launch where they keep up with it: run.py -h 1 (HellaSwag at llm.c's
eval steps) and --core-every N (CORE every N steps, and on the whole bundle at the last step).

Placements (`--eval-on`):
- tasks: rank 0 puts a weights-only snapshot of the model in Ray's object store (bf16 from a GPU run, fp32
  from a CPU one) and K Ray tasks score it on accelerators no training worker holds (or on CPUs when training
  itself runs on CPU) while training goes on. One eval runs at a time and only the newest waits
  (`evals.parallel.ConcurrentEvals`), so slow evals skip steps, recorded, instead of queueing without end.
- ranks: every rank scores a disjoint slice of the batch plan with the model it is training and rank 0
  gathers the scores: training pauses for the eval, but every accelerator works on it and no second copy
  of the model is loaded. The result equals the single-process scorer's exactly.
- auto: tasks when the cluster has accelerators for them (or on a CPU run), else ranks.
Results go to main.log (`s:%d eval:%f` / `s:%d core:%f`, in step order), the console, `on_result` (gauges,
reports, summary) and one JSON line each in hellaswag.jsonl / core.jsonl, skipped steps included.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.files import atomic_write
from evals.core_data import locate_bundle, read_bundle
from evals.core_scoring import plan as core_plan
from evals.hellaswag_data import load_examples
from evals.parallel import ConcurrentEvals, EvalHandle, EvalSet, WeightsSnapshot, deal
from evals.scoring import (
    Batch,
    RowScores,
    default_batch_tokens,
    forward_flops,
    hellaswag_result,
    plan_batches,
    score_live_model,
)
from gpt2.interop import read_llmc_header
from gpt2.model import GPT, GPTConfig
from gpt2.rundir import CORE_RECORDS, HELLASWAG_RECORDS, MAIN_LOG
from training.config import TrainConfig
from training.metrics import flops_per_token, peak_flops

Result = dict[str, Any]
Plan = tuple[list[Batch], Callable[[RowScores], Result]]  # batches, and how their rows' scores read
PLACEMENTS = ("auto", "tasks", "ranks")
# Stated fractions of peak FLOP/s for the cost model: a training step at llm.c's MFU, and the eval's padded,
# forward-only batches (bench/hellaswag_bench.py prints the prediction against a measured eval).
TRAIN_EFFICIENCY = 0.40
EVAL_EFFICIENCY = 0.30


@dataclass
class CoreSettings:
    """run.py's --core-* flags, as they travel to the workers; `placement` is decided once, at launch."""

    bundle: str | None  # an unzipped eval bundle; None = the public one (downloaded, cached)
    placement: str  # "tasks" or "ranks"
    tasks: int
    cpus_per_task: float
    gpus_per_task: float
    every: int
    max_per_task: int  # 0 = all; the last step's eval always scores all
    context_length: int = 1024  # the model's block size: prompts are cut to it


@dataclass
class HellaSwagSettings:
    """run.py's -h flags, as they travel to the workers; `placement` is decided once, at launch."""

    file: str | None  # jsonl or llm.c eval .bin; None = the canonical validation set (downloaded, cached)
    placement: str  # "tasks" or "ranks"
    tasks: int
    cpus_per_task: float
    gpus_per_task: float


def choose_placement(eval_on: str, use_gpu: bool, workers: int, cluster: dict[str, float], tasks: int,
                     gpus_per_task: float) -> tuple[str, str]:
    """(placement, why) for `--eval-on` given the cluster's resources (ray.cluster_resources())."""
    if eval_on == "ranks":
        return "ranks", f"--eval-on ranks: in-loop on all {workers} training rank(s)"
    if not use_gpu:
        return "tasks", f"{tasks} Ray task(s) on CPUs beside the CPU training workers"
    spare = cluster.get("GPU", 0.0) - workers
    need = tasks * gpus_per_task
    if eval_on == "tasks":
        where = f"{need:g} GPU(s)" if need else "CPUs, as asked (--eval-gpus-per-task 0)"
        return "tasks", f"--eval-on tasks: {tasks} Ray task(s) on {where}; {spare:g} GPU(s) free now"
    if need > 0 and spare >= need:
        return "tasks", f"{tasks} Ray task(s) x {gpus_per_task:g} GPU on the {spare:g} GPU(s) no training worker holds"
    return "ranks", (f"in-loop on all {workers} training rank(s): the workers hold every GPU ({spare:g} spare, "
                     f"tasks need {need:g}); --eval-on tasks with an eval node type adds GPUs for them")


def cpu_flops_per_second(threads: int) -> float:
    """This process's fp32 matmul rate with `threads` threads: a CPU worker's peak for the cost model."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.randn(512, 512)
    a @ a  # warm-up
    started, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ a
    torch.set_num_threads(previous)
    return repeats * 2 * 512**3 / (time.perf_counter() - started)


Settings = HellaSwagSettings | CoreSettings


@dataclass
class RunShape:
    """What the cost model needs to know of the training run."""

    model: GPTConfig
    num_params: int
    workers: int
    tokens_per_step: int
    seq_len: int
    val_every: int


def predicted_seconds(eval_flops: int, settings: Settings, device_peak: float, workers: int) -> float:
    """Seconds one eval takes on its placement: FLOPs over the peak of the devices doing it, at EVAL_EFFICIENCY.
    `device_peak` is one training worker's (a GPU's, or the measured rate of a CPU worker's threads)."""
    devices = workers if settings.placement == "ranks" else settings.tasks * (settings.gpus_per_task or 1)
    return eval_flops / (device_peak * devices * EVAL_EFFICIENCY)


def cost_line(run: RunShape, eval_flops: int, settings: Settings, gpu_name: str | None, cpus_per_worker: float,
              name: str = "hellaswag", flag: str = "-v") -> str:
    """Estimated seconds per eval on the chosen placement against the training seconds between evals, both
    from FLOPs, a device peak (the GPU's table entry, or the CPU's measured matmul rate) and a stated
    efficiency; says what to do when tasks cannot keep up."""
    if gpu_name:
        train_peak = eval_peak = peak_flops(gpu_name, bf16=True)
        if train_peak is None:
            return f"{name} cost model: n/a (no peak FLOP/s known for {gpu_name})"
    else:  # a CPU's peak is what its threads measure; an eval task gets int(--eval-cpus-per-task) threads
        train_peak = cpu_flops_per_second(max(1, round(cpus_per_worker)))
        eval_peak = train_peak if settings.placement == "ranks" else cpu_flops_per_second(
            max(1, int(settings.cpus_per_task)))
    train_flops = run.val_every * run.tokens_per_step * flops_per_token(run.num_params, run.model, run.seq_len)
    train_seconds = train_flops / (train_peak * run.workers * TRAIN_EFFICIENCY)
    eval_seconds = predicted_seconds(eval_flops, settings, eval_peak, run.workers)
    line = (f"{name} cost model: {eval_flops / 1e12:.3g} TFLOP per eval, est. {eval_seconds:.3g} s on "
            f"{settings.placement} vs est. {train_seconds:.3g} s of training between evals ({flag} {run.val_every})")
    if settings.placement == "ranks":
        return line + f": training pauses ~{100 * eval_seconds / train_seconds:.2g}% of the time"
    if eval_seconds > train_seconds:
        return line + (f"; the tasks cannot keep up, so some steps will be skipped: raise {flag}, give them more "
                       "(--eval-tasks, --eval-gpus-per-task) or use --eval-on ranks")
    return line + "; the tasks keep up"


def model_shape(descriptor: str) -> GPTConfig:
    """The shape of -e: a descriptor (d12, L2H2C64) or an llm.c model file's header."""
    return read_llmc_header(descriptor)[0] if descriptor.endswith(".bin") else GPTConfig.from_descriptor(descriptor)


def _place(name: str, flag: str, every: int, eval_on: str, tasks: int, gpus_per_task: float, config: TrainConfig,
           workers: int, use_gpu: bool, cpus_per_worker: float, cluster: dict[str, float],
           settings_of: Callable[[str], Settings], plan_flops: Callable[[GPTConfig, str], int]) -> Settings:
    """At launch, in the driver: decide an eval's placement and print it, and the cost model, in one line each."""
    placement, why = choose_placement(eval_on, use_gpu, workers, cluster, tasks, gpus_per_task)
    settings = settings_of(placement)
    print(f"{name}: {placement}: {why}", flush=True)
    shape = model_shape(config.model)
    with torch.device("meta"):
        num_params = GPT(shape).num_parameters()
    run = RunShape(shape, num_params, workers, config.tokens_per_step(workers), config.seq_len, every)
    # Ray names each GPU node's model as a resource, e.g. accelerator_type:H100
    gpu_name = next((k.split(":", 1)[1] for k in cluster if k.startswith("accelerator_type:")), None) if use_gpu \
        else None
    print(cost_line(run, plan_flops(shape, "cuda" if use_gpu else "cpu"), settings, gpu_name, cpus_per_worker,
                    name, flag), flush=True)
    return settings


def settle(eval_on: str, file: str | None, tasks: int, cpus_per_task: float, gpus_per_task: float,
           config: TrainConfig, workers: int, use_gpu: bool, cpus_per_worker: float,
           cluster: dict[str, float]) -> HellaSwagSettings:
    """HellaSwag's placement and cost model (-h 1: every -v step)."""
    examples = load_examples(file)
    return _place("hellaswag", "-v", config.val_every, eval_on, tasks, gpus_per_task, config, workers, use_gpu,
                  cpus_per_worker, cluster,
                  lambda placement: HellaSwagSettings(file, placement, tasks, cpus_per_task, gpus_per_task),
                  lambda shape, device: forward_flops(shape, plan_batches(examples, default_batch_tokens(device))))


def settle_core(eval_on: str, bundle: str | None, every: int, max_per_task: int, tasks: int, cpus_per_task: float,
                gpus_per_task: float, config: TrainConfig, workers: int, use_gpu: bool, cpus_per_worker: float,
                cluster: dict[str, float]) -> CoreSettings:
    """CORE's placement and cost model (--core-every N: the periodic, --core-max-per-task eval)."""
    tasks_read = read_bundle(locate_bundle(bundle), max_per_task or None)
    context = model_shape(config.model).block_size
    return _place("core", "--core-every", every, eval_on, tasks, gpus_per_task, config, workers, use_gpu,
                  cpus_per_worker, cluster,
                  lambda placement: CoreSettings(bundle, placement, tasks, cpus_per_task, gpus_per_task, every,
                                                 max_per_task, context),
                  lambda shape, device: forward_flops(shape, core_plan(tasks_read, shape.block_size,
                                                                       default_batch_tokens(device)).batches))


class EvalBesideTraining(ABC):
    """An eval of the training run's checkpoints on one rank: `on_eval` at the engine's eval steps, `poll`
    every step (rank 0), `finish` before exiting. Subclasses say what is scored (`plans`), when (`due`) and how
    it reads (`describe`).

    A run resumed at step S keeps the records file's lines up to S (later steps are trained, and evaluated,
    again) and scores step S again only if its eval ran in Ray tasks and was lost with the run that stopped."""

    name = ""  # the console's prefix
    records_name = ""  # its records in the run directory (gpt2/rundir.py names them)
    stream, key = "eval", "acc_norm"  # main.log's stream and the result's value written there

    def __init__(self, settings: Settings, out_dir: Path, device: torch.device, rank: int, world: int,
                 on_result: Callable[[int, Result], None], resume_step: int | None = None):
        self.settings, self.device, self.rank, self.world, self.on_result = settings, device, rank, world, on_result
        self.resume_step = resume_step
        # batches sized for where they are scored: this rank's device, or the eval tasks'
        where = device if settings.placement == "ranks" else "cuda" if settings.gpus_per_task > 0 else "cpu"
        self.plans = self.plans_for(default_batch_tokens(where))
        self.snapshot_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.evals = None
        self.records = out_dir / self.records_name
        self.steps_done = 0
        self.recorded_steps: set[int] = set()
        if rank == 0 and resume_step is not None:
            self.recorded_steps = self._keep_records_up_to(resume_step)
        if rank == 0:
            if settings.placement == "tasks":  # each distinct plan dealt to the tasks once, for the whole run
                dealt = {id(plan): EvalSet(deal(plan[0], settings.tasks), plan[1]) for plan in self.plans.values()}
                self.eval_sets = {last: dealt[id(plan)] for last, plan in self.plans.items()}
            self.evals = ConcurrentEvals(None, out_dir / MAIN_LOG, settings.cpus_per_task, settings.gpus_per_task,
                                         report=self._record, on_skip=self._skipped, stream=self.stream, key=self.key,
                                         name=self.name)

    @abstractmethod
    def plans_for(self, batch_tokens: int) -> dict[bool, Plan]:
        """{last step?: (batches, summarize)}: what a periodic eval and the last step's eval score."""

    def due(self, step: int, last: bool) -> bool:
        return True

    @abstractmethod
    def describe(self, result: Result) -> str:
        """The console's one line for a result."""

    def on_eval(self, step: int, model: GPT, last: bool = False) -> None:
        if not self.due(step, last):
            return
        # an in-loop eval finished before its step's checkpoint was written: every rank skips it alike
        if step == self.resume_step and (self.settings.placement == "ranks" or step in self.recorded_steps):
            return
        if self.settings.placement == "tasks":
            if self.evals:  # rank 0: the other ranks train on
                self.evals.submit(step, WeightsSnapshot.of(model, self.snapshot_dtype), self.eval_sets[last])
            return
        started = time.time()
        batches, summarize = self.plans[last]
        mine = batches[self.rank::self.world]  # a rank past the last batch (more ranks than batches) adds nothing
        parts = [score_live_model(model, mine) if mine else None]
        if self.world > 1:  # every rank reaches this at the same step: a collective like the val loss
            parts = [None] * self.world
            dist.all_gather_object(parts, score_live_model(model, mine) if mine else None)
        if self.evals:
            rows = RowScores.concatenate(part for part in parts if part is not None)
            self.evals.record(step, {**summarize(rows), "seconds": round(time.time() - started, 3)})

    def poll(self, steps_done: int) -> None:
        """Rank 0, once per step: collect a finished eval and start the waiting one; never blocks."""
        self.steps_done = steps_done
        self._guarded(self.evals.poll)

    def finish(self) -> None:
        """Rank 0, before exiting: wait for the last step's eval (an older one still running is cancelled)."""
        self._guarded(self.evals.finish)

    def _guarded(self, collect: Callable[[], object]) -> None:
        try:
            collect()
        except Exception as err:  # a failed eval costs its line, not the training run
            print(f"{self.name}: an eval failed and is skipped: {type(err).__name__}: {err}", flush=True)

    def _keep_records_up_to(self, step: int) -> set[int]:
        if not self.records.exists():
            return set()
        kept = {}
        for line in self.records.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the stopped run's last line, cut short
                continue
            if record["step"] <= step:
                kept[record["step"]] = line
        with atomic_write(self.records, "w") as f:
            f.write("".join(line + "\n" for line in kept.values()))
        return set(kept)

    def _write(self, record: dict) -> None:
        with open(self.records, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _skipped(self, step: int, reason: str) -> None:
        print(f"step {step} | {self.name} skipped: {reason}", flush=True)
        self._write({"step": step, "skipped": reason, "steps_done": self.steps_done})

    def _record(self, step: int, result: Result, handle: EvalHandle | None) -> None:
        mode = "ray tasks" if handle else "ranks"
        print(f"step {step} | {self.describe(result)} | {mode}", flush=True)
        record = {"step": step, **result, "mode": mode, "collected_at": time.time(),
                  "steps_done_at_collection": self.steps_done}
        if handle:
            record.update(submitted_at=handle.submitted_at, task_spans=handle.task_spans,
                          seconds=round(max(e for _, e in handle.task_spans) - handle.submitted_at, 3))
        self._write(record)
        self.on_result(step, result)


class HellaSwagBesideTraining(EvalBesideTraining):
    """run.py -h 1: HellaSwag at every eval step (-v and the last)."""

    name = "hellaswag"
    records_name = HELLASWAG_RECORDS

    def plans_for(self, batch_tokens: int) -> dict[bool, Plan]:
        plan = (plan_batches(load_examples(self.settings.file), batch_tokens), hellaswag_result)
        return {False: plan, True: plan}

    def describe(self, result: Result) -> str:
        return (f"hellaswag acc_norm {result['acc_norm']:.4f} (acc {result['acc']:.4f}) | {result['num_total']} "
                "examples")


class CoreBesideTraining(EvalBesideTraining):
    """run.py --core-every N: CORE at every N-th step (a multiple of -v) on --core-max-per-task examples per
    task, and on the whole bundle at the last step."""

    name = "core"
    records_name = CORE_RECORDS
    stream, key = "core", "core"

    def plans_for(self, batch_tokens: int) -> dict[bool, Plan]:
        bundle = locate_bundle(self.settings.bundle)
        context = self.settings.context_length

        def planned(max_per_task: int | None) -> Plan:
            core = core_plan(read_bundle(bundle, max_per_task), context, batch_tokens)
            return core.batches, core.summarize

        periodic = planned(self.settings.max_per_task or None)
        return {False: periodic, True: planned(None) if self.settings.max_per_task else periodic}

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.settings.every == 0

    def describe(self, result: Result) -> str:
        return f"CORE {result['core']:.4f} | {len(result['tasks'])} tasks, {result['num_total']} examples"
