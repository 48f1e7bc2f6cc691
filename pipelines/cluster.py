"""Connecting launchers to Ray: a running cluster (RAY_ADDRESS, `ray job submit`) or a fresh local one."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "training", "evals")


def connect(address: str | None = None) -> None:
    """ray.init with this repository's packages shipped to every worker, so workers import the code the
    driver runs whether or not the project is pip-installed on the cluster's nodes."""
    import ray

    if ray.is_initialized():
        return
    modules = [str(REPO_ROOT / name) for name in PACKAGES if (REPO_ROOT / name / "__init__.py").exists()]
    ray.init(address=address, runtime_env={"py_modules": modules}, log_to_driver=True)
