"""run.py -h 1: rank 0 scores HellaSwag on each eval-step checkpoint while training goes on.

Each checkpoint written at a -v step (and the last) is handed to Ray tasks on the cluster's spare resources
(`evals.parallel.ConcurrentEvals`); the training loop only polls them once per step and never waits, except
for the last checkpoint's eval before the run ends. Without spare resources (or with a cloud -o, whose local
checkpoint copy is deleted once uploaded) the checkpoint is scored in-loop instead. Every result goes to
main.log (`s:%d eval:%f`, in step order however late it arrives), the console, the caller's `on_result`
(dashboard gauges) and one JSON line in `hellaswag.jsonl` with its timing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evals.hellaswag_data import load_examples
from evals.parallel import ConcurrentEvals, EvalHandle, prepare, spare_resources
from evals.scoring import evaluate
from gpt2.interop import load_gpt

Result = dict[str, float | int]


@dataclass
class HellaSwagSettings:
    """run.py's -h flags, as they travel to the workers."""

    file: str | None  # jsonl or llm.c eval .bin; None = the canonical validation set (downloaded, cached)
    tasks: int
    cpus_per_task: float
    gpus_per_task: float


class HellaSwagBesideTraining:
    """Rank 0's HellaSwag: `on_checkpoint` at every checkpoint (before Ray registers it), `poll` every step,
    `drain` before exiting. `keep` is Ray's -nk: a checkpoint Ray is about to prune keeps its eval first."""

    def __init__(self, settings: HellaSwagSettings, out_dir: Path, device: str, concurrent: bool,
                 keep: int | None, on_result: Callable[[int, Result], None]):
        self.examples = load_examples(settings.file)
        self.settings, self.device, self.keep, self.on_result = settings, device, keep, on_result
        self.concurrent = concurrent
        self.records = out_dir / "hellaswag.jsonl"
        self.evals = ConcurrentEvals(prepare(self.examples, settings.tasks, gpu=settings.gpus_per_task > 0),
                                     out_dir / "main.log", settings.cpus_per_task, settings.gpus_per_task,
                                     report=self._record)
        self.handles: dict[int, EvalHandle] = {}
        self.registered: list[int] = []  # checkpoint steps in the order Ray registers them
        self.steps_done = 0
        self.noted_in_loop = False

    def on_checkpoint(self, step: int, path: Path, eval_due: bool) -> None:
        if self.keep:
            self._keep_pending_checkpoints_alive()
        self.registered.append(step)
        self.steps_done = step
        if not eval_due:
            return
        s = self.settings
        # Our own evals still in flight hold the room the next one needs: queue behind them rather than pause.
        if self.concurrent and (self.evals.in_flight or spare_resources(s.tasks, s.cpus_per_task, s.gpus_per_task)):
            self.handles[step] = self.evals.submit(step, path)
            return
        if not self.noted_in_loop:
            why = ("a cloud -o keeps no local checkpoint to hand over" if not self.concurrent else
                   f"no spare resources for {s.tasks} task(s) x {s.cpus_per_task} CPU / {s.gpus_per_task} GPU")
            print(f"hellaswag: {why}; evaluating in-loop (training pauses for it)", flush=True)
            self.noted_in_loop = True
        self.evals.record(step, evaluate(load_gpt(path, self.device), self.examples))

    def _keep_pending_checkpoints_alive(self) -> None:
        """Registering one more checkpoint makes Ray delete the oldest of the newest `keep`+1: if its eval is
        still in flight, wait for it (only when evals fall `keep` checkpoints behind)."""
        if len(self.registered) >= self.keep:
            evicted = self.registered[-self.keep]
            if evicted in self.evals.in_flight:
                self._collect(lambda: self.evals.wait(evicted))

    def poll(self, steps_done: int) -> None:
        """Record finished evals; never blocks."""
        self.steps_done = steps_done
        if self.evals.in_flight:
            self._collect(self.evals.poll)

    def drain(self) -> None:
        """Wait for every eval in flight, the last checkpoint's included."""
        while self.evals.in_flight:
            self._collect(self.evals.drain)

    def _collect(self, collect: Callable[[], object]) -> None:
        try:
            collect()
        except Exception as err:  # a failed eval costs its line, not the training run
            print(f"hellaswag: an eval failed and is skipped: {type(err).__name__}: {err}", flush=True)

    def _record(self, step: int, result: Result) -> None:
        handle = self.handles.pop(step, None)
        print(f"step {step} | hellaswag acc_norm {result['acc_norm']:.4f} (acc {result['acc']:.4f}) | "
              f"{result['num_total']} examples" + ("" if handle else " | in-loop"), flush=True)
        record = {"step": step, **result, "mode": "ray tasks" if handle else "in-loop",
                  "collected_at": time.time(), "steps_done_at_collection": self.steps_done}
        if handle:
            record.update(submitted_at=handle.submitted_at, task_spans=handle.task_spans)
        with open(self.records, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.on_result(step, result)
