"""demo.py end to end, shortened: tokenize -> train with HellaSwag beside it -> sample -> plot, each stage the
real CLI in its own process on its own local Ray cluster."""

import json
import re

from demo import main


def test_demo_runs_the_whole_pipeline_into_one_output_dir(tmp_path, capfd):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--steps", "12", "--model", "L2H2C64", "--every", "6"]) == 0
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["shards"][0]["name"] == "python_docs_val_000000.bin" and len(manifest["shards"]) >= 4
    assert all((out / "shards" / shard["name"]).exists() for shard in manifest["shards"])
    assert manifest["total_tokens"] > 300_000 and set(manifest["timings_s"]) >= {"startup_s", "tokenize_s", "finish_s"}
    train = out / "train"
    log = (train / "main.log").read_text()
    val = [float(v) for v in re.findall(r"^s:\d+ tel:(\S+)$", log, re.M)]
    assert log.count(" trl:") == 12 and len(val) == 3 and val[-1] < val[0]
    assert re.findall(r"^s:(\d+) eval:", log, re.M) == ["6", "12"]
    summary = json.loads((train / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["hellaswag"]["step"] == 12 and summary["tokens_seen"] == 12 * 8 * 64 * 2
    assert (train / "main.png").stat().st_size > 0
    printed = capfd.readouterr().out
    shards = len(manifest["shards"])  # tokenize.py's own summary
    assert f"wrote {shards} shards (1 val + {shards - 1} train), {manifest['total_tokens']:,} tokens" in printed
    assert "\nstart-up " in printed
    assert "--- sample 0" in printed and f"val loss    : {val[0]:.4f} at step 0 -> {val[-1]:.4f} at step 12" in printed
