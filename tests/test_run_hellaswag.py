"""training/run.py -h 1: HellaSwag on every -v checkpoint in Ray tasks beside a 2-worker run, on the local cluster."""

import json
import re
from pathlib import Path

import pytest

from tests.test_train import make_shards
from training.run import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "evals" / "data" / "hellaswag_smoke.jsonl"
STEPS, EVERY = 60, 20


@pytest.fixture(scope="module")
def run_dir(ray_cluster, tmp_path_factory) -> Path:
    data = make_shards(tmp_path_factory.mktemp("shards"), tokens_per_shard=20_000)
    out = tmp_path_factory.mktemp("runs") / "hellaswag"
    # The session cluster has 4 logical CPUs: 2 workers x 1 leave room for the 2 eval tasks x 0.5.
    assert main(["-i", str(data / "*_train_*.bin"), "-j", str(data / "*_val_*.bin"), "-o", str(out),
                 "--workers", "2", "--cpus-per-worker", "1", "-e", "L2H2C64", "-b", "2", "-t", "32",
                 "-x", str(STEPS), "-v", str(EVERY), "-m", "2", "-s", "0", "-l", "1e-3",
                 "-h", "1", "--hellaswag-file", str(SMOKE)]) == 0
    return out


def test_every_eval_step_gets_a_checkpoint_and_an_eval_line_in_step_order(run_dir):
    eval_steps = list(range(EVERY, STEPS + 1, EVERY))
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == [f"ckpt_{s:08d}" for s in eval_steps]
    lines = (run_dir / "main.log").read_text().splitlines()
    evals = [(int(m[1]), float(m[2])) for line in lines if (m := re.match(r"^s:(\d+) eval:(\S+)$", line))]
    assert [step for step, _ in evals] == eval_steps
    assert all(0.0 <= acc_norm <= 1.0 for _, acc_norm in evals)
    assert lines[-1].startswith(f"s:{STEPS} eval:")  # the last checkpoint's eval was awaited before exit


def test_evals_ran_in_ray_tasks_while_training_went_on(run_dir):
    records = {r["step"]: r for r in map(json.loads, (run_dir / "hellaswag.jsonl").read_text().splitlines())}
    assert sorted(records) == list(range(EVERY, STEPS + 1, EVERY))
    assert all(r["mode"] == "ray tasks" and r["num_total"] == 24 for r in records.values())
    for step in range(EVERY, STEPS, EVERY):  # not the last: the run ends after its checkpoint
        record = records[step]
        # The loop only polled: training went on while the eval ran, and the result came in a later step.
        assert record["steps_done_at_collection"] > step, record
        assert record["submitted_at"] <= min(start for start, _ in record["task_spans"])
    assert records[STEPS]["steps_done_at_collection"] == STEPS  # drained before exit


def test_summary_json_records_the_run(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["workers"] == 2 and summary["device"] == "cpu"
    assert summary["tokens_seen"] == STEPS * 2 * 32 * 2
    assert summary["hellaswag"]["step"] == STEPS and summary["hellaswag"]["examples"] == 24
    assert summary["estimated_cost_usd"] is None  # CPU without --gpu-hour-usd: no price to apply
    assert summary["val_loss"] > 0 and summary["elapsed_s"] > 0
