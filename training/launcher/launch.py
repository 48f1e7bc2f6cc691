"""The driver: check every flag and input, connect to Ray, size the worker group, place the evals, and run the
engine in a TorchTrainer (`launch_run`); `main` is run.py's command line."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from common.cluster import cannot_grow
from evals.core_data import Task, locate_bundle, read_bundle
from evals.hellaswag_data import Example, check_fits, load_examples
from gpt2.checkpoint import read_state
from gpt2.rundir import CHECKPOINT_STATE, RunDir, RunDirError
from training.config import ConfigError, TrainConfig
from training.data import shard_files
from training.launcher.console import RAY_TRAIN_CONSOLE_LEVEL
from training.launcher.elastic import uneven_split_note
from training.launcher.flags import LaunchConfig, absolute, parse_run_flags, plan
from training.launcher.hub import Launch
from training.launcher.placement import (
    Cluster,
    Settings,
    check_eval_resources,
    cpus_per_worker,
    gpus_per_task,
    model_shape,
    settle,
    settle_core,
)
from training.launcher.progress import hour_price
from training.launcher.records import RunRecords, report_group_failures
from training.launcher.storage import staged
from training.launcher.worker import INPUT_ERRORS, FatalTrainingError, train_worker
from training.resume import check_same_run

# Elastic runs' RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S unless set (Ray's default: 60 s). After a node is lost, Ray
# Train sizes the next group from resources Ray still counts for a while (until the GCS declares the node dead,
# ~15 s by default, and Ray Data's AutoscalingCoordinator, which Ray Train asks, refreshes: every 20 s). Such a
# group cannot be placed, and this timeout is how soon Ray Train gives up on it and sizes again; a group sized
# from resources that exist is placed at once.
ELASTIC_GROUP_START_TIMEOUT_S = 10


@dataclasses.dataclass(frozen=True)
class EvalInputs:
    """The evals' data as the driver read it while checking the flags, so that it is read once."""

    examples: list[Example] | None = None  # HellaSwag's, with -h 1
    core_tasks: list[Task] | None = None  # CORE's, with --core-every (--core-max-per-task examples per task)


def _resources(launch: LaunchConfig, cluster: dict[str, float]) -> tuple[bool, float]:
    use_gpu = cluster.get("GPU", 0) > 0 if launch.use_gpu == "auto" else launch.use_gpu == "1"
    if launch.cpus_per_worker:
        return use_gpu, launch.cpus_per_worker
    if use_gpu:
        return use_gpu, 1
    return use_gpu, cpus_per_worker(cluster.get("CPU", 1), launch.workers, launch.evals(), launch.eval_on,
                                    launch.eval_tasks, launch.eval_cpus_per_task)


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


def _place_evals(config: TrainConfig, launch: LaunchConfig, cluster: Cluster, fixed_size: bool,
                 inputs: EvalInputs) -> dict[str, Settings | None]:
    """{"hellaswag": HellaSwagSettings | None, "core": CoreSettings | None}: each eval's placement, printed."""
    gpus = gpus_per_task(launch.eval_gpus_per_task, cluster.use_gpu)
    placed = {"hellaswag": None, "core": None}
    if launch.hellaswag:
        examples = inputs.examples if inputs.examples is not None else load_examples(launch.hellaswag_file)
        placed["hellaswag"] = settle(launch.eval_on, absolute(launch.hellaswag_file) or None, examples,
                                     launch.eval_tasks, launch.eval_cpus_per_task, gpus, config, cluster)
    if launch.core_every:
        core_tasks = inputs.core_tasks if inputs.core_tasks is not None else read_bundle(
            locate_bundle(launch.core_bundle), launch.core_max_per_task or None)
        placed["core"] = settle_core(launch.eval_on, absolute(launch.core_bundle) or None, core_tasks,
                                     launch.core_every, launch.core_max_per_task, launch.eval_tasks,
                                     launch.eval_cpus_per_task, gpus, config, cluster)
    for settings in placed.values():
        if settings:
            check_eval_resources(settings, fixed_size)
    return placed


def launch_run(config: TrainConfig, launch: LaunchConfig, callbacks: list | None = None,
               inputs: EvalInputs = EvalInputs()) -> None:
    """Run the training as configured on the connected Ray cluster (`callbacks`: ray.train.UserCallback
    instances, e.g. a benchmark's); raises FatalTrainingError or Ray's TrainingFailedError."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    config, run_dir = plan(config, launch)
    use_gpu, cpus = _resources(launch, ray.cluster_resources())
    smallest, largest = launch.group_sizes()
    fixed_size = cannot_grow(launch.address)
    _check_capacity(smallest, "--workers" if smallest == largest else "--min-workers", use_gpu, cpus, fixed_size)
    if note := uneven_split_note(config, smallest, largest):
        print(note, flush=True)
    remote = staged(run_dir)
    run_name = run_dir.rsplit("/", 1)[-1]
    storage_path = run_dir.rsplit("/", 1)[0] or "/"
    evals = _place_evals(config, launch, Cluster(launch.workers, use_gpu, cpus, ray.cluster_resources()),
                         fixed_size, inputs)
    worker_launch = Launch(run_name=run_name, run_dir=run_dir, remote=remote, use_gpu=use_gpu, cpus_per_worker=cpus,
                           report_interval=launch.report_interval, workers=launch.workers, started_at=time.time(),
                           usd_per_worker_hour=hour_price(launch.gpu_hour_usd, use_gpu), **evals)
    # Ray Train keeps the newest -nk checkpoints it registered; the engine's own pruning could delete the
    # checkpoint Ray would restart from before Ray knows of its successor.
    keep = config.checkpoints_keep or None
    config = dataclasses.replace(config, checkpoints_keep=0, output_dir=config.output_dir if remote else run_dir)
    # Beside the driver, as Ray Train's controller is: a worker node may vanish (spot capacity) and must not take
    # the run's own records with it.
    beside_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    records = ray.remote(num_cpus=0, scheduling_strategy=beside_driver)(RunRecords).remote()
    if smallest < largest:
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(ELASTIC_GROUP_START_TIMEOUT_S))
    # Ray Train's state API (the dashboard's /api/train/v2/runs/v1: the run, its attempts and workers) is off
    # unless the driver that calls fit() has this set; Ray passes it on to its controller. An explicit 0 wins.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    claim = RunDir(run_dir).claimed(bool(config.resume or config.resume_from), config.overwrite)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"train": config, "launch": worker_launch, "records": records},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=largest if smallest == largest else (smallest, largest),
                                     use_gpu=use_gpu, elastic_resize_monitor_interval_s=launch.resize_interval,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=launch.restarts()),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep),
                             callbacks=[*(callbacks or []), report_group_failures(records)],
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
        recorded = ray.get(records.first_error.remote())
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


def _check_inputs(config: TrainConfig, launch: LaunchConfig) -> EvalInputs:
    """Every flag and input the driver can check before a cluster starts or a file is written; returns the evals'
    data it read."""
    from common.cluster import starts_local_cluster

    config, run_dir = plan(config, launch)
    if starts_local_cluster(launch.address):  # the workers will see this machine's files: look now
        shard_files(config.train_data, "-i")
        if config.val_data:
            shard_files(config.val_data, "-j")
    try:
        block_size = model_shape(config.model).block_size
    except ValueError as err:  # a bad -e descriptor, or an llm.c file that is not one
        raise ConfigError(f"-e {config.model}: {err}") from err
    inputs = EvalInputs()
    if launch.hellaswag:  # a file that does not fit would fail in every restarted worker
        inputs = dataclasses.replace(inputs, examples=load_examples(launch.hellaswag_file))
        check_fits(inputs.examples, block_size, launch.hellaswag_file or "HellaSwag")
    if launch.core_every:  # the same for the bundle (downloaded now when none is given)
        inputs = dataclasses.replace(inputs, core_tasks=read_bundle(locate_bundle(launch.core_bundle),
                                                                    launch.core_max_per_task or None))
    run = RunDir(run_dir)
    run.check(bool(config.resume or config.resume_from), config.overwrite)
    _check_resume(config, run, launch.workers)
    return inputs


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """run.py's command line; `callbacks`: ray.train.UserCallback instances for launch_run."""
    from common.cluster import connect

    config, launch = parse_run_flags(argv)
    try:  # validate, then act: nothing starts and nothing is written before every check has passed
        inputs = _check_inputs(config, launch)
        connect(launch.address)
    except (*INPUT_ERRORS, RunDirError, ConnectionError) as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
    from ray.train import TrainingFailedError

    try:
        launch_run(config, launch, callbacks, inputs)
    except (ConfigError, RunDirError) as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
    except FatalTrainingError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2 if err.bad_input else 1
    except TrainingFailedError as err:
        print(f"run.py: error: training failed after {launch.restarts()} restart(s): {err}", file=sys.stderr)
        return 1
    return 0
