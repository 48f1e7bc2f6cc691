"""A real `ray start --head` for tests: free ports, its own temp dir, beside any other cluster on this machine.

`--block` keeps `ray start` in the foreground; terminating it stops this cluster alone, where `ray stop`
would stop every cluster on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class RayHead:
    gcs_address: str  # for ray.init / run.py --address
    dashboard_url: str  # for `ray job ...` and the dashboard's REST API
    metrics_export_port: int
    temp_dir: Path
    env: dict[str, str]  # for clients: token auth, which Ray 2.60 turns on for `ray start` clusters


@contextmanager
def ray_head(temp_dir: Path, *extra_args: str, num_cpus: int = 2) -> Iterator[RayHead]:
    gcs, dashboard, agent, agent_grpc, metrics, runtime_env, client = free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the CLI then reads ~/.ray/auth_token
    with open(temp_dir / "ray-start.log", "w") as log:
        head = subprocess.Popen(
            [*RAY, "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
             f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}",
             f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats", *extra_args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    try:
        while subprocess.run([*RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(2)
        yield RayHead(f"127.0.0.1:{gcs}", address, metrics, temp_dir, env)
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
