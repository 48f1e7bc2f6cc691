"""Sample text from a GPT: used by training's `-s`/`-g`, and as a CLI on any checkpoint.

    python training/sample.py out/ckpt_00001000 -g 64 --num-samples 2 --prompt "The meaning of life"

Tokens are drawn on the CPU from a dedicated generator, so samples depend only on the seed and the
weights, not on the device or on how much of the global RNG training has consumed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable instead of training/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding
from training.checkpoint import CheckpointError, list_checkpoints, load_model
from training.export import LlmcFormatError
from training.model import GPT, autocast_for


@torch.no_grad()
def generate(model: GPT, prompt: list[int], new_tokens: int, generator: torch.Generator,
             temperature: float = 1.0) -> list[int]:
    """Extend `prompt` by `new_tokens` tokens sampled from the model's softmax."""
    device = next(model.parameters()).device
    tokens = list(prompt)
    was_training = model.training
    model.eval()
    for _ in range(new_tokens):
        context = torch.tensor([tokens[-model.config.block_size:]], device=device)
        with autocast_for(device):
            logits = model(context)[0, -1]
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    model.train(was_training)
    return tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample from a training checkpoint")
    parser.add_argument("checkpoint", help="checkpoint directory, or an output dir (its latest checkpoint)")
    parser.add_argument("-g", "--gen-tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--prompt", default=None, help="text prompt (default: <|endoftext|>)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    path = Path(args.checkpoint)
    if not (path / "state.json").exists() and list_checkpoints(path):
        path = list_checkpoints(path)[-1]
    try:
        model = load_model(path, args.device)
    except (CheckpointError, LlmcFormatError) as err:
        raise SystemExit(f"error: {err}") from err
    encoding = gpt2_encoding()
    prompt = encoding.encode(args.prompt) if args.prompt else [EOT_TOKEN]
    generator = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        tokens = generate(model, prompt, args.gen_tokens, generator, args.temperature)
        print(f"--- sample {i} ({path.name}) ---\n{encoding.decode(tokens)}")


if __name__ == "__main__":
    main()
