"""run.py -h 1: HellaSwag at llm.c's eval steps, placed once at launch where it keeps up with training.

Placements (`--eval-on`):
- tasks: rank 0 puts a weights-only snapshot of the model in Ray's object store (bf16 from a GPU run, fp32
  from a CPU one) and K Ray tasks score it on accelerators no training worker holds (or on CPUs when training
  itself runs on CPU) while training goes on. One eval runs at a time and only the newest waits
  (`evals.parallel.ConcurrentEvals`), so slow evals skip steps, recorded, instead of queueing without end.
- ranks: every rank scores a disjoint slice of the batch plan with the model it is training and the counts
  are summed over ranks: training pauses for the eval, but every accelerator works on it and no second copy
  of the model is loaded. The counts equal the single-process scorer's exactly.
- auto: tasks when the cluster has accelerators for them (or on a CPU run), else ranks.
Results go to main.log (`s:%d eval:%f`, in step order), the console, `on_result` (gauges, reports, summary)
and one JSON line each in hellaswag.jsonl, skipped steps included.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from evals.hellaswag_data import load_examples
from evals.parallel import ConcurrentEvals, EvalHandle, WeightsSnapshot, prepare
from evals.scoring import (
    Scores,
    counts,
    default_batch_tokens,
    forward_flops,
    plan_batches,
    score_live_model,
    summarize_counts,
)
from gpt2.interop import read_llmc_header
from gpt2.model import GPT, GPTConfig
from pipelines.files import atomic_write
from training.config import TrainConfig
from training.metrics import flops_per_token, peak_flops

Result = dict[str, float | int]
PLACEMENTS = ("auto", "tasks", "ranks")
# Stated fractions of peak FLOP/s for the cost model: a training step at llm.c's MFU, and the eval's padded,
# forward-only batches (bench/hellaswag_bench.py prints the prediction against a measured eval).
TRAIN_EFFICIENCY = 0.40
EVAL_EFFICIENCY = 0.30


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


@dataclass
class RunShape:
    """What the cost model needs to know of the training run."""

    model: GPTConfig
    num_params: int
    workers: int
    tokens_per_step: int
    seq_len: int
    val_every: int


def predicted_seconds(eval_flops: int, settings: HellaSwagSettings, device_peak: float, workers: int) -> float:
    """Seconds one eval takes on its placement: FLOPs over the peak of the devices doing it, at EVAL_EFFICIENCY.
    `device_peak` is one training worker's (a GPU's, or the measured rate of a CPU worker's threads)."""
    devices = workers if settings.placement == "ranks" else settings.tasks * (settings.gpus_per_task or 1)
    return eval_flops / (device_peak * devices * EVAL_EFFICIENCY)


def cost_line(run: RunShape, eval_flops: int, settings: HellaSwagSettings, gpu_name: str | None,
              cpus_per_worker: float) -> str:
    """Estimated seconds per eval on the chosen placement against the training seconds between evals, both
    from FLOPs, a device peak (the GPU's table entry, or the CPU's measured matmul rate) and a stated
    efficiency; says what to do when tasks cannot keep up."""
    if gpu_name:
        train_peak = eval_peak = peak_flops(gpu_name, bf16=True)
        if train_peak is None:
            return f"hellaswag cost model: n/a (no peak FLOP/s known for {gpu_name})"
    else:  # a CPU's peak is what its threads measure; an eval task gets int(--eval-cpus-per-task) threads
        train_peak = cpu_flops_per_second(max(1, round(cpus_per_worker)))
        eval_peak = train_peak if settings.placement == "ranks" else cpu_flops_per_second(
            max(1, int(settings.cpus_per_task)))
    train_flops = run.val_every * run.tokens_per_step * flops_per_token(run.num_params, run.model, run.seq_len)
    train_seconds = train_flops / (train_peak * run.workers * TRAIN_EFFICIENCY)
    eval_seconds = predicted_seconds(eval_flops, settings, eval_peak, run.workers)
    line = (f"hellaswag cost model: {eval_flops / 1e12:.3g} TFLOP per eval, est. {eval_seconds:.3g} s on "
            f"{settings.placement} vs est. {train_seconds:.3g} s of training between evals (-v {run.val_every})")
    if settings.placement == "ranks":
        return line + f": training pauses ~{100 * eval_seconds / train_seconds:.2g}% of the time"
    if eval_seconds > train_seconds:
        return line + ("; the tasks cannot keep up, so some steps will be skipped: raise -v, give them more "
                       "(--eval-tasks, --eval-gpus-per-task) or use --eval-on ranks")
    return line + "; the tasks keep up"


def _model_shape(descriptor: str) -> GPTConfig:
    return read_llmc_header(descriptor)[0] if descriptor.endswith(".bin") else GPTConfig.from_descriptor(descriptor)


def settle(eval_on: str, file: str | None, tasks: int, cpus_per_task: float, gpus_per_task: float,
           config: TrainConfig, workers: int, use_gpu: bool, cpus_per_worker: float,
           cluster: dict[str, float]) -> HellaSwagSettings:
    """At launch, in the driver: decide the placement and print it, and the cost model, in one line each."""
    placement, why = choose_placement(eval_on, use_gpu, workers, cluster, tasks, gpus_per_task)
    settings = HellaSwagSettings(file, placement, tasks, cpus_per_task, gpus_per_task)
    print(f"hellaswag: {placement}: {why}", flush=True)
    shape = _model_shape(config.model)
    with torch.device("meta"):
        num_params = GPT(shape).num_parameters()
    batches = plan_batches(load_examples(file), default_batch_tokens("cuda" if use_gpu else "cpu"))
    run = RunShape(shape, num_params, workers, config.tokens_per_step(workers), config.seq_len, config.val_every)
    # Ray names each GPU node's model as a resource, e.g. accelerator_type:H100
    gpu_name = next((k.split(":", 1)[1] for k in cluster if k.startswith("accelerator_type:")), None) if use_gpu \
        else None
    print(cost_line(run, forward_flops(shape, batches), settings, gpu_name, cpus_per_worker), flush=True)
    return settings


class HellaSwagBesideTraining:
    """TrainHooks.on_eval for -h 1 on one rank, `poll` every step (rank 0), `finish` before exiting.

    A run resumed at step S keeps hellaswag.jsonl's records up to S (later steps are trained, and evaluated,
    again) and scores step S again only if its eval ran in Ray tasks and was lost with the run that stopped."""

    def __init__(self, settings: HellaSwagSettings, out_dir: Path, device: torch.device, rank: int, world: int,
                 on_result: Callable[[int, Result], None], resume_step: int | None = None):
        self.settings, self.device, self.rank, self.world, self.on_result = settings, device, rank, world, on_result
        self.resume_step = resume_step
        examples = load_examples(settings.file)
        self.batches = plan_batches(examples, default_batch_tokens(device))
        self.my_batches = self.batches[rank::world]  # this rank's share under --eval-on ranks
        self.snapshot_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.evals = None
        self.records = out_dir / "hellaswag.jsonl"
        self.steps_done = 0
        self.recorded_steps: set[int] = set()
        if rank == 0 and resume_step is not None:
            self.recorded_steps = self._keep_records_up_to(resume_step)
        if rank == 0:
            eval_set = (prepare(examples, settings.tasks, gpu=settings.gpus_per_task > 0)
                        if settings.placement == "tasks" else None)
            self.evals = ConcurrentEvals(eval_set, out_dir / "main.log", settings.cpus_per_task,
                                         settings.gpus_per_task, report=self._record, on_skip=self._skipped)

    def on_eval(self, step: int, model: GPT) -> None:
        # an in-loop eval finished before its step's checkpoint was written: every rank skips it alike
        if step == self.resume_step and (self.settings.placement == "ranks" or step in self.recorded_steps):
            return
        if self.settings.placement == "tasks":
            if self.evals:  # rank 0: the other ranks train on
                self.evals.submit(step, WeightsSnapshot.of(model, self.snapshot_dtype))
            return
        started = time.time()
        # a rank past the last batch (more ranks than batches) adds nothing
        mine = counts(Scores.of(score_live_model(model, self.my_batches))) if self.my_batches else (0, 0, 0)
        totals = torch.tensor(mine, dtype=torch.int64, device=self.device)
        if self.world > 1:
            dist.all_reduce(totals)  # every rank reaches this at the same step: a collective like the val loss
        if self.evals:
            self.evals.record(step, {**summarize_counts(*totals.tolist()), "seconds": round(time.time() - started, 3)})

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
            print(f"hellaswag: an eval failed and is skipped: {type(err).__name__}: {err}", flush=True)

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
        print(f"step {step} | hellaswag skipped: {reason}", flush=True)
        self._write({"step": step, "skipped": reason, "steps_done": self.steps_done})

    def _record(self, step: int, result: Result, handle: EvalHandle | None) -> None:
        mode = "ray tasks" if handle else "ranks"
        print(f"step {step} | hellaswag acc_norm {result['acc_norm']:.4f} (acc {result['acc']:.4f}) | "
              f"{result['num_total']} examples | {mode}", flush=True)
        record = {"step": step, **result, "mode": mode, "collected_at": time.time(),
                  "steps_done_at_collection": self.steps_done}
        if handle:
            record.update(submitted_at=handle.submitted_at, task_spans=handle.task_spans,
                          seconds=round(max(e for _, e in handle.task_spans) - handle.submitted_at, 3))
        self._write(record)
        self.on_result(step, result)
