"""Bad input and faults, run as a user runs them: the real commands on real files.

Every case must end with exit status 2, one or two lines on stderr that name the file, flag or field at
fault, no traceback, and every file that existed before the command byte-identical afterwards. Each command
runs through its main(argv) in this process (the same code from argument parsing on, without a second
interpreter's start-up); the few whose check depends on starting a cluster of their own, or on reaching one
by --address, run in a subprocess as typed, which also proves each script's wiring.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipelines.shards import shard_name, write_shard
from tests.helpers import REPO, make_shards, run_cli, run_subprocess, tiny_config
from training.train import train

RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) \S+\.py:\d+ -- ")


@dataclass
class Case:
    id: str
    setup: Callable[[Path], list[str]]  # writes what the case needs under the directory; returns the argv
    names: str  # the stderr line must contain this (the file, flag or field at fault)
    ray: bool = False  # the command gets --address of the session's Ray cluster (one cluster for all such cases)
    subprocess: bool = False  # as typed, in a fresh interpreter that starts a local cluster or looks for one


def _jsonl(directory: Path, lines: list[str], name: str = "docs.jsonl") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _good_jsonl(directory: Path) -> Path:
    return _jsonl(directory, [json.dumps({"text": f"document number {i} has a few words"}) for i in range(20)])


def _tokenize(tmp: Path, *extra: str) -> list[str]:
    return ["pipelines/tokenize.py", "--input", str(_good_jsonl(tmp / "in")), "-o", str(tmp / "out"), *extra]


def _foreign_shards(tmp: Path) -> list[str]:
    """Shards as llm.c's fineweb.py names them, with no manifest of ours: not ours to delete."""
    (tmp / "out").mkdir()
    for index in range(2):
        write_shard(tmp / "out" / shard_name("edufineweb", index), list(range(100)))
    return _tokenize(tmp)


def _deleted_manifest(tmp: Path) -> list[str]:
    """Our own shards whose manifest was deleted: nothing can tell what made them."""
    (tmp / "out").mkdir()
    write_shard(tmp / "out" / shard_name("edu_fineweb", 0), list(range(100)))
    return _tokenize(tmp)


def _truncated(name: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        (tmp / "out").mkdir()
        write_shard(tmp / "out" / shard_name("edu_fineweb", 0), list(range(100)))
        (tmp / "out" / name).write_text('{"fingerprint": {"inputs": ["a.jso')
        return _tokenize(tmp)
    return setup


def _shards(tmp: Path) -> Path:
    return make_shards(tmp / "shards", tokens_per_shard=2000, shards=2)


def _engine_flags(data: Path, out: Path, *extra: str) -> list[str]:
    return ["-i", str(data / "*_train_*.bin"), "-j", str(data / "*_val_*.bin"), "-o", str(out), "-e", "L2H2C64",
            "-b", "2", "-t", "16", "-x", "2", "-s", "0", *extra]


def _used_output_dir(script: str) -> Callable[[Path], list[str]]:
    """A fresh run (no -y 1) into -o where an earlier run left its log and checkpoints."""
    def setup(tmp: Path) -> list[str]:
        data = _shards(tmp)
        train(tiny_config(data, tmp / "run", max_steps=2))
        extra = ["--workers", "1"] if script.endswith("run.py") else []
        return [script, *_engine_flags(data, tmp / "run", *extra)]
    return setup


def _resume_with_other_flags(tmp: Path) -> list[str]:
    """-y 1 into a run made with another learning rate: it would continue somebody else's optimisation."""
    data = _shards(tmp)
    train(tiny_config(data, tmp / "run", max_steps=2))
    return ["training/train.py", *_engine_flags(data, tmp / "run", "-y", "1", "-l", "0.5")]


def _engine(script: str, *extra: str) -> Callable[[Path], list[str]]:
    """`script` on fresh shards with the engine flags and `extra`."""
    def setup(tmp: Path) -> list[str]:
        return [script, *_engine_flags(_shards(tmp), tmp / "run", *extra)]
    return setup


def _out_of_vocab_shard(tmp: Path) -> list[str]:
    data = make_shards(tmp / "shards", tokens_per_shard=2000, shards=2)
    tokens = np.arange(2000) % 50257
    tokens[1234] = 60000
    write_shard(data / shard_name("rand", 1), tokens)
    return ["training/train.py", *_engine_flags(data, tmp / "run")]


def _output_dir_is_a_file(tmp: Path) -> list[str]:
    data = _shards(tmp)
    (tmp / "run").write_text("not a directory\n")
    return ["training/train.py", *_engine_flags(data, tmp / "run")]


def _checkpoint(tmp: Path) -> Path:
    data = _shards(tmp)
    train(tiny_config(data, tmp / "run", max_steps=2))
    return tmp / "run"


GOOD_EXAMPLE = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}
READ_ONLY_DIR = "/sys/kernel"  # sysfs refuses new files even to root, as tests here often run
NOTHING_LISTENS = "127.0.0.1:9"  # the discard port: no Ray cluster there, and ray.init would wait minutes on it


def _malformed_hellaswag(tmp: Path) -> Path:
    return _jsonl(tmp, [json.dumps(GOOD_EXAMPLE), json.dumps({**GOOD_EXAMPLE, "label": 7})], "hellaswag.jsonl")


def _bundle_without_baseline(tmp: Path) -> Path:
    """The smoke CORE bundle, copied, with one task's row gone from eval_meta_data.csv."""
    smoke = REPO / "evals" / "data" / "core_smoke"
    bundle = tmp / "bundle"
    for path in smoke.rglob("*.*"):
        (bundle / path.relative_to(smoke)).parent.mkdir(parents=True, exist_ok=True)
        (bundle / path.relative_to(smoke)).write_bytes(path.read_bytes())
    meta = bundle / "eval_meta_data.csv"
    meta.write_text("".join(line for line in meta.read_text().splitlines(keepends=True) if "pronouns" not in line))
    return bundle


def _tokenize_lines(*bad: tuple[int, bytes]) -> Callable[[Path], list[str]]:
    """tokenize.py on a jsonl whose line N (1-based) is replaced by raw bytes: errors met inside a worker."""
    def setup(tmp: Path) -> list[str]:
        lines = [json.dumps({"text": f"document number {i} has a few words"}).encode() for i in range(20)]
        for number, raw in bad:
            lines[number - 1] = raw
        (tmp / "in").mkdir()
        (tmp / "in" / "docs.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
        return ["pipelines/tokenize.py", "--input", str(tmp / "in" / "docs.jsonl"), "-o", str(tmp / "out"),
                "--num-workers", "1"]
    return setup


def _tokenize_parquet(tmp: Path, table) -> list[str]:
    import pyarrow.parquet as pq

    (tmp / "in").mkdir()
    pq.write_table(table, tmp / "in" / "docs.parquet", row_group_size=100, use_dictionary=False)
    return ["pipelines/tokenize.py", "--input", str(tmp / "in" / "docs.parquet"), "-o", str(tmp / "out"),
            "--num-workers", "1"]


def _corrupt_data_page(tmp: Path) -> list[str]:
    """A parquet file whose footer is fine and whose third row group's compressed page is not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    argv = _tokenize_parquet(tmp, pa.table({"text": [f"document {i} " * 30 for i in range(400)]}))
    path = tmp / "in" / "docs.parquet"
    chunk = pq.ParquetFile(path).metadata.row_group(2).column(0)
    data = bytearray(path.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle:middle + 64] = bytes(range(64))
    path.write_bytes(bytes(data))
    return argv


def _numeric_text_parquet(tmp: Path) -> list[str]:
    import pyarrow as pa

    return _tokenize_parquet(tmp, pa.table({"text": list(range(10))}))


def _output_is_a_file(tmp: Path) -> list[str]:
    (tmp / "out").write_text("somebody's file\n")
    return _tokenize(tmp)


CASES = [
    Case("tokenize: llm.c shards without a manifest", _foreign_shards, "edufineweb_train_000001.bin"),
    Case("tokenize: our shards, manifest deleted", _deleted_manifest, "edu_fineweb_val_000000.bin"),
    Case("tokenize: truncated manifest.json", _truncated("manifest.json"), "manifest.json"),
    Case("tokenize: truncated tokenize_state.json", _truncated("tokenize_state.json"), "tokenize_state.json"),
    Case("tokenize: --shard-size 0", lambda tmp: _tokenize(tmp, "--shard-size", "0"), "--shard-size"),
    Case("tokenize: --shard-size past the int32 header", lambda tmp: _tokenize(tmp, "--shard-size", "3000000000"),
         "--shard-size"),
    Case("tokenize: --shard-size abc", lambda tmp: _tokenize(tmp, "--shard-size", "abc"), "--shard-size"),
    Case("tokenize: --num-workers 0", lambda tmp: _tokenize(tmp, "--num-workers", "0"), "--num-workers"),
    Case("tokenize: --batch-size 0", lambda tmp: _tokenize(tmp, "--batch-size", "0"), "--batch-size"),
    Case("tokenize: -o is a file", _output_is_a_file, "-o "),
    Case("tokenize: parquet text column of ints", _numeric_text_parquet, "docs.parquet: column 'text' is int64"),
    Case("tokenize: malformed jsonl line", _tokenize_lines((7, b'{"text": "cut off')), "docs.jsonl: line 7", ray=True),
    Case("tokenize: non-UTF-8 jsonl line", _tokenize_lines((4, b'{"text": "caf\xe9"}')), "docs.jsonl: line 4",
         ray=True),
    Case("tokenize: jsonl text that is a number", _tokenize_lines((5, b'{"text": 42}')), "docs.jsonl: line 5",
         ray=True),
    Case("tokenize: corrupt parquet data page", _corrupt_data_page, "docs.parquet: row group 2 (rows 200-299)",
         ray=True),
    Case("tokenize: --cpus-per-worker beyond any node", lambda tmp: _tokenize(tmp, "--cpus-per-worker", "64"),
         "--cpus-per-worker 64", ray=True),
    Case("tokenize: --node-resource no node has", lambda tmp: _tokenize(
        tmp, "--node-resource", "data_node", "--num-workers", "1", "--start-timeout", "3"), "--start-timeout 3",
         ray=True),
    Case("train.py: fresh run into a used -o", _used_output_dir("training/train.py"), "-y 1"),
    Case("run.py: fresh run into a used -o", _used_output_dir("training/run.py"), "-y 1"),
    Case("train.py: -y 1 with another -l", _resume_with_other_flags, "-l 0.001 -> 0.5"),
    Case("train.py: -l nan", _engine("training/train.py", "-l", "nan"), "-l must be"),
    Case("train.py: -l -1", _engine("training/train.py", "-l", "-1"), "-l must be"),
    Case("train.py: --device cuda without a GPU", _engine("training/train.py", "--device", "cuda"), "--device cuda"),
    Case("train.py: --device bogus", _engine("training/train.py", "--device", "tpu0"), "--device 'tpu0'"),
    Case("train.py: -o is a file", _output_dir_is_a_file, "-o "),
    Case("train.py: -e L0H1C64", _engine("training/train.py", "-e", "L0H1C64"), "n_layer must be at least 1"),
    Case("train.py: -e L2H3C64", _engine("training/train.py", "-e", "L2H3C64"), "64 channels do not split into 3"),
    Case("train.py: token id beyond the vocabulary", _out_of_vocab_shard, "token id 60000 at token 1234"),
    Case("sample.py: --temperature -1",
         lambda tmp: ["training/sample.py", str(_checkpoint(tmp)), "--temperature", "-1"], "--temperature"),
    Case("sample.py: no such checkpoint", lambda tmp: ["training/sample.py", str(tmp / "nowhere")], "nowhere"),
    Case("export.py: --hf is a file", lambda tmp: ["training/export.py", str(_checkpoint(tmp)), "--hf",
                                                   str(_jsonl(tmp, ["x"], "taken.txt"))], "--hf"),
    Case("export.py: --llmc into a missing directory", lambda tmp: ["training/export.py", str(_checkpoint(tmp)),
                                                                    "--llmc", str(tmp / "no" / "m.bin")], "--llmc"),
    Case("hellaswag.py: label out of range", lambda tmp: ["evals/hellaswag.py", "--checkpoint", str(_checkpoint(tmp)),
                                                          "--file", str(_malformed_hellaswag(tmp)), "--tasks", "0"],
         "hellaswag.jsonl:2"),
    Case("core.py: a task without a random baseline",
         lambda tmp: ["evals/core.py", "--checkpoint", str(_checkpoint(tmp)), "--bundle",
                      str(_bundle_without_baseline(tmp)), "--tasks", "0"],
         "eval_meta_data.csv: field 'Random baseline'"),
    Case("run.py: --core-every with a bundle missing a baseline",
         lambda tmp: ["training/run.py", *_engine_flags(_shards(tmp), tmp / "run", "-v", "2", "--core-every",
                                                        "2", "--core-bundle", str(_bundle_without_baseline(tmp)))],
         "no row for task 'smoke_pronouns'"),
    Case("run.py: -h 1 with a malformed --hellaswag-file",
         lambda tmp: ["training/run.py", *_engine_flags(_shards(tmp), tmp / "run", "-h", "1", "--hellaswag-file",
                                                        str(_malformed_hellaswag(tmp)))], "hellaswag.jsonl:2"),
    Case("tokenize: --prefix that climbs out of -o", lambda tmp: _tokenize(tmp, "--prefix", "../../x"), "--prefix"),
    Case("tokenize: --prefix with a slash", lambda tmp: _tokenize(tmp, "--prefix", "a/b"), "--prefix"),
    Case("tokenize: empty --prefix", lambda tmp: _tokenize(tmp, "--prefix", ""), "--prefix"),
    Case("tokenize: --dataset with --input", lambda tmp: _tokenize(tmp, "--dataset", "someone/corpus"), "--dataset"),
    Case("tokenize: --address that is not an address", lambda tmp: _tokenize(tmp, "--address", "garbage"),
         "--address garbage: not a Ray address", subprocess=True),
    Case("tokenize: -o a read-only directory", lambda tmp: [*_tokenize(tmp)[:3], "-o", READ_ONLY_DIR],
         f"-o {READ_ONLY_DIR}: cannot write there"),
    Case("tokenize: -o inside a read-only directory",
         lambda tmp: [*_tokenize(tmp)[:3], "-o", f"{READ_ONLY_DIR}/shards"], f"-o {READ_ONLY_DIR}/shards"),
    Case("tokenize: --address where nothing listens", lambda tmp: _tokenize(tmp, "--address", NOTHING_LISTENS),
         f"--address {NOTHING_LISTENS}: no Ray cluster answers there", subprocess=True),
    Case("run.py: --address where nothing listens", _engine("training/run.py", "--address", NOTHING_LISTENS),
         f"--address {NOTHING_LISTENS}: no Ray cluster answers there", subprocess=True),
    Case("hellaswag.py: --address where nothing listens",
         lambda tmp: ["evals/hellaswag.py", "--checkpoint", str(_checkpoint(tmp)), "--address", NOTHING_LISTENS,
                      "--file", str(_jsonl(tmp, [json.dumps(GOOD_EXAMPLE)], "hellaswag.jsonl"))],
         f"--address {NOTHING_LISTENS}: no Ray cluster answers there", subprocess=True),
    Case("train.py: --resume-from a missing directory", _engine("training/train.py", "--resume-from", "/nowhere/ckpt"),
         "/nowhere/ckpt"),
    Case("train.py: -t beyond the model's context", _engine("training/train.py", "-t", "2048"), "-t 2048"),
    Case("train.py: -x -5", _engine("training/train.py", "-x", "-5"), "-x -5"),
    Case("train.py: -i matches nothing", lambda tmp: ["training/train.py", "-i", str(tmp / "none_*.bin"), "-j", ""],
         "-i "),
    Case("run.py: -i matches nothing", lambda tmp: ["training/run.py", "-i", str(tmp / "none_*.bin"), "-j", "",
                                                    "-o", str(tmp / "run")], "-i", subprocess=True),
    Case("plot.py: a directory without main.log", lambda tmp: ["training/plot.py", str(tmp)], "main.log"),
    Case("export.py: nothing to do", lambda tmp: ["training/export.py", str(tmp)], "--llmc"),
    Case("hellaswag.py: --tasks -1", lambda tmp: ["evals/hellaswag.py", "--checkpoint", str(tmp), "--tasks", "-1"],
         "--tasks"),
    Case("hellaswag.py: --batch-tokens 0", lambda tmp: ["evals/hellaswag.py", "--checkpoint", str(tmp),
                                                        "--batch-tokens", "0"], "--batch-tokens"),
    Case("run.py: --workers 0", _engine("training/run.py", "--workers", "0"), "--workers"),
    Case("run.py: --eval-tasks 0", _engine("training/run.py", "-h", "1", "--eval-tasks", "0"), "--eval-tasks"),
    Case("run.py: no such --hellaswag-file", _engine("training/run.py", "-h", "1", "--hellaswag-file", "/no/hs.jsonl"),
         "/no/hs.jsonl"),
    Case("run.py: -d that does not split into micro-batches", _engine("training/run.py", "-d", "1000"), "-d 1000"),
    Case("run.py: more workers than the local cluster holds", _engine("training/run.py", "--workers", "64"),
         "--workers 64"),
    Case("run.py: an elastic range with groups -d cannot split over",  # -b 2 x -t 16: -d 192 is 6 micro-batches
         _engine("training/run.py", "--workers", "8", "--min-workers", "2", "-d", "192"), "sizes that keep -d: 2-6"),
    Case("monitor: install with no Ray session in --temp-dir", lambda tmp: [
        "training/monitor.py", "install", "--temp-dir", str(tmp), "--no-prometheus", "--no-grafana"], "--temp-dir"),
    Case("monitor: --scrape-interval that Prometheus would refuse", lambda tmp: [
        "training/monitor.py", "install", "--temp-dir", str(tmp), "--scrape-interval", "fast"], "--scrape-interval"),
    Case("monitor: an unknown command", lambda tmp: ["training/monitor.py", "start"], "'start'"),
    Case("demo.py: --steps 0", lambda tmp: ["demo.py", "--out", str(tmp / "demo"), "--steps", "0"], "--steps"),
    Case("demo.py: a --model whose heads do not split its channels",
         lambda tmp: ["demo.py", "--out", str(tmp / "demo"), "--model", "L2H3C64"], "--model L2H3C64"),
    Case("spot_watch: --interval inf", lambda tmp: ["training/ops/spot_watch.py", "--interval", "inf"], "--interval"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# Scripts that connect to Ray: in this process they use the session's cluster, never one of their own.
CONNECTS_TO_RAY = {"pipelines/tokenize.py", "training/run.py"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_changes(case, tmp_path, request):
    script, *argv = case.setup(tmp_path)
    if case.ray or (script in CONNECTS_TO_RAY and not case.subprocess):
        cluster = request.getfixturevalue("ray_cluster")  # connected: the command never starts one of its own
        if case.ray:
            argv += ["--address", cluster.get_runtime_context().gcs_address]
    before = _snapshot(tmp_path)
    done = run_subprocess(script, argv) if case.subprocess else run_cli(script, argv)
    # Ray's own start-up log lines (a command that starts a local cluster) are Ray's, not the error's.
    lines = [line for line in done.stderr.strip().splitlines() if not RAY_LOG_LINE.match(line)]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and 1 <= len(lines) <= 2, done.stderr[-3000:]
    assert case.names in lines[-1], lines
    after = _snapshot(tmp_path)
    assert {name: after.get(name) for name in before} == before
