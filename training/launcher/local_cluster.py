"""A real multi-node Ray cluster on one machine, for the tests and the elastic benchmark: `ray start --head`
and extra nodes on free ports with their own temp dir, beside any other cluster on this machine.

`--block` keeps `ray start` in the foreground; terminating it stops this cluster alone, where `ray stop`
would stop every cluster on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
def ray_head(num_cpus: int = 2, system_config: dict | None = None) -> Iterator[RayHead]:
    """The head, up once `ray job list` answers; `system_config`: Ray's `--system-config` overrides. Its temp dir
    is a new one directly under the system's temp dir, removed afterwards: Ray puts Unix sockets in it, whose
    paths may not exceed 107 bytes, so a test's or a benchmark's own (deeper) directory may not take them."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))
    gcs, dashboard, agent, agent_grpc, metrics, runtime_env, client = free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the CLI then reads ~/.ray/auth_token
    with open(temp_dir / "ray-start.log", "w") as log:
        head = subprocess.Popen(
            [*RAY, "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
             f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}",
             f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             *([f"--system-config={json.dumps(system_config)}"] if system_config else [])],
            # A test's head has nothing worth draining: Ray 2.60 would wait up to 30 s for it on SIGTERM.
            env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    try:
        while subprocess.run([*RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            assert head.poll() is None and time.monotonic() < deadline, \
                "ray start --head did not come up: " + (temp_dir / "ray-start.log").read_text()[-3000:]
            time.sleep(2)
        yield RayHead(f"127.0.0.1:{gcs}", address, metrics, temp_dir, env)
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it (all found before any dies, so none escapes by being
    reparented): a node whose machine vanishes, as a reclaimed spot instance does."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue


# Asked of the GCS through a short-lived driver rather than of the dashboard's state API, which once stopped
# answering for minutes on a heavily loaded machine while the GCS, the nodes and the runs went on.
ALIVE_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([{"node_id": n["NodeID"], "is_head_node": "node:__internal_head__" in n["Resources"]}
                  for n in ray.nodes() if n["Alive"]]))
"""


def alive_nodes(head: RayHead) -> list[dict]:
    """The nodes the cluster lists alive: [{"node_id": ..., "is_head_node": ...}]."""
    done = subprocess.run([sys.executable, "-c", ALIVE_NODES, head.gcs_address], env=head.env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"listing the nodes of {head.gcs_address}: {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def ray_node(head: RayHead, num_cpus: int = 1) -> Iterator[subprocess.Popen]:
    """One more node joining `head` on this machine (`ray start --address --block`, ports of its own), yielded
    once the cluster lists it alive; its process tree is killed on exit (see kill_tree)."""
    nodes_before = len(alive_nodes(head))
    metrics, agent, agent_grpc, runtime_env, node_manager, object_manager = free_ports(6)
    with open(head.temp_dir / f"ray-node-{node_manager}.log", "w") as log:
        node = subprocess.Popen(
            [*RAY, "start", "--block", f"--address={head.gcs_address}", f"--num-cpus={num_cpus}",
             f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
             f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
             "--disable-usage-stats"],
            env=head.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while len(alive_nodes(head)) <= nodes_before:
            assert node.poll() is None and time.monotonic() < deadline, "ray start --address did not come up"
            time.sleep(1)
        yield node
    finally:
        kill_tree(node.pid)
        node.wait()
