"""training/run.py --core-every on the session's local cluster: CORE beside training in Ray tasks and in-loop
on the ranks, main.log lines, core.jsonl and the summary, the last step scored on the whole bundle and equal
to the single-process scorer."""

import json
from pathlib import Path

import pytest

from evals.core_data import read_bundle
from evals.core_scoring import evaluate_core
from gpt2.checkpoint import load_model
from gpt2.mainlog import read
from tests.helpers import make_shards
from training.run import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "evals" / "data" / "core_smoke"
STEPS, EVERY = 40, 20


def run(data: Path, out: Path, *extra: str) -> int:
    return main(["-i", str(data / "*_train_*.bin"), "-j", str(data / "*_val_*.bin"), "-o", str(out),
                 "--workers", "2", "--cpus-per-worker", "1", "-e", "L2H2C64", "-b", "2", "-t", "32", "-m", "2",
                 "-s", "0", "-l", "1e-3", "-x", str(STEPS), "-v", str(EVERY), "--core-every", str(EVERY),
                 "--core-bundle", str(SMOKE), "--core-max-per-task", "4", *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), tokens_per_shard=20_000)


@pytest.mark.parametrize("placement", ["tasks", "ranks"])
def test_core_beside_training_scores_the_last_step_on_the_whole_bundle(ray_cluster, data, tmp_path, placement):
    out = tmp_path / placement
    assert run(data, out, "--eval-on", placement) == 0
    records = [json.loads(line) for line in (out / "core.jsonl").read_text().splitlines()]
    scored = [r for r in records if "skipped" not in r]  # a loaded machine may skip the periodic one (tasks)
    assert scored[-1]["step"] == STEPS and scored[-1]["mode"] == ("ray tasks" if placement == "tasks" else "ranks")
    assert [step for step, _ in read(out / "main.log")["core"]] == [r["step"] for r in scored]
    expected = evaluate_core(load_model(out / f"ckpt_{STEPS:08d}"), read_bundle(SMOKE))
    assert scored[-1]["tasks"] == expected["tasks"] and scored[-1]["num_total"] == 36  # all, not 4 per task
    assert all(r["num_total"] == 12 for r in scored[:-1])  # periodic: --core-max-per-task 4 x 3 tasks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["core"]["step"] == STEPS and summary["core"]["core"] == expected["core"]
    assert summary["hellaswag"] is None


def test_core_every_must_be_a_multiple_of_v(data, tmp_path, capsys):
    assert run(data, tmp_path / "bad", "--core-every", "30") == 2
    assert "--core-every 30 must be a multiple of -v 20" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
