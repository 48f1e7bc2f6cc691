"""Evals (HellaSwag, CORE) fanned out over Ray tasks, and evaluated concurrently with training.

The batch plan is made once, in the driver, and dealt round-robin into K groups, so each example is
scored in the same batch whatever K is: the result is identical for any K. The tasks return per-row scores;
the eval's own summary (HellaSwag's acc_norm, CORE's accuracies) is computed from them in the driver. Each
group is put in the object store once (`EvalSet`), so a training loop launching an eval per -v step only submits tasks.
A model reaches the tasks as a path (a checkpoint, run directory, llm.c or Hugging Face file) or as a
`WeightsSnapshot`: its weights in the object store, which any node can read and nothing has to delete.
Ray is imported inside the functions: the scorer must stay importable where Ray is not installed.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evals.hellaswag_data import Example, load_examples
from evals.scoring import Batch, Result, RowScores, default_batch_tokens, hellaswag_result, plan_batches, score_rows
from gpt2.interop import load_gpt, resolve_model_source
from gpt2.mainlog import EvalLog
from gpt2.model import GPT, GPTConfig, pick_device

DEFAULT_TASKS = 2
# Fractional by default: K eval tasks fit beside a training job on a small machine instead of waiting
# for whole CPUs: whole-CPU actors stalled a 2-CPU cluster.
DEFAULT_CPUS_PER_TASK = 0.5


def add_fanout_flags(parser: argparse.ArgumentParser) -> None:
    """The eval CLIs' flags for where scoring runs: K Ray tasks (and their resources) or this process."""
    parser.add_argument("--tasks", type=int, default=DEFAULT_TASKS, help="Ray tasks to split over; 0 = this process")
    parser.add_argument("--cpus-per-task", type=float, default=DEFAULT_CPUS_PER_TASK, help="Ray num_cpus per task")
    parser.add_argument("--gpus-per-task", type=float, default=0.0, help="Ray num_gpus per task (e.g. 0.25)")
    parser.add_argument("--batch-tokens", type=int, help="padded tokens per forward pass (default by device)")
    parser.add_argument("--device", default="auto", help="device for --tasks 0: auto (a GPU if there is one), cpu, "
                                                         "cuda or cuda:N")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a new local cluster)")


def check_fanout_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`parser.error` (one line, exit 2) for a fan-out flag out of range."""
    if args.tasks < 0:
        parser.error(f"--tasks must be 0 (this process) or more, got {args.tasks}")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        parser.error(f"--batch-tokens must be positive, got {args.batch_tokens}")
    for flag, value in (("--cpus-per-task", args.cpus_per_task), ("--gpus-per-task", args.gpus_per_task)):
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"{flag} must be a finite number >= 0, got {value}")
    try:
        pick_device(args.device)
    except ValueError as err:
        parser.error(str(err))


@dataclass(frozen=True)
class WeightsSnapshot:
    """A model's weights in Ray's object store (bf16 from a GPU run, fp32 from a CPU one)."""

    config: dict[str, int]
    weights: Any  # ObjectRef of {name: tensor}

    @classmethod
    def of(cls, model: GPT, dtype: torch.dtype) -> WeightsSnapshot:
        import ray

        weights = {name: tensor.detach().to("cpu", dtype) for name, tensor in model.state_dict().items()}
        return cls(model.config.to_dict(), ray.put(weights))

    def load(self, device: str) -> GPT:
        import ray

        weights = {name: tensor.float() for name, tensor in ray.get(self.weights).items()}
        return GPT.from_weights(GPTConfig(**self.config), weights).to(device).eval()


ModelSource = str | os.PathLike | WeightsSnapshot


def _score_group(source: ModelSource, batches: list[Batch], use_gpu: bool,
                 threads: int) -> tuple[RowScores, float, float]:
    """One Ray task: load the model, score its batches; returns the scores and the task's wall-clock span."""
    started = time.time()
    torch.set_num_threads(threads)
    device = "cuda" if use_gpu else "cpu"
    model = source.load(device) if isinstance(source, WeightsSnapshot) else load_gpt(source, device)
    return score_rows(model, batches), started, time.time()


@dataclass(frozen=True)
class EvalSet:
    """Examples planned into batches and dealt into per-task groups held in Ray's object store, and how the
    eval's result is computed from the rows' scores."""

    groups: list[Any]  # ObjectRefs of list[Batch]
    summarize: Callable[[RowScores], Result]


def deal(batches: Sequence[Batch], tasks: int) -> list[Any]:
    """`batches` dealt round-robin into (at most) `tasks` groups, each put in the object store once."""
    import ray

    if tasks < 1:
        raise ValueError(f"--tasks must be at least 1, got {tasks}")
    return [ray.put(list(batches[k::tasks])) for k in range(min(tasks, len(batches)))]


def prepare(examples: Sequence[Example] | str | os.PathLike, tasks: int = DEFAULT_TASKS,
            batch_tokens: int | None = None, gpu: bool = False) -> EvalSet:
    """Plan HellaSwag `examples` (or a HellaSwag file) into `tasks` groups and put them in the object store."""
    if tasks < 1:
        raise ValueError(f"--tasks must be at least 1, got {tasks}")
    if isinstance(examples, (str, os.PathLike)):
        examples = load_examples(examples)
    batches = plan_batches(examples, batch_tokens or default_batch_tokens("cuda" if gpu else "cpu"))
    return EvalSet(deal(batches, tasks), hellaswag_result)


@dataclass
class EvalHandle:
    """Ray tasks scoring one model; `ready()` never blocks, `result()` waits and aggregates."""

    refs: list[Any]
    submitted_at: float
    summarize: Callable[[RowScores], Result]
    task_spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end) per task, once done
    _result: Result | None = None

    def ready(self) -> bool:
        import ray

        done, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(done) == len(self.refs)

    def result(self, timeout: float | None = None) -> Result:
        """The eval's summary (HellaSwag: acc, acc_norm, num_correct, num_correct_norm, num_total); raises
        TimeoutError (Ray's GetTimeoutError) if not done within `timeout` seconds, or a task's error."""
        import ray

        if self._result is None:
            outputs = ray.get(self.refs, timeout=timeout)
            self.task_spans = [(start, end) for _, start, end in outputs]
            self._result = self.summarize(RowScores.concatenate(scores for scores, _, _ in outputs))
        return self._result

    def cancel(self) -> None:
        import ray

        # force: the worker process is ended, not interrupted. An interrupt can land inside an import (torch
        # imports sympy lazily) and leave a half-made module behind for the next task that process runs.
        for ref in self.refs:
            ray.cancel(ref, force=True)


class ClusterTooSmall(ValueError):
    """A resource request no node of a cluster that cannot grow will ever satisfy; the message names the flag."""


def connect_for_tasks(address: str | None, cpus_per_task: float, gpus_per_task: float) -> None:
    """Connect an eval command to Ray for its tasks (common.cluster.connect), then make sure a task's
    --cpus-per-task and --gpus-per-task fit a node: ClusterTooSmall on a cluster that cannot grow (nothing can
    add the nodes it lacks, so the tasks would wait forever), a note on a cluster an autoscaler may grow."""
    from common.cluster import cannot_grow, connect

    connect(address)
    for flag, resource, per_task in (("--cpus-per-task", "CPU", cpus_per_task),
                                     ("--gpus-per-task", "GPU", gpus_per_task)):
        if (most := resource_short(resource, per_task)) is not None:
            message = f"{flag} {per_task:g}: no node of the cluster has that many {resource}s (the most is {most:g})"
            if cannot_grow(address):
                raise ClusterTooSmall(f"{message}; lower it, or join a larger cluster (--address)")
            print(f"note: {message}; the tasks wait until the autoscaler adds such a node", flush=True)


def resource_short(resource: str, per_task: float) -> float | None:
    """The most of `resource` ("CPU", "GPU") a live node of the connected cluster has, when that is less than a
    task's `per_task` (such a task waits until a node with it joins, forever on a cluster that cannot grow);
    None if one fits."""
    import ray

    most = max((node["Resources"].get(resource, 0.0) for node in ray.nodes() if node["Alive"]), default=0.0)
    return most if most < per_task else None


def launch(source: ModelSource, examples: EvalSet | Sequence[Example] | str | os.PathLike,
           tasks: int = DEFAULT_TASKS, num_cpus: float = DEFAULT_CPUS_PER_TASK, num_gpus: float = 0.0,
           batch_tokens: int | None = None) -> EvalHandle:
    """Submit Ray tasks scoring `source` and return at once. Pass an `EvalSet` from `prepare` to reuse one
    plan across models (then `tasks`/`batch_tokens` are the EvalSet's)."""
    import ray

    if not isinstance(source, WeightsSnapshot):
        source = str(resolve_model_source(source))  # a bad path fails here, not later inside every task
    if not isinstance(examples, EvalSet):
        examples = prepare(examples, tasks, batch_tokens, gpu=num_gpus > 0)
    # Ray sets OMP_NUM_THREADS to 1 for fractional tasks; whole CPUs per task get that many torch threads.
    threads = max(1, int(num_cpus))
    remote = ray.remote(_score_group).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)
    submitted_at = time.time()  # before the first task can start
    refs = [remote.remote(source, group, num_gpus > 0, threads) for group in examples.groups]
    return EvalHandle(refs, submitted_at, examples.summarize)


class ConcurrentEvals:
    """Evals of a training run's -v steps, one in flight at a time, never a growing queue.

    `submit(step, source)` at each eval step, `poll()` once per training step (never blocks), `record(step,
    result)` for an eval scored elsewhere (in-loop), `finish()` before exiting. An eval due while another runs
    waits; only the newest waits, so when evals are slower than the -v interval the older waiting one is
    skipped (`on_skip(step, reason)`) rather than queued: the backlog is bounded by one. `report(step,
    result)` gets every result as it is collected; main.log gets the `s:%d <stream>:%f` lines of `result[key]`
    in step order (HellaSwag: eval / acc_norm; CORE: core / core).
    """

    def __init__(self, examples: EvalSet | None, log_path: str | os.PathLike | None,
                 num_cpus: float = DEFAULT_CPUS_PER_TASK, num_gpus: float = 0.0,
                 report: Callable[[int, Result, EvalHandle | None], None] | None = None,
                 on_skip: Callable[[int, str], None] | None = None, stream: str = "eval", key: str = "acc_norm",
                 name: str = "hellaswag"):
        self.examples, self.name = examples, name
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.log = EvalLog(log_path, stream) if log_path is not None else None
        self.key = key
        self.report, self.on_skip = report, on_skip
        self.running: tuple[int, EvalHandle] | None = None
        self.waiting: tuple[int, ModelSource, EvalSet] | None = None

    def submit(self, step: int, source: ModelSource, examples: EvalSet | None = None) -> None:
        """Score `source` for `step`, on `examples` (default: the EvalSet given at construction)."""
        if self.log:
            self.log.expect(step)
        if self.waiting:
            self._skip(self.waiting[0], f"the eval of step {step} was due before it could start")
        self.waiting = (step, source, examples or self.examples)
        self._start_waiting()

    def record(self, step: int, result: Result, handle: EvalHandle | None = None) -> None:
        """A finished result for `step`, from Ray tasks (`handle`) or scored in-loop by the caller."""
        if self.report:
            self.report(step, result, handle)
        if self.log:
            self.log.record(step, float(result[self.key]))

    def poll(self) -> None:
        """Record the running eval if it has finished, and start the waiting one; never blocks. A failed eval
        is given up (no main.log line) and its error re-raised."""
        if self.running and self.running[1].ready():
            self._collect(timeout=0)
        self._start_waiting()

    def finish(self) -> None:
        """Wait for the newest eval only: one still running for an older step is cancelled (and skipped)."""
        if self.running and self.waiting:
            step, handle = self.running
            handle.cancel()
            self.running = None
            self._skip(step, "cancelled at the end of the run in favour of the last step's eval")
        self._start_waiting()
        if self.running:  # the one wait with nothing else to do: say what for, in case Ray cannot place the tasks
            print(f"{self.name}: waiting for step {self.running[0]}'s eval (tasks of {self.num_cpus:g} CPU, "
                  f"{self.num_gpus:g} GPU)", flush=True)
            self._collect(timeout=None)

    def _start_waiting(self) -> None:
        if self.waiting and not self.running:
            step, source, examples = self.waiting
            self.waiting = None
            self.running = (step, launch(source, examples, num_cpus=self.num_cpus, num_gpus=self.num_gpus))

    def _skip(self, step: int, reason: str) -> None:
        if self.log:
            self.log.give_up(step)
        if self.on_skip:
            self.on_skip(step, reason)

    def _collect(self, timeout: float | None) -> None:
        step, handle = self.running
        self.running = None
        try:
            result = handle.result(timeout)
        except Exception:
            if self.log:
                self.log.give_up(step)
            raise
        self.record(step, result, handle)
