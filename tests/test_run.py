"""training/run.py on a real local Ray cluster: 2 CPU workers, ZeRO-1, a killed worker, fatal errors, -d checks."""

import json
import os
import re
import signal
import threading
from pathlib import Path

import psutil
import pytest
import torch

from gpt2.mainlog import read
from gpt2.rundir import RAY_SNAPSHOT
from tests.helpers import ReportGate, final_weights, make_shards, wait_for
from training.launcher.launch import main

STEPS = 40
# Tiny model, 2 workers x B=2 x T=32, a checkpoint every 20 steps.
FLAGS = ["--workers", "2", "--cpus-per-worker", "1", "-e", "L2H2C64", "-b", "2", "-t", "32", "-x", str(STEPS),
         "-v", "20", "-m", "2", "-s", "0", "-n", "20", "-l", "1e-3"]


def run(data: Path, out: Path, *extra: str, callbacks: list | None = None) -> int:
    return main(["-i", str(data / "*_train_*.bin"), "-j", str(data / "*_val_*.bin"), "-o", str(out),
                 *FLAGS, *extra], callbacks)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), tokens_per_shard=20_000)


@pytest.fixture(scope="module")
def reference(ray_cluster, data, tmp_path_factory) -> Path:
    """An uninterrupted 2-worker run without ZeRO, the baseline of the other runs."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert run(data, out) == 0
    return out


def test_run_dir_holds_engine_checkpoints_main_log_and_ray_state(reference):
    assert sorted(p.name for p in reference.glob("ckpt_*")) == [f"ckpt_{s:08d}" for s in range(20, STEPS + 1, 20)]
    log = (reference / "main.log").read_text()
    assert log.count("trl:") == STEPS and log.count("tel:") == 3  # rank 0 alone writes, steps 0, 20 and 40
    registered = json.loads((reference / RAY_SNAPSHOT).read_text())  # Ray Train registered them in place
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


def test_killed_worker_resumes_from_the_checkpoint_and_ends_bitwise_equal(reference, data, tmp_path):
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
    assert run(data, out, callbacks=[gate]) == 0
    killer.join()
    assert killed and killed["latest"] == out / "ckpt_00000020" and not killed["finished"]
    # The restart resumed from the registered checkpoint rather than retraining through it.
    assert killed["latest"].stat().st_ino == killed["inode"]
    resumed, straight = final_weights(out), final_weights(reference)
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert (out / "main.log").read_text() == (reference / "main.log").read_text()


def test_a_cloud_run_resumed_on_another_node_continues_its_logs_and_zero1_matches_zero0(reference, data, tmp_path):
    """-o as a URI (file:// takes the s3:// / gs:// code path): the engine writes into a private local
    staging directory, gone when the run ends, and main.log goes up with every checkpoint. The resumed run,
    like a restart on another node, stages afresh: it must continue the uploaded main.log, not replace it
    with the lines written after the resume. With ZeRO-1 (-z 1), whose sharded Adam state goes through that
    checkpoint, the weights end where the reference's without ZeRO do."""
    out = tmp_path / "cloud"
    flags = ["-i", str(data / "*_train_*.bin"), "-j", str(data / "*_val_*.bin"), "-o", f"file://{out}", *FLAGS,
             "-z", "1"]
    assert main([*flags, "-x", "20"]) == 0
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_00000020"]
    assert main([*flags, "-x", "40", "-y", "1"]) == 0
    log = read(out / "main.log")
    assert [step for step, _ in log["trl"]] == list(range(40)) and [step for step, _ in log["tel"]] == [0, 20, 40]
    zero1, zero0 = final_weights(out), final_weights(reference)
    for name in zero0:
        torch.testing.assert_close(zero1[name], zero0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_nan_loss_stops_the_run_naming_rank_and_step_without_retrying_forever(ray_cluster, data, tmp_path, capsys):
    out = tmp_path / "nan"
    assert run(data, out, "-l", "1e30", "--max-failures", "1") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("run.py: error: rank ") and ", step 2: loss is nan" in error


def test_bad_input_a_worker_meets_is_one_line_and_exit_2(ray_cluster, data, tmp_path, capsys):
    """On a cluster run.py joins, -i is globbed where the workers run, not by the driver."""
    missing = tmp_path / "elsewhere_*.bin"
    assert run(data, tmp_path / "run", "-i", str(missing), "--max-failures", "0") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"run\.py: error: rank \d, setup: -i '{re.escape(str(missing))}': no files match", error)


def test_global_batch_that_does_not_divide_names_the_numbers(data, tmp_path, capsys):
    assert run(data, tmp_path / "bad", "--workers", "3", "-d", "1000") == 2
    assert "-d 1000 is not a positive multiple of -b 2 x -t 32 = 64 tokens" in capsys.readouterr().err
    assert run(data, tmp_path / "bad", "--workers", "3", "-d", "128") == 2  # 2 micro-batches for 3 workers
    assert "--workers 3: -d 128 is 2 micro-batch(es) of -b 2 x -t 32 per step, fewer than the workers" in \
        capsys.readouterr().err
