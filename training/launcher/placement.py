"""Where the evals beside training run (`--eval-on auto|tasks|ranks`), with what resources, and what they cost:
decided once, at launch, in the driver. training/launcher/beside_training.py runs them where this put them.

- tasks: K Ray tasks score a weights snapshot on accelerators no training worker holds (on CPUs when training
  itself runs on CPU) while training goes on.
- ranks: every training rank scores a slice in-loop; training pauses for the eval.
- auto: tasks when the cluster has accelerators for them (or on a CPU run), else ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from evals.core_data import Task
from evals.core_scoring import plan as core_plan
from evals.hellaswag_data import Example
from evals.parallel import resource_short
from evals.scoring import default_batch_tokens, forward_flops, plan_batches
from gpt2.interop import read_llmc_header
from gpt2.model import GPT, GPTConfig
from training.config import ConfigError, TrainConfig
from training.metrics import flops_per_token, peak_flops

PLACEMENTS = ("auto", "tasks", "ranks")
# Stated fractions of peak FLOP/s for the cost model: a training step at llm.c's MFU, and the eval's padded,
# forward-only batches (bench/hellaswag_bench.py prints the prediction against a measured eval).
TRAIN_EFFICIENCY = 0.40
EVAL_EFFICIENCY = 0.30
# A CPU worker below this share of a CPU is too slow to be worth leaving the eval tasks room beside it.
MIN_CPUS_PER_WORKER = 0.25


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class HellaSwagSettings:
    """run.py's -h flags, as they travel to the workers; `placement` is decided once, at launch."""

    file: str | None  # jsonl or llm.c eval .bin; None = the canonical validation set (downloaded, cached)
    placement: str  # "tasks" or "ranks"
    tasks: int
    cpus_per_task: float
    gpus_per_task: float


Settings = HellaSwagSettings | CoreSettings


def gpus_per_task(asked: float | None, use_gpu: bool) -> float:
    """--eval-gpus-per-task, by default one GPU per task on a GPU run and none on CPU."""
    return asked if asked is not None else float(use_gpu)


def cpus_per_worker(cpus: float, workers: int, evals: int, eval_on: str, tasks: int, cpus_per_task: float) -> float:
    """A CPU run's CPUs per training worker: the cluster's `cpus` shared by the workers, less what `evals` evals'
    Ray tasks need beside them (in CPU fractions) unless they run in-loop on the ranks."""
    if evals and eval_on != "ranks":
        per_worker = (cpus - evals * tasks * cpus_per_task) / workers
        if per_worker >= MIN_CPUS_PER_WORKER:
            return per_worker if per_worker < 1 else float(int(per_worker))
    return max(1, int(cpus) // workers)


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


def check_eval_resources(settings: Settings, fixed_size: bool) -> None:
    """Eval tasks asking for more CPUs or GPUs than any node has would wait forever, after the training has
    finished."""
    if settings.placement != "tasks":
        return
    for flag, resource, per_task, other in (
            ("--eval-cpus-per-task", "CPU", settings.cpus_per_task, "lower it"),
            ("--eval-gpus-per-task", "GPU", settings.gpus_per_task, "lower it (0 runs the evals on CPUs)")):
        if (most := resource_short(resource, per_task)) is None:
            continue
        message = f"{flag} {per_task:g}: no node of the cluster has that many {resource}s (the most is {most:g})"
        if fixed_size:
            raise ConfigError(f"{message}; {other}, use --eval-on ranks, or join a larger cluster (--address)")
        print(f"note: {message}; the evals wait until the autoscaler adds such a node", flush=True)


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


@dataclass(frozen=True)
class Cluster:
    """What a placement is decided against: the training group and the cluster's resources at launch."""

    workers: int
    use_gpu: bool
    cpus_per_worker: float
    resources: dict[str, float]  # ray.cluster_resources()


def _place(name: str, flag: str, every: int, eval_on: str, tasks: int, gpus: float, config: TrainConfig,
           cluster: Cluster, settings_of: Callable[[str], Settings],
           plan_flops: Callable[[GPTConfig, str], int]) -> Settings:
    """At launch, in the driver: decide an eval's placement and print it, and the cost model, in one line each."""
    placement, why = choose_placement(eval_on, cluster.use_gpu, cluster.workers, cluster.resources, tasks, gpus)
    settings = settings_of(placement)
    print(f"{name}: {placement}: {why}", flush=True)
    shape = model_shape(config.model)
    with torch.device("meta"):
        num_params = GPT(shape).num_parameters()
    run = RunShape(shape, num_params, cluster.workers, config.tokens_per_step(cluster.workers), config.seq_len, every)
    # Ray names each GPU node's model as a resource, e.g. accelerator_type:H100
    gpu_name = next((k.split(":", 1)[1] for k in cluster.resources if k.startswith("accelerator_type:")), None) \
        if cluster.use_gpu else None
    print(cost_line(run, plan_flops(shape, "cuda" if cluster.use_gpu else "cpu"), settings, gpu_name,
                    cluster.cpus_per_worker, name, flag), flush=True)
    return settings


def settle(eval_on: str, file: str | None, examples: Sequence[Example], tasks: int, cpus_per_task: float,
           gpus: float, config: TrainConfig, cluster: Cluster) -> HellaSwagSettings:
    """HellaSwag's placement and cost model (-h 1: every -v step); `examples` are `file`'s, as the driver read
    them."""
    return _place("hellaswag", "-v", config.val_every, eval_on, tasks, gpus, config, cluster,
                  lambda placement: HellaSwagSettings(file, placement, tasks, cpus_per_task, gpus),
                  lambda shape, device: forward_flops(shape, plan_batches(examples, default_batch_tokens(device))))


def settle_core(eval_on: str, bundle: str | None, core_tasks: Sequence[Task], every: int, max_per_task: int,
                tasks: int, cpus_per_task: float, gpus: float, config: TrainConfig,
                cluster: Cluster) -> CoreSettings:
    """CORE's placement and cost model (--core-every N: the periodic, --core-max-per-task eval); `core_tasks` are
    the bundle's, read with `max_per_task` by the driver."""
    context = model_shape(config.model).block_size
    return _place("core", "--core-every", every, eval_on, tasks, gpus, config, cluster,
                  lambda placement: CoreSettings(bundle, placement, tasks, cpus_per_task, gpus, every, max_per_task,
                                                 context),
                  lambda shape, device: forward_flops(shape, core_plan(core_tasks, shape.block_size,
                                                                       default_batch_tokens(device)).batches))
