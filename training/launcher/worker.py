"""Ray Train's train_loop_per_worker: one rank of the engine (training.train.train()) in the process group Ray
Train set up, resumed from Ray's latest checkpoint, with errors a restart cannot fix recorded for the driver."""

from __future__ import annotations

import dataclasses
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from evals.core_data import CoreFormatError
from evals.hellaswag_data import HellaSwagFormatError
from gpt2.checkpoint import CheckpointError
from gpt2.interop import LlmcFormatError
from gpt2.rundir import make_staging
from pipelines.shards import ShardFormatError
from training.config import ConfigError, TrainConfig
from training.launcher.console import quiet_ray_train_console
from training.launcher.elastic import record_resize
from training.launcher.hub import Launch, WorkerHooks
from training.launcher.storage import fetch_run_logs
from training.train import TrainingDiverged, train

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


def _resize_reason(group_starts: list[tuple[float, int]], group_failure: str | None) -> str:
    if group_failure:
        return group_failure
    if len(group_starts) > 1:  # the group before ended without an error: Ray Train's elastic policy resized it
        return "Ray Train resized the group to the capacity it found"
    return "a new launch resuming the run"


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker. `loop_config`: the engine's TrainConfig ("train"), the Launch, and the
    driver's RunRecords actor ("records", training/launcher/records.py)."""
    import ray
    import ray.train
    import ray.train.torch

    config: TrainConfig = loop_config["train"]
    records = loop_config["records"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # this group's size: an elastic run's groups vary within the bounds
    launch: Launch = dataclasses.replace(loop_config["launch"], workers=context.get_world_size())
    quiet_ray_train_console()
    recorded = ray.get(records.first_error.remote())
    if recorded:  # Ray restarted us after an error that would only happen again
        raise FatalTrainingError(*recorded)
    if launch.use_gpu:
        config = dataclasses.replace(config, device=str(ray.train.torch.get_device()))
    else:
        config = dataclasses.replace(config, device="cpu")
        torch.set_num_threads(max(1, round(launch.cpus_per_worker)))
    staging = None
    if launch.remote and rank == 0:  # the engine writes locally (only rank 0 writes); RayReports uploads
        staging = str(make_staging())
        config = dataclasses.replace(config, output_dir=staging)
    group_starts, group_failure = [(launch.started_at, launch.workers)], None
    if rank == 0:
        group_starts, group_failure = ray.get(records.group_started.remote(time.time(), launch.workers))
    hooks = None
    with ExitStack() as stack:
        if staging:
            stack.callback(shutil.rmtree, staging, ignore_errors=True)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:  # a restart, or -y 1 finding an earlier fit's checkpoints
            config = dataclasses.replace(config, resume_from=stack.enter_context(checkpoint.as_directory()))
        try:
            if rank == 0 and config.resume_from and staging:
                fetch_run_logs(launch.run_dir, staging)
            if rank == 0 and config.resume_from:  # before the engine trims main.log for its resume
                resize = record_resize(Path(config.output_dir), Path(config.resume_from), launch.workers,
                                       _resize_reason(group_starts, group_failure))
                if resize:
                    print(resize.line(), flush=True)
            hooks = WorkerHooks(launch, config, rank, torch.device(config.device), staging, group_starts)
            result = train(config, hooks.train_hooks())
        except DETERMINISTIC_ERRORS as err:
            steps_done = hooks.steps_done if hooks else None
            step = err.step if isinstance(err, TrainingDiverged) else None if steps_done is None else steps_done + 1
            message = f"rank {rank}, {'setup' if step is None else f'step {step}'}: {err}"
            bad_input = isinstance(err, INPUT_ERRORS)
            ray.get(records.record_error.remote(message, bad_input))
            raise FatalTrainingError(message, bad_input) from err
        hooks.finish(result)
