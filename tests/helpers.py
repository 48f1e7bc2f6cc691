"""What many test modules share: small training inputs, configs, and running a command as a user would."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.train import UserCallback

from gpt2.checkpoint import load_part, save_checkpoint
from gpt2.model import GPT, GPTConfig
from pipelines.shards import read_shard, write_random_shards
from pipelines.tokenize import TokenizeConfig, tokenize
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding
from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
HELLASWAG_WORDS = ("the man woman dog ball runs jumps kitchen slowly quickly then picks up puts down a an water bike "
         "rope hair paint brush knife cuts onto floor table smiles talks camera shows").split()


def file_sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256, as hex (what write_shard returns and the tokenize manifest records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def make_shards(directory: Path, tokens_per_shard: int = 4000, shards: int = 3, seed: int = 0) -> Path:
    """llm.c-named shards of random tokens: shard 0 is val, the rest train."""
    write_random_shards(directory, "rand", shards, tokens_per_shard, seed)
    return directory


# The launcher tests' runs (test_run, test_elastic), compared with one uninterrupted run (conftest's
# `reference_run`): 2 CPU workers, -d 256 = 4 micro-batches of -b 2 x -t 32 (2 micro-steps each on 2 workers,
# 2/1/1 on 3), ZeRO-1, val every 10 steps and a checkpoint every 5, 20 steps.
RUN_STEPS, RUN_EVERY = 20, 5
RUN_FLAGS = ["--cpus-per-worker", "1", "-e", "L2H2C64", "-b", "2", "-t", "32", "-d", "256", "-v", "10", "-m", "2",
             "-s", "0", "-n", str(RUN_EVERY), "-l", "1e-3", "-z", "1", "-x", str(RUN_STEPS)]


def run_flags(data: Path, out: Path | str, *extra: str) -> list[str]:
    """run.py's flags for a run of `data` (make_shards) into `out`; `extra` flags win over RUN_FLAGS."""
    return ["-i", str(data / "*_train_*.bin"), "-j", str(data / "*_val_*.bin"), "-o", str(out), *RUN_FLAGS, *extra]


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


def wait_for(condition: Callable[[], object], what: str, limit_s: float = 600) -> object:
    """Wait for an event the product makes visible (a file, a record), checking every 20 ms; `limit_s` only
    stops a hung run from hanging the suite, it is no guess at how fast this machine is."""
    deadline = time.monotonic() + limit_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {limit_s:.0f} s"
        time.sleep(0.02)
    return found


class ReportGate(UserCallback):
    """A ray.train.UserCallback, run by Ray Train's controller, that holds a training run at its first report
    (with `checkpoint=True`: its first report carrying a checkpoint, which Ray has registered by then; with
    `name`: the report carrying that checkpoint) until the test releases it. Ray Train's workers block at
    their next report until the controller takes it, so a held run cannot finish, nor register another
    checkpoint, while the test kills what it kills. Files in `directory` are the signals, so a run driven
    from another process is held the same way."""

    def __init__(self, directory: Path, checkpoint: bool = True, name: str | None = None):
        self.directory, self.checkpoint, self.name = Path(directory), checkpoint or bool(name), name

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if self.reached() is not None or (self.checkpoint and checkpoint is None):
            return
        if self.name and Path(checkpoint.path).name != self.name:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.directory / "reached.partial"
        temporary.write_text(Path(checkpoint.path).name if checkpoint else "")
        temporary.rename(self.directory / "reached")
        wait_for(lambda: (self.directory / "release").exists(), "the test to release the run")

    def reached(self) -> str | None:
        """The held report's checkpoint directory name ("" without one) once the run is held."""
        path = self.directory / "reached"
        return path.read_text() if path.exists() else None

    def wait_until_held(self) -> str:
        wait_for(lambda: self.reached() is not None, "the run to be held at its report")
        return self.reached()

    def release(self) -> None:
        (self.directory / "release").touch()


class HeldCPUs:
    """An actor holding `cpus` of the connected cluster's CPUs until released: Ray tasks that need them wait,
    so a test decides when they may run instead of guessing how long they take."""

    def __init__(self, cpus: float):
        import ray

        @ray.remote(num_cpus=cpus)
        class Holder:
            def ready(self) -> bool:
                return True

        self.actor = Holder.remote()
        ray.get(self.actor.ready.remote())  # placed: the CPUs are taken

    def release(self) -> None:
        import ray

        ray.kill(self.actor)


def hellaswag_records(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    sentence = lambda low, high: " ".join(rng.choice(HELLASWAG_WORDS, rng.integers(low, high)))  # noqa: E731
    return [{"ind": i, "activity_label": "Synthetic", "ctx": sentence(3, 14).capitalize() + ".",
             "endings": [sentence(1, 9) + "." for _ in range(4)], "label": int(rng.integers(0, 4)), "split": "val"}
            for i in range(count)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


DOCUMENT_WORDS = ("the model reads tokens from shards and learns to predict the next one while the optimizer "
         "updates every weight a little after each batch of text drawn from educational web pages").split()


def make_documents(count: int, seed: int, mean_words: int = 60) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        n_words = int(rng.integers(1, 2 * mean_words))
        text = " ".join(rng.choice(DOCUMENT_WORDS, size=n_words)) + ("." if i % 3 else "\n\nNext paragraph here.")
        docs.append({"text": text, "int_score": int(rng.integers(1, 6)), "score": float(rng.uniform(1, 5)),
                     "language_score": float(rng.uniform(0.5, 1.0))})
    docs[5]["text"] = "   \n "  # whitespace only
    docs[7]["text"] = docs[3]["text"]  # exact duplicates, one in another file
    docs[250]["text"] = docs[3]["text"]
    return docs


def write_parquet_files(directory, docs, files=3, row_group_size=40):
    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(docs) // files)
    for i in range(files):
        table = pa.Table.from_pylist(docs[i * per_file:(i + 1) * per_file])
        pq.write_table(table, directory / f"part_{i:03d}.parquet", row_group_size=row_group_size)
    return str(directory / "*.parquet")


def expected_stream(docs) -> np.ndarray:
    encode = gpt2_encoding().encode_ordinary
    return np.array([t for d in docs for t in [EOT_TOKEN, *encode(d["text"])]], dtype=np.uint16)


def llmc_shard(tokens: np.ndarray) -> bytes:
    """An llm.c shard written independently of pipelines.shards: 256 int32 header, then uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, tokens.size)
    return header.tobytes() + tokens.astype("<u2").tobytes()


def shard_paths(manifest, out_dir):
    return [out_dir / s["name"] for s in manifest["shards"]]


def all_tokens(manifest, out_dir) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p)) for p in shard_paths(manifest, out_dir)])


def sha256s(manifest) -> list[str]:
    return [s["sha256"] for s in manifest["shards"]]


def tokenize_files(pattern, out_dir, **overrides) -> dict:
    """tokenize.py's job on `pattern` with small units and shards, in this process (on the session cluster)."""
    # small units: every 40-row row group (~16 kB of text) is cut in parts, and units cross files
    settings = {"source": "files", "input": pattern, "output_dir": out_dir, "shard_size": 3000, "num_workers": 2,
                "batch_size": 64, "unit_bytes": 5000, **overrides}
    return tokenize(TokenizeConfig(**settings))


def random_model(seed: int = 0, config: GPTConfig | None = None) -> GPT:
    """A tiny GPT (L2H2C64 by default) whose biases are random too, so endings get clearly different losses."""
    model = GPT(config or GPTConfig.from_descriptor("L2H2C64"), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def save_model(model: GPT, out: Path, step: int = 1) -> Path:
    parts = {"model.pt": model.state_dict(), "optimizer.pt": {}, "rng.pt": {}}
    return save_checkpoint(out, step, parts, {"model_config": model.config.to_dict()})
