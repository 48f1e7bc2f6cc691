"""CORE scored with the packed batch scorer (evals/scoring.py), in any process (no Ray).

Every example's rows are packed around their shared token prefix (for a few-shot prompt, the shots and most
of the question; rows cut to the context by different amounts run as separate sequences), each task's
examples planned into batches of similar length. An example is right when:
multiple choice / schema: the row with the lowest mean loss over its scored tokens is the gold one (the first
such row on a tie; a row with nothing to score has a NaN mean, which Python's min passes over unless it comes
first); language modeling: every scored token is the model's argmax. A task's accuracy is centered on its
random baseline, (acc - baseline) / (1 - baseline), and CORE is the mean over tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evals.core_data import Task, tokenize
from evals.scoring import Batch, Result, RowScores, default_batch_tokens, pack_rows, plan_packed, score_live_model
from gpt2.model import GPT


@dataclass(frozen=True)
class CorePlan:
    """The tasks' examples as batches; example i (numbered across tasks) belongs to task `example_task[i]`."""

    labels: tuple[str, ...]
    baselines: tuple[float, ...]
    example_task: np.ndarray
    batches: list[Batch]

    def summarize(self, rows: RowScores) -> Result:
        return summarize(self, rows)


def plan(tasks: Sequence[Task], context_length: int, batch_tokens: int) -> CorePlan:
    """Render, tokenize (rows cut to `context_length`) and batch every task; the largest batches first, so
    dealing them round-robin over Ray tasks spreads the work evenly."""
    example_task, batches = [], []
    for number, task in enumerate(tasks):
        packed = []
        for item in tokenize(task, context_length):
            packed += pack_rows(len(example_task), item.gold, item.rows, item.spans)
            example_task.append(number)
        batches += plan_packed(packed, batch_tokens)
    batches.sort(key=lambda batch: -batch.tokens.size)
    return CorePlan(tuple(t.label for t in tasks), tuple(t.baseline for t in tasks), np.array(example_task),
                    batches)


def example_correct(rows: RowScores) -> np.ndarray:
    """(examples,) bool in example-index order, from all the rows of every example."""
    starts = np.flatnonzero(np.r_[True, rows.example_index[1:] != rows.example_index[:-1]])
    ends = np.r_[starts[1:], len(rows.example_index)]
    means = rows.mean_loss
    correct = np.zeros(len(starts), dtype=bool)
    for n, (start, end) in enumerate(zip(starts, ends, strict=True)):
        gold = int(rows.labels[start])
        if gold < 0:  # language modeling: one row, right when greedy decoding reproduces it
            correct[n] = bool(rows.greedy[start])
        else:
            losses = means[start:end].tolist()
            correct[n] = losses.index(min(losses)) == gold
    return correct


def summarize(plan: CorePlan, rows: RowScores) -> Result:
    """Per task accuracy and centered accuracy, and CORE (their mean)."""
    if len(np.unique(rows.example_index)) != len(plan.example_task):
        raise ValueError(f"CORE scores cover {len(np.unique(rows.example_index))} of {len(plan.example_task)} "
                         "examples")
    correct = example_correct(rows)
    tasks = {}
    for number, (label, baseline) in enumerate(zip(plan.labels, plan.baselines, strict=True)):
        mine = correct[plan.example_task == number]
        accuracy = float(mine.mean())
        tasks[label] = {"accuracy": accuracy, "centered": (accuracy - baseline) / (1 - baseline),
                        "num_correct": int(mine.sum()), "num_total": len(mine)}
    core = sum(task["centered"] for task in tasks.values()) / len(tasks)
    return {"core": core, "num_total": len(correct), "tasks": tasks}


def evaluate_core(model: GPT, tasks: Sequence[Task], batch_tokens: int | None = None) -> Result:
    """CORE of `model` in this process (no Ray) on its device: for machines without Ray, and the reference
    every distributed path must equal."""
    core_plan = plan(tasks, model.config.block_size, batch_tokens or default_batch_tokens(model.wte.weight.device))
    return core_plan.summarize(score_live_model(model, core_plan.batches))
