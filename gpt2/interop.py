"""GPT-2 in other people's formats: llm.c's `model_XXXXXXXX.bin` and Hugging Face `transformers` GPT-2.

llm.c layout (train_gpt2.py write_model): 256 int32 header — magic 20240326, version (3 = fp32, 5 = bf16),
max T, vocab, layers, heads, channels, padded vocab — then every parameter in llm.c's order: wte (padded),
wpe, then for each kind of block tensor all layers in turn, then ln_f. Linear weights are (out, in) as in
PyTorch; Hugging Face's Conv1D stores them transposed, and its vocab is unpadded.

`load_gpt` opens any model a user may point a tool at (one of our checkpoint directories, an llm.c file or a
Hugging Face directory) as our `GPT`, so sampling, export and evals have one model class and one forward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_write
from gpt2.checkpoint import CheckpointError, load_model, model_config, read_state
from gpt2.model import GPT, GPT2_VOCAB, PADDED_VOCAB, GPTConfig
from gpt2.rundir import CHECKPOINT_STATE, list_checkpoints

LLMC_MAGIC = 20240326
LLMC_VERSIONS = {3: torch.float32, 5: torch.bfloat16}
HEADER_INTS = 256
HF_CONFIG = "config.json"  # what makes a directory a Hugging Face model

_BLOCK_ORDER = ("ln_1.weight", "ln_1.bias", "c_attn.weight", "c_attn.bias", "attn_proj.weight", "attn_proj.bias",
                "ln_2.weight", "ln_2.bias", "c_fc.weight", "c_fc.bias", "mlp_proj.weight", "mlp_proj.bias")
# Our block tensor names -> transformers GPT2LMHeadModel's, and whether its Conv1D stores them transposed.
_HF_BLOCK_NAMES = {"ln_1": ("ln_1", False), "c_attn": ("attn.c_attn", True), "attn_proj": ("attn.c_proj", True),
                   "ln_2": ("ln_2", False), "c_fc": ("mlp.c_fc", True), "mlp_proj": ("mlp.c_proj", True)}
_HF_TOP_NAMES = {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
                 "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"}


class LlmcFormatError(ValueError):
    """A file that is not a readable llm.c model file; the message names it."""


class ModelSourceError(ValueError):
    """A model path that is none of the formats we read, or a model we cannot use; the message names it."""


# ---- llm.c ------------------------------------------------------------------------------------------------
def llmc_order(config: GPTConfig) -> list[str]:
    """Our parameter names in the order llm.c stores them."""
    blocks = [f"h.{layer}.{name}" for name in _BLOCK_ORDER for layer in range(config.n_layer)]
    return ["wte.weight", "wpe.weight", *blocks, "ln_f.weight", "ln_f.bias"]


def write_llmc(model: GPT, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
    """Write `model` as an llm.c model file (fp32 = version 3, bf16 = version 5), atomically."""
    version = {v: k for k, v in LLMC_VERSIONS.items()}[dtype]
    c = model.config
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = (LLMC_MAGIC, version, c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd,
                  c.padded_vocab_size)
    params = dict(model.named_parameters())
    with atomic_write(path) as f:
        f.write(header.tobytes())
        for name in llmc_order(c):
            tensor = params[name].detach().to("cpu", dtype).contiguous()
            raw = tensor.view(torch.int16) if dtype == torch.bfloat16 else tensor
            f.write(raw.numpy().tobytes())


def read_llmc_header(path: str | os.PathLike) -> tuple[GPTConfig, int]:
    """The model shape an llm.c model file holds and the bytes per value (4 = fp32, 2 = bf16)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw_header = f.read(HEADER_INTS * 4)
    except OSError as err:
        raise LlmcFormatError(f"{path}: cannot read llm.c model file ({err.strerror})") from err
    if len(raw_header) < HEADER_INTS * 4:
        raise LlmcFormatError(f"{path}: shorter than llm.c's {HEADER_INTS * 4}-byte header")
    header = np.frombuffer(raw_header, dtype="<i4")
    if header[0] != LLMC_MAGIC:
        raise LlmcFormatError(f"{path}: bad magic {header[0]}, expected {LLMC_MAGIC} (not an llm.c model file)")
    if header[1] not in LLMC_VERSIONS:
        raise LlmcFormatError(f"{path}: unsupported version {header[1]}, expected 3 (fp32) or 5 (bf16)")
    itemsize = 2 if LLMC_VERSIONS[int(header[1])] == torch.bfloat16 else 4
    block_size, vocab, n_layer, n_head, n_embd, padded_vocab = (int(v) for v in header[2:8])
    try:
        return GPTConfig(n_layer, n_head, n_embd, block_size, vocab, padded_vocab), itemsize
    except ValueError as err:
        raise LlmcFormatError(f"{path}: header describes no valid GPT-2 ({err})") from err


def read_llmc(path: str | os.PathLike, recompute: int = 0) -> GPT:
    """Build a GPT from an llm.c model file (fp32 or bf16; bf16 values are widened to fp32)."""
    path = Path(path)
    config, itemsize = read_llmc_header(path)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in GPT(config).named_parameters()}
    order = llmc_order(config)
    expected = HEADER_INTS * 4 + itemsize * sum(shapes[name].numel() for name in order)
    if path.stat().st_size != expected:
        raise LlmcFormatError(f"{path}: {path.stat().st_size} bytes, header implies {expected}; truncated or corrupt")
    body = np.memmap(path, dtype="<i2" if itemsize == 2 else "<f4", mode="r", offset=HEADER_INTS * 4)
    weights, offset = {}, 0
    for name in order:
        count = shapes[name].numel()
        chunk = torch.from_numpy(np.array(body[offset:offset + count]))
        weights[name] = (chunk.view(torch.bfloat16) if itemsize == 2 else chunk).view(shapes[name]).float()
        offset += count
    return GPT.from_weights(config, weights, recompute)


# ---- Hugging Face -----------------------------------------------------------------------------------------
def _hf_names(config: GPTConfig) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (transformers' name, whether the tensor is stored transposed there)."""
    names = {ours: (theirs, False) for ours, theirs in _HF_TOP_NAMES.items()}
    for layer in range(config.n_layer):
        for ours, (theirs, transposed) in _HF_BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"h.{layer}.{ours}.{kind}"] = (f"transformer.h.{layer}.{theirs}.{kind}",
                                                     transposed and kind == "weight")
    return names


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' GPT2LMHeadModel names (vocab unpadded, Conv1D weights transposed)."""
    ours = {name: param.detach() for name, param in model.named_parameters()}
    ours["wte.weight"] = ours["wte.weight"][: model.config.vocab_size]
    out = {theirs: ours[name].t() if transposed else ours[name]
           for name, (theirs, transposed) in _hf_names(model.config).items()}
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _hf_shape(n_layer: int, n_head: int, n_embd: int, n_positions: int, vocab_size: int) -> GPTConfig:
    """Our config for a transformers GPT-2 shape: its vocab padded as llm.c pads GPT-2's (to a multiple of 128)."""
    padded = PADDED_VOCAB if vocab_size == GPT2_VOCAB else -(-vocab_size // 128) * 128
    return GPTConfig(n_layer, n_head, n_embd, n_positions, vocab_size, padded)


def gpt_from_hf(hf: torch.nn.Module, source: str = "model") -> GPT:
    """Our GPT holding a transformers GPT2LMHeadModel's weights (vocab padded with zero rows, Conv1D weights
    transposed back)."""
    c = hf.config
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh") or c.layer_norm_epsilon != 1e-5:
        raise ModelSourceError(f"{source}: activation {c.activation_function!r} / layer norm eps "
                               f"{c.layer_norm_epsilon}; GPT-2 expects tanh GELU and 1e-5")
    config = _hf_shape(c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size)
    padded = config.padded_vocab_size
    theirs = hf.state_dict()
    weights = {name: theirs[hf_name].t().contiguous() if transposed else theirs[hf_name].clone()
               for name, (hf_name, transposed) in _hf_names(config).items()}
    wte = weights["wte.weight"]
    weights["wte.weight"] = torch.cat([wte, wte.new_zeros(padded - c.vocab_size, c.n_embd)])
    return GPT.from_weights(config, weights)


def to_hf(model: GPT):
    """A transformers GPT2LMHeadModel holding `model`'s weights (transformers is imported only here)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(config)
    state = {k: v.contiguous() for k, v in hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]:
        raise RuntimeError(f"transformers GPT-2 layout changed: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def export_hf(model: GPT, out_dir: str | os.PathLike) -> None:
    to_hf(model).save_pretrained(out_dir)


# ---- any of them ------------------------------------------------------------------------------------------
def resolve_model_source(path: str | os.PathLike) -> Path:
    """`path` itself if it is a model we read, or a run directory's latest checkpoint; ModelSourceError
    otherwise (cheap: loads nothing)."""
    path = Path(path)
    if (path / CHECKPOINT_STATE).is_file() or (path / HF_CONFIG).is_file() or path.is_file():
        return path
    if checkpoints := list_checkpoints(path):
        return checkpoints[-1]
    raise ModelSourceError(f"{path}: not a checkpoint directory ({CHECKPOINT_STATE}), a run directory holding "
                           f"checkpoints, a Hugging Face GPT-2 directory ({HF_CONFIG}) or an llm.c model .bin")


def block_size_of(path: Path) -> int:
    """The context length of the model at `path` (as resolve_model_source returns it), without loading weights."""
    try:
        if (path / CHECKPOINT_STATE).is_file():
            return model_config(read_state(path)).block_size
        if (path / HF_CONFIG).is_file():
            return int(json.loads((path / HF_CONFIG).read_text())["n_positions"])
        return read_llmc_header(path)[0].block_size
    except (CheckpointError, LlmcFormatError, OSError, ValueError, KeyError, TypeError) as err:
        raise ModelSourceError(f"{path}: {err}") from err


def load_gpt(path: str | os.PathLike, device: torch.device | str = "cpu") -> GPT:
    """A checkpoint dir, a run dir (its latest checkpoint), a Hugging Face GPT-2 dir or an llm.c model .bin,
    in eval mode on `device`."""
    path = resolve_model_source(path)
    try:
        if (path / CHECKPOINT_STATE).is_file():
            model = load_model(path)
        elif (path / HF_CONFIG).is_file():
            from transformers import GPT2LMHeadModel  # only HF directories need transformers

            model = gpt_from_hf(GPT2LMHeadModel.from_pretrained(path, local_files_only=True), str(path))
        else:
            model = read_llmc(path)
    except (CheckpointError, LlmcFormatError, OSError) as err:
        raise ModelSourceError(str(err)) from err
    return model.to(device).eval()


def read_model_config(path: str | os.PathLike) -> GPTConfig:
    """The shape of the model at `path` (any source `load_gpt` reads), without loading its weights."""
    path = resolve_model_source(path)
    try:
        if (path / "state.json").is_file():
            return model_config(read_state(path))
        if (path / "config.json").is_file():
            c = json.loads((path / "config.json").read_text())
            return _hf_shape(c["n_layer"], c["n_head"], c["n_embd"], c["n_positions"], c["vocab_size"])
        return read_llmc_header(path)[0]
    except (CheckpointError, LlmcFormatError, OSError, KeyError, TypeError, ValueError) as err:
        raise ModelSourceError(f"{path}: cannot read the model's shape ({err})") from err
