"""run.py's flags: the engine's (training/config.py's TrainConfig, llm.c's letters) and the Ray ones here, in one
dataclass with one flag table as the engine's; checked together before anything starts."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

from common import cli
from evals.parallel import DEFAULT_CPUS_PER_TASK, DEFAULT_TASKS
from training.config import ConfigError, TrainConfig, build_parser, config_from_args
from training.launcher.elastic import check_group_sizes
from training.launcher.placement import PLACEMENTS
from training.launcher.storage import staged


@dataclass(frozen=True)
class LaunchConfig:
    """How run.py launches the engine on Ray: the worker group, the cluster, and the evals beside training."""

    workers: int = 1
    min_workers: int | None = None  # None: --workers, a fixed group
    resize_interval: float = 60.0
    address: str | None = None
    use_gpu: str = "auto"
    cpus_per_worker: float | None = None
    max_failures: int | None = None
    report_interval: float = 5.0
    gpu_hour_usd: float | None = None
    hellaswag: int = 0
    eval_on: str = "auto"
    hellaswag_file: str | None = None
    core_every: int = 0
    core_bundle: str | None = None
    core_max_per_task: int = 0
    eval_tasks: int = DEFAULT_TASKS
    eval_cpus_per_task: float = DEFAULT_CPUS_PER_TASK
    eval_gpus_per_task: float | None = None

    def group_sizes(self) -> tuple[int, int]:
        """(smallest, largest) worker group: --min-workers (default: --workers, a fixed group) and --workers."""
        return self.workers if self.min_workers is None else self.min_workers, self.workers

    def restarts(self) -> int:
        """--max-failures: by default 3, or unlimited (-1) for an elastic group, where every spot reclaim is one."""
        if self.max_failures is not None:
            return self.max_failures
        smallest, largest = self.group_sizes()
        return -1 if smallest < largest else 3

    def evals(self) -> int:
        """How many evals run beside training (HellaSwag, CORE)."""
        return bool(self.hellaswag) + bool(self.core_every)

    def validate(self, config: TrainConfig) -> None:
        """ConfigError naming the flag at fault; `config` is the engine's, for the flags that depend on it."""
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        smallest, largest = self.group_sizes()
        if not 1 <= smallest <= largest:
            raise ConfigError(f"--min-workers must be between 1 and --workers {largest}, got {smallest}")
        for flag, value in (("--resize-interval", self.resize_interval), ("--report-interval", self.report_interval),
                            ("--gpu-hour-usd", self.gpu_hour_usd), ("--eval-cpus-per-task", self.eval_cpus_per_task),
                            ("--eval-gpus-per-task", self.eval_gpus_per_task)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
        if self.cpus_per_worker is not None and not (math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise ConfigError(f"--cpus-per-worker must be a finite number > 0, got {self.cpus_per_worker}")
        if self.max_failures is not None and self.max_failures < -1:
            raise ConfigError(f"--max-failures must be -1 (unlimited) or more, got {self.max_failures}")
        if not config.output_dir:
            raise ConfigError("-o is required: it is the Ray Train run directory that checkpoints and restarts use")
        if self.core_every < 0 or self.core_max_per_task < 0:
            raise ConfigError("--core-every and --core-max-per-task must not be negative")
        if self.core_every and (config.val_every <= 0 or self.core_every % config.val_every):
            raise ConfigError(f"--core-every {self.core_every} must be a multiple of -v {config.val_every} (evals "
                              "run at -v steps)")
        if self.evals():
            if self.eval_tasks < 1:
                raise ConfigError(f"--eval-tasks must be at least 1, got {self.eval_tasks}")
            if self.hellaswag_file and not os.path.isfile(self.hellaswag_file):
                raise ConfigError(f"--hellaswag-file {self.hellaswag_file}: no such file")


RAY_TRAIN, EVALS = "Ray Train", "Evals beside training: HellaSwag (llm.c's -h) and CORE"
# (group, flags, field, type, choices, help); the help says each default, some of which depend on the cluster.
_FLAGS: list[tuple[str, tuple[str, ...], str, type, tuple | None, str]] = [
    (RAY_TRAIN, ("--workers",), "workers", int, None, "training workers: one per GPU (default: 1)"),
    (RAY_TRAIN, ("--min-workers",), "min_workers", int, None,
     "elastic group: Ray Train runs between --min-workers and --workers workers as nodes come and go (spot "
     "capacity), resuming from the latest checkpoint at each new size with the same global batch -d (default: "
     "--workers, a fixed group)"),
    (RAY_TRAIN, ("--resize-interval",), "resize_interval", float, None,
     "elastic group: seconds between Ray Train's checks for room to grow the group; each growth restarts from the "
     "latest checkpoint (default: 60)"),
    (RAY_TRAIN, ("--address",), "address", str, None,
     "Ray cluster to join ('auto' = the running one; default: RAY_ADDRESS, else a new local cluster)"),
    (RAY_TRAIN, ("--use-gpu",), "use_gpu", str, ("auto", "1", "0"),
     "one GPU per worker; auto = when the cluster has GPUs (default: auto)"),
    (RAY_TRAIN, ("--cpus-per-worker",), "cpus_per_worker", float, None,
     "CPUs per worker (fractions allowed), rounded its torch threads on CPU (default: 1 with GPUs, else the "
     "cluster's CPUs / --workers, less what -h 1's eval tasks need)"),
    (RAY_TRAIN, ("--max-failures",), "max_failures", int, None,
     "worker failures to recover from by restarting at the last checkpoint (-1 = unlimited; default: 3, or -1 with "
     "--min-workers: every spot reclaim is one)"),
    (RAY_TRAIN, ("--report-interval",), "report_interval", float, None,
     "seconds between ray.train.report calls, besides one per checkpoint and one at the end; dashboard gauges "
     "update every step (default: 5)"),
    (RAY_TRAIN, ("--gpu-hour-usd",), "gpu_hour_usd", float, None,
     "USD per worker-hour for the cost estimate (default: 3.50, an H100, on GPU; on CPU no estimate unless given)"),
    (EVALS, ("-h", "--hellaswag"), "hellaswag", int, (0, 1),
     "1 = score HellaSwag at every -v step (and the last), placed by --eval-on (default: 0)"),
    (EVALS, ("--eval-on",), "eval_on", str, PLACEMENTS,
     "tasks: Ray tasks on accelerators no worker holds (CPUs on a CPU run) while training goes on; ranks: in-loop "
     "on every training rank; auto: tasks if the cluster has the accelerators for them, else ranks (default: auto)"),
    (EVALS, ("--hellaswag-file",), "hellaswag_file", str, None,
     "HellaSwag jsonl or llm.c eval .bin (default: the validation set, downloaded once to "
     "~/.cache/raygpt2/hellaswag/)"),
    (EVALS, ("--core-every",), "core_every", int, None,
     "score CORE every N steps, a multiple of -v, and at the last step, placed by --eval-on like HellaSwag "
     "(default: 0 = never)"),
    (EVALS, ("--core-bundle",), "core_bundle", str, None,
     "unzipped CORE eval bundle (default: the public one, downloaded once to ~/.cache/raygpt2/core/)"),
    (EVALS, ("--core-max-per-task",), "core_max_per_task", int, None,
     "examples per CORE task in the periodic evals; the last step's scores them all (default: 0 = all)"),
    (EVALS, ("--eval-tasks",), "eval_tasks", int, None, f"Ray tasks per eval (default: {DEFAULT_TASKS})"),
    (EVALS, ("--eval-cpus-per-task",), "eval_cpus_per_task", float, None,
     f"CPUs per eval task (default: {DEFAULT_CPUS_PER_TASK})"),
    (EVALS, ("--eval-gpus-per-task",), "eval_gpus_per_task", float, None,
     "GPUs per eval task (default: 1 on a GPU run, 0 on CPU; 0 on a GPU run puts the tasks on CPUs, with "
     "--eval-on tasks)"),
]


def build_run_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description="GPT-2 pretraining on Ray Train; engine flags as llm.c's train_gpt2cu (see training/train.py)",
        add_help=False, parents=[build_parser()],
    )
    groups = {name: parser.add_argument_group(name) for name in (RAY_TRAIN, EVALS)}
    defaults = LaunchConfig()
    for group, flags, field, kind, choices, text in _FLAGS:
        groups[group].add_argument(*flags, dest=field, type=kind, choices=choices, default=getattr(defaults, field),
                                   help=text)
    return parser


def absolute(path: str) -> str:
    """Workers run in their own directory: local paths (and globs) are made absolute against ours."""
    return path if not path or staged(path) else os.path.abspath(path)


def parse_run_flags(argv: list[str] | None = None) -> tuple[TrainConfig, LaunchConfig]:
    """The engine's config and the launch's, as given (exit 2 on a flag argparse refuses)."""
    args = build_run_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    return config_from_args(args), LaunchConfig(**{k: v for k, v in vars(args).items() if k in fields})


def plan(config: TrainConfig, launch: LaunchConfig) -> tuple[TrainConfig, str]:
    """The engine config the workers run and the run directory; ConfigError names the flag at fault."""
    launch.validate(config)
    config.validate()
    smallest, largest = launch.group_sizes()
    # llm.c's -d -1 is B x T x workers: fixed here, so that it stays the global batch if the group resizes.
    config = dataclasses.replace(
        config, total_batch_tokens=config.tokens_per_step(launch.workers), train_data=absolute(config.train_data),
        val_data=absolute(config.val_data), resume_from=absolute(config.resume_from) if config.resume_from else None)
    check_group_sizes(config, smallest, largest)  # every size must run a step of -d
    return config, absolute(config.output_dir.rstrip("/"))
