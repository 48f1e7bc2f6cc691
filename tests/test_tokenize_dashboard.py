"""`ray job submit -- python pipelines/tokenize.py ...` on a real `ray start --head`: the job's Ray Data pipeline
is on the dashboard (its data API, which the Jobs page shows) with named operators, rows and state FINISHED."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

from tests.helpers import REPO, make_documents
from training.launcher.local_cluster import RAY, ray_head


def _get(url: str) -> dict:
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_tokenize_job_is_listed_on_the_dashboard(tmp_path, tmp_path_factory):
    docs = [d for d in make_documents(300, seed=2) if d["text"].strip()]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    with ray_head(tmp_path_factory.mktemp("rayhead"), num_cpus=2) as head:  # a short path: Ray's sockets live there
        job = subprocess.run(
            [*RAY, "job", "submit", "--address", head.dashboard_url, "--submission-id", "tokenize-1",
             "--working-dir", ".", "--", "python", "pipelines/tokenize.py", "--input", str(tmp_path / "docs.jsonl"),
             "-o", str(tmp_path / "out"), "--shard-size", "3000", "--unit-bytes", "5000"],
            cwd=REPO, env=head.env, capture_output=True, text=True, timeout=400)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        job_id = _get(f"{head.dashboard_url}/api/jobs/tokenize-1")["job_id"]
        datasets = _get(f"{head.dashboard_url}/api/data/datasets/{job_id}")["datasets"]
    assert len(datasets) == 1, datasets
    (dataset,) = datasets
    assert dataset["state"] == "FINISHED"
    operators = {op["name"]: op for op in dataset["operators"]}
    # read and Filter are fused into one operator (Ray tasks); Tokenize and WriteShards are actor pools
    assert [name for name in operators if name != "Input"] == \
        ["ReadJSON->MapBatches(Filter)", "MapBatches(Tokenize)", "MapBatches(WriteShards)"], list(operators)
    assert all(op["state"] == "FINISHED" for op in operators.values()), operators
    units = manifest["units"]
    assert units > 1
    # a block per work unit all the way: the unit's filtered documents, then its counters (a row each)
    assert operators["ReadJSON->MapBatches(Filter)"]["total_rows"] >= manifest["docs"]["kept"]
    assert operators["MapBatches(Tokenize)"]["total_rows"] == units
    assert operators["MapBatches(WriteShards)"]["total_rows"] == units
    assert dataset["progress"] == dataset["total"] == units
