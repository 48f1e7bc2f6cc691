"""The training engine on Ray Train: one `TorchTrainer` worker per GPU (or per CPU slot), same command everywhere.

    python training/run.py --workers 8 -i 'data/*_train_*.bin' -j 'data/*_val_*.bin' -o /shared/runs/d12 -e d12 \
        -b 64 -t 1024 -d 524288 -l 6e-4 -q 0.0 -u 700 -c 0.1 -x 18865 -v 250 -s 20000 -n 500 -y 1
    ray job submit --working-dir . -- python training/run.py --workers 16 -o s3://bucket/runs/d24 ...

Every engine flag is `training/train.py`'s (llm.c's letters); this file adds the Ray ones (`--workers`,
`--address`, ...). Each worker runs `training.train.train()` as one rank of the process group Ray Train set
up (NCCL on GPU, gloo on CPU), so data sharding, DDP, ZeRO-1 and checkpoint contents are the engine's.

`-o DIR` is the Ray Train run directory: RunConfig(storage_path=parent of DIR, name=basename of DIR), so
Ray's bookkeeping sits next to the engine's `ckpt_XXXXXXXX/` and `main.log`. A local DIR (shared storage
on a multi-node cluster) is written in place by rank 0 and registered with Ray without a copy; a cloud URI
gets each checkpoint (and main.log) uploaded from a staging directory private to the run. gpt2/rundir.py
owns the directory's layout, its checks (used -o, --overwrite) and the lock the driver holds while it runs.
A failed worker makes Ray restart the group from the latest registered checkpoint (`--max-failures`); errors
that a restart cannot fix (NaN loss, bad data, OOM, bad checkpoint) stop the run with one line naming the
rank and step.

`--workers MAX --min-workers MIN` makes the group elastic (spot capacity): Ray Train runs it at any size in
between that the cluster has room for and restarts it at a new size from the latest checkpoint when a node
is lost or added. -d stays the global batch at every size (training/launcher/elastic.py checks the sizes at launch);
each new group's rank 0 records a resize on the console and in main.log.

`-h 1` (llm.c's flag) scores HellaSwag on every -v step's checkpoint in Ray tasks beside the training, and
`--core-every N` CORE every N steps (training/launcher/run_hellaswag.py). Rank 0 prints elapsed / ETA / estimated cost
every -v steps and writes `summary.json` at the end (training/launcher/progress.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make the repo root importable, then run as training.run
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    from training.run import main

    sys.exit(main())

import torch

from common import cli
from common.files import write_json
from evals.core_data import CoreFormatError, locate_bundle, read_bundle
from evals.hellaswag_data import HellaSwagFormatError, check_fits, load_examples
from evals.parallel import gpus_short
from gpt2.checkpoint import CheckpointError, read_state
from gpt2.interop import LlmcFormatError
from gpt2.rundir import CHECKPOINT_STATE, RUN_LOGS, SUMMARY, RunDir, RunDirError, make_staging
from pipelines.shards import ShardFormatError
from training.config import ConfigError, TrainConfig, build_parser, config_from_args
from training.data import shard_files
from training.launcher.console import RAY_TRAIN_CONSOLE_LEVEL, quiet_ray_train_console
from training.launcher.elastic import check_group_sizes, record_resize, uneven_split_note
from training.launcher.progress import Progress, hour_price
from training.launcher.run_hellaswag import (
    PLACEMENTS,
    CoreBesideTraining,
    CoreSettings,
    HellaSwagBesideTraining,
    HellaSwagSettings,
    model_shape,
    settle,
    settle_core,
)
from training.ops.gauges import RunGauges
from training.train import TrainHooks, TrainingDiverged, TrainResult, check_same_run, train

# Elastic runs' RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S unless set (Ray's default: 60 s). After a node is lost, Ray
# Train sizes the next group from resources Ray still counts for a while (until the GCS declares the node dead,
# ~15 s by default, and Ray Data's AutoscalingCoordinator, which Ray Train asks, refreshes: every 20 s). Such a
# group cannot be placed, and this timeout is how soon Ray Train gives up on it and sizes again; a group sized
# from resources that exist is placed at once.
ELASTIC_GROUP_START_TIMEOUT_S = 10
INPUT_ERRORS = (ConfigError, CheckpointError, ShardFormatError, LlmcFormatError, HellaSwagFormatError,
                CoreFormatError)
# Errors that a restart from the last checkpoint would only repeat.
DETERMINISTIC_ERRORS = (*INPUT_ERRORS, TrainingDiverged, torch.OutOfMemoryError)


class FatalTrainingError(RuntimeError):
    """An error that restarting the workers cannot fix; the message names the rank and step. `bad_input`:
    the flags or files are at fault (exit status 2, as when the driver finds it), not the training."""

    def __init__(self, message: str, bad_input: bool = False):
        super().__init__(message)
        self.bad_input = bad_input


@dataclass
class Launch:
    """What the workers need besides the engine config."""

    run_name: str
    run_dir: str  # -o as given (absolute when local): the Ray Train run directory
    remote: bool  # -o is a cloud URI: checkpoints are staged locally and uploaded
    use_gpu: bool
    cpus_per_worker: float
    report_interval: float
    workers: int  # --workers on the driver; on a worker, its group's size (an elastic run's groups vary)
    started_at: float  # the launcher's time.time() at launch: elapsed time and cost count from here
    usd_per_worker_hour: float | None  # None: no cost estimate (CPU without --gpu-hour-usd)
    hellaswag: dict[str, Any] | None  # HellaSwagSettings as a dict; None without -h 1
    core: dict[str, Any] | None = None  # CoreSettings as a dict; None without --core-every


def _is_uri(path: str) -> bool:
    return "://" in path


def build_run_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description="GPT-2 pretraining on Ray Train; engine flags as llm.c's train_gpt2cu (see training/train.py)",
        add_help=False, parents=[build_parser()],
    )
    ray_flags = parser.add_argument_group("Ray Train")
    ray_flags.add_argument("--workers", type=int, default=1, help="training workers: one per GPU (default: 1)")
    ray_flags.add_argument("--min-workers", type=int,
                           help="elastic group: Ray Train runs between --min-workers and --workers workers as "
                                "nodes come and go (spot capacity), resuming from the latest checkpoint at each new "
                                "size with the same global batch -d (default: --workers, a fixed group)")
    ray_flags.add_argument("--resize-interval", type=float, default=60.0,
                           help="elastic group: seconds between Ray Train's checks for room to grow the group; each "
                                "growth restarts from the latest checkpoint (default: 60)")
    ray_flags.add_argument("--address", help="Ray cluster to join ('auto' = the running one; default: "
                                             "RAY_ADDRESS, else a new local cluster)")
    ray_flags.add_argument("--use-gpu", choices=("auto", "1", "0"), default="auto",
                           help="one GPU per worker; auto = when the cluster has GPUs (default: auto)")
    ray_flags.add_argument("--cpus-per-worker", type=float,
                           help="CPUs per worker (fractions allowed), rounded its torch threads on CPU (default: 1 "
                                "with GPUs, else the cluster's CPUs / --workers, less what -h 1's eval tasks need)")
    ray_flags.add_argument("--max-failures", type=int,
                           help="worker failures to recover from by restarting at the last checkpoint (-1 = "
                                "unlimited; default: 3, or -1 with --min-workers: every spot reclaim is one)")
    ray_flags.add_argument("--report-interval", type=float, default=5.0,
                           help="seconds between ray.train.report calls, besides one per checkpoint and one at "
                                "the end; dashboard gauges update every step (default: 5)")
    ray_flags.add_argument("--gpu-hour-usd", type=float,
                           help="USD per worker-hour for the cost estimate (default: 3.50, an H100, on GPU; on CPU "
                                "no estimate unless given)")
    evals = parser.add_argument_group("Evals beside training: HellaSwag (llm.c's -h) and CORE")
    evals.add_argument("-h", "--hellaswag", type=int, default=0, choices=(0, 1),
                       help="1 = score HellaSwag at every -v step (and the last), placed by --eval-on (default: 0)")
    evals.add_argument("--eval-on", choices=PLACEMENTS, default="auto",
                       help="tasks: Ray tasks on accelerators no worker holds (CPUs on a CPU run) while training "
                            "goes on; ranks: in-loop on every training rank; auto: tasks if the cluster has the "
                            "accelerators for them, else ranks (default: auto)")
    evals.add_argument("--hellaswag-file",
                       help="HellaSwag jsonl or llm.c eval .bin (default: the validation set, downloaded once to "
                            "~/.cache/raygpt2/hellaswag/)")
    evals.add_argument("--core-every", type=int, default=0,
                       help="score CORE every N steps, a multiple of -v, and at the last step, placed by --eval-on "
                            "like HellaSwag (default: 0 = never)")
    evals.add_argument("--core-bundle", help="unzipped CORE eval bundle (default: the public one, downloaded once "
                                             "to ~/.cache/raygpt2/core/)")
    evals.add_argument("--core-max-per-task", type=int, default=0,
                       help="examples per CORE task in the periodic evals; the last step's scores them all "
                            "(default: 0 = all)")
    evals.add_argument("--eval-tasks", type=int, default=2, help="Ray tasks per eval (default: 2)")
    evals.add_argument("--eval-cpus-per-task", type=float, default=0.5, help="CPUs per eval task (default: 0.5)")
    evals.add_argument("--eval-gpus-per-task", type=float,
                       help="GPUs per eval task (default: 1 on a GPU run, 0 on CPU; 0 on a GPU run puts the tasks "
                            "on CPUs, with --eval-on tasks)")
    return parser


def _absolute(path: str) -> str:
    """Workers run in their own directory: local paths (and globs) are made absolute against ours."""
    return path if not path or _is_uri(path) else os.path.abspath(path)


def _group_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """(smallest, largest) worker group: --min-workers (default: --workers, a fixed group) and --workers."""
    return args.workers if args.min_workers is None else args.min_workers, args.workers


def _max_failures(args: argparse.Namespace) -> int:
    if args.max_failures is not None:
        return args.max_failures
    smallest, largest = _group_sizes(args)
    return -1 if smallest < largest else 3


def plan(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """The engine config the workers run and the run directory; ConfigError names the flag at fault."""
    config = config_from_args(args)
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    smallest, largest = _group_sizes(args)
    if not 1 <= smallest <= largest:
        raise ConfigError(f"--min-workers must be between 1 and --workers {largest}, got {smallest}")
    for flag, value in (("--resize-interval", args.resize_interval), ("--report-interval", args.report_interval),
                        ("--gpu-hour-usd", args.gpu_hour_usd), ("--eval-cpus-per-task", args.eval_cpus_per_task),
                        ("--eval-gpus-per-task", args.eval_gpus_per_task)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
    if args.cpus_per_worker is not None and not (math.isfinite(args.cpus_per_worker) and args.cpus_per_worker > 0):
        raise ConfigError(f"--cpus-per-worker must be a finite number > 0, got {args.cpus_per_worker}")
    if args.max_failures is not None and args.max_failures < -1:
        raise ConfigError(f"--max-failures must be -1 (unlimited) or more, got {args.max_failures}")
    if not config.output_dir:
        raise ConfigError("-o is required: it is the Ray Train run directory that checkpoints and restarts use")
    if args.core_every < 0 or args.core_max_per_task < 0:
        raise ConfigError("--core-every and --core-max-per-task must not be negative")
    if args.core_every and (config.val_every <= 0 or args.core_every % config.val_every):
        raise ConfigError(f"--core-every {args.core_every} must be a multiple of -v {config.val_every} (evals run "
                          "at -v steps)")
    if args.hellaswag or args.core_every:
        if args.eval_tasks < 1:
            raise ConfigError(f"--eval-tasks must be at least 1, got {args.eval_tasks}")
        if args.hellaswag_file and not os.path.isfile(args.hellaswag_file):
            raise ConfigError(f"--hellaswag-file {args.hellaswag_file}: no such file")
    config.validate()
    # llm.c's -d -1 is B x T x workers: fixed here, so that it stays the global batch if the group resizes.
    config.total_batch_tokens = config.tokens_per_step(args.workers)
    check_group_sizes(config, smallest, largest)  # every size must run a step of -d
    run_dir = _absolute(config.output_dir.rstrip("/"))
    config.train_data, config.val_data = _absolute(config.train_data), _absolute(config.val_data)
    config.resume_from = _absolute(config.resume_from) if config.resume_from else None
    return config, run_dir


def _storage(run_dir: str):
    """(pyarrow filesystem, path within it) of the run directory."""
    import pyarrow.fs

    if _is_uri(run_dir):
        return pyarrow.fs.FileSystem.from_uri(run_dir)
    return pyarrow.fs.LocalFileSystem(), run_dir


class _FailureLog:
    """The first deterministic error of a run, kept outside the workers so restarted workers and the driver
    can see it. A Ray actor with no CPU; created by the driver for one fit."""

    def __init__(self):
        self.error: tuple[str, bool] | None = None

    def record(self, message: str, bad_input: bool) -> None:
        if self.error is None:
            self.error = message, bad_input

    def first(self) -> tuple[str, bool] | None:
        """(message, bad_input) of the first error recorded."""
        return self.error


class _WorkerGroupLog:
    """The worker groups of one fit, kept outside them: when each started and with how many workers, and why
    the one before failed (Ray Train's controller reports worker errors here). Each new group's rank 0 reads
    it to record a resize and to count the worker-hours used. A Ray actor with no CPU; created by the driver."""

    def __init__(self):
        self.starts: list[tuple[float, int]] = []  # (time.time(), workers)
        self.failure: str | None = None  # why the running group failed, until the next one starts

    def failed(self, reason: str) -> None:
        if self.failure is None:  # the first error tells; the others are its echoes on the other ranks
            self.failure = reason

    def started(self, at: float, workers: int) -> tuple[list[tuple[float, int]], str | None]:
        """Every group start so far, this one last, and why the group before it failed (None: it did not)."""
        self.starts.append((at, workers))
        failure, self.failure = self.failure, None
        return list(self.starts), failure


def _report_group_failures(groups) -> Any:
    """A ray.train.UserCallback, run by Ray Train's controller, that tells `groups` (a _WorkerGroupLog) why a
    worker group failed. Made here because run.py imports Ray only once it runs."""
    from ray.train import UserCallback

    class ReportGroupFailures(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            def cause_first(item: tuple[int, Exception]) -> tuple[bool, int]:
                # A lost node shows as its workers' failed health checks; the survivors' errors (a collective
                # whose peer vanished) follow from it.
                return "HealthCheck" not in type(item[1]).__name__, item[0]

            rank, error = min(worker_exceptions.items(), key=cause_first)
            first_line = (str(error).strip().splitlines() or [""])[0][:160]
            groups.failed.remote(f"rank {rank} failed: {type(error).__name__}: {first_line}")

    return ReportGroupFailures()


class _RayReports:
    """What Ray Train hears from the workers: metrics now and then, and every checkpoint.

    ray.train.report is a barrier every rank must reach equally often, and Ray Train's controller takes one
    report per health check (2 s), a report blocking until the previous one is taken: per-step reports
    would throttle fast steps. So reports go about every --report-interval seconds, counted in steps: at
    each report (a barrier already) rank 0 turns its measured step time into the number of steps to the
    next one and broadcasts it, so the steps in between make no collective call of their own.
    """

    def __init__(self, launch: Launch, rank: int, device: torch.device, staging: str | None):
        import ray.train

        self.ray_train = ray.train
        self.launch, self.rank, self.device, self.staging = launch, rank, device, staging
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
            stride[0] = max(1, math.ceil(self.launch.report_interval / max(seconds_per_step, 1e-6)))
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
        elif not self.launch.remote:  # written in place in the run directory: register it, copy nothing
            self.report(metrics, checkpoint=Checkpoint.from_directory(str(path)), checkpoint_dir_name=path.name,
                        checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        else:
            self.report(metrics, checkpoint=Checkpoint.from_directory(str(path)), checkpoint_dir_name=path.name,
                        delete_local_checkpoint_after_upload=True)
            self.upload(*RUN_LOGS)

    def upload(self, *names: str) -> None:
        """Copy files of the local staging directory (those that exist) next to the checkpoints of a cloud -o."""
        import pyarrow.fs

        filesystem, path = _storage(self.launch.run_dir)
        for name in names:
            if os.path.exists(local := os.path.join(self.staging, name)):
                pyarrow.fs.copy_files(local, f"{path}/{name}", destination_filesystem=filesystem)


def _fetch_run_logs(run_dir: str, staging: str) -> None:
    """Rank 0 of a resumed cloud run, whose staging directory is new: bring back the logs as uploaded with the
    latest checkpoint, so that they are continued, not started over."""
    import pyarrow.fs

    filesystem, path = _storage(run_dir)
    for name in RUN_LOGS:
        if filesystem.get_file_info(f"{path}/{name}").type == pyarrow.fs.FileType.File:
            pyarrow.fs.copy_files(f"{path}/{name}", os.path.join(staging, name), source_filesystem=filesystem)


class _WorkerHooks:
    """The engine's TrainHooks on a Ray Train worker: Ray reports on every rank; on rank 0 also
    the dashboard gauges, progress / ETA / cost lines, HellaSwag beside training and summary.json."""

    def __init__(self, launch: Launch, config: TrainConfig, rank: int, device: torch.device, staging: str | None,
                 group_starts: list[tuple[float, int]]):
        """`group_starts`: (time.time(), workers) of each worker group of this fit so far, this one last."""
        self.launch, self.config, self.rank, self.device = launch, config, rank, device
        self.reports = _RayReports(launch, rank, device, staging)
        self.steps_done: int | None = None  # for error messages; None while the engine sets up
        self.total_steps = config.max_steps  # -1 (one epoch) until the engine's first step says how many
        self.hellaswag_metrics: dict[str, float | int] = {}  # the last eval's, added to reports and the summary
        self.core_metrics: dict[str, float | int] = {}  # the same for CORE
        self.progress = Progress(launch.started_at, group_starts[0][1], launch.usd_per_worker_hour)
        for at, workers in group_starts[1:]:
            self.progress.resized(at, workers)
        self.gauges = RunGauges(launch.run_name) if rank == 0 else None
        self.hellaswag = None
        if launch.hellaswag and (rank == 0 or launch.hellaswag["placement"] == "ranks"):
            self.hellaswag = HellaSwagBesideTraining(
                HellaSwagSettings(**launch.hellaswag), Path(config.output_dir), device, rank, launch.workers,
                on_result=self._hellaswag_result,
                resume_step=read_state(config.resume_from)["step"] if config.resume_from else None)
        self.core = None
        if launch.core and (rank == 0 or launch.core["placement"] == "ranks"):
            self.core = CoreBesideTraining(
                CoreSettings(**launch.core), Path(config.output_dir), device, rank, launch.workers,
                on_result=self._core_result,
                resume_step=read_state(config.resume_from)["step"] if config.resume_from else None)

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

    def _hellaswag_result(self, step: int, result: dict[str, float | int]) -> None:
        self.hellaswag_metrics = {"hellaswag_step": step, "hellaswag_acc": result["acc"],
                                  "hellaswag_acc_norm": result["acc_norm"], "hellaswag_examples": result["num_total"]}
        self.gauges.update(self.hellaswag_metrics)

    def _core_result(self, step: int, result: dict[str, Any]) -> None:
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
            hellaswag["data"] = self.launch.hellaswag["file"] or "HellaSwag validation set"
        core = None
        if self.core_metrics:
            core = {"step": self.core_metrics["core_step"], "core": self.core_metrics["core"],
                    "examples": self.core_metrics["core_examples"],
                    "bundle": self.launch.core["bundle"] or "public CORE eval bundle"}
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        summary = {"run": self.launch.run_dir, **self.progress.summary(
            result.steps, self.config.tokens_per_step(self.launch.workers), device),
            "train_loss": result.train_loss, "val_loss": result.val_loss, "hellaswag": hellaswag, "core": core}
        path = Path(self.config.output_dir) / SUMMARY
        write_json(path, summary)
        print(f"wrote {path if not self.launch.remote else f'{self.launch.run_dir}/{SUMMARY}'}", flush=True)


def _resize_reason(group_starts: list[tuple[float, int]], group_failure: str | None) -> str:
    if group_failure:
        return group_failure
    if len(group_starts) > 1:  # the group before ended without an error: Ray Train's elastic policy resized it
        return "Ray Train resized the group to the capacity it found"
    return "a new launch resuming the run"


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: one rank of the engine, resumed from Ray's latest checkpoint."""
    import ray
    import ray.train
    import ray.train.torch

    launch = Launch(**loop_config["launch"])
    config = TrainConfig(**loop_config["train"])
    failures, groups = loop_config["failures"], loop_config["groups"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    launch.workers = context.get_world_size()  # this group's: an elastic run's groups vary within the bounds
    quiet_ray_train_console()
    recorded = ray.get(failures.first.remote())
    if recorded:  # Ray restarted us after an error that would only happen again
        raise FatalTrainingError(*recorded)
    if launch.use_gpu:
        config.device = str(ray.train.torch.get_device())
    else:
        config.device = "cpu"
        torch.set_num_threads(max(1, round(launch.cpus_per_worker)))
    staging = None
    if launch.remote and rank == 0:  # the engine writes locally (only rank 0 writes); _RayReports uploads
        staging = str(make_staging())
        config.output_dir = staging
    group_starts, group_failure = [(launch.started_at, launch.workers)], None
    if rank == 0:
        group_starts, group_failure = ray.get(groups.started.remote(time.time(), launch.workers))
    hooks = None
    with ExitStack() as stack:
        if staging:
            stack.callback(shutil.rmtree, staging, ignore_errors=True)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:  # a restart, or -y 1 finding an earlier fit's checkpoints
            config.resume_from = stack.enter_context(checkpoint.as_directory())
        try:
            if rank == 0 and config.resume_from and staging:
                _fetch_run_logs(launch.run_dir, staging)
            if rank == 0 and config.resume_from:  # before the engine trims main.log for its resume
                resize = record_resize(Path(config.output_dir), Path(config.resume_from), launch.workers,
                                       _resize_reason(group_starts, group_failure))
                if resize:
                    print(resize.line(), flush=True)
            hooks = _WorkerHooks(launch, config, rank, torch.device(config.device), staging, group_starts)
            result = train(config, TrainHooks(on_step=hooks.on_step, on_checkpoint=hooks.on_checkpoint,
                                              on_eval=hooks.on_eval if launch.hellaswag or launch.core else None))
        except DETERMINISTIC_ERRORS as err:
            steps_done = hooks.steps_done if hooks else None
            step = err.step if isinstance(err, TrainingDiverged) else None if steps_done is None else steps_done + 1
            message = f"rank {rank}, {'setup' if step is None else f'step {step}'}: {err}"
            bad_input = isinstance(err, INPUT_ERRORS)
            ray.get(failures.record.remote(message, bad_input))
            raise FatalTrainingError(message, bad_input) from err
        hooks.finish(result)


def _resources(args: argparse.Namespace, cluster: dict[str, float]) -> tuple[bool, float]:
    use_gpu = cluster.get("GPU", 0) > 0 if args.use_gpu == "auto" else args.use_gpu == "1"
    if args.cpus_per_worker:
        return use_gpu, args.cpus_per_worker
    if use_gpu:
        return use_gpu, 1
    cpus = cluster.get("CPU", 1)
    evals = bool(args.hellaswag) + bool(args.core_every)
    if evals and args.eval_on != "ranks":  # leave eval tasks room beside the workers, in CPU fractions
        per_worker = (cpus - evals * args.eval_tasks * args.eval_cpus_per_task) / args.workers
        if per_worker >= 0.25:
            return use_gpu, per_worker if per_worker < 1 else float(int(per_worker))
    return use_gpu, max(1, int(cpus) // args.workers)


def _check_capacity(workers: int, flag: str, use_gpu: bool, cpus: float, fixed_size: bool) -> None:
    """Ray waits forever for resources no node has. A cluster this process started (or joined in-process) has
    no autoscaler, so a worker group that does not fit is an error now; on a cluster that can grow it is a
    note, and the group starts when nodes come."""
    import ray

    need = {"CPU": cpus, **({"GPU": 1.0} if use_gpu else {})}
    fits = sum(min(int(node["Resources"].get(name, 0.0) // amount) for name, amount in need.items() if amount > 0)
               for node in ray.nodes() if node["Alive"])
    if fits >= workers:
        return
    what = " + ".join(f"{amount:g} {name}" for name, amount in need.items())
    message = f"{flag} {workers} x ({what}) per worker: the cluster's nodes hold {fits} such worker(s) now"
    if fixed_size:
        raise ConfigError(f"{message}; lower {flag} or --cpus-per-worker, or join a larger cluster (--address)")
    print(f"note: {message}; Ray Train waits until the autoscaler adds nodes", flush=True)


def _check_eval_gpus(settings: HellaSwagSettings | CoreSettings, fixed_size: bool) -> None:
    """Eval tasks asking for more GPUs than any node has would wait forever, after the training has finished."""
    if settings.placement != "tasks" or (most := gpus_short(settings.gpus_per_task)) is None:
        return
    message = (f"--eval-gpus-per-task {settings.gpus_per_task:g}: no node of the cluster has that many GPUs "
               f"(the most is {most:g})")
    if fixed_size:
        raise ConfigError(f"{message}; lower it (0 runs the evals on CPUs), use --eval-on ranks, or join a cluster "
                          "with GPU nodes (--address)")
    print(f"note: {message}; the evals wait until the autoscaler adds a GPU node", flush=True)


def launch_run(args: argparse.Namespace, callbacks: list | None = None) -> None:
    """Run the training as configured on the connected Ray cluster (`callbacks`: ray.train.UserCallback
    instances, e.g. a benchmark's); raises FatalTrainingError or Ray's TrainingFailedError."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    config, run_dir = plan(args)
    use_gpu, cpus = _resources(args, ray.cluster_resources())
    smallest, largest = _group_sizes(args)
    fixed_size = args.address is None and "RAY_ADDRESS" not in os.environ
    _check_capacity(smallest, "--workers" if smallest == largest else "--min-workers", use_gpu, cpus, fixed_size)
    if note := uneven_split_note(config, smallest, largest):
        print(note, flush=True)
    remote = _is_uri(run_dir)
    run_name = run_dir.rsplit("/", 1)[-1]
    storage_path = run_dir.rsplit("/", 1)[0] or "/"
    # Ray Train keeps the newest -nk checkpoints it registered; the engine's own pruning could delete the
    # checkpoint Ray would restart from before Ray knows of its successor.
    keep = config.checkpoints_keep or None
    config.checkpoints_keep = 0
    hellaswag = None
    if args.hellaswag:
        gpus_per_task = args.eval_gpus_per_task if args.eval_gpus_per_task is not None else float(use_gpu)
        settings = settle(args.eval_on, _absolute(args.hellaswag_file) if args.hellaswag_file else None,
                          args.eval_tasks, args.eval_cpus_per_task, gpus_per_task, config, args.workers, use_gpu,
                          cpus, ray.cluster_resources())
        _check_eval_gpus(settings, fixed_size)
        hellaswag = asdict(settings)
    core = None
    if args.core_every:
        gpus_per_task = args.eval_gpus_per_task if args.eval_gpus_per_task is not None else float(use_gpu)
        settings = settle_core(args.eval_on, _absolute(args.core_bundle) if args.core_bundle else None,
                               args.core_every, args.core_max_per_task, args.eval_tasks, args.eval_cpus_per_task,
                               gpus_per_task, config, args.workers, use_gpu, cpus, ray.cluster_resources())
        _check_eval_gpus(settings, fixed_size)
        core = asdict(settings)
    launch = Launch(run_name=run_name, run_dir=run_dir, remote=remote, use_gpu=use_gpu, cpus_per_worker=cpus,
                    report_interval=args.report_interval, workers=args.workers, started_at=time.time(),
                    usd_per_worker_hour=hour_price(args.gpu_hour_usd, use_gpu), hellaswag=hellaswag, core=core)
    if not remote:
        config.output_dir = run_dir
    # Beside the driver, as Ray Train's controller is: a worker node may vanish (spot capacity) and must not take
    # the run's own records with it.
    beside_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    failures = ray.remote(num_cpus=0, scheduling_strategy=beside_driver)(_FailureLog).remote()
    groups = ray.remote(num_cpus=0, scheduling_strategy=beside_driver)(_WorkerGroupLog).remote()
    if smallest < largest:
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(ELASTIC_GROUP_START_TIMEOUT_S))
    # Ray Train's state API (the dashboard's /api/train/v2/runs/v1: the run, its attempts and workers) is off
    # unless the driver that calls fit() has this set; Ray passes it on to its controller. An explicit 0 wins.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    claim = RunDir(run_dir).claimed(bool(config.resume or config.resume_from), config.overwrite)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"train": asdict(config), "launch": asdict(launch), "failures": failures, "groups": groups},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=largest if smallest == largest else (smallest, largest),
                                     use_gpu=use_gpu, elastic_resize_monitor_interval_s=args.resize_interval,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=_max_failures(args)),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep),
                             callbacks=[*(callbacks or []), _report_group_failures(groups)],
                             # Console as the engine prints it: Ray Train's print patch would log every
                             # print a second time. Of its own logs only warnings and errors show (the
                             # workers' quiet_ray_train_console covers the lines `ray.train` does not).
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
                             logging_config=LoggingConfig(log_level=RAY_TRAIN_CONSOLE_LEVEL)),
    )
    try:
        with claim:  # the first write into -o: everything that could refuse the run has been checked
            trainer.fit()
    except Exception as err:
        recorded = ray.get(failures.first.remote())
        if recorded:
            raise FatalTrainingError(*recorded) from err
        raise


def _check_resume(config: TrainConfig, run: RunDir, workers: int) -> None:
    """The checkpoint that -y 1 or --resume-from would continue exists and fits these flags: checked here, before a
    cluster starts, rather than in every worker Ray would restart."""
    if config.resume_from:
        where, state = config.resume_from, read_state(config.resume_from)
    elif config.resume and (name := run.latest_checkpoint()):
        where = f"{run.location}/{name}"
        state = (read_state(run.path(name)) if run.local
                 else json.loads(run.read_text(f"{name}/{CHECKPOINT_STATE}")))
    else:
        return
    if note := check_same_run(where, state, config, model_shape(config.model), workers):
        print(note, flush=True)


def _check_inputs(args: argparse.Namespace) -> None:
    """Every flag and input the driver can check before a cluster starts or a file is written."""
    from common.cluster import starts_local_cluster

    config, run_dir = plan(args)
    if starts_local_cluster(args.address):  # the workers will see this machine's files: look now
        shard_files(config.train_data, "-i")
        if config.val_data:
            shard_files(config.val_data, "-j")
    try:
        block_size = model_shape(config.model).block_size
    except ValueError as err:  # a bad -e descriptor, or an llm.c file that is not one
        raise ConfigError(f"-e {config.model}: {err}") from err
    if args.hellaswag:  # a file that does not fit would fail in every restarted worker
        check_fits(load_examples(args.hellaswag_file), block_size, args.hellaswag_file or "HellaSwag")
    if args.core_every:  # the same for the bundle (downloaded now when none is given)
        read_bundle(locate_bundle(args.core_bundle), args.core_max_per_task or None)
    run = RunDir(run_dir)
    run.check(bool(config.resume or config.resume_from), config.overwrite)
    _check_resume(config, run, args.workers)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """The command line; `callbacks`: ray.train.UserCallback instances for launch_run."""
    from common.cluster import connect

    args = build_run_parser().parse_args(argv)
    try:  # validate, then act: nothing starts and nothing is written before every check has passed
        _check_inputs(args)
        connect(args.address)
    except (*INPUT_ERRORS, RunDirError, ConnectionError) as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
    from ray.train import TrainingFailedError

    try:
        launch_run(args, callbacks)
    except (ConfigError, RunDirError) as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
    except FatalTrainingError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2 if err.bad_input else 1
    except TrainingFailedError as err:
        print(f"run.py: error: training failed after {_max_failures(args)} restart(s): {err}", file=sys.stderr)
        return 1
    return 0
