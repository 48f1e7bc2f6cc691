"""training/run.py on a real local Ray cluster: 2 CPU workers, ZeRO-1, a killed worker, fatal errors, -d checks."""

import json
import os
import re
import signal
import threading
from pathlib import Path

import psutil
import torch

from gpt2.mainlog import read
from gpt2.rundir import RAY_SNAPSHOT
from tests.helpers import RUN_STEPS as STEPS
from tests.helpers import ReportGate, final_weights, run_flags, wait_for
from training.launcher.launch import main


def run(data: Path, out: Path | str, *extra: str, callbacks: list | None = None) -> int:
    return main([*run_flags(data, out), "--workers", "2", *extra], callbacks)


def test_run_dir_holds_engine_checkpoints_main_log_and_ray_state(reference_run):
    assert sorted(p.name for p in reference_run.glob("ckpt_*")) == [f"ckpt_{s:08d}" for s in range(5, STEPS + 1, 5)]
    log = (reference_run / "main.log").read_text()
    assert log.count("trl:") == STEPS and log.count("tel:") == 3  # rank 0 alone writes, steps 0, 10 and 20
    registered = json.loads((reference_run / RAY_SNAPSHOT).read_text())  # Ray Train registered them in place
    assert registered["latest_checkpoint_result"]["checkpoint_dir_name"] == f"ckpt_{STEPS:08d}"


def _train_workers() -> list[psutil.Process]:
    """This session's Ray Train workers: descendants of the test process, which started the local cluster."""
    workers = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] == ["ray::RayTrainWorker"]:
                workers.append(process)
        except psutil.Error:  # exited meanwhile
            continue
    return workers


def test_killed_worker_resumes_from_the_checkpoint_and_ends_bitwise_equal(reference_run, run_shards, tmp_path):
    out = tmp_path / "killed"
    gate = ReportGate(tmp_path / "gate")  # holds the run once Ray has registered its first checkpoint
    killed: dict[str, object] = {}

    def kill_a_worker_while_held() -> None:
        latest = out / gate.wait_until_held()
        killed.update(latest=latest, inode=latest.stat().st_ino, finished=(out / f"ckpt_{STEPS:08d}").exists())
        workers = wait_for(lambda: len(_train_workers()) == 2 and _train_workers(), "the 2 train workers")
        os.kill(workers[-1].pid, signal.SIGKILL)
        gate.release()

    killer = threading.Thread(target=kill_a_worker_while_held, daemon=True)
    killer.start()
    assert run(run_shards, out, callbacks=[gate]) == 0
    killer.join()
    assert killed and killed["latest"] == out / "ckpt_00000005" and not killed["finished"]
    # The restart resumed from the registered checkpoint rather than retraining through it.
    assert killed["latest"].stat().st_ino == killed["inode"]
    resumed, straight = final_weights(out), final_weights(reference_run)
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert (out / "main.log").read_text() == (reference_run / "main.log").read_text()


def test_a_cloud_run_resumed_on_another_node_continues_its_logs_and_zero0_matches_zero1(reference_run, run_shards,
                                                                                       tmp_path):
    """-o as a URI (file:// takes the s3:// / gs:// code path): the engine writes into a private local
    staging directory, gone when the run ends, and main.log goes up with every checkpoint. The resumed run,
    like a restart on another node, stages afresh: it must continue the uploaded main.log, not replace it
    with the lines written after the resume. Without ZeRO (-z 0), through that checkpoint, the weights end
    where the reference's with ZeRO-1 (sharded Adam state) do."""
    out = tmp_path / "cloud"
    assert run(run_shards, f"file://{out}", "-z", "0", "-x", "10") == 0
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_00000005", "ckpt_00000010"]
    assert run(run_shards, f"file://{out}", "-z", "0", "-y", "1") == 0
    log = read(out / "main.log")
    assert [step for step, _ in log["trl"]] == list(range(STEPS)) and [step for step, _ in log["tel"]] == [0, 10, 20]
    zero0, zero1 = final_weights(out), final_weights(reference_run)
    for name in zero1:
        torch.testing.assert_close(zero0[name], zero1[name], atol=1e-6, rtol=1e-5, msg=name)


def test_nan_loss_stops_the_run_naming_rank_and_step_without_retrying_forever(ray_cluster, run_shards, tmp_path,
                                                                             capsys):
    out = tmp_path / "nan"
    assert run(run_shards, out, "-l", "1e30", "--max-failures", "1") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("run.py: error: rank ") and ", step 2: loss is nan" in error


def test_bad_input_a_worker_meets_is_one_line_and_exit_2(ray_cluster, run_shards, tmp_path, capsys):
    """On a cluster run.py joins, -i is globbed where the workers run, not by the driver."""
    missing = tmp_path / "elsewhere_*.bin"
    assert run(run_shards, tmp_path / "run", "-i", str(missing), "--max-failures", "0") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"run\.py: error: rank \d, setup: -i '{re.escape(str(missing))}': no files match", error)


def test_global_batch_that_does_not_divide_names_the_numbers(run_shards, tmp_path, capsys):
    assert run(run_shards, tmp_path / "bad", "--workers", "3", "-d", "1000") == 2
    assert "-d 1000 is not a positive multiple of -b 2 x -t 32 = 64 tokens" in capsys.readouterr().err
    assert run(run_shards, tmp_path / "bad", "--workers", "3", "-d", "128") == 2  # 2 micro-batches for 3 workers
    assert "--workers 3: -d 128 is 2 micro-batch(es) of -b 2 x -t 32 per step, fewer than the workers" in \
        capsys.readouterr().err
