"""HellaSwag fanned out over Ray tasks, and evaluated concurrently with training.

The batch plan is made once, in the driver, and dealt round-robin into K groups, so each example is
scored in the same batch whatever K is: the result is identical for any K. Each group is put in the
object store once (`EvalSet`), so a training loop launching an eval per checkpoint only submits tasks.
Ray is imported inside the functions: the scorer must stay importable where Ray is not installed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from evals.hellaswag_data import Example, load_examples
from evals.scoring import Batch, Scores, default_batch_tokens, plan_batches, score_batches, summarize
from gpt2.interop import load_gpt, resolve_model_source
from gpt2.mainlog import EvalLog

DEFAULT_TASKS = 2
# Fractional by default: K eval tasks fit beside a training job on a small machine instead of waiting
# for whole CPUs (shared/notes: whole-CPU actors stalled a 2-CPU cluster).
DEFAULT_CPUS_PER_TASK = 0.5


def _score_group(checkpoint: str, batches: list[Batch], use_gpu: bool, threads: int) -> tuple[Scores, float, float]:
    """One Ray task: load the model, score its batches; returns the scores and the task's wall-clock span."""
    import torch

    started = time.time()
    torch.set_num_threads(threads)
    model = load_gpt(checkpoint, "cuda" if use_gpu else "cpu")
    return score_batches(model, batches), started, time.time()


@dataclass(frozen=True)
class EvalSet:
    """Examples planned into batches and dealt into per-task groups held in Ray's object store."""

    groups: list[Any]  # ObjectRefs of list[Batch]


def prepare(examples: Sequence[Example] | str | os.PathLike, tasks: int = DEFAULT_TASKS,
            batch_tokens: int | None = None, gpu: bool = False) -> EvalSet:
    """Plan `examples` (or a HellaSwag file) into `tasks` groups and put them in the object store."""
    import ray

    if tasks < 1:
        raise ValueError(f"--tasks must be at least 1, got {tasks}")
    if isinstance(examples, (str, os.PathLike)):
        examples = load_examples(examples)
    batch_tokens = batch_tokens or default_batch_tokens("cuda" if gpu else "cpu")
    batches = plan_batches(examples, batch_tokens)
    groups = [batches[k::tasks] for k in range(min(tasks, len(batches)))]
    return EvalSet([ray.put(group) for group in groups])


@dataclass
class EvalHandle:
    """Ray tasks scoring one checkpoint; `ready()` never blocks, `result()` waits and aggregates."""

    checkpoint: str
    refs: list[Any]
    submitted_at: float
    task_spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end) per task, once done
    _result: dict[str, float | int] | None = None

    def ready(self) -> bool:
        import ray

        done, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(done) == len(self.refs)

    def result(self, timeout: float | None = None) -> dict[str, float | int]:
        """acc, acc_norm, num_correct, num_correct_norm, num_total; raises TimeoutError (Ray's GetTimeoutError)
        if not done within `timeout` seconds, or the task's error if one failed."""
        import ray

        if self._result is None:
            outputs = ray.get(self.refs, timeout=timeout)
            self.task_spans = [(start, end) for _, start, end in outputs]
            self._result = summarize(Scores.concatenate(scores for scores, _, _ in outputs))
        return self._result


def launch(checkpoint: str | os.PathLike, examples: EvalSet | Sequence[Example] | str | os.PathLike,
           tasks: int = DEFAULT_TASKS, num_cpus: float = DEFAULT_CPUS_PER_TASK, num_gpus: float = 0.0,
           batch_tokens: int | None = None) -> EvalHandle:
    """Submit Ray tasks scoring `checkpoint` and return at once. Pass an `EvalSet` from `prepare` to reuse one
    plan across checkpoints (then `tasks`/`batch_tokens` are the EvalSet's). The checkpoint path must stay
    readable by the workers until the tasks have started (do not prune it while an eval is queued)."""
    import ray

    checkpoint = resolve_model_source(checkpoint)  # a bad path fails here, not later inside every task
    if not isinstance(examples, EvalSet):
        examples = prepare(examples, tasks, batch_tokens, gpu=num_gpus > 0)
    # Ray sets OMP_NUM_THREADS to 1 for fractional tasks; whole CPUs per task get that many torch threads.
    threads = max(1, int(num_cpus))
    remote = ray.remote(_score_group).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)
    refs = [remote.remote(str(checkpoint), group, num_gpus > 0, threads) for group in examples.groups]
    return EvalHandle(str(checkpoint), refs, time.time())


def spare_resources(tasks: int, num_cpus: float = DEFAULT_CPUS_PER_TASK, num_gpus: float = 0.0) -> bool:
    """Whether the cluster has room right now for `tasks` eval tasks of this size beside what is running."""
    import ray

    free = ray.available_resources()
    return free.get("CPU", 0.0) >= tasks * num_cpus and free.get("GPU", 0.0) >= tasks * num_gpus


class ConcurrentEvals:
    """One eval per checkpoint step, in flight while training goes on; results logged in step order.

    `submit(step, ckpt)` after each checkpoint, `poll()` once per training step (never blocks), `record(step,
    result)` for an eval done in-loop, `drain()` before exiting. `report(step, result)` is called once per
    finished eval as it is collected (console / dashboard); main.log gets the `s:%d eval:%f` line.
    """

    def __init__(self, examples: EvalSet, log_path: str | os.PathLike | None, num_cpus: float = DEFAULT_CPUS_PER_TASK,
                 num_gpus: float = 0.0, report: Callable[[int, dict[str, float | int]], None] | None = None):
        self.examples = examples
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.log = EvalLog(log_path) if log_path is not None else None
        self.report = report
        self.in_flight: dict[int, EvalHandle] = {}
        self.results: dict[int, dict[str, float | int]] = {}

    def submit(self, step: int, checkpoint: str | os.PathLike) -> EvalHandle:
        handle = launch(checkpoint, self.examples, num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        self.in_flight[step] = handle
        if self.log:
            self.log.expect(step)
        return handle

    def record(self, step: int, result: dict[str, float | int]) -> None:
        """A finished result for `step` (from the in-flight tasks, or computed in-loop by the caller)."""
        self.in_flight.pop(step, None)
        self.results[step] = result
        if self.report:
            self.report(step, result)
        if self.log:
            self.log.record(step, float(result["acc_norm"]))

    def poll(self) -> list[int]:
        """Record every finished eval; returns their steps. Failed evals are given up and re-raised."""
        finished = sorted(step for step, handle in self.in_flight.items() if handle.ready())
        for step in finished:
            self._collect(step, timeout=0)
        return finished

    def wait(self, step: int, timeout: float | None = None) -> None:
        """Wait for `step`'s eval and record it (e.g. before its checkpoint may be deleted)."""
        self._collect(step, timeout)

    def drain(self, timeout: float | None = None) -> list[int]:
        """Wait for every eval in flight (the last checkpoint's included); returns their steps."""
        deadline = None if timeout is None else time.monotonic() + timeout
        steps = sorted(self.in_flight)
        for step in steps:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._collect(step, left)
        return steps

    def _collect(self, step: int, timeout: float | None) -> None:
        try:
            result = self.in_flight[step].result(timeout)
        except TimeoutError:  # still running: keep waiting for it later
            raise
        except Exception:
            if self.log:
                self.log.give_up(step)
            self.in_flight.pop(step)
            raise
        self.record(step, result)
