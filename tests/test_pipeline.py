"""The tokenize job end to end on a real local Ray cluster, with input files the tests write."""

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.files import PARTIAL_SUFFIX, atomic_write
from pipelines.dedup import HASH_ROW, duplicate_docs, find_duplicates
from pipelines.filters import FilterConfig
from pipelines.shards import read_header
from pipelines.sources import InputError
from pipelines.workdir import PARTS_DIR, STATE_FILE, OutputDir, unit_file
from tests.helpers import (
    DOCUMENT_WORDS,
    REPO,
    all_tokens,
    expected_stream,
    file_sha256,
    llmc_shard,
    make_documents,
    sha256s,
    shard_paths,
    tokenize_files,
    write_parquet_files,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_documents(300, seed=1)
    return docs, write_parquet_files(tmp_path_factory.mktemp("raw"), docs)


@pytest.fixture(scope="module")
def reference(ray_cluster, corpus, tmp_path_factory):
    """The corpus tokenized with the settings of tokenize_files(): (manifest, output directory)."""
    out = tmp_path_factory.mktemp("reference")
    return tokenize_files(corpus[1], out), out


def test_shards_are_byte_identical_to_an_independent_writer(corpus, reference):
    docs, _ = corpus
    manifest, out = reference
    stream = expected_stream([d for d in docs if d["text"].strip()])
    paths = shard_paths(manifest, out)
    assert len(paths) == -(-stream.size // 3000) > 3
    for index, path in enumerate(paths):
        assert path.read_bytes() == llmc_shard(stream[index * 3000:(index + 1) * 3000]), path
    names = [s["name"] for s in manifest["shards"]]
    assert names[0] == "edu_fineweb_val_000000.bin"
    assert names[1:] == [f"edu_fineweb_train_{i:06d}.bin" for i in range(1, len(names))]
    assert sha256s(manifest) == [file_sha256(p) for p in paths]
    assert manifest["total_tokens"] == stream.size and manifest["units"] > 10
    assert manifest["docs"] == {"read": 300, "kept": 299, "dropped": {
        "empty": 1, "int_score": 0, "score": 0, "language_score": 0, "min_chars": 0, "max_chars": 0, "duplicate": 0}}
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["name"] == "gpt2"
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "manifest.json"])  # no parts, no state


def test_filters_and_dedup_are_counted(ray_cluster, corpus, tmp_path):
    docs, pattern = corpus
    filters = FilterConfig(min_int_score=3, min_language_score=0.6, min_chars=40, max_chars=700, dedup=True)
    manifest = tokenize_files(pattern, tmp_path, filters=filters)
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


def test_dedup_shuffle_keeps_the_first_copy_in_input_order(ray_cluster, corpus, tmp_path):
    """The hash shuffle over several partitions and workers equals one sequential pass."""
    out = OutputDir(tmp_path)
    out.makedirs(PARTS_DIR)
    rng = np.random.default_rng(3)
    units, seen, expected = 7, set(), {}
    for unit in range(units):
        rows = np.zeros(int(rng.integers(0, 60)), dtype=HASH_ROW)
        rows["hash"] = rng.integers(0, 40, rows.size).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        rows["unit"], rows["doc"], rows["tokens"] = unit, np.arange(rows.size), rng.integers(1, 9, rows.size)
        with atomic_write(out.path(unit_file(unit, "hashes.npy"))) as f:
            np.save(f, rows)
        for row in rows:
            if int(row["hash"]) in seen:
                entry = expected.setdefault(unit, {"docs": 0, "tokens": 0, "rows": []})
                entry["docs"] += 1
                entry["tokens"] += int(row["tokens"])
                entry["rows"].append(int(row["doc"]))
            seen.add(int(row["hash"]))
    for partitions in (1, 3):
        found = find_duplicates(out, list(range(units)), partitions, num_cpus=0.5)
        assert {u: (f["docs"], f["tokens"]) for u, f in found.items()} == \
            {u: (e["docs"], e["tokens"]) for u, e in expected.items()}
        for unit, entry in found.items():
            assert sorted(duplicate_docs(out, unit, entry["files"]).tolist()) == expected[unit]["rows"]


def test_bytes_do_not_depend_on_workers_units_or_batches(corpus, reference, tmp_path):
    _, pattern = corpus
    one = tokenize_files(pattern, tmp_path / "one", num_workers=1, batch_size=500, unit_bytes=10**9)  # one unit
    three = tokenize_files(pattern, tmp_path / "three", num_workers=3, batch_size=7, unit_bytes=1500)
    assert one["units"] == 1 and three["units"] > 40
    assert sha256s(one) == sha256s(three) == sha256s(reference[0])


def test_jsonl_gz_gives_the_same_tokens_as_parquet(corpus, reference, tmp_path):
    docs, _ = corpus
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, part in enumerate((docs[:150], docs[150:])):
        with gzip.open(raw / f"part_{i}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(d) + "\n" for d in part)
    assert sha256s(tokenize_files(str(raw / "*.jsonl.gz"), tmp_path / "json")) == sha256s(reference[0])


def test_a_big_jsonl_file_is_cut_into_units_on_line_boundaries(corpus, reference, tmp_path):
    docs, _ = corpus
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    one = tokenize_files(str(path), tmp_path / "one", unit_bytes=10**9)
    # ranges of ~300 bytes: most start or end inside a line, some hold no line start at all
    cut = tokenize_files(str(path), tmp_path / "cut", unit_bytes=300, num_workers=3)
    assert one["units"] == 1 and cut["units"] > len(docs) // 2
    assert sha256s(one) == sha256s(cut) == sha256s(reference[0])


def test_fsspec_urls_read_and_write_like_local_paths(corpus, reference, tmp_path):
    """The cloud code path (s3://, gs://, hf:// go through fsspec) exercised with file:// URLs."""
    _, pattern = corpus
    manifest, out = reference
    via_url = tokenize_files("file://" + pattern, f"file://{tmp_path}")
    assert via_url["inputs"] == manifest["inputs"] and len(manifest["inputs"]) == 3
    written = [p.read_bytes() for p in shard_paths(via_url, tmp_path)]
    assert written == [p.read_bytes() for p in shard_paths(manifest, out)]


def test_atomic_write_to_an_object_store_url():
    """The branch for s3:// and gs:// outputs, on fsspec's in-memory filesystem."""
    out = OutputDir("memory://raygpt2-test/out")
    out.write_json("a.json", {"x": 1})
    with pytest.raises(RuntimeError), out.write("b.bin") as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert out.read_json("a.json") == {"x": 1} and out.glob("*") == ["a.json"]


def test_tiny_shards_and_the_single_shard_warning(ray_cluster, corpus, tmp_path, capsys):
    docs, pattern = corpus
    tiny = tokenize_files(pattern, tmp_path / "tiny", shard_size=499)
    stream = expected_stream([d for d in docs if d["text"].strip()])
    assert len(tiny["shards"]) == -(-stream.size // 499) > 30 and not tiny["warnings"]
    np.testing.assert_array_equal(all_tokens(tiny, tmp_path / "tiny"), stream)
    one = tokenize_files(pattern, tmp_path / "one", shard_size=10**6)
    assert len(one["shards"]) == 1 and one["shards"][0]["split"] == "val"
    suggested = int(re.search(r"--shard-size (\d+)$", one["warnings"][0]).group(1))
    assert "no train shard" in one["warnings"][0] and 1 <= suggested <= one["total_tokens"] // 5
    assert "warning: only 1 shard" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors_naming_the_file(ray_cluster, corpus, tmp_path):
    with pytest.raises(InputError, match="matched no files"):
        tokenize_files(str(tmp_path / "nothing" / "*.parquet"), tmp_path / "out")
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["x"]}), no_text)
    with pytest.raises(InputError, match=f"{no_text}: no 'text' column"):
        tokenize_files(str(no_text), tmp_path / "out")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match=f"{garbage}: unreadable"):
        tokenize_files(str(garbage), tmp_path / "out")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text("{not json\n")
    with pytest.raises(InputError, match=f"{bad_json}: line 1 is not JSON"):
        tokenize_files(str(bad_json), tmp_path / "out")


def test_rerun_is_a_noop_and_other_flags_are_refused(corpus, reference, tmp_path, capsys):
    _, pattern = corpus
    first = reference[0]
    shutil.copytree(reference[1], tmp_path, dirs_exist_ok=True)
    mtimes = [p.stat().st_mtime_ns for p in shard_paths(first, tmp_path)]
    again = tokenize_files(pattern, tmp_path)
    assert "already complete" in capsys.readouterr().out
    assert again == first and mtimes == [p.stat().st_mtime_ns for p in shard_paths(first, tmp_path)]
    with pytest.raises(InputError, match="different inputs or flags"):
        tokenize_files(pattern, tmp_path, shard_size=5000)
    redone = tokenize_files(pattern, tmp_path, shard_size=5000, overwrite=True)
    assert redone["total_tokens"] == first["total_tokens"] and len(redone["shards"]) < len(first["shards"])


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_changed_input_is_refused_finished_or_interrupted(ray_cluster, tmp_path):
    docs = make_documents(300, seed=4)
    pattern = write_parquet_files(tmp_path / "raw", docs, files=2)
    out = tmp_path / "out"
    manifest = tokenize_files(pattern, out)
    changed = tmp_path / "raw" / "part_001.parquet"
    write_parquet_files(tmp_path / "edited", docs[150:-1], files=1)  # its last document deleted
    shutil.move(tmp_path / "edited" / "part_000.parquet", changed)
    before = _snapshot(out)
    with pytest.raises(InputError, match=f"{changed}: changed .*--overwrite"):
        tokenize_files(pattern, out)
    assert _snapshot(out) == before
    # interrupted: the state file of a run begun on the old input, no manifest yet
    (out / STATE_FILE).write_text(json.dumps({"version": 2, "fingerprint": manifest["fingerprint"], "units": []}))
    (out / "manifest.json").unlink()
    before = _snapshot(out)
    with pytest.raises(InputError, match=f"{changed}: changed .*--overwrite"):
        tokenize_files(pattern, out)
    assert _snapshot(out) == before
    redone = tokenize_files(pattern, out, overwrite=True)
    np.testing.assert_array_equal(all_tokens(redone, out), expected_stream([d for d in docs[:-1] if d["text"].strip()]))


def test_only_temp_files_of_our_own_writes_are_cleaned(ray_cluster, corpus, reference, tmp_path):
    _, pattern = corpus
    theirs = {"notes.tmp": b"somebody's notes", "edu_fineweb_train_000001.bin.1.ab.tmp": b"not ours",
              "data.raygpt2-partial": b"no target of ours"}
    for name, content in theirs.items():
        (tmp_path / name).write_bytes(content)
    ours = tmp_path / f"edu_fineweb_train_000001.bin.123.abcd1234{PARTIAL_SUFFIX}"  # a killed run's shard write
    ours.write_bytes(b"half a shard")
    manifest = tokenize_files(pattern, tmp_path)
    assert sha256s(manifest) == sha256s(reference[0]) and not ours.exists()
    assert {name: (tmp_path / name).read_bytes() for name in theirs} == theirs


def test_a_jsonl_line_of_any_length(ray_cluster, tmp_path):
    """One 10.5 MB document among short ones: Arrow's JSON blocks (1 MB) grow to hold it."""
    docs = [d for d in make_documents(300, seed=5)[:20] if d["text"].strip()]
    rng = np.random.default_rng(6)
    docs[9]["text"] = " ".join(rng.choice(DOCUMENT_WORDS, size=1_900_000))
    assert len(docs[9]["text"]) > 10_500_000
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    manifest = tokenize_files(str(path), tmp_path / "out", shard_size=10**8, unit_bytes=10**9)
    np.testing.assert_array_equal(all_tokens(manifest, tmp_path / "out"), expected_stream(docs))


def _start(command):
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _kill_when(job, ready, what: str) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None and not ready():
        time.sleep(0.01)
    assert job.poll() is None, f"the job finished before {what}; give it more input"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def _copy_what_is_written(source: Path, target: Path) -> None:
    """Copy the finished files of a killed job's output. Ray stops the job's workers a moment after its
    driver dies, so one may still be renaming a temp file into place while we copy."""
    for path in source.rglob("*"):
        if path.is_file() and not path.name.endswith(PARTIAL_SUFFIX):
            copy = target / path.relative_to(source)
            copy.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                shutil.copy2(path, copy)


def test_killed_runs_resume_to_identical_bytes(ray_cluster, tmp_path):
    """SIGKILL while units are being encoded, then again while shards are being assembled: the third run
    redoes only what is missing and ends with the bytes of an uninterrupted run."""
    docs = make_documents(3000, seed=7, mean_words=150)
    pattern = write_parquet_files(tmp_path / "raw", docs, files=4, row_group_size=100)
    flags = {"shard_size": 20_000, "unit_bytes": 20_000}
    reference = tokenize_files(pattern, tmp_path / "straight", **flags)
    assert len(reference["shards"]) > 15 and reference["units"] > 50

    out = tmp_path / "killed"
    command = [sys.executable, "pipelines/tokenize.py", "--input", pattern, "-o", str(out), "--num-workers", "2",
               "--shard-size", str(flags["shard_size"]), "--unit-bytes", str(flags["unit_bytes"]),
               "--address", ray_cluster.get_runtime_context().gcs_address]
    parts = out / PARTS_DIR
    first = _start(command)
    _kill_when(first, lambda: len(list(parts.glob("unit_*.json"))) >= 3, "3 units were done")
    state = (out / STATE_FILE).read_bytes()
    done_before = len(list(parts.glob("unit_*.json")))
    second = _start(command)

    def consumed_units() -> list[Path]:  # done, and their tokens deleted once the shards they went into were written
        return [p for p in parts.glob("unit_*.json") if not p.with_suffix(".tokens").exists()]

    _kill_when(second, lambda: len(list(parts.glob("shards_*.json"))) >= 3 and consumed_units(),
               "3 shard groups were written and their units' tokens deleted")
    assert (out / STATE_FILE).read_bytes() == state  # written once per run, never rewritten as it progresses
    assert not (out / "manifest.json").exists()
    for shard in out.glob("*.bin"):
        read_header(shard)  # nothing half-written sits under a final name

    damaged = tmp_path / "damaged"  # shards deleted by hand after the tokens they hold were deleted
    _copy_what_is_written(out, damaged)
    for shard in damaged.glob("*.bin"):
        shard.unlink()
    with pytest.raises(InputError, match=r"\.bin: missing or damaged.*--overwrite"):
        tokenize_files(pattern, damaged, **flags)

    resumed = tokenize_files(pattern, out, **flags)
    assert resumed["resumed"]["units"] > done_before and resumed["resumed"]["shards"] >= 3
    assert sha256s(resumed) == sha256s(reference) and resumed["docs"] == reference["docs"]
    assert not (out / PARTS_DIR).exists() and not (out / STATE_FILE).exists()


def test_cli_as_a_script_refuses_bad_input_in_one_line(tmp_path):
    """The script's wiring (the demo corpus as a script: tests/test_demo.py)."""
    bad = subprocess.run([sys.executable, "pipelines/tokenize.py", "--input", str(tmp_path / "none*.parquet"),
                          "-o", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "matched no files" in bad.stderr
