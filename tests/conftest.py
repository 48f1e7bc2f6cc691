import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Every process the tests start (commands, `ray start` nodes and their workers) imports this checkout's code,
# tests/helpers.py included (a Ray Train callback of the tests runs in Ray's controller).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
# Ray Train's controller takes a worker's report (and notices a dead worker) once per health check, 2 s by
# default; a report waits until the one before was taken. The tests' short runs report often, so a quicker
# check only removes waiting. Inherited by every Ray process the tests start.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


# `make test` runs two pytest-xdist workers (`-n 2 --dist loadgroup`) that take a group of tests at a time: a
# file, whose module fixtures are then built once, except test_run.py and test_elastic.py, which both compare
# with one reference run (`reference_run`) and so go to the same worker.
SHARE_THE_REFERENCE_RUN = ("test_run.py", "test_elastic.py")


@pytest.hookimpl(tryfirst=True)  # before xdist names each test after its group
def pytest_collection_modifyitems(items):
    for item in items:
        group = "reference_run" if item.path.name in SHARE_THE_REFERENCE_RUN else item.path.stem
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config):
    """Once, before pytest-xdist starts its workers: the auth token that `ray start --head` clusters (token auth)
    and their clients share, so that two heads starting at once in two workers never both create it."""
    if hasattr(config, "workerinput") or (Path.home() / ".ray" / "auth_token").exists():
        return
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], check=True,
                   capture_output=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session.

    Four logical CPUs on a 2-core machine: Ray Data's actor pools and read tasks would otherwise wait on
    each other for the CPUs, and the tests only need concurrency, not dedicated cores.
    """
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init("local", num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def run_shards(tmp_path_factory) -> Path:
    """The launcher tests' shards (tests/helpers.py: run_flags)."""
    from tests.helpers import make_shards

    return make_shards(tmp_path_factory.mktemp("run_shards"), tokens_per_shard=20_000)


@pytest.fixture(scope="session")
def reference_run(ray_cluster, run_shards, tmp_path_factory) -> Path:
    """An uninterrupted run of RUN_FLAGS on a fixed group of 2 workers, the baseline of the launcher tests' runs."""
    from tests.helpers import run_flags
    from training.launcher.launch import main

    out = tmp_path_factory.mktemp("runs") / "reference"
    assert main([*run_flags(run_shards, out), "--workers", "2"]) == 0
    return out
