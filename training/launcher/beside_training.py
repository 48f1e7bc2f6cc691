"""Evals beside training, on the ranks: run.py -h 1 (HellaSwag at llm.c's eval steps) and --core-every N (CORE
every N steps, and on the whole bundle at the last step), where training/launcher/placement.py put them at launch:
- tasks: rank 0 puts a weights-only snapshot of the model in Ray's object store (bf16 from a GPU run, fp32
  from a CPU one) and K Ray tasks score it on accelerators no training worker holds (or on CPUs when training
  itself runs on CPU) while training goes on. One eval runs at a time and only the newest waits
  (`evals.parallel.ConcurrentEvals`), so slow evals skip steps, recorded, instead of queueing without end.
- ranks: every rank scores a disjoint slice of the batch plan with the model it is training and rank 0
  gathers the scores: training pauses for the eval, but every accelerator works on it and no second copy
  of the model is loaded. The result equals the single-process scorer's exactly.
Results go to main.log (`s:%d eval:%f` / `s:%d core:%f`, in step order), the console, `on_result` (gauges,
reports, summary) and one JSON line each in hellaswag.jsonl / core.jsonl, skipped steps included.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from common.files import atomic_write
from evals.core_data import locate_bundle, read_bundle
from evals.core_scoring import plan as core_plan
from evals.hellaswag_data import load_examples
from evals.parallel import ConcurrentEvals, EvalHandle, EvalSet, WeightsSnapshot, deal
from evals.scoring import (
    Batch,
    Result,
    RowScores,
    default_batch_tokens,
    hellaswag_result,
    plan_batches,
    score_live_model,
)
from gpt2.model import GPT
from gpt2.rundir import CORE_RECORDS, HELLASWAG_RECORDS, MAIN_LOG
from training.launcher.placement import Settings

Plan = tuple[list[Batch], Callable[[RowScores], Result]]  # batches, and how their rows' scores read


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
