"""Elapsed time, ETA and estimated cost of a run, and its summary (no Ray: run.py's rank 0 uses it).

Cost is priced like llm.c's GPT-2 reproduction ("$672 for 24 h on 8xH100", i.e. $3.50 per GPU-hour):
worker-hours used x USD per GPU-hour, where an elastic run's worker-hours count each worker group's size
for the time until the next group took over (elapsed hours x workers when the size never changed). CPU
workers have no meaningful GPU-hour price, so on CPU there is an estimate only when a price is given.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

DEFAULT_GPU_HOUR_USD = 3.50  # an H100 GPU-hour, as in llm.c's $672 / (24 h x 8 GPUs)
RECENT_STEPS = 20  # steps whose mean wall-clock time predicts the rest (val, samples, checkpoints included)


def hour_price(gpu_hour_usd: float | None, use_gpu: bool) -> float | None:
    """USD per worker-hour for the estimate: the flag if given, else the H100 default on GPU, else none."""
    if gpu_hour_usd is not None:
        return gpu_hour_usd
    return DEFAULT_GPU_HOUR_USD if use_gpu else None


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Wall-clock progress of a run started at `started_at` (time.time(), the launcher's start)."""

    def __init__(self, started_at: float, workers: int, usd_per_worker_hour: float | None):
        self.started_at, self.workers, self.price = started_at, workers, usd_per_worker_hour
        self.group_sizes = [(started_at, workers)]  # (time.time(), workers) from which each group size held
        self.step_times: deque[tuple[int, float]] = deque(maxlen=RECENT_STEPS + 1)

    def elapsed(self) -> float:
        return time.time() - self.started_at

    def resized(self, at: float, workers: int) -> None:
        """From time.time() `at` on, the run has `workers` workers."""
        self.group_sizes.append((at, workers))
        self.workers = workers

    def worker_hours(self) -> float:
        ends = [at for at, _ in self.group_sizes[1:]] + [time.time()]
        return sum((end - start) * workers for (start, workers), end in zip(self.group_sizes, ends, strict=True)) / 3600

    def cost(self) -> float | None:
        return None if self.price is None else self.worker_hours() * self.price

    def step_done(self, steps_done: int) -> None:
        self.step_times.append((steps_done, time.monotonic()))

    def eta(self, steps_done: int, total_steps: int) -> float | None:
        """Remaining steps x the mean wall-clock time of the recent steps; None before two steps are seen."""
        if len(self.step_times) < 2:
            return None
        (first_step, first_time), (last_step, last_time) = self.step_times[0], self.step_times[-1]
        if last_step == first_step:
            return None
        return (total_steps - steps_done) * (last_time - first_time) / (last_step - first_step)

    def summary(self, steps: int, tokens_per_step: int, device: str) -> dict[str, Any]:
        """The run's size, time and price, for summary.json."""
        cost = self.cost()
        return {"steps": steps, "tokens_seen": steps * tokens_per_step, "elapsed_s": round(self.elapsed(), 1),
                "estimated_cost_usd": None if cost is None else round(cost, 4), "usd_per_worker_hour": self.price,
                "workers": self.workers, "worker_hours": round(self.worker_hours(), 4), "device": device}

    def line(self, steps_done: int, total_steps: int) -> str:
        eta = self.eta(steps_done, total_steps)
        cost = self.cost()
        if cost is None:
            cost_text = "est. cost n/a on CPU (--gpu-hour-usd prices it)"
        elif len(self.group_sizes) == 1:
            cost_text = f"est. cost ${cost:.2f} ({self.workers} worker(s) x ${self.price:.2f}/h)"
        else:
            cost_text = (f"est. cost ${cost:.2f} ({self.worker_hours():.2f} worker-hours x ${self.price:.2f}/h; "
                         f"{self.workers} worker(s) now)")
        return (f"progress {steps_done}/{total_steps} steps | elapsed {clock(self.elapsed())} | "
                f"ETA {'n/a' if eta is None else clock(eta)} | {cost_text}")
