"""Elastic worker groups (`run.py --workers MAX --min-workers MIN`): which group sizes keep the global batch,
and the record of a resize. No Ray here: run.py checks the sizes on the driver and each new group's rank 0
records a resize before the engine starts.

Ray Train 2.60 (`ScalingConfig(num_workers=(min, max))`) starts a group of as many workers as the cluster
has room for, restarts it smaller when a worker or node is lost and larger when capacity comes back, each
time from the latest checkpoint. The engine makes the optimisation independent of the size: -d stays the
global batch, the sequence stream depends on -d and -t only, and a step's micro-batches are dealt to the
ranks round-robin, unevenly if need be, with the gradient weighted per micro-batch (training/train.py,
training/data.py). So a resize is a resume at another world size, and all a group must do is fit: each
rank needs at least one micro-batch of every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpt2 import mainlog
from gpt2.checkpoint import read_state
from gpt2.rundir import MAIN_LOG
from training.config import ConfigError, TrainConfig


def _sizes(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def check_group_sizes(config: TrainConfig, min_workers: int, max_workers: int) -> None:
    """Refuse a size range in which some group could not run a step of -d, naming the sizes that could."""
    micro_batches = config.micro_batches_per_step(1)  # -d not a multiple of B x T: the engine's own error
    if micro_batches >= max_workers:
        return
    step = (f"-d {config.tokens_per_step(max_workers)} is {micro_batches} micro-batch(es) of -b {config.micro_batch} "
            f"x -t {config.seq_len} per step")
    if min_workers == max_workers:
        raise ConfigError(f"--workers {max_workers}: {step}, fewer than the workers (each needs one); lower "
                          "--workers or -b")
    works = _sizes(min_workers, micro_batches) if micro_batches >= min_workers else "none of them"
    raise ConfigError(f"--min-workers {min_workers} --workers {max_workers}: {step}, too few for a group of "
                      f"{_sizes(micro_batches + 1, max_workers)} workers (each rank needs one); sizes that keep -d: "
                      f"{works}; lower --workers or -b")


def uneven_split_note(config: TrainConfig, min_workers: int, max_workers: int) -> str | None:
    """A note naming the group sizes that split a step's micro-batches unevenly, if any."""
    micro_batches = config.micro_batches_per_step(1)
    uneven = [size for size in range(min_workers, max_workers + 1) if micro_batches % size]
    if not uneven:
        return None
    runs: list[list[int]] = []  # consecutive sizes, written first-last
    for size in uneven:
        if runs and runs[-1][1] == size - 1:
            runs[-1][1] = size
        else:
            runs.append([size, size])
    return (f"note: -d {config.tokens_per_step(max_workers)} is {micro_batches} micro-batches of -b "
            f"{config.micro_batch} x -t {config.seq_len} per step; a group of "
            f"{', '.join(_sizes(first, last) for first, last in runs)} worker(s) splits them unevenly (ranks with a "
            "micro-step fewer wait for the others), on the same batches")


@dataclass
class Resize:
    step: int  # the checkpoint the new group resumes from
    old: int
    new: int
    reason: str
    steps_redone: int  # steps the previous group trained past the checkpoint: lost, and trained again

    def line(self) -> str:
        return (f"resize: {self.old} -> {self.new} workers at step {self.step} ({self.reason}); "
                f"{self.steps_redone} step(s) after that checkpoint are trained again")


def record_resize(output_dir: Path, checkpoint: Path, workers: int, reason: str) -> Resize | None:
    """For the rank 0 of a group about to resume from `checkpoint`: when the group that trained before it had
    another size (main.log's last `workers` line up to the checkpoint's step, else the size that wrote the
    checkpoint), append this group's size to main.log and return the resize."""
    state = read_state(checkpoint)
    step = state["step"]
    log = output_dir / MAIN_LOG
    series = mainlog.read(log) if log.exists() else {"trl": [], "workers": []}
    earlier = [int(size) for at, size in series["workers"] if at <= step]
    previous = earlier[-1] if earlier else state["world_size"]
    if previous == workers:
        return None
    last_trained = series["trl"][-1][0] if series["trl"] else step - 1  # trl step s: the update of step s
    mainlog.record_workers(log, step, workers)
    return Resize(step, previous, workers, reason, max(0, last_trained + 1 - step))
