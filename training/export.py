"""Interop: llm.c's `model_XXXXXXXX.bin` (write and read) and a Hugging Face `transformers` GPT-2 directory.

llm.c layout (train_gpt2.py write_model): 256 int32 header — magic 20240326, version (3 = fp32, 5 = bf16),
max T, vocab, layers, heads, channels, padded vocab — then every parameter in llm.c's order: wte (padded),
wpe, then for each kind of block tensor all layers in turn, then ln_f. Linear weights are (out, in) as in
PyTorch; Hugging Face's Conv1D wants them transposed.

    python training/export.py out/ckpt_00001000 --llmc model.bin --dtype bf16 --hf hf_gpt2/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable instead of training/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from training.checkpoint import CheckpointError, load_model
from training.model import GPT, GPTConfig

LLMC_MAGIC = 20240326
LLMC_VERSIONS = {3: torch.float32, 5: torch.bfloat16}
HEADER_INTS = 256


class LlmcFormatError(ValueError):
    """A file that is not a readable llm.c model file; the message names it."""


_BLOCK_ORDER = ("ln_1.weight", "ln_1.bias", "c_attn.weight", "c_attn.bias", "attn_proj.weight", "attn_proj.bias",
                "ln_2.weight", "ln_2.bias", "c_fc.weight", "c_fc.bias", "mlp_proj.weight", "mlp_proj.bias")
# Our block tensor names -> Hugging Face GPT2LMHeadModel's, and whether the weight needs transposing.
_HF_BLOCK_NAMES = {"ln_1": ("ln_1", False), "c_attn": ("attn.c_attn", True), "attn_proj": ("attn.c_proj", True),
                   "ln_2": ("ln_2", False), "c_fc": ("mlp.c_fc", True), "mlp_proj": ("mlp.c_proj", True)}


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
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(partial, "wb") as f:
        f.write(header.tobytes())
        for name in llmc_order(c):
            tensor = params[name].detach().to("cpu", dtype).contiguous()
            raw = tensor.view(torch.int16) if dtype == torch.bfloat16 else tensor
            f.write(raw.numpy().tobytes())
    partial.replace(path)


def read_llmc(path: str | os.PathLike, recompute: int = 0) -> GPT:
    """Build a GPT from an llm.c model file (fp32 or bf16; bf16 values are widened to fp32)."""
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
    dtype = LLMC_VERSIONS[int(header[1])]
    block_size, vocab, n_layer, n_head, n_embd, padded_vocab = (int(v) for v in header[2:8])
    model = GPT(GPTConfig(n_layer, n_head, n_embd, block_size, vocab, padded_vocab), recompute)
    params = dict(model.named_parameters())
    order = llmc_order(model.config)
    itemsize = 2 if dtype == torch.bfloat16 else 4
    expected = HEADER_INTS * 4 + itemsize * sum(params[name].numel() for name in order)
    if path.stat().st_size != expected:
        raise LlmcFormatError(f"{path}: {path.stat().st_size} bytes, header implies {expected}; truncated or corrupt")
    body = np.memmap(path, dtype="<i2" if itemsize == 2 else "<f4", mode="r", offset=HEADER_INTS * 4)
    offset = 0
    with torch.no_grad():
        for name in order:
            param = params[name]
            chunk = torch.from_numpy(np.array(body[offset:offset + param.numel()]))
            values = chunk.view(torch.bfloat16) if itemsize == 2 else chunk
            param.copy_(values.view(param.shape).float())
            offset += param.numel()
    return model


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' GPT2LMHeadModel names (vocab unpadded, Conv1D weights transposed)."""
    c = model.config
    wte = model.wte.weight.detach()[: c.vocab_size]
    out = {"transformer.wte.weight": wte, "transformer.wpe.weight": model.wpe.weight.detach(),
           "transformer.ln_f.weight": model.ln_f.weight.detach(), "transformer.ln_f.bias": model.ln_f.bias.detach(),
           "lm_head.weight": wte}
    for layer, block in enumerate(model.h):
        for ours, (theirs, transpose) in _HF_BLOCK_NAMES.items():
            module = getattr(block, ours)
            prefix = f"transformer.h.{layer}.{theirs}"
            out[f"{prefix}.weight"] = module.weight.detach().t() if transpose else module.weight.detach()
            out[f"{prefix}.bias"] = module.bias.detach()
    return out


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a checkpoint to llm.c .bin and/or a HF GPT-2 directory")
    parser.add_argument("source", help="checkpoint directory (ckpt_XXXXXXXX) or llm.c model .bin")
    parser.add_argument("--llmc", help="write an llm.c model file here")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="llm.c file precision")
    parser.add_argument("--hf", help="write a Hugging Face transformers GPT-2 directory here")
    args = parser.parse_args(argv)
    if not args.llmc and not args.hf:
        parser.error("nothing to do: give --llmc and/or --hf")
    try:
        model = read_llmc(args.source) if args.source.endswith(".bin") else load_model(args.source)
    except (CheckpointError, LlmcFormatError) as err:
        raise SystemExit(f"error: {err}") from err
    if args.llmc:
        write_llmc(model, args.llmc, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    if args.hf:
        export_hf(model, args.hf)


if __name__ == "__main__":
    main()
