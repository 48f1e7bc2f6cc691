"""Checkpoint directories `ckpt_XXXXXXXX/`: model.pt, optimizer.pt, rng.pt and state.json.

Each is written into a hidden temp directory (gpt2/rundir.py names it and the checkpoint) that is renamed
into place once every file is on disk, so a directory under its final name is complete by construction and
"latest" is simply the highest step.
state.json records the model config (enough to rebuild the model alone), the step, the data position and
the byte size of every file, which catches truncated copies before torch.load does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from common.files import atomic_write, fsync_dir
from gpt2.model import GPT, GPTConfig
from gpt2.rundir import CHECKPOINT_PARTS as PARTS
from gpt2.rundir import CHECKPOINT_STATE, MODEL_PART, checkpoint_dir, checkpoint_temp_dir, list_checkpoints

FORMAT = "raygpt2-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not fit this run; the message names the file."""


def save_checkpoint(output_dir: str | os.PathLike, step: int, parts: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write `parts` (one object per name in PARTS) and `state` as checkpoint `step`; returns its directory.
    A write that fails (disk full, read-only) leaves the checkpoints there were and raises CheckpointError
    naming the last good one."""
    final = checkpoint_dir(output_dir, step)
    partial = checkpoint_temp_dir(final, "partial")
    try:
        partial.mkdir(parents=True)
        for name in PARTS:
            with atomic_write(partial / name) as f:
                torch.save(parts[name], f)
        sizes = {name: (partial / name).stat().st_size for name in PARTS}
        record = {"format": FORMAT, "version": VERSION, "step": step, "sizes": sizes, **state}
        with atomic_write(partial / CHECKPOINT_STATE, "w") as f:
            json.dump(record, f, indent=1)
        if final.exists():  # rewritten after a resume: swap the old one out, never leave neither in place
            stale = checkpoint_temp_dir(final, "old")
            final.rename(stale)
            partial.rename(final)
            shutil.rmtree(stale)
        else:
            partial.rename(final)
        fsync_dir(final.parent)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(partial, ignore_errors=True)
        good = [p for p in list_checkpoints(output_dir) if p != final]
        last = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written before it"
        raise CheckpointError(f"{final}: cannot be written ({type(err).__name__}: {err}); {last}") from err
    return final


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    for stale in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(stale)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """Validated state.json of checkpoint directory `path`."""
    path = Path(path)
    state_file = path / CHECKPOINT_STATE
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
        raise CheckpointError(f"{CHECKPOINT_STATE}: model_config {state.get('model_config')!r} is not a GPT-2 "
                              f"({err})") from err


def weights_mismatch(model: GPT, weights: dict[str, torch.Tensor]) -> str:
    """In one line, how `weights` differ from `model`'s parameters: counts and a first example of each kind
    (load_state_dict's own message lists every key, dozens of lines for a GPT-2)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in weights.items()}
    kinds = {"missing": sorted(expected.keys() - got.keys()), "unexpected": sorted(got.keys() - expected.keys()),
             "of another shape": sorted(n for n in expected.keys() & got.keys() if expected[n] != got[n])}
    return ", ".join(f"{len(names)} tensor(s) {kind} (e.g. {names[0]})" for kind, names in kinds.items() if names)


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> GPT:
    """Rebuild the model stored in checkpoint directory `path` from the checkpoint alone."""
    state = read_state(path)
    config, weights = model_config(state), load_part(path, MODEL_PART)
    with torch.device("meta"):
        shape = GPT(config)
    if mismatch := weights_mismatch(shape, weights):
        raise CheckpointError(f"{Path(path) / MODEL_PART}: does not match its {CHECKPOINT_STATE} config "
                              f"{config.to_dict()}: {mismatch}")
    return GPT.from_weights(config, weights).to(device)
