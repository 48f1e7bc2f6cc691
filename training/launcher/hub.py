"""The engine's TrainHooks on a Ray Train worker, the one place each rank's step metrics go: Ray Train reports on
every rank; on rank 0 also the dashboard gauges, progress / ETA / cost lines, the evals beside training and
summary.json."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.files import write_json
from evals.scoring import Result
from gpt2.checkpoint import read_state
from gpt2.rundir import RUN_LOGS, SUMMARY
from training.config import TrainConfig
from training.launcher.beside_training import CoreBesideTraining, HellaSwagBesideTraining
from training.launcher.placement import CoreSettings, HellaSwagSettings
from training.launcher.progress import Progress
from training.launcher.reports import RayReports
from training.ops.gauges import RunGauges
from training.train import TrainHooks, TrainResult


@dataclass(frozen=True)
class Launch:
    """What the workers need besides the engine config, decided by the driver at launch."""

    run_name: str
    run_dir: str  # -o as given (absolute when local): the Ray Train run directory
    remote: bool  # -o is a URL: checkpoints are staged locally and uploaded
    use_gpu: bool
    cpus_per_worker: float
    report_interval: float
    workers: int  # --workers on the driver; on a worker, its group's size (an elastic run's groups vary)
    started_at: float  # the launcher's time.time() at launch: elapsed time and cost count from here
    usd_per_worker_hour: float | None  # None: no cost estimate (CPU without --gpu-hour-usd)
    hellaswag: HellaSwagSettings | None  # None without -h 1
    core: CoreSettings | None = None  # None without --core-every


class WorkerHooks:
    """One rank's TrainHooks (see the module's docstring)."""

    def __init__(self, launch: Launch, config: TrainConfig, rank: int, device: torch.device, staging: str | None,
                 group_starts: list[tuple[float, int]]):
        """`group_starts`: (time.time(), workers) of each worker group of this fit so far, this one last."""
        self.launch, self.config, self.rank, self.device = launch, config, rank, device
        self.reports = RayReports(launch.report_interval, rank, device, staging, launch.run_dir)
        self.steps_done: int | None = None  # for error messages; None while the engine sets up
        self.total_steps = config.max_steps  # -1 (one epoch) until the engine's first step says how many
        self.hellaswag_metrics: dict[str, float | int] = {}  # the last eval's, added to reports and the summary
        self.core_metrics: dict[str, float | int] = {}  # the same for CORE
        self.progress = Progress(launch.started_at, group_starts[0][1], launch.usd_per_worker_hour)
        for at, workers in group_starts[1:]:
            self.progress.resized(at, workers)
        self.gauges = RunGauges(launch.run_name) if rank == 0 else None
        evals = launch.hellaswag or launch.core
        resume_step = read_state(config.resume_from)["step"] if evals and config.resume_from else None
        self.hellaswag = None
        if launch.hellaswag and (rank == 0 or launch.hellaswag.placement == "ranks"):
            self.hellaswag = HellaSwagBesideTraining(launch.hellaswag, Path(config.output_dir), device, rank,
                                                     launch.workers, self._hellaswag_result, resume_step)
        self.core = None
        if launch.core and (rank == 0 or launch.core.placement == "ranks"):
            self.core = CoreBesideTraining(launch.core, Path(config.output_dir), device, rank, launch.workers,
                                           self._core_result, resume_step)

    def train_hooks(self) -> TrainHooks:
        return TrainHooks(on_step=self.on_step, on_checkpoint=self.on_checkpoint,
                          on_eval=self.on_eval if self.launch.hellaswag or self.launch.core else None)

    def on_step(self, metrics: dict[str, Any]) -> bool:
        # metrics["step"] is the step index, 0-based like the engine's loop; the console shows it 1-based.
        self.steps_done = metrics["step"] + ("loss" in metrics)
        self.total_steps = metrics.get("total_steps", self.total_steps)
        if self.rank == 0:
            self._track_progress(metrics)
        done = {**metrics, **self.hellaswag_metrics, **self.core_metrics, "step": self.steps_done,
                "timestamp": time.time()}
        if self.gauges:
            self.gauges.update({**done, "elapsed_s": self.progress.elapsed(), "cost_usd": self.progress.cost(),
                                "eta_s": self.progress.eta(self.steps_done, self.total_steps),
                                "workers": self.launch.workers})
        if "loss" not in metrics:  # the final val-only call: always reported, so the last metrics reach Ray
            self.reports.report(done)
            return False
        return self.reports.on_step(self.steps_done, done)

    def _track_progress(self, metrics: dict[str, Any]) -> None:
        """Collect finished evals (never waits), and every -v steps print elapsed/ETA/cost (finish() prints
        the last line)."""
        for evals in (self.hellaswag, self.core):
            if evals:
                evals.poll(self.steps_done)
        if "loss" not in metrics:
            return
        self.progress.step_done(self.steps_done)
        every = self.config.val_every
        if every > 0 and self.steps_done % every == 0 and self.steps_done != self.total_steps:
            print(self.progress.line(self.steps_done, self.total_steps), flush=True)

    def _hellaswag_result(self, step: int, result: Result) -> None:
        self.hellaswag_metrics = {"hellaswag_step": step, "hellaswag_acc": result["acc"],
                                  "hellaswag_acc_norm": result["acc_norm"], "hellaswag_examples": result["num_total"]}
        self.gauges.update(self.hellaswag_metrics)

    def _core_result(self, step: int, result: Result) -> None:
        self.core_metrics = {"core_step": step, "core": result["core"], "core_examples": result["num_total"]}
        self.gauges.update(self.core_metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.steps_done = step
        self.reports.register(step, path)

    def on_eval(self, step: int, model: torch.nn.Module) -> None:
        for evals in (self.hellaswag, self.core):
            if evals:
                evals.on_eval(step, model, last=step == self.total_steps)

    def finish(self, result: TrainResult) -> None:
        """After the engine returns, on every rank: rank 0 waits for the last evals and writes summary.json;
        then one last report (a barrier) carries the final HellaSwag result to Ray Train."""
        if self.rank == 0:
            for evals in (self.hellaswag, self.core):
                if evals:
                    evals.finish()
            print(self.progress.line(result.steps, result.steps), flush=True)
            self._write_summary(result)
            if self.launch.remote:
                self.reports.upload(*RUN_LOGS, SUMMARY)
        self.reports.report({"step": result.steps, **self.hellaswag_metrics, **self.core_metrics,
                             "timestamp": time.time()})

    def _write_summary(self, result: TrainResult) -> None:
        hellaswag = None
        if self.hellaswag_metrics:
            hellaswag = {name.removeprefix("hellaswag_"): value for name, value in self.hellaswag_metrics.items()}
            hellaswag["data"] = self.launch.hellaswag.file or "HellaSwag validation set"
        core = None
        if self.core_metrics:
            core = {"step": self.core_metrics["core_step"], "core": self.core_metrics["core"],
                    "examples": self.core_metrics["core_examples"],
                    "bundle": self.launch.core.bundle or "public CORE eval bundle"}
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        summary = {"run": self.launch.run_dir, **self.progress.summary(
            result.steps, self.config.tokens_per_step(self.launch.workers), device),
            "train_loss": result.train_loss, "val_loss": result.val_loss, "hellaswag": hellaswag, "core": core}
        path = Path(self.config.output_dir) / SUMMARY
        write_json(path, summary)
        print(f"wrote {path if not self.launch.remote else f'{self.launch.run_dir}/{SUMMARY}'}", flush=True)
