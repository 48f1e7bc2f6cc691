"""Drain this Ray node when EC2 announces a spot interruption, so that a training run checkpoints before the
node goes (README "Elastic training on spot nodes").

    python -m training.ops.spot_watch          # on each worker node, after `ray start` (cluster.yaml does this)

EC2 puts the notice in the instance metadata two minutes ahead: spot/instance-action answers
{"action": "terminate", "time": "2026-12-07T03:12:00Z"} instead of 404. This polls it (IMDSv2) and then runs
`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` on the node it runs on, with the time left as the
deadline. Ray Train's preemption watcher sees that drain, and run.py checkpoints at its next report.
An on-demand instance never gets a notice; off EC2 there is no metadata service, and this says so and exits.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

from common import cli
from common.cluster import check_listening

METADATA_URL = "http://169.254.169.254"
TOKEN_TTL_S = 21600
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]


class InstanceMetadata:
    """EC2's instance metadata service, IMDSv2: a session token first, then GETs that carry it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.token: str | None = None

    def _request(self, method: str, path: str, headers: dict[str, str]) -> str:
        request = urllib.request.Request(f"{self.url}{path}", method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.read().decode()

    def get(self, path: str) -> str | None:
        """The text at `path`, or None where the service answers 404."""
        for _ in range(2):  # a token that expired is fetched again once
            if self.token is None:
                self.token = self._request("PUT", "/latest/api/token",
                                           {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            try:
                return self._request("GET", path, {"X-aws-ec2-metadata-token": self.token})
            except urllib.error.HTTPError as err:
                if err.code == 404:
                    return None
                if err.code != 401:
                    raise
                self.token = None
        raise PermissionError(f"{self.url}: the metadata service refused a fresh token")


def interruption(metadata: InstanceMetadata) -> tuple[str, float] | None:
    """(action, seconds left) once EC2 has scheduled this spot instance's interruption, else None."""
    notice = metadata.get("/latest/meta-data/spot/instance-action")
    if notice is None:
        return None
    payload = json.loads(notice)
    when = datetime.fromisoformat(payload["time"].replace("Z", "+00:00"))
    return payload["action"], (when - datetime.now(timezone.utc)).total_seconds()


def locate(address: str, node_id: str | None) -> tuple[str, str]:
    """(GCS address, node id) of the cluster at `address` and of `node_id`, else of the node this machine runs.
    ConnectionError when no cluster answers; LookupError when no live node of it has `node_id`."""
    check_listening(address)
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        context = ray.get_runtime_context()
        if node_id is None:
            return context.gcs_address, context.get_node_id()
        if node_id not in {node["NodeID"] for node in ray.nodes() if node["Alive"]}:
            raise LookupError(f"--node-id {node_id}: no live node of the cluster at {context.gcs_address} has it")
        return context.gcs_address, node_id
    finally:
        ray.shutdown()


def drain(address: str, node_id: str, action: str, seconds_left: float) -> bool:
    done = subprocess.run([*RAY_CLI, "drain-node", "--address", address, "--node-id", node_id,
                           "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                           f"EC2 spot interruption: {action}",
                           "--deadline-remaining-seconds", str(max(1, int(seconds_left)))],
                          capture_output=True, text=True)
    if done.returncode:
        last_line = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        print(f"spot watch: ray drain-node failed ({last_line}); retrying", flush=True)
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m training.ops.spot_watch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--metadata-url", default=METADATA_URL,
                        help=f"the instance metadata service (default {METADATA_URL})")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"),
                        help="the cluster's GCS address (default: RAY_ADDRESS, else the cluster this node is in)")
    parser.add_argument("--node-id", help="the Ray node to drain (default: the one on this machine)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.interval) and args.interval > 0):  # inf would end the watch at its first sleep
        parser.error(f"--interval must be a finite number of seconds > 0, got {args.interval:g}")
    metadata = InstanceMetadata(args.metadata_url)
    try:
        metadata.get("/latest/meta-data/instance-id")
    except OSError as err:
        print(f"spot watch: no EC2 instance metadata at {args.metadata_url} ({err}); nothing to watch")
        return 0
    try:
        address, node_id = locate(args.address, args.node_id)
    except ConnectionError as err:
        print(f"{parser.prog}: error: --address {args.address}: {err}", file=sys.stderr)
        return 2
    except LookupError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"spot watch: node {node_id}, polling {args.metadata_url} every {args.interval:g} s", flush=True)
    while True:
        try:
            notice = interruption(metadata)
        except OSError as err:  # the service hiccups; a notice stays up until the end, so ask again
            print(f"spot watch: metadata unreadable ({err}); retrying", flush=True)
            notice = None
        if notice is not None:
            action, seconds_left = notice
            print(f"spot watch: EC2 will {action} this instance in {seconds_left:.0f} s; draining node {node_id}",
                  flush=True)
            if drain(address, node_id, action, seconds_left):
                return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
