"""The models HellaSwag scores, all loaded as our `GPT`: checkpoint directories, llm.c model `.bin` files,
and Hugging Face GPT-2 directories (e.g. from training/export.py), whose weights are mapped back onto GPT.

One model class means one scoring path: the shared-context forward in evals/scoring.py needs the blocks'
layers, which a transformers model would hide behind its own forward.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from training.checkpoint import CheckpointError, load_model
from training.export import LlmcFormatError, read_llmc
from training.model import GPT, GPT2_VOCAB, PADDED_VOCAB, GPTConfig

# transformers GPT2LMHeadModel block tensor names for ours, and whether its Conv1D stores them transposed.
_HF_BLOCK_NAMES = {"ln_1": ("ln_1", False), "c_attn": ("attn.c_attn", True), "attn_proj": ("attn.c_proj", True),
                   "ln_2": ("ln_2", False), "c_fc": ("mlp.c_fc", True), "mlp_proj": ("mlp.c_proj", True)}


class ModelSourceError(ValueError):
    """A model path that is none of the formats we read, or a model we cannot score; the message names it."""


def check_model_source(path: str | os.PathLike) -> None:
    """Raise ModelSourceError unless `path` looks like one of the formats we load (cheap: loads nothing)."""
    path = Path(path)
    if not ((path / "state.json").is_file() or (path / "config.json").is_file() or path.is_file()):
        raise ModelSourceError(f"--checkpoint {path}: not a checkpoint directory (state.json), a Hugging Face "
                               "GPT-2 directory (config.json) or an llm.c model .bin")


def gpt_from_hf(hf: torch.nn.Module, source: str = "model") -> GPT:
    """Our GPT holding a transformers GPT2LMHeadModel's weights (vocab padded, Conv1D weights transposed)."""
    c = hf.config
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh") or c.layer_norm_epsilon != 1e-5:
        raise ModelSourceError(f"{source}: activation {c.activation_function!r} / layer norm eps "
                               f"{c.layer_norm_epsilon}; GPT-2 scoring expects tanh GELU and 1e-5")
    padded = PADDED_VOCAB if c.vocab_size == GPT2_VOCAB else -(-c.vocab_size // 128) * 128
    model = GPT(GPTConfig(c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size, padded))
    theirs = hf.state_dict()
    with torch.no_grad():
        model.wte.weight.zero_()
        model.wte.weight[: c.vocab_size] = theirs["transformer.wte.weight"]
        model.wpe.weight.copy_(theirs["transformer.wpe.weight"])
        model.ln_f.weight.copy_(theirs["transformer.ln_f.weight"])
        model.ln_f.bias.copy_(theirs["transformer.ln_f.bias"])
        for layer, block in enumerate(model.h):
            for ours, (name, transposed) in _HF_BLOCK_NAMES.items():
                module, prefix = getattr(block, ours), f"transformer.h.{layer}.{name}"
                weight = theirs[f"{prefix}.weight"]
                module.weight.copy_(weight.t() if transposed else weight)
                module.bias.copy_(theirs[f"{prefix}.bias"])
    return model


def load_gpt(path: str | os.PathLike, device: torch.device | str = "cpu") -> GPT:
    """Load a checkpoint dir (state.json), a Hugging Face GPT-2 dir (config.json) or an llm.c model .bin,
    in eval mode on `device`."""
    check_model_source(path)
    path = Path(path)
    try:
        if (path / "state.json").is_file():
            model = load_model(path)
        elif (path / "config.json").is_file():
            from transformers import GPT2LMHeadModel  # only HF directories need transformers

            model = gpt_from_hf(GPT2LMHeadModel.from_pretrained(path, local_files_only=True), str(path))
        else:
            model = read_llmc(path)
    except (CheckpointError, LlmcFormatError, OSError) as err:
        raise ModelSourceError(str(err)) from err
    return model.to(device).eval()
