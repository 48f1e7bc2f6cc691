"""cluster.yaml: we cannot boot AWS here, so check it against the launcher's own schema and our invariants."""

import json
import re
from pathlib import Path

import jsonschema
import ray
import yaml

from tests.helpers import REPO


def load_cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_satisfies_the_launcher_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load_cluster(), schema)


def test_cluster_yaml_has_what_the_launcher_and_our_jobs_need():
    config = load_cluster()
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert config["provider"]["type"] == "aws"
    gpu_nodes = [n for n in nodes.values() if n["node_config"].get("InstanceType") == "p5.48xlarge"]
    assert gpu_nodes and all(n["max_workers"] >= n["min_workers"] >= 0 for n in gpu_nodes)
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert config["docker"]["image"] == f"rayproject/ray:{pinned}-py311-gpu"
    assert any("pip install" in c and "raygpt2" in c for c in config["setup_commands"])
    assert "~/raygpt2" in config["file_mounts"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-port=8265" in head_start and "--metrics-export-port" in head_start
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert worker_start.index("ray start --address") < worker_start.index("python -m training.ops.spot_watch")
