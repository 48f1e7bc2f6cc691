"""Checkpoint directories `ckpt_XXXXXXXX/`: model.pt, optimizer.pt, rng.pt and state.json.

Each is written into a hidden temp directory that is renamed into place once every file is on disk, so a
directory under its final name is complete by construction and "latest" is simply the highest step.
state.json records the model config (enough to rebuild the model alone), the step, the data position and
the byte size of every file, which catches truncated copies before torch.load does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from gpt2.model import GPT, GPTConfig
from pipelines.files import atomic_write, fsync_dir

FORMAT = "raygpt2-checkpoint"
VERSION = 1
PARTS = ("model.pt", "optimizer.pt", "rng.pt")
_NAME = re.compile(r"^ckpt_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not fit this run; the message names the file."""


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"ckpt_{step:08d}"


def save_checkpoint(output_dir: str | os.PathLike, step: int, parts: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write `parts` (one object per name in PARTS) and `state` as checkpoint `step`; returns its directory."""
    final = checkpoint_dir(output_dir, step)
    partial = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in PARTS:
        with atomic_write(partial / name) as f:
            torch.save(parts[name], f)
    sizes = {name: (partial / name).stat().st_size for name in PARTS}
    record = {"format": FORMAT, "version": VERSION, "step": step, "sizes": sizes, **state}
    with atomic_write(partial / "state.json", "w") as f:
        json.dump(record, f, indent=1)
    if final.exists():  # rewritten after a resume: swap the old one out, never leave neither in place
        stale = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale)
    else:
        partial.rename(final)
    fsync_dir(final.parent)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name)[1]))


# What a run writes into -o besides its checkpoints (run.py adds the last two).
RUN_FILES = ("main.log", "hellaswag.jsonl", "summary.json")


def claim_output_dir(output_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """A new run (no -y 1) must not write over another run's log and checkpoints, which a later -y 1 would
    then mistake for its own: refuse a used -o unless --overwrite says to discard what is there."""
    root = Path(output_dir)
    if resume or not root.is_dir():
        return
    checkpoints = list_checkpoints(root)
    logs = [root / name for name in RUN_FILES if (root / name).is_file() and (root / name).stat().st_size]
    if not checkpoints and not logs:
        return
    if not overwrite:
        held = ", ".join([*(p.name for p in logs), *([f"{len(checkpoints)} checkpoint(s)"] if checkpoints else [])])
        raise CheckpointError(f"-o {root}: holds an earlier run ({held}); continue it with -y 1, or pass "
                              "--overwrite to discard it and start over")
    for path in checkpoints:
        shutil.rmtree(path)
    for path in logs:
        path.unlink()


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    for stale in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(stale)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """Validated state.json of checkpoint directory `path`."""
    path = Path(path)
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{state_file}: missing, {path} is not a checkpoint directory") from err
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{state_file}: unreadable ({err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{state_file}: not a {FORMAT} state file")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{state_file}: version {state.get('version')}, this code reads {VERSION}")
    for name in PARTS:
        part = path / name
        expected = state.get("sizes", {}).get(name)
        if not part.exists():
            raise CheckpointError(f"{part}: missing; the checkpoint is incomplete")
        actual = part.stat().st_size
        if actual != expected:
            raise CheckpointError(f"{part}: {actual} bytes on disk, state.json recorded {expected}; corrupt")
    return state


def load_part(path: str | os.PathLike, name: str, device: torch.device | str = "cpu") -> Any:
    part = Path(path) / name
    try:
        return torch.load(part, map_location=device, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, zip errors... all mean corrupt
        raise CheckpointError(f"{part}: cannot be loaded, corrupt ({type(err).__name__}: {err})") from err


def model_config(state: dict[str, Any]) -> GPTConfig:
    try:
        return GPTConfig(**state["model_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"state.json: model_config {state.get('model_config')!r} is not a GPT-2 ({err})") from err


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> GPT:
    """Rebuild the model stored in checkpoint directory `path` from the checkpoint alone."""
    state = read_state(path)
    try:
        model = GPT.from_weights(model_config(state), load_part(path, "model.pt"))
    except RuntimeError as err:
        raise CheckpointError(f"{Path(path) / 'model.pt'}: does not match its state.json config ({err})") from err
    return model.to(device)
