"""The tokenize job end to end on a real local Ray cluster, with input files the tests write."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.filters import FilterConfig
from pipelines.shards import file_sha256, read_header, read_shard
from pipelines.sources import InputError
from pipelines.tokenize import TokenizeConfig, tokenize
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding
from pipelines.writer import STATE_FILE
from tests.conftest import REPO

WORDS = ("the model reads tokens from shards and learns to predict the next one while the optimizer "
         "updates every weight a little after each batch of text drawn from educational web pages").split()


def make_documents(count: int, seed: int, mean_words: int = 60) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        n_words = int(rng.integers(1, 2 * mean_words))
        text = " ".join(rng.choice(WORDS, size=n_words)) + ("." if i % 3 else "\n\nNext paragraph here.")
        docs.append({"text": text, "int_score": int(rng.integers(1, 6)), "score": float(rng.uniform(1, 5)),
                     "language_score": float(rng.uniform(0.5, 1.0))})
    docs[5]["text"] = "   \n "  # whitespace only
    docs[7]["text"] = docs[3]["text"]  # an exact duplicate
    return docs


def write_parquet_files(directory, docs, files=3, row_group_size=40):
    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(docs) // files)
    for i in range(files):
        table = pa.Table.from_pylist(docs[i * per_file:(i + 1) * per_file])
        pq.write_table(table, directory / f"part_{i:03d}.parquet", row_group_size=row_group_size)
    return str(directory / "*.parquet")


def expected_stream(docs) -> np.ndarray:
    encode = gpt2_encoding().encode_ordinary
    return np.array([t for d in docs for t in [EOT_TOKEN, *encode(d["text"])]], dtype=np.uint16)


def shard_paths(manifest, out_dir):
    return [out_dir / s["name"] for s in manifest["shards"]]


def all_tokens(manifest, out_dir) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p)) for p in shard_paths(manifest, out_dir)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_documents(300, seed=1)
    return docs, write_parquet_files(tmp_path_factory.mktemp("raw"), docs)


def run(pattern, out_dir, **overrides) -> dict:
    settings = {"source": "files", "input": pattern, "output_dir": out_dir, "shard_size": 3000, "num_workers": 2,
                "batch_size": 64, **overrides}
    return tokenize(TokenizeConfig(**settings))


def test_every_document_lands_eot_first_in_fixed_size_shards(ray_cluster, corpus, tmp_path):
    docs, pattern = corpus
    manifest = run(pattern, tmp_path)
    kept = [d for d in docs if d["text"].strip()]
    np.testing.assert_array_equal(all_tokens(manifest, tmp_path), expected_stream(kept))
    sizes = [read_header(p) for p in shard_paths(manifest, tmp_path)]
    assert all(size == 3000 for size in sizes[:-1]) and 0 < sizes[-1] <= 3000
    names = [s["name"] for s in manifest["shards"]]
    assert names[0] == "edu_fineweb_val_000000.bin"
    assert names[1:] == [f"edu_fineweb_train_{i:06d}.bin" for i in range(1, len(names))]
    assert [s["sha256"] for s in manifest["shards"]] == [file_sha256(p) for p in shard_paths(manifest, tmp_path)]
    assert manifest["total_tokens"] == sum(sizes)
    assert manifest["docs"] == {"read": 300, "kept": 299, "dropped": {
        "empty": 1, "int_score": 0, "score": 0, "language_score": 0, "min_chars": 0, "max_chars": 0, "duplicate": 0}}
    assert json.loads((tmp_path / "manifest.json").read_text())["tokenizer"]["name"] == "gpt2"
    assert not (tmp_path / STATE_FILE).exists()


def test_filters_and_dedup_are_counted(ray_cluster, corpus, tmp_path):
    docs, pattern = corpus
    filters = FilterConfig(min_int_score=3, min_language_score=0.6, min_chars=40, max_chars=700, dedup=True)
    manifest = run(pattern, tmp_path, filters=filters)
    expected_kept, counts, seen = [], dict.fromkeys(manifest["docs"]["dropped"], 0), set()
    for d in docs:
        text = d["text"]
        reason = ("empty" if not text.strip() else "int_score" if d["int_score"] < 3
                  else "language_score" if d["language_score"] < 0.6 else "min_chars" if len(text) < 40
                  else "max_chars" if len(text) > 700 else "duplicate" if text in seen else None)
        if reason:
            counts[reason] += 1
        else:
            seen.add(text)
            expected_kept.append(d)
    assert counts["duplicate"] >= 1 and counts["int_score"] > 0
    assert manifest["docs"]["dropped"] == counts
    assert manifest["docs"]["kept"] == len(expected_kept)
    np.testing.assert_array_equal(all_tokens(manifest, tmp_path), expected_stream(expected_kept))


def test_bytes_do_not_depend_on_parallelism(ray_cluster, corpus, tmp_path):
    _, pattern = corpus
    one = run(pattern, tmp_path / "one", num_workers=1, batch_size=500)
    three = run(pattern, tmp_path / "three", num_workers=3, batch_size=7)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in three["shards"]]
    assert len(one["shards"]) > 3


def test_jsonl_gz_gives_the_same_tokens_as_parquet(ray_cluster, corpus, tmp_path):
    docs, pattern = corpus
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, part in enumerate((docs[:150], docs[150:])):
        with gzip.open(raw / f"part_{i}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(d) + "\n" for d in part)
    from_json = run(str(raw / "*.jsonl.gz"), tmp_path / "json")
    from_parquet = run(pattern, tmp_path / "parquet")
    assert [s["sha256"] for s in from_json["shards"]] == [s["sha256"] for s in from_parquet["shards"]]


def test_fsspec_urls_read_like_local_paths(ray_cluster, corpus, tmp_path):
    """The cloud code path (s3://, gs://, hf:// go through fsspec) exercised with file:// URLs."""
    _, pattern = corpus
    via_url = run("file://" + pattern, tmp_path / "url")
    plain = run(pattern, tmp_path / "plain")
    assert via_url["inputs"] == plain["inputs"] and len(plain["inputs"]) == 3
    assert [s["sha256"] for s in via_url["shards"]] == [s["sha256"] for s in plain["shards"]]


def test_bad_inputs_are_one_line_errors_naming_the_file(ray_cluster, corpus, tmp_path):
    with pytest.raises(InputError, match="matched no files"):
        run(str(tmp_path / "nothing" / "*.parquet"), tmp_path / "out")
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["x"]}), no_text)
    with pytest.raises(InputError, match=f"{no_text}: no 'text' column"):
        run(str(no_text), tmp_path / "out")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match=f"{garbage}: unreadable"):
        run(str(garbage), tmp_path / "out")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text("{not json\n")
    with pytest.raises(InputError, match=f"{bad_json}: line 1 is not JSON"):
        run(str(bad_json), tmp_path / "out")


def test_rerun_is_a_noop_and_other_flags_are_refused(ray_cluster, corpus, tmp_path, capsys):
    _, pattern = corpus
    first = run(pattern, tmp_path)
    mtimes = [p.stat().st_mtime_ns for p in shard_paths(first, tmp_path)]
    again = run(pattern, tmp_path)
    assert "already complete" in capsys.readouterr().out
    assert again == first and mtimes == [p.stat().st_mtime_ns for p in shard_paths(first, tmp_path)]
    with pytest.raises(InputError, match="different inputs or flags"):
        run(pattern, tmp_path, shard_size=5000)
    redone = run(pattern, tmp_path, shard_size=5000, overwrite=True)
    assert redone["total_tokens"] == first["total_tokens"] and len(redone["shards"]) < len(first["shards"])


def test_killed_run_resumes_to_identical_bytes(ray_cluster, tmp_path):
    docs = make_documents(6000, seed=7, mean_words=150)
    pattern = write_parquet_files(tmp_path / "raw", docs, files=4, row_group_size=100)
    shard_size = 20_000
    reference = run(pattern, tmp_path / "straight", shard_size=shard_size)
    assert len(reference["shards"]) > 20

    out = tmp_path / "killed"
    command = [sys.executable, "pipelines/tokenize.py", "--input", pattern, "-o", str(out),
               "--shard-size", str(shard_size), "--num-workers", "2", "--batch-size", "64",
               "--address", ray_cluster.get_runtime_context().gcs_address]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        state = out / STATE_FILE
        if state.exists() and len(json.loads(state.read_text())["shards"]) >= 3:
            break
        time.sleep(0.02)
    assert job.poll() is None, "the job finished before it could be killed; give it more input"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()

    assert not (out / "manifest.json").exists()
    for shard in out.glob("*.bin"):
        read_header(shard)  # nothing half-written sits under a final name
    resumed = run(pattern, out, shard_size=shard_size)
    assert resumed["resumed_after_shards"] >= 3
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert resumed["docs"] == reference["docs"]


def test_cli_demo_source_runs_as_a_script(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    result = subprocess.run(
        [sys.executable, "pipelines/tokenize.py", "--source", "demo", "-o", str(tmp_path), "--address", address],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout and "1 val" in result.stdout
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"][0]["name"] == "python_docs_val_000000.bin"
    assert manifest["total_tokens"] > 300_000 and len(manifest["shards"]) >= 4
    bad = subprocess.run([sys.executable, "pipelines/tokenize.py", "--input", str(tmp_path / "none*.parquet"),
                          "-o", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "matched no files" in bad.stderr
