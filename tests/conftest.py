import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session.

    Four logical CPUs on a 2-core machine: Ray Data's actor pools and read tasks would otherwise wait on
    each other (see shared/notes), and the tests only need concurrency, not dedicated cores.
    """
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init("local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()
