"""The default source (FineWeb-Edu on the Hugging Face hub) against a local server that speaks the hub's HTTP
API, as huggingface_hub's HfFileSystem uses it (HF_ENDPOINT), serving parquet files the test writes. The
server throttles (429) and fails (503, a connection cut mid-body, a burst of 429s longer than
huggingface_hub's own retries) at chosen requests; the job must retry and end with the bytes of a clean run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.tokenize import TokenizeConfig, tokenize
from tests.helpers import REPO
from tests.test_pipeline import make_documents

REPO_ID = "HuggingFaceFW/fineweb-edu"
FOLDER = "sample/10BT"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(BaseHTTPRequestHandler):
    """The hub endpoints HfFileSystem calls: repo info, tree listing, paths-info, and file ranges."""

    files: dict[str, bytes]  # path in repo -> content
    faults: dict[tuple[str, int], list[str]]  # (what, n-th request of it) -> faults to answer, in turn
    seen: dict[str, int]
    answered: list[str]
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _fault(self, what: str) -> str | None:
        with self.lock:
            count = self.seen[what] = self.seen.get(what, 0) + 1
            pending = self.faults.get((what, count)) or self.faults.get((what, -1))
            if pending:
                fault = pending.pop(0)
                self.seen[what] -= 1  # a fault does not use up the request it answers
                self.answered.append(f"{what} #{count}: {fault}")
                return fault
        return None

    def _send_fault(self, fault: str, body: bytes = b"") -> None:
        if fault == "cut":  # promise the whole body, send half of it, hang up
            self.send_response(206)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        status = int(fault)
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _json(self, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _entry(self, path: str) -> dict:
        return {"type": "file", "path": path, "size": len(self.files[path]), "oid": f"{abs(hash(path)):040x}"[:40]}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        route = self.path.split("?")[0]
        if route == f"/api/datasets/{REPO_ID}" or route.startswith(f"/api/datasets/{REPO_ID}/revision/"):
            if fault := self._fault("revision"):
                return self._send_fault(fault)
            return self._json({"id": REPO_ID, "sha": COMMIT, "private": False, "siblings": []})
        if route.startswith(f"/api/datasets/{REPO_ID}/tree/"):
            if fault := self._fault("tree"):
                return self._send_fault(fault)
            folder = re.sub(r"^/api/datasets/[^/]+/[^/]+/tree/[^/]+/?", "", route).replace("%2F", "/")
            entries = [self._entry(p) for p in sorted(self.files) if p.rsplit("/", 1)[0] == folder]
            if not folder:
                entries = [{"type": "directory", "path": "sample", "oid": "0" * 40}]
            elif folder == "sample":
                entries = [{"type": "directory", "path": FOLDER, "oid": "1" * 40}]
            return self._json(entries)
        if found := re.match(rf"^/datasets/{REPO_ID}/resolve/[^/]+/(.+)$", route):
            path = found.group(1)
            content = self.files[path]
            start, end = 0, len(content) - 1
            if ranged := re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                start, end = int(ranged.group(1)), int(ranged.group(2) or end)
            body = content[start:end + 1]
            if fault := self._fault(path):
                return self._send_fault(fault, body)
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(content)}")
            self.send_header("ETag", f'"{COMMIT}"')
            self.end_headers()
            self.wfile.write(body)
            return None
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        form = self.rfile.read(length).decode()
        if "/paths-info/" in self.path:
            if fault := self._fault("paths-info"):
                return self._send_fault(fault)
            from urllib.parse import parse_qs

            paths = parse_qs(form).get("paths", [])
            return self._json([self._entry(p) for p in paths if p in self.files])
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None


def serve(files: dict[str, bytes], faults: dict[tuple[str, int], list[str]]):
    handler = type("Hub", (FakeHub,), {"files": files, "faults": faults, "seen": {}, "answered": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


def test_hub_source_survives_throttling_and_failed_ranges(ray_cluster, tmp_path):
    docs = make_documents(1200, seed=11, mean_words=120)
    local = tmp_path / "local"
    local.mkdir()
    files = {}
    for i, part in enumerate((docs[:700], docs[700:])):
        path = local / f"00{i}_00000.parquet"
        pq.write_table(pa.Table.from_pylist(part), path, row_group_size=100)
        files[f"{FOLDER}/{path.name}"] = path.read_bytes()
    first, second = sorted(files)
    faults = {
        ("revision", 1): ["503"],  # huggingface_hub does not retry this one: our listing retry must
        ("tree", 1): ["429"],
        (first, 3): ["503"],
        (second, 2): ["cut"],
        (second, 5): ["429"] * 6,  # more than huggingface_hub's 5 retries: the unit's read is retried
    }
    server, hub = serve(files, faults)
    flags = ["--shard-size", "20000", "--unit-bytes", "60000", "--num-workers", "2"]
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
        out = tmp_path / "hub"
        done = subprocess.run([sys.executable, "pipelines/tokenize.py", "-o", str(out), *flags,
                               "--address", ray_cluster.get_runtime_context().gcs_address],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert all(not pending for pending in faults.values()), f"faults not met: {faults}; answered: {hub.answered}"
    assert "retry" in done.stderr  # our own retry, after huggingface_hub's gave up on the burst of 429s
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == [f"hf://datasets/{REPO_ID}/{p}" for p in sorted(files)]

    clean = tokenize(TokenizeConfig(source="files", input=str(local / "*.parquet"), output_dir=tmp_path / "clean",
                                    shard_size=20000, num_workers=2))
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert [Path(out / s["name"]).read_bytes() for s in manifest["shards"]] == \
        [Path(tmp_path / "clean" / s["name"]).read_bytes() for s in clean["shards"]]
