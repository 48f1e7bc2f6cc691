"""Whether a checkpoint may be continued under the flags given: the same run (model, optimisation, tokens per
step), or another one that must start in its own -o. The engine checks it when it resumes; the Ray launcher
before it starts a cluster."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpt2.checkpoint import CheckpointError, model_config
from gpt2.model import GPTConfig
from training.config import RUN_DEFINING, TrainConfig


def check_same_run(path: Path | str, state: dict[str, Any], config: TrainConfig, model_shape: GPTConfig,
                   world: int) -> str | None:
    """Refuse to continue checkpoint `path` (its state.json `state`) under flags that would make it another run,
    saying what differs; returns a note when only -x changed. The launcher calls it before it starts a cluster."""
    if model_config(state) != model_shape:
        raise CheckpointError(f"{path}: holds model {state['model_config']}, but -e {config.model} "
                              f"is {model_shape.to_dict()}")
    saved = TrainConfig(**{k: v for k, v in state["train_config"].items() if k in TrainConfig.__dataclass_fields__})
    current = asdict(config)
    differs = [f"{flag} {getattr(saved, name)} -> {current[name]}" for name, flag in RUN_DEFINING.items()
               if name != "model" and getattr(saved, name) != current[name]]
    saved_tokens = saved.tokens_per_step(state["world_size"])
    if saved_tokens != config.tokens_per_step(world):
        differs.append(f"-d {saved_tokens} -> {config.tokens_per_step(world)} tokens per step")
    if differs:
        raise CheckpointError(f"{path}: written by a run with other flags ({', '.join(differs)}); resume with "
                              "the same flags, or start a new run in another -o")
    if saved.max_steps != config.max_steps:
        return f"-x {saved.max_steps} -> {config.max_steps}: the learning-rate schedule now runs to the new -x"
    return None
