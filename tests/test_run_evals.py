"""training/run.py -h 1 and --core-every on the session's local cluster: evals placed by --eval-on, ranks equal
to the single-process scorers, CORE's last step on the whole bundle, a bounded backlog, and an output directory
free of eval leftovers. HellaSwag and CORE share each run: a Ray Train fit is the expensive part here."""

import json
import shutil
import threading
from pathlib import Path

import pytest

from evals.core_data import read_bundle
from evals.core_scoring import evaluate_core
from evals.hellaswag_data import read_jsonl
from evals.scoring import evaluate
from gpt2.checkpoint import load_model
from gpt2.mainlog import read
from tests.helpers import HeldCPUs, make_shards, wait_for
from training.launcher.launch import main
from training.launcher.placement import choose_placement

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "evals" / "data" / "hellaswag_smoke.jsonl"
CORE_SMOKE = REPO / "evals" / "data" / "core_smoke"
STEPS, EVERY = 40, 20


def with_core(every: int) -> list[str]:
    """CORE every `every` steps on 4 examples per task of the smoke bundle (3 tasks), all of it at the end."""
    return ["--core-every", str(every), "--core-bundle", str(CORE_SMOKE), "--core-max-per-task", "4"]


def run(data: Path, out: Path, *extra: str) -> int:
    return main(["-i", str(data / "*_train_*.bin"), "-j", str(data / "*_val_*.bin"), "-o", str(out),
                 "--workers", "2", "--cpus-per-worker", "1", "-e", "L2H2C64", "-b", "2", "-t", "32", "-m", "2",
                 "-s", "0", "-l", "1e-3", "-h", "1", *extra])


def records(run_dir: Path, name: str = "hellaswag.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), tokens_per_shard=20_000)


@pytest.fixture(scope="module")
def run_dir(ray_cluster, data, tmp_path_factory) -> Path:
    """-n 0 -h 1 and CORE with evals as Ray tasks: the session cluster's 4 CPUs leave room for 2 tasks x 0.5 CPU
    of each beside the 2 workers."""
    out = tmp_path_factory.mktemp("runs") / "evals"
    assert run(data, out, "-x", str(STEPS), "-v", str(EVERY), "--hellaswag-file", str(SMOKE), *with_core(EVERY)) == 0
    return out


def test_eval_lines_in_step_order_and_nothing_of_size_left_behind(run_dir):
    scored = [r["step"] for r in records(run_dir) if "skipped" not in r]  # a loaded machine may skip one
    evals = read(run_dir / "main.log")["eval"]
    assert [step for step, _ in evals] == scored and all(0.0 <= value <= 1.0 for _, value in evals)
    last_two = sorted(line.split(":")[1] for line in (run_dir / "main.log").read_text().splitlines()[-2:])
    assert last_two == [f"{STEPS} core", f"{STEPS} eval"]  # both awaited at the end
    # The tasks read weights from Ray's object store: no eval checkpoints or snapshots on disk, only -n's
    # schedule (here: the final checkpoint), the logs and Ray Train's own bookkeeping.
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([
        ".validate_storage_marker", "checkpoint_manager_snapshot.json", f"ckpt_{STEPS:08d}", "core.jsonl",
        "hellaswag.jsonl", "main.log", "summary.json"])


def test_evals_ran_in_ray_tasks_while_training_went_on(run_dir):
    assert sorted(r["step"] for r in records(run_dir)) == list(range(EVERY, STEPS + 1, EVERY))  # each accounted for
    by_step = {r["step"]: r for r in records(run_dir) if "skipped" not in r}
    assert STEPS in by_step and all(r["mode"] == "ray tasks" and r["num_total"] == 24 for r in by_step.values())
    for step in sorted(by_step)[:-1]:  # not the last: the run ends after it
        # The loop only polled: training went on while the eval ran, and the result came in a later step.
        assert by_step[step]["steps_done_at_collection"] > step, by_step[step]
        assert by_step[step]["submitted_at"] <= min(start for start, _ in by_step[step]["task_spans"])
    assert by_step[STEPS]["steps_done_at_collection"] == STEPS  # awaited before exit


def test_a_resumed_run_continues_from_its_latest_checkpoint_and_scores_again_the_eval_lost(run_dir, data, tmp_path):
    """As if the run had stopped while its last step's eval ran in Ray tasks, after training on 10 more
    steps (and evaluating them): the lost eval's record and main.log line never written, the later one's
    written."""
    out = tmp_path / "lost"
    shutil.copytree(run_dir, out)  # Ray Train's snapshot names checkpoints relative to the run directory
    lost = next(r for r in records(run_dir) if r["step"] == STEPS)
    kept = [r for r in records(run_dir) if r["step"] != STEPS] + [{**lost, "step": STEPS + 10}]
    (out / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    log = (out / "main.log").read_text().replace(f"s:{STEPS} eval:", f"s:{STEPS + 10} eval:")
    (out / "main.log").write_text(log)
    last = out / f"ckpt_{STEPS:08d}"  # the latest checkpoint Ray Train registered
    inode = last.stat().st_ino
    assert run(data, out, "-y", "1", "-x", str(STEPS + EVERY), "-v", str(EVERY), "--hellaswag-file", str(SMOKE)) == 0
    assert last.stat().st_ino == inode  # resumed after it, not retrained through it
    trained, before = read(out / "main.log")["trl"], read(run_dir / "main.log")["trl"]
    assert [s for s, _ in trained] == list(range(STEPS + EVERY)) and trained[:STEPS] == before
    steps = [r["step"] for r in records(out)]
    assert sorted(steps) == list(range(EVERY, STEPS + EVERY + 1, EVERY))  # each once, the later step's gone
    rescored = next(r for r in records(out) if r["step"] == STEPS)
    assert {k: rescored[k] for k in ("num_correct", "num_correct_norm", "num_total")} == {
        k: lost[k] for k in ("num_correct", "num_correct_norm", "num_total")}
    assert [s for s, _ in read(out / "main.log")["eval"]][-2:] == [STEPS, STEPS + EVERY]


def test_summary_json_records_the_run(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["workers"] == 2 and summary["device"] == "cpu"
    assert summary["tokens_seen"] == STEPS * 2 * 32 * 2
    assert summary["hellaswag"]["step"] == STEPS and summary["hellaswag"]["examples"] == 24
    assert summary["estimated_cost_usd"] is None  # CPU without --gpu-hour-usd: no price to apply
    assert summary["val_loss"] > 0 and summary["elapsed_s"] > 0
    assert summary["core"]["step"] == STEPS


def assert_core_beside_training(out: Path, mode: str, last: int) -> None:
    """CORE's records, main.log lines and summary: periodic evals on 4 examples per task, the last step's on the
    whole bundle and equal to the single-process scorer."""
    scored = [r for r in records(out, "core.jsonl") if "skipped" not in r]  # a loaded machine may skip one (tasks)
    assert scored[-1]["step"] == last and all(r["mode"] == mode for r in scored)
    assert [step for step, _ in read(out / "main.log")["core"]] == [r["step"] for r in scored]
    expected = evaluate_core(load_model(out / f"ckpt_{scored[-1]['step']:08d}"), read_bundle(CORE_SMOKE))
    assert scored[-1]["tasks"] == expected["tasks"] and scored[-1]["num_total"] == 36  # all, not 4 per task
    assert all(r["num_total"] == 12 for r in scored[:-1])  # periodic: --core-max-per-task 4 x 3 tasks
    assert json.loads((out / "summary.json").read_text())["core"]["core"] == expected["core"]


def test_core_beside_training_scores_the_last_step_on_the_whole_bundle(run_dir):
    assert_core_beside_training(run_dir, "ray tasks", STEPS)


def test_ranks_score_exactly_as_the_single_process_scorer(ray_cluster, data, tmp_path, capsys):
    out = tmp_path / "ranks"
    assert run(data, out, "-x", "20", "-v", "10", "-n", "10", "--eval-on", "ranks",
               "--hellaswag-file", str(SMOKE), *with_core(10)) == 0
    printed = capsys.readouterr().out
    assert "hellaswag: ranks: --eval-on ranks" in printed and "core: ranks: --eval-on ranks" in printed
    examples = read_jsonl(SMOKE)
    for record in records(out):
        assert record["mode"] == "ranks"
        expected = evaluate(load_model(out / f"ckpt_{record['step']:08d}"), examples)
        assert {k: record[k] for k in expected} == expected, record["step"]
    assert [r["step"] for r in records(out)] == [10, 20]
    assert [r["step"] for r in records(out, "core.jsonl")] == [10, 20]
    assert_core_beside_training(out, "ranks", 20)


def test_core_every_must_be_a_multiple_of_v(data, tmp_path, capsys):
    assert run(data, tmp_path / "bad", "-x", str(STEPS), "-v", str(EVERY), *with_core(30)) == 2
    assert "--core-every 30 must be a multiple of -v 20" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_evals_that_cannot_keep_up_never_queue_more_than_one_and_the_run_ends_after_the_last(
        ray_cluster, data, tmp_path):
    """An eval is due every 2 steps, and none can start until training has done 20 steps: the session
    cluster's 4 CPUs are 2 held by the test and 2 taken by the workers, the eval tasks need 0.5 each."""
    out = tmp_path / "backlog"
    held = HeldCPUs(2)
    releaser = threading.Thread(target=lambda: (
        wait_for(lambda: (out / "main.log").exists() and (out / "main.log").read_text().count(" trl:") >= 20,
                 "20 training steps"), held.release()), daemon=True)
    releaser.start()
    assert run(data, out, "-x", "40", "-v", "2", "--hellaswag-file", str(SMOKE)) == 0
    releaser.join()
    scored = [r for r in records(out) if "skipped" not in r]
    skipped = [r for r in records(out) if "skipped" in r]
    assert sorted(r["step"] for r in scored + skipped) == list(range(2, 41, 2))  # every due step accounted for
    # Step 2's eval was started but could not run; each newer one replaced the one waiting behind it, and
    # evals up to step 18 were due before the CPUs came free. Step 2's eval then ran, unless the run reached
    # its end first: the end cancels it in favour of the last step's.
    assert set(range(4, 17, 2)) <= {r["step"] for r in skipped} and scored[-1]["step"] == 40
    first = next(r for r in records(out) if r["step"] == 2)
    assert first.get("steps_done_at_collection", 0) >= 20 or "cancelled at the end" in first["skipped"], first
    spans = sorted((r["submitted_at"], max(end for _, end in r["task_spans"])) for r in scored)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))  # one at a time
    assert [s for s, _ in read(out / "main.log")["eval"]] == [r["step"] for r in scored]


def test_placement_on_a_cluster_that_declares_gpus(ray_cluster):
    """The session cluster's own resource view (ray.cluster_resources()) as a cluster of 4 GPUs would give it."""
    cluster = {**ray_cluster.cluster_resources(), "GPU": 4.0}
    placements = [choose_placement(*asked, cluster, 2, gpus)[0] for *asked, gpus in (
        ("auto", True, 4, 1.0), ("auto", True, 2, 1.0), ("auto", False, 2, 0.0), ("tasks", True, 4, 1.0),
        ("auto", True, 3, 1.0))]
    # every GPU held -> ranks; 2 spare -> tasks; CPU training -> tasks; asked -> tasks; 1 spare < 2 needed -> ranks
    assert placements == ["ranks", "tasks", "tasks", "tasks", "ranks"]
