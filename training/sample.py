"""Sample text from a GPT: used by training's `-s`/`-g`, and as a CLI on any checkpoint.

    python training/sample.py out/ckpt_00001000 -g 64 --num-samples 2 --prompt "The meaning of life"

Tokens are drawn on the CPU from a dedicated generator, so samples depend only on the seed and the
weights, not on the device or on how much of the global RNG training has consumed.
"""

from __future__ import annotations

import sys

import torch

from common import cli
from gpt2.interop import load_gpt, resolve_model_source
from gpt2.model import GPT, autocast_for, pick_device
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding


@torch.no_grad()
def generate(model: GPT, prompt: list[int], new_tokens: int, generator: torch.Generator,
             temperature: float = 1.0) -> list[int]:
    """Extend `prompt` by `new_tokens` tokens sampled from the model's softmax (temperature 0: the most likely
    token each time)."""
    device = next(model.parameters()).device
    tokens = list(prompt)
    was_training = model.training
    model.eval()
    for _ in range(new_tokens):
        context = torch.tensor([tokens[-model.config.block_size:]], device=device)
        with autocast_for(device):
            logits = model(context)[0, -1]
        if temperature == 0:
            tokens.append(int(logits.argmax()))
            continue
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    model.train(was_training)
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description="Sample from a checkpoint (or an llm.c / Hugging Face GPT-2)")
    parser.add_argument("checkpoint", help="checkpoint dir, run dir (its latest checkpoint), llm.c .bin or HF dir")
    parser.add_argument("-g", "--gen-tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--prompt", default=None, help="text prompt (default: <|endoftext|>)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    args = parser.parse_args(argv)
    if not args.temperature >= 0 or args.temperature == float("inf"):
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.gen_tokens < 1 or args.num_samples < 1:
        parser.error("-g and --num-samples must be at least 1")
    try:
        path = resolve_model_source(args.checkpoint)
        model = load_gpt(path, pick_device(args.device))
    except ValueError as err:  # ModelSourceError, or a --device this machine does not have
        print(f"sample.py: error: {err}", file=sys.stderr)
        return 2
    encoding = gpt2_encoding()
    # <|endoftext|> typed in a prompt is the document separator the model was trained on, as in nanoGPT
    prompt = encoding.encode(args.prompt, allowed_special={"<|endoftext|>"}) if args.prompt else [EOT_TOKEN]
    generator = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        tokens = generate(model, prompt, args.gen_tokens, generator, args.temperature)
        print(f"--- sample {i} ({path.name}) ---\n{encoding.decode(tokens)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
