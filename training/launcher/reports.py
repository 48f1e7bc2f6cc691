"""What the workers tell Ray Train: throttled reports and checkpoint registration."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from gpt2.rundir import RUN_LOGS
from training.launcher.storage import upload


class RayReports:
    """What Ray Train hears from the workers: metrics now and then, and every checkpoint.

    ray.train.report is a barrier every rank must reach equally often, and Ray Train's controller takes one
    report per health check (2 s), a report blocking until the previous one is taken: per-step reports
    would throttle fast steps. So reports go about every --report-interval seconds, counted in steps: at
    each report (a barrier already) rank 0 turns its measured step time into the number of steps to the
    next one and broadcasts it, so the steps in between make no collective call of their own.
    """

    def __init__(self, report_interval: float, rank: int, device: torch.device, staging: str | None,
                 run_dir: str):
        """`staging`: rank 0's local directory for a cloud -o `run_dir` (None: -o is written in place)."""
        import ray.train

        self.ray_train = ray.train
        self.report_interval, self.rank, self.device = report_interval, rank, device
        self.staging, self.run_dir = staging, run_dir
        self.next_report = 0  # steps done at which the next report goes; 0: the first step reports at once
        self.last_report: tuple[int, float] | None = None  # (steps done, time.monotonic()) at the last one
        self.preempted = False

    def on_step(self, steps_done: int, metrics: dict[str, Any]) -> bool:
        """Report when due; True when a checkpoint should be written now: a node of this group is being
        preempted (drained by Ray, e.g. on a spot reclaim notice), so the restart that follows resumes from here
        rather than from the last -n checkpoint."""
        if steps_done < self.next_report:
            return False
        self.report(metrics)
        self.next_report = steps_done + self._agree_on_stride(steps_done)
        # a collective like the report: every rank asks at the same steps and gets rank 0's answer
        notice = self.ray_train.get_preemption_info()
        if notice is None or self.preempted:
            return False
        self.preempted = True
        if self.rank == 0:
            deadline = (f", reclaimed in {notice.deadline_ms / 1000 - time.time():.0f} s" if notice.deadline_ms
                        else "")
            print(f"preemption notice: rank(s) {', '.join(map(str, notice.preempted_ranks))} on a node being "
                  f"drained{deadline}; checkpointing at step {steps_done}", flush=True)
        return True

    def _agree_on_stride(self, steps_done: int) -> int:
        now = time.monotonic()
        stride = torch.ones(1, dtype=torch.int64, device=self.device)
        if self.last_report is not None and steps_done > self.last_report[0]:
            seconds_per_step = (now - self.last_report[1]) / (steps_done - self.last_report[0])
            stride[0] = max(1, math.ceil(self.report_interval / max(seconds_per_step, 1e-6)))
        self.last_report = (steps_done, now)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast(stride, src=0)  # rank 0's clock decides for every rank
        return int(stride.item())

    def report(self, metrics: dict[str, Any], **checkpoint: Any) -> None:
        self.ray_train.report({k: v for k, v in metrics.items() if v is not None}, **checkpoint)

    def register(self, step: int, path: Path) -> None:
        """Every rank reports (a barrier); rank 0, which wrote the directory, attaches it."""
        from ray.train import Checkpoint, CheckpointUploadMode

        metrics = {"step": step, "timestamp": time.time()}
        if self.rank != 0:
            self.report(metrics, checkpoint_dir_name=path.name)
        elif not self.staging:  # written in place in the run directory: register it, copy nothing
            self.report(metrics, checkpoint=Checkpoint.from_directory(str(path)), checkpoint_dir_name=path.name,
                        checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        else:
            self.report(metrics, checkpoint=Checkpoint.from_directory(str(path)), checkpoint_dir_name=path.name,
                        delete_local_checkpoint_after_upload=True)
            self.upload(*RUN_LOGS)

    def upload(self, *names: str) -> None:
        """Rank 0 of a cloud -o: copy the staged files `names` next to the checkpoints."""
        upload(self.staging, self.run_dir, *names)
