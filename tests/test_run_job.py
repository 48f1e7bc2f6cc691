"""`ray job submit --working-dir . -- python training/run.py --workers 2 ...` against a real `ray start --head`."""

import subprocess
from pathlib import Path

import pytest

from tests.helpers import make_shards
from training.local_cluster import RAY, ray_head

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def head_node(tmp_path_factory):
    """A head node with a dashboard on free ports, in its own temp dir, beside any other cluster here."""
    with ray_head(tmp_path_factory.mktemp("rayhead")) as head:
        yield head.dashboard_url, head.env


def test_ray_job_submit_runs_the_launcher_on_a_head_node(head_node, tmp_path):
    address, env = head_node
    data = make_shards(tmp_path / "shards", tokens_per_shard=20_000)
    out = tmp_path / "job_run"
    job = subprocess.run(
        [*RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
         "python", "training/run.py", "--workers", "2", "--cpus-per-worker", "1",
         "-i", str(data / "*_train_*.bin"), "-j", str(data / "*_val_*.bin"), "-o", str(out),
         "-e", "L2H2C64", "-b", "2", "-t", "32", "-x", "6", "-v", "3", "-m", "2", "-s", "0", "-n", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    assert "step    6/6" in job.stdout  # the engine's console, forwarded from rank 0
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_00000003", "ckpt_00000006"]
    assert (out / "main.log").read_text().count("trl:") == 6
