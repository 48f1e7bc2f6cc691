"""demo.py end to end, shortened: tokenize -> train with HellaSwag beside it -> sample -> plot, each stage the
real CLI in its own process on its own local Ray cluster."""

import json
import re

import pytest

from demo import main, out_problem


def test_demo_runs_the_whole_pipeline_into_one_output_dir(tmp_path, capfd):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--steps", "12", "--model", "L2H2C64", "--every", "6"]) == 0
    assert out_problem(out) is None  # marked as the demo's own: a rerun may replace its training run
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["shards"][0]["name"] == "python_docs_val_000000.bin" and len(manifest["shards"]) >= 4
    assert all((out / "shards" / shard["name"]).exists() for shard in manifest["shards"])
    assert manifest["total_tokens"] > 300_000 and set(manifest["timings_s"]) >= {"startup_s", "tokenize_s", "finish_s"}
    train = out / "train"
    log = (train / "main.log").read_text()
    val = [float(v) for v in re.findall(r"^s:\d+ tel:(\S+)$", log, re.M)]
    assert log.count(" trl:") == 12 and len(val) == 3 and val[-1] < val[0]
    records = [json.loads(line) for line in (train / "hellaswag.jsonl").read_text().splitlines()]
    # each due step accounted for; a busy machine may skip step 6's eval for step 12's, never the last one
    assert sorted(r["step"] for r in records) == [6, 12] and "skipped" not in max(records, key=lambda r: r["step"])
    scored = sorted(r["step"] for r in records if "skipped" not in r)
    assert [int(step) for step in re.findall(r"^s:(\d+) eval:", log, re.M)] == scored
    summary = json.loads((train / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["hellaswag"]["step"] == 12 and summary["tokens_seen"] == 12 * 8 * 64 * 2
    assert (train / "main.png").stat().st_size > 0
    printed = capfd.readouterr().out
    shards = len(manifest["shards"])  # tokenize.py's own summary
    assert f"wrote {shards} shards (1 val + {shards - 1} train), {manifest['total_tokens']:,} tokens" in printed
    assert "\nstart-up " in printed
    assert printed.count("\nhellaswag   : step ") == 2
    assert "--- sample 0" in printed and f"val loss    : {val[0]:.4f} at step 0 -> {val[-1]:.4f} at step 12" in printed


def test_the_demo_never_reruns_into_a_directory_it_did_not_make(tmp_path, capsys):
    """A rerun replaces the demo's training run (run.py --overwrite): pointed at a directory holding someone's
    run as train/, it would discard that run's checkpoints. One line, exit 2, nothing changed."""
    out = tmp_path / "runs"
    (out / "train").mkdir(parents=True)
    (out / "train" / "main.log").write_text("s:0 tel:10.9\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(out)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"demo.py: error: --out {out}: holds files the demo did not write (train), and a rerun of the demo "
        "replaces its training run; give a new or empty directory (--help for usage)"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["train", "train/main.log"]
