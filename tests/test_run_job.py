"""`ray job submit --working-dir . -- python training/run.py --workers 2 ...` against a real `ray start --head`."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import make_shards
from training.launcher.local_cluster import RAY, ray_head

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
    submission = re.search(r"Job '(raysubmit_\w+)' succeeded", job.stdout)
    assert submission, job.stdout[-3000:]
    # What the cluster says of the job afterwards, as `ray job status` and `ray job logs` show it to a user.
    status = subprocess.run([*RAY, "job", "status", "--address", address, submission[1]], env=env,
                            capture_output=True, text=True, timeout=60)
    assert f"Job '{submission[1]}' succeeded" in status.stdout, status.stdout + status.stderr
    logs = subprocess.run([*RAY, "job", "logs", "--address", address, submission[1]], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    # the engine's console, forwarded from rank 0: one line per step with that step's loss from main.log
    losses = {int(s): float(v) for s, v in re.findall(r"^s:(\d+) trl:(\S+)", (out / "main.log").read_text(), re.M)}
    printed = {int(s) - 1: float(v) for s, v in re.findall(r"step +(\d+)/6 \| loss (\S+)", logs)}
    assert sorted(losses) == list(range(6)) and printed == pytest.approx(losses, abs=1e-6), (printed, losses)
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_00000003", "ckpt_00000006"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["workers"] == 2
