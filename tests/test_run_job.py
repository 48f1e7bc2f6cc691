"""`ray job submit --working-dir . -- python training/run.py --workers 2 ...` against a real `ray start --head`."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_train import make_shards

REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def head_node(tmp_path_factory):
    """A head node with a dashboard on free ports, in its own temp dir, beside any other cluster on this
    machine. `--block` keeps `ray start` in the foreground; terminating it stops this cluster alone, where
    `ray stop` would stop every cluster on the machine."""
    gcs, dashboard, agent, agent_grpc, metrics, runtime_env, client = free_ports(7)
    temp_dir = tmp_path_factory.mktemp("rayhead")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the CLI then reads ~/.ray/auth_token
    head = subprocess.Popen(
        [*RAY, "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while subprocess.run([*RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
        assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
        time.sleep(2)
    yield address, env
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


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
