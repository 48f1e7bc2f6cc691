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
from tests.helpers import REPO, make_documents

REPO_ID = "HuggingFaceFW/fineweb-edu"
FOLDER = "sample/10BT"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(BaseHTTPRequestHandler):
    """The hub endpoints HfFileSystem calls: repo info, tree listing, paths-info, and file ranges."""

    repo: str  # the one dataset it serves
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

    def _tree(self, folder: str, recursive: bool) -> list[dict]:
        """The files (and, listed flat, the folders) under `folder`, as the hub's tree API lists them."""
        inside = [p for p in sorted(self.files) if not folder or p.startswith(folder + "/")]
        depth = folder.count("/") + 1 if folder else 0
        levels = range(depth + 1, 99) if recursive else [depth + 1]
        folders = sorted({"/".join(p.split("/")[:level]) for p in inside for level in levels if p.count("/") >= level})
        return [{"type": "directory", "path": f, "oid": "0" * 40} for f in folders] + \
            [self._entry(p) for p in inside if recursive or p.count("/") == depth]

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        route = self.path.split("?")[0]
        if route == f"/api/datasets/{self.repo}" or route.startswith(f"/api/datasets/{self.repo}/revision/"):
            if fault := self._fault("revision"):
                return self._send_fault(fault)
            return self._json({"id": self.repo, "sha": COMMIT, "private": False, "siblings": []})
        if route.startswith(f"/api/datasets/{self.repo}/tree/"):
            if fault := self._fault("tree"):
                return self._send_fault(fault)
            folder = re.sub(r"^/api/datasets/[^/]+/[^/]+/tree/[^/]+/?", "", route).replace("%2F", "/")
            entries = self._tree(folder, recursive="recursive=true" in self.path)
            return self._json(entries)
        if found := re.match(rf"^/datasets/{self.repo}/resolve/[^/]+/(.+)$", route):
            path = found.group(1)
            if path not in self.files:  # what `datasets` looks for and a dataset may not have (a loading script)
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
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
            self.send_header("X-Repo-Commit", COMMIT)  # how huggingface_hub knows it talks to a hub
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)
            return None
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None

    do_HEAD = do_GET  # noqa: N815 (http.server's name): the same headers, no body

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


FINEWEB_EDU_CARD = b"""---
license: odc-by
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
# FineWeb-Edu (as this test serves it)
"""


def _hub_env(server, tmp_path: Path) -> dict[str, str]:
    """The job's environment: the local hub, and `datasets`' caches of its own (every test's hub has the same
    commit id, so a shared cache would answer one test with another's dataset card)."""
    return {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home")}


def serve(files: dict[str, bytes], faults: dict[tuple[str, int], list[str]], repo: str = REPO_ID):
    handler = type("Hub", (FakeHub,), {"repo": repo, "files": files, "faults": faults, "seen": {}, "answered": []})
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
    files["README.md"] = FINEWEB_EDU_CARD  # `datasets` resolves --name sample-10BT from its configs
    files["data/CC-MAIN-2024-10/000_00000.parquet"] = files[first]  # the default config's files: not read
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
        env = _hub_env(server, tmp_path)
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
    assert manifest["inputs"] == [f"hf://datasets/{REPO_ID}/{p}" for p in (first, second)]

    clean = tokenize(TokenizeConfig(source="files", input=str(local / "*.parquet"), output_dir=tmp_path / "clean",
                                    shard_size=20000, num_workers=2))
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert [Path(out / s["name"]).read_bytes() for s in manifest["shards"]] == \
        [Path(tmp_path / "clean" / s["name"]).read_bytes() for s in clean["shards"]]


def test_any_hub_dataset_by_name_with_its_own_config_layout(ray_cluster, tmp_path):
    """--dataset REPO --name CONFIG for a dataset whose configs are folders (data_dir), as `datasets` reads it."""
    docs = make_documents(400, seed=12)
    local = {"en": tmp_path / "en", "fr": tmp_path / "fr"}
    files = {"README.md": b"---\nconfigs:\n- config_name: en\n  data_dir: en\n"
                          b"- config_name: fr\n  data_dir: fr\n---\n"}
    for (language, folder), part in zip(local.items(), (docs[:150], docs[150:]), strict=True):
        folder.mkdir()
        for i, chunk in enumerate((part[:len(part) // 2], part[len(part) // 2:])):
            path = folder / f"train-{i:05d}-of-00002.parquet"
            pq.write_table(pa.Table.from_pylist(chunk), path, row_group_size=50)
            files[f"{language}/{path.name}"] = path.read_bytes()
    server, _ = serve(files, {}, repo="someone/tiny-corpus")
    try:
        done = subprocess.run([sys.executable, "pipelines/tokenize.py", "--dataset", "someone/tiny-corpus", "--name",
                               "fr", "-o", str(tmp_path / "hub"), "--shard-size", "5000", "--address",
                               ray_cluster.get_runtime_context().gcs_address],
                              cwd=REPO, env=_hub_env(server, tmp_path), capture_output=True, text=True, timeout=600)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((tmp_path / "hub" / "manifest.json").read_text())
    assert manifest["inputs"] == [f"hf://datasets/someone/tiny-corpus/fr/train-0000{i}-of-00002.parquet"
                                  for i in (0, 1)]
    assert manifest["shards"][0]["name"] == "tiny_corpus_val_000000.bin"
    clean = tokenize(TokenizeConfig(source="files", input=str(local["fr"] / "*.parquet"), output_dir=tmp_path / "clean",
                                    prefix="tiny_corpus", shard_size=5000))
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in clean["shards"]]
