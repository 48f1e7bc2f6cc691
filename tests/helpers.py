"""What many test modules share: small training inputs, configs, and running a command as a user would."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2.checkpoint import load_part
from pipelines.shards import write_random_shards
from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def make_shards(directory: Path, tokens_per_shard: int = 4000, shards: int = 3, seed: int = 0) -> Path:
    """llm.c-named shards of random tokens: shard 0 is val, the rest train."""
    write_random_shards(directory, "rand", shards, tokens_per_shard, seed)
    return directory


def tiny_config(data: Path, out: Path | None, **overrides) -> TrainConfig:
    fields = {"train_data": str(data / "*_train_*.bin"), "val_data": str(data / "*_val_*.bin"),
              "output_dir": str(out) if out else None, "model": "L2H2C64", "micro_batch": 2, "seq_len": 16,
              "max_steps": 4, "val_every": 2, "val_batches": 2, "sample_every": 0, "learning_rate": 1e-3}
    fields.update(overrides)
    return TrainConfig(**fields)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_part(max(out.glob("ckpt_*")), "model.pt")


@dataclass
class Done:
    """How a command ended, as its user sees it."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(script: str, argv: list[str]) -> Done:
    """Run a command-line script (a path from the repository root, e.g. "training/train.py") in this process
    through its `main(argv)`, with stdout and stderr captured: what `python script ...` does, without a
    second interpreter's start-up and imports. Commands that start or join a Ray cluster of their own belong
    in run_subprocess."""
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            returned = module.main(argv)
            code = returned if isinstance(returned, int) else 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return Done(code, stdout.getvalue(), stderr.getvalue())


def run_subprocess(script: str, argv: list[str], timeout: float = 300, **env: str) -> Done:
    """`python script argv...` from the repository root, as a user runs it (RAY_ADDRESS unset unless given)."""
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    done = subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=environment)
    return Done(done.returncode, done.stdout, done.stderr)
