"""Connecting launchers to Ray: a running cluster (RAY_ADDRESS, `ray job submit`) or a fresh local one."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "pipelines", "gpt2", "training", "evals")


NAMED_ADDRESSES = ("auto", "local")


def check_listening(address: str) -> None:
    """Raise ConnectionError at once when `address` is not a Ray address at all, or nothing listens at its
    host:port: ray.init would wait there for minutes before it gives up (or fail with a traceback)."""
    if address in NAMED_ADDRESSES:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError("not a Ray address (expected host:port, ray://host:port or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise ConnectionError(f"no Ray cluster answers there ({err})") from err


def cannot_grow(address: str | None) -> bool:
    """Whether the cluster a command uses has no autoscaler: one it starts on this machine, or one its process
    joined already (in-process), rather than a cluster named by --address or RAY_ADDRESS. On such a cluster a
    resource request no node holds waits forever, so it is an error rather than a note."""
    return address is None and "RAY_ADDRESS" not in os.environ


def starts_local_cluster(address: str | None) -> bool:
    """Whether connect(address) starts a cluster on this machine, whose workers see this machine's files."""
    import ray

    return cannot_grow(address) and not ray.is_initialized()


def lost_in_job_copy(path: str | os.PathLike) -> str | None:
    """Why output `path` would be lost, or None. In the driver of a job submitted with `ray job submit
    --working-dir`, the current directory is Ray's copy of that directory, made for the job on the head: a
    relative path lands there, where nobody looks, and Ray deletes the copy with everything in it once its
    runtime-env cache (10 GB) needs the room."""
    if os.path.isabs(path) or "://" in str(path):
        return None
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # what Ray gives a job's driver
    except ValueError:
        return None
    if not (job.get("runtime_env") or {}).get("working_dir"):
        return None
    return (f"a relative path in a job submitted with --working-dir lands in Ray's temporary copy of that "
            f"directory ({os.getcwd()}), which Ray deletes; give an absolute path or a URL")


def check_address(address: str | None = None) -> None:
    """The checks connect() makes before ray.init, to be made before a job creates anything: ConnectionError
    naming the --address or RAY_ADDRESS that is not an address or where no cluster answers."""
    import ray

    if starts_local_cluster(address) or ray.is_initialized():
        return
    try:
        check_listening(address or os.environ["RAY_ADDRESS"])
    except ConnectionError as err:
        given = f"--address {address}" if address else f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
        raise ConnectionError(f"{given}: {err}") from err


def connect(address: str | None = None) -> None:
    """ray.init so that every worker imports the code this driver runs; ConnectionError names the --address
    or RAY_ADDRESS where no cluster answers.

    A cluster this call starts runs on this machine and inherits the environment, so putting the repository
    on PYTHONPATH is enough and lets Ray hand tasks its already-started workers. Any other cluster gets the
    packages shipped as a runtime env (`py_modules`), so its nodes need only the dependencies.
    """
    import ray

    if ray.is_initialized():
        return
    if starts_local_cluster(address):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        # Ray ends an idle worker process above its soft limit (the CPU count) after 1 s. Actors (the tokenize
        # job's, the training workers) hold those slots, so nearly every task beside them (shard assembly, an
        # eval) would start a fresh process, ~0.8 CPU-s of imports each. Kept a minute, they are reused.
        ray.init("local", log_to_driver=True, _system_config={"idle_worker_killing_time_threshold_ms": 60_000})
        return
    check_address(address)
    modules = [str(REPO_ROOT / name) for name in PACKAGES if (REPO_ROOT / name / "__init__.py").exists()]
    ray.init(address=address, runtime_env={"py_modules": modules}, log_to_driver=True)
