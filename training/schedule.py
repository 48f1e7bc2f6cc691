"""llm.c's learning-rate schedules (llmc/schedulers.h): linear warmup, then cosine/linear decay or constant."""

from __future__ import annotations

import math


def learning_rate(step: int, max_lr: float, warmup_steps: int, total_steps: int, final_frac: float,
                  schedule: str) -> float:
    """LR for 0-based optimizer `step` of `total_steps`; decays from max_lr to max_lr * final_frac."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return max_lr
    min_lr = max_lr * final_frac
    decay_ratio = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (max_lr - min_lr)
    if schedule == "linear":
        return max_lr - decay_ratio * (max_lr - min_lr)
    raise ValueError(f"-k {schedule!r}: unknown learning-rate schedule")
