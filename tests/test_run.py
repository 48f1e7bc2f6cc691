"""training/run.py on a real local Ray cluster: 2 CPU workers, ZeRO-1, a killed worker, fatal errors, -d checks."""

import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from gpt2.mainlog import read
from gpt2.rundir import RAY_SNAPSHOT
from tests.helpers import final_weights, make_shards
from training.run import main

STEPS = 100
# Tiny model, 2 workers x B=2 x T=32 (~70 ms a step here), a checkpoint every 20 steps: Ray registers one
# within a health check (2 s) of its report, well before the run ends, so there is time to kill a worker.
FLAGS = ["--workers", "2", "--cpus-per-worker", "1", "-e", "L2H2C64", "-b", "2", "-t", "32", "-x", str(STEPS),
         "-v", "50", "-m", "2", "-s", "0", "-n", "20", "-l", "1e-3"]


def run(data: Path, out: Path, *extra: str) -> int:
    return main(["-i", str(data / "*_train_*.bin"), "-j", str(data / "*_val_*.bin"), "-o", str(out),
                 *FLAGS, *extra])


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
    assert log.count("trl:") == STEPS and log.count("tel:") == 3  # rank 0 alone writes, steps 0, 50 and 100
    registered = json.loads((reference / RAY_SNAPSHOT).read_text())  # Ray Train registered them in place
    assert registered["latest_checkpoint_result"]["checkpoint_dir_name"] == f"ckpt_{STEPS:08d}"


def test_resume_flag_continues_from_the_latest_checkpoint_ray_registered(reference, data, tmp_path):
    out = tmp_path / "continued"
    shutil.copytree(reference, out)  # Ray Train's snapshot names checkpoints relative to the run directory
    last = out / f"ckpt_{STEPS:08d}"
    inode = last.stat().st_ino
    assert run(data, out, "-x", str(STEPS + 20), "-y", "1") == 0
    assert last.stat().st_ino == inode  # resumed after it, not retrained through it
    log = (out / "main.log").read_text()
    assert log.count("trl:") == STEPS + 20 and log.startswith((reference / "main.log").read_text())


def test_zero1_matches_zero0(reference, data, tmp_path):
    assert run(data, tmp_path / "zero1", "-z", "1") == 0
    zero1, zero0 = final_weights(tmp_path / "zero1"), final_weights(reference)
    for name in zero0:
        torch.testing.assert_close(zero1[name], zero0[name], atol=1e-6, rtol=1e-5, msg=name)


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


def _latest_registered(out: Path) -> str | None:
    """The checkpoint directory Ray Train last registered for the run in `out`, if any yet."""
    try:
        snapshot = json.loads((out / RAY_SNAPSHOT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return None
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


def test_killed_worker_resumes_from_the_checkpoint_and_ends_bitwise_equal(reference, data, tmp_path):
    out = tmp_path / "killed"
    killed: dict[str, object] = {}

    def kill_after_first_registered_checkpoint() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            registered = _latest_registered(out)
            workers = _train_workers()
            if registered and len(workers) == 2:
                # A later checkpoint may be on disk but not yet registered: the restart retrains through that one.
                latest = out / registered
                killed.update(latest=latest, inode=latest.stat().st_ino, finished=(out / f"ckpt_{STEPS:08d}").exists())
                os.kill(workers[-1].pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_registered_checkpoint, daemon=True)
    killer.start()
    assert run(data, out) == 0
    killer.join()
    assert killed and not killed["finished"], "the worker was not killed while the run was in progress"
    # The restart resumed from the registered checkpoint rather than retraining through it.
    assert killed["latest"].stat().st_ino == killed["inode"]
    resumed, straight = final_weights(out), final_weights(reference)
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert (out / "main.log").read_text() == (reference / "main.log").read_text()


def test_a_cloud_run_resumed_on_another_node_continues_its_logs(ray_cluster, data, tmp_path):
    """-o as a URI (file:// takes the s3:// / gs:// code path): the engine writes into a local staging
    directory and main.log goes up with every checkpoint. A restart on a node without that directory must
    continue the uploaded main.log, not replace it with the lines written after the resume."""
    out = tmp_path / "cloud"
    flags = ["-i", str(data / "*_train_*.bin"), "-j", str(data / "*_val_*.bin"), "-o", f"file://{out}", *FLAGS]
    assert main([*flags, "-x", "40"]) == 0
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_00000020", "ckpt_00000040"]
    shutil.rmtree(Path(tempfile.gettempdir()) / "raygpt2" / out.name)  # as on another node
    assert main([*flags, "-x", "60", "-y", "1"]) == 0
    log = read(out / "main.log")
    assert [step for step, _ in log["trl"]] == list(range(60)) and [step for step, _ in log["tel"]] == [0, 40, 50, 60]


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
