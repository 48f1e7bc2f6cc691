"""Nothing lost, nothing planted: every command that writes is run against a directory holding files that must
survive (an earlier training run and a user's own files), over its failure modes.

Each table case ends with exit status 2, one line on stderr naming the flag or file at fault, no traceback, and
the directory exactly as it was: every file byte-identical, nothing created or deleted (no lock, no temp file,
no empty directory). The commands run in this process (run_cli) unless they start or join a Ray cluster of
their own; the lock tests need a second process by nature.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from common.lock import LOCK_NAME as LOCK
from gpt2.checkpoint import CheckpointError, read_state
from gpt2.model import GPT, GPTConfig
from gpt2.rundir import MODEL_PART, RAY_SNAPSHOT, STAGING_PREFIX, RunDir, checkpoint_name, make_staging
from tests.helpers import (
    REPO,
    make_documents,
    make_shards,
    run_cli,
    run_subprocess,
    tiny_config,
    tokenize_files,
    write_parquet_files,
)
from training.train import TrainHooks, train

STEPS = 4  # the earlier run: checkpoints at 2 and 4 (-n 2), main.log
NOTHING_LISTENS = "127.0.0.1:9"
RAY_LOG_LINE = ("INFO ", "WARNING ")  # Ray's own start-up lines on stderr, when a command starts a cluster


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """Shards and a finished training run (-b 4) in one directory, made once and copied into each case."""
    root = tmp_path_factory.mktemp("earlier")
    data = make_shards(root / "shards", tokens_per_shard=2000, shards=2)
    train(tiny_config(data, root / "run", micro_batch=4, max_steps=STEPS, checkpoint_every=2))
    (root / "notes.txt").write_text("a user's own file beside the run\n")
    (root / "run" / "README.md").write_text("a user's own file inside -o\n")
    return root


def _engine(tmp: Path, *extra: str, out: str | None = None) -> list[str]:
    """The engine flags of the earlier run (-b 4), -o the earlier run unless `out`."""
    return ["-i", str(tmp / "shards" / "*_train_*.bin"), "-j", str(tmp / "shards" / "*_val_*.bin"),
            "-o", out or str(tmp / "run"), "-e", "L2H2C64", "-b", "4", "-t", "16", "-x", str(STEPS), "-v", "2",
            "-m", "2", "-s", "0", "-l", "1e-3", *extra]


def _checkpoint(tmp: Path, step: int = STEPS) -> Path:
    return tmp / "run" / checkpoint_name(step)


SHORT_EXAMPLE = {"ctx": "A man", "endings": ["sits", "runs", "eats", "sings"], "label": 0}


def _examples(tmp: Path, long: bool = False) -> Path:
    """A two-example HellaSwag jsonl; with `long`, the second one's context + ending is longer than GPT-2's 1024
    positions."""
    path = tmp / f"hellaswag_{'long' if long else 'ok'}.jsonl"
    second = {**SHORT_EXAMPLE, "ctx": "word " * 1100} if long else SHORT_EXAMPLE
    path.write_text(json.dumps(SHORT_EXAMPLE) + "\n" + json.dumps(second) + "\n")
    return path


def _earlier_export(tmp: Path) -> Path:
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text("{}")
    return tmp / "hf"


def _mismatched_checkpoint(tmp: Path) -> Path:
    """A copy of the last checkpoint whose model.pt holds another model than its state.json describes."""
    ckpt = tmp / "mismatched"
    shutil.copytree(_checkpoint(tmp), ckpt)
    torch.save(GPT(GPTConfig.from_descriptor("L1H2C64")).state_dict(), ckpt / MODEL_PART)
    state = json.loads((ckpt / "state.json").read_text())
    state["sizes"][MODEL_PART] = (ckpt / MODEL_PART).stat().st_size
    (ckpt / "state.json").write_text(json.dumps(state))
    return ckpt


def _symlinked_checkpoint(tmp: Path) -> list[str]:
    """A ckpt_* entry that is a link to a user's directory: --overwrite must not follow it, nor delete it."""
    (tmp / "mine").mkdir()
    (tmp / "mine" / "weights.txt").write_text("precious\n")
    (tmp / "run" / checkpoint_name(9)).symlink_to(tmp / "mine")
    return ["training/train.py", *_engine(tmp, "--overwrite")]


def _snapshot_without_its_checkpoint(tmp: Path) -> list[str]:
    """Ray Train's snapshot registers a checkpoint the user deleted since: -y 1 must say so before a cluster."""
    (tmp / "run" / RAY_SNAPSHOT).write_text(json.dumps({
        "checkpoint_results": [{"checkpoint_dir_name": checkpoint_name(6)}],
        "latest_checkpoint_result": {"checkpoint_dir_name": checkpoint_name(6)}}))
    return ["training/run.py", *_engine(tmp, "-y", "1", "--workers", "1")]


@dataclass
class Case:
    id: str
    setup: Callable[[Path], list[str]]  # the command line, after writing what the case needs under the directory
    names: str  # the stderr line must contain this
    subprocess: bool = False  # starts (or would join) a Ray cluster of its own
    cluster: bool = False  # in this process, connected to the session's Ray cluster (CPUs only, no GPU)


EVAL_ASKS = (("gpus-per-task", "1", "GPUs a CPU cluster lacks"), ("cpus-per-task", "64", "more CPUs than any node has"))
CASES = [
    # 1: an --overwrite that fails validation deletes nothing
    Case("1 train.py --overwrite -l nan", lambda t: ["training/train.py", *_engine(t, "--overwrite", "-l", "nan")],
         "-l"),
    Case("1 train.py --overwrite, -i matching nothing",
         lambda t: ["training/train.py", *_engine(t, "--overwrite", "-i", str(t / "none_*.bin"))], "-i"),
    Case("1 run.py --overwrite, --address where nothing listens",
         lambda t: ["training/run.py", *_engine(t, "--overwrite", "--address", NOTHING_LISTENS)], NOTHING_LISTENS,
         subprocess=True),
    # 2: a URL -o is checked as a local one
    Case("2 run.py -o file:// into a finished run",
         lambda t: ["training/run.py", *_engine(t, out=f"file://{t / 'run'}")], "holds an earlier run"),
    Case("2 train.py into a finished run", lambda t: ["training/train.py", *_engine(t)], "--overwrite"),
    # 4: exports never replace what was not named as replaceable, nor anything they read
    Case("4 export.py --llmc onto an unrelated file",
         lambda t: ["training/export.py", str(t / "run"), "--llmc", str(t / "notes.txt")], "--overwrite"),
    Case("4 export.py --llmc into the checkpoint it reads, even with --overwrite",
         lambda t: ["training/export.py", str(t / "run"), "--llmc", str(_checkpoint(t) / MODEL_PART), "--overwrite"],
         "which this command reads"),
    Case("4 export.py --hf onto an earlier export",
         lambda t: ["training/export.py", str(t / "run"), "--hf", str(_earlier_export(t))], "--overwrite"),
    # 5: a plot never lands on the run's own files
    Case("5 plot.py -o main.log, even with --overwrite",
         lambda t: ["training/plot.py", str(t / "run"), "-o", str(t / "run" / "main.log"), "--overwrite"],
         "which this command reads"),
    Case("5 plot.py -o onto an unrelated file", lambda t: ["training/plot.py", str(t / "run"), "-o",
                                                           str(t / "notes.txt")], "--overwrite"),
    # 10 / 11: what the evals will meet, checked at launch; 10: tasks asking for more than any node has would
    # wait forever (run.py's, once the training had finished)
    *[Case(f"10 run.py -h 1 eval tasks asking for {what}",
           lambda t, ask=(f"--eval-{per_task}", value): [
               "training/run.py", *_engine(t, "-y", "1", "--workers", "1", "-x", str(STEPS + 2), "-h", "1",
                                           "--hellaswag-file", str(_examples(t)), "--eval-on", "tasks", *ask)],
           f"--eval-{per_task} {value}: no node of the cluster has that many", cluster=True)
      for per_task, value, what in EVAL_ASKS],
    *[Case(f"10 hellaswag.py tasks asking for {what}",
           lambda t, ask=(f"--{per_task}", value): [
               "evals/hellaswag.py", "--checkpoint", str(t / "run"), "--file", str(_examples(t)), "--tasks", "1",
               *ask], f"--{per_task} {value}: no node of the cluster has that many", cluster=True)
      for per_task, value, what in EVAL_ASKS],
    *[Case(f"10 core.py tasks asking for {what}",
           lambda t, ask=(f"--{per_task}", value): [
               "evals/core.py", "--checkpoint", str(t / "run"), "--bundle", str(REPO / "evals" / "data" / "core_smoke"),
               "--tasks", "1", *ask], f"--{per_task} {value}: no node of the cluster has that many", cluster=True)
      for per_task, value, what in EVAL_ASKS],
    Case("11 run.py -h 1, an example longer than the block size",
         lambda t: ["training/run.py", *_engine(t, "-y", "1", "-h", "1", "--hellaswag-file", str(_examples(t, True)))],
         "example 1"),
    Case("11 hellaswag.py, an example longer than the block size",
         lambda t: ["evals/hellaswag.py", "--checkpoint", str(t / "run"), "--file", str(_examples(t, True)),
                    "--tasks", "0"], "example 1"),
    # 14: a model.pt that does not match its state.json, in one line
    Case("14 sample.py, mismatched model.pt", lambda t: ["training/sample.py", str(_mismatched_checkpoint(t))],
         "tensor(s)"),
    Case("14 export.py, mismatched model.pt",
         lambda t: ["training/export.py", str(_mismatched_checkpoint(t)), "--llmc", str(t / "m.bin")], "tensor(s)"),
    Case("14 hellaswag.py, mismatched model.pt",
         lambda t: ["evals/hellaswag.py", "--checkpoint", str(_mismatched_checkpoint(t)), "--file",
                    str(_examples(t)), "--tasks", "0"], "tensor(s)"),
    # 15: one line, not a traceback
    Case("15 run.py --address garbage", lambda t: ["training/run.py", *_engine(t, "-y", "1", "--address", "garbage")],
         "not a Ray address", subprocess=True),
    Case("15 hellaswag.py --address garbage",
         lambda t: ["evals/hellaswag.py", "--checkpoint", str(t / "run"), "--file", str(_examples(t)),
                    "--address", "garbage"], "not a Ray address", subprocess=True),
    Case("15 train.py -o under /proc", lambda t: ["training/train.py", *_engine(t, out="/proc/raygpt2-run")],
         "/proc/raygpt2-run"),
    Case("15 export.py --hf under /proc", lambda t: ["training/export.py", str(t / "run"), "--hf",
                                                     "/proc/raygpt2-hf"], "cannot write"),
    Case("15 train.py --overwrite with a symlinked ckpt_* entry", _symlinked_checkpoint, "symbolic link"),
    Case("15 run.py -y 1 after the checkpoint directory was deleted", _snapshot_without_its_checkpoint,
         checkpoint_name(6)),
    Case("15 run.py -y 1 -b 2 on a -b 4 run",
         lambda t: ["training/run.py", *_engine(t, "-y", "1", "--workers", "1"), "-b", "2"], "-d 64 -> 32"),
    Case("15 run.py --cpus-per-worker -1", lambda t: ["training/run.py", *_engine(t, "--cpus-per-worker", "-1")],
         "--cpus-per-worker"),
    Case("15 run.py --cpus-per-worker 0", lambda t: ["training/run.py", *_engine(t, "--cpus-per-worker", "0")],
         "--cpus-per-worker"),
    Case("15 run.py --report-interval nan", lambda t: ["training/run.py", *_engine(t, "--report-interval", "nan")],
         "--report-interval"),
    Case("15 hellaswag.py --cpus-per-task inf",
         lambda t: ["evals/hellaswag.py", "--checkpoint", str(t / "run"), "--cpus-per-task", "inf"],
         "--cpus-per-task"),
]


def _tree(root: Path) -> dict[str, str]:
    """Every path under `root`, directories and links included, with what it holds."""
    def what(p: Path) -> str:
        if p.is_symlink():
            return f"-> {os.readlink(p)}"
        return "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return {str(p.relative_to(root)): what(p) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_refused_command_changes_nothing(case, earlier, tmp_path, request):
    if case.cluster:
        request.getfixturevalue("ray_cluster")
    shutil.copytree(earlier, tmp_path, dirs_exist_ok=True, symlinks=True)
    argv = case.setup(tmp_path)
    before = _tree(tmp_path)
    done = (run_subprocess if case.subprocess else run_cli)(argv[0], argv[1:])
    lines = [line for line in done.stderr.strip().splitlines() if not any(t in line for t in RAY_LOG_LINE)]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-3000:]
    assert case.names in lines[0], lines
    assert _tree(tmp_path) == before


# ---- the lock: one live writer per run directory ---------------------------------------------------------------
HOLD_LOCK = """
import sys
from gpt2.rundir import RunDir
with RunDir(sys.argv[1]).claimed(resume=False, overwrite=False):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_live_writer_is_refused_and_a_dead_ones_lock_is_taken_over(earlier, tmp_path):
    """6: two train.py runs into one -o at once: the second is refused while the first lives; once the first
    is killed (its lock left behind), the next run takes the stale lock over and trains."""
    shutil.copytree(earlier / "shards", tmp_path / "shards")
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = run_cli("training/train.py", _engine(tmp_path, out=str(out)))
        assert refused.returncode == 2 and f"pid {holder.pid}" in refused.stderr, refused.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == holder.pid  # killed: it could not clean up
    done = run_cli("training/train.py", _engine(tmp_path, out=str(out)))
    assert done.returncode == 0, done.stderr
    assert "stale lock" in done.stdout and not (out / LOCK).exists()
    assert read_state(out / checkpoint_name(STEPS))["step"] == STEPS


def test_a_lock_is_taken_once_and_released(tmp_path):
    run = RunDir(f"file://{tmp_path / 'run'}")
    with run.claimed(resume=False, overwrite=False):
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(ValueError, match="in use by a live run"):
            RunDir(str(tmp_path / "run")).check(resume=True, overwrite=False)
    assert not (tmp_path / "run" / LOCK).exists()


HOLD_TOKENIZE_OUTPUT = """
import sys
from pipelines.workdir import OutputDir, claimed
with claimed(OutputDir(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_live_tokenize_jobs_output_takes_no_second_job_and_is_not_trained_on(ray_cluster, tmp_path):
    """tokenize.py twice into one -o (the same job submitted again while the first runs): the second is refused
    while the first lives, even with --overwrite, and the first one's files stay; a dead one's lock is taken
    over. Before, the second deleted the first one's partial writes, or with --overwrite its shards. Training
    on those shards meanwhile is refused too: it would take the few written so far."""
    pattern = write_parquet_files(tmp_path / "raw", make_documents(300, seed=3), files=1)
    out = tmp_path / "shards"
    tokenize_files(pattern, out)
    before = _tree(out)
    flags = ["--input", pattern, "-o", str(out), "--shard-size", "3000", "--unit-bytes", "5000"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_TOKENIZE_OUTPUT, str(out)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--overwrite"]):
            refused = run_cli("pipelines/tokenize.py", [*flags, *extra])
            assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
            assert f"-o {out}: in use by a live job (pid {holder.pid} on " in refused.stderr, refused.stderr
            assert {name: what for name, what in _tree(out).items() if name != LOCK} == before
        early = run_cli("training/train.py", ["-i", str(out / "*_train_*.bin"), "-o", str(tmp_path / "run"),
                                              "-e", "L2H2C64", "-b", "1", "-t", "16", "-x", "1"])
        assert early.returncode == 2 and early.stderr.count("\n") == 1, early.stderr
        assert f"{out} is still being written by a live job (pid {holder.pid} on " in early.stderr, early.stderr
        assert not (tmp_path / "run").exists()
    finally:
        holder.kill()
        holder.wait()
    again = run_cli("pipelines/tokenize.py", flags)
    assert again.returncode == 0 and "stale lock" in again.stdout and "already complete" in again.stdout, again
    assert _tree(out) == before


# ---- --overwrite discards only the product's files -------------------------------------------------------------
def test_overwrite_discards_the_earlier_run_and_keeps_the_users_files(earlier, tmp_path):
    shutil.copytree(earlier, tmp_path, dirs_exist_ok=True)
    (tmp_path / "run" / "main.png").write_bytes(b"an old plot")
    done = run_cli("training/train.py", _engine(tmp_path, "--overwrite", "-x", "2", "-n", "0"))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["README.md", checkpoint_name(2), "main.log"]  # ckpt_4 and the plot were the earlier run's
    assert (tmp_path / "run" / "README.md").read_text() == "a user's own file inside -o\n"


# ---- a checkpoint write that fails mid-run -----------------------------------------------------------------------
def test_a_failed_checkpoint_write_names_the_last_good_one(earlier, tmp_path):
    """15: the disk fills up (a file-size limit: writes fail with EFBIG) after the first checkpoint."""
    out = tmp_path / "run"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails rather than the process dying

    def fill_the_disk(metrics: dict) -> None:
        if metrics["step"] == 3 and "loss" in metrics:
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))

    try:
        with pytest.raises(CheckpointError) as raised:
            train(tiny_config(earlier / "shards", out, micro_batch=4, max_steps=STEPS, checkpoint_every=2),
                  TrainHooks(on_step=fill_the_disk))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    message = str(raised.value)
    assert checkpoint_name(4) in message and f"the last good checkpoint is {out / checkpoint_name(2)}" in message
    assert "\n" not in message
    assert sorted(p.name for p in out.iterdir()) == [checkpoint_name(2), "main.log"]  # no partial left
    assert read_state(out / checkpoint_name(2))["step"] == 2


# ---- a URL -o's staging directory ----------------------------------------------------------------------------
def test_staging_is_private_and_unique():
    """9: a predictable staging path let another user plant a checkpoint there that a -y 1 resumed from."""
    first, second = make_staging(), make_staging()
    try:
        assert first != second
        assert stat.S_IMODE(first.stat().st_mode) == 0o700 and list(first.iterdir()) == []
    finally:
        first.rmdir()
        second.rmdir()


def test_a_url_run_never_resumes_from_a_checkpoint_planted_in_the_old_staging_path(ray_cluster, earlier, tmp_path):
    """9: run.py -o file://EMPTY/r15 -y 1 resumed from $TMPDIR/raygpt2/r15/ckpt_00000015, planted there. The
    session cluster's workers have this process's temp directory; the run's name is unique to this test."""
    tmp = Path(tempfile.gettempdir())
    name = f"r15-{uuid.uuid4().hex[:12]}"
    planted = tmp / "raygpt2" / name / checkpoint_name(15)
    shutil.copytree(_checkpoint(earlier), planted)
    staging_before = set(tmp.glob(f"{STAGING_PREFIX}*"))
    try:
        before = _tree(planted.parent)
        out = tmp_path / "empty" / name
        done = run_cli("training/run.py", [*_engine(earlier, "-y", "1", "-x", "2", "--workers", "1",
                                                    out=f"file://{out}")])
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resumed from" not in done.stdout
        assert read_state(out / checkpoint_name(2))["step"] == 2 and (out / "main.log").read_text().startswith("s:0 ")
        assert _tree(planted.parent) == before  # the planted directory untouched
        assert set(tmp.glob(f"{STAGING_PREFIX}*")) <= staging_before  # and this run's staging removed
    finally:
        shutil.rmtree(planted.parent)


# ---- 12: an empty XDG_CACHE_HOME means unset -------------------------------------------------------------------
def test_an_empty_xdg_cache_home_does_not_cache_into_the_working_directory(earlier, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    done = run_cli("evals/hellaswag.py", ["--checkpoint", str(earlier / "run"), "--tasks", "0",
                                          "--url", f"file://{tmp_path}/no-such-hellaswag.jsonl"])
    assert done.returncode == 2 and "cannot download" in done.stderr, done.stderr
    assert not (tmp_path / "raygpt2").exists()
