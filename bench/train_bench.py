"""Training-step throughput and peak memory: our engine against a plain nanoGPT-style reference.

The reference is what a straightforward PyTorch GPT-2 does: manual causal attention (masked softmax),
full (B*T, V) logits into F.cross_entropy, AdamW without fused or foreach kernels, no torch.compile. Both
run the same shape, batch and precision (bf16 autocast on CUDA, fp32 on CPU), each in its own subprocess
so that peak memory is its own; warm-up steps (and any compile) are excluded from the timing. Each
figure is the median step; `--rounds` alternates the two implementations and keeps each one's best round,
so a busy machine slows both alike rather than whichever ran second.

    python bench/train_bench.py                      # CPU: d12, B=4, T=64; CUDA: d12 and d24, B=16, T=1024
    python bench/train_bench.py --models d24 -b 8 -t 1024 --steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from gpt2.model import GPT, PADDED_VOCAB, GPTConfig, autocast_for
from training.config import TrainConfig
from training.metrics import flops_per_token, mfu, peak_flops
from training.train import make_optimizer


class ReferenceBlock(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.c_attn, self.c_proj = nn.Linear(c.n_embd, 3 * c.n_embd), nn.Linear(c.n_embd, c.n_embd)
        self.c_fc, self.mlp_proj = nn.Linear(c.n_embd, 4 * c.n_embd), nn.Linear(4 * c.n_embd, c.n_embd)
        self.register_buffer("mask", torch.tril(torch.ones(c.block_size, c.block_size, dtype=torch.bool)))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        scores = scores.masked_fill(~self.mask[:seq, :seq], float("-inf"))
        y = F.softmax(scores, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class ReferenceGPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(PADDED_VOCAB, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(ReferenceBlock(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, PADDED_VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


def build(impl: str, model_name: str, recompute: int, device: torch.device):
    config = GPTConfig.from_descriptor(model_name)
    if impl == "ours":
        model = GPT(config, recompute).to(device)
        if device.type == "cuda":
            model.compile_blocks()
        optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1), device, sharded=False)
    else:
        model = ReferenceGPT(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                      foreach=False, fused=False)
    return config, model, optimizer


def measure(impl: str, model_name: str, batch: int, seq_len: int, warmup: int, steps: int, recompute: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config, model, optimizer = build(impl, model_name, recompute, device)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (warmup + steps, batch, seq_len + 1), generator=generator)

    def step(i: int) -> float:
        started = time.perf_counter()
        inputs, targets = data[i, :, :-1].to(device), data[i, :, 1:].to(device)
        with autocast_for(device):
            loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # a host sync, as the training loop's logging does
        return time.perf_counter() - started

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # The median step: robust to other processes stealing the CPU for a moment.
    tokens_per_second = batch * seq_len / statistics.median(step(i) for i in range(warmup, warmup + steps))
    num_params = sum(p.numel() for p in GPT(config).parameters()) if impl == "ours" else None
    num_params = num_params or sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else None
    peak = peak_flops(device_name, bf16=device.type == "cuda")
    if device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated()
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"impl": impl, "tokens_per_second": tokens_per_second, "peak_memory": peak_memory,
            "mfu": mfu(tokens_per_second, flops_per_token(num_params, config, seq_len), peak),
            "device": device_name or f"cpu ({torch.get_num_threads()} threads)", "params": num_params}


def run_child(impl: str, args: argparse.Namespace, model_name: str) -> dict:
    command = [sys.executable, __file__, "--impl", impl, "--models", model_name, "-b", str(args.batch),
               "-t", str(args.seq_len), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "-r", str(args.recompute)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{impl} {model_name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(result: dict, memory_label: str) -> str:
    mfu_text = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    return (f"{result['impl']:<10}: {result['tokens_per_second']:10.1f} tok/s | {memory_label} "
            f"{result['peak_memory'] / 2**20:8.0f} MiB | MFU {mfu_text}")


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="d12,d24" if cuda else "d12", help="comma-separated -e descriptors")
    parser.add_argument("-b", "--batch", type=int, default=16 if cuda else 4)
    parser.add_argument("-t", "--seq-len", type=int, default=1024 if cuda else 64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10 if not cuda else 20)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each; the best counts")
    parser.add_argument("-r", "--recompute", type=int, default=1, help="our -r level (llm.c default 1)")
    parser.add_argument("--impl", choices=("ours", "reference"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:  # child: one implementation, one model, JSON on the last line
        print(json.dumps(measure(args.impl, args.models, args.batch, args.seq_len, args.warmup, args.steps,
                                 args.recompute)))
        return
    memory_label = "peak GPU mem" if cuda else "peak RSS"
    for model_name in args.models.split(","):
        rounds = [(run_child("ours", args, model_name), run_child("reference", args, model_name))
                  for _ in range(args.rounds)]
        ours, reference = (max((r[i] for r in rounds), key=lambda r: r["tokens_per_second"]) for i in (0, 1))
        print(f"device: {ours['device']} | model {model_name} ({ours['params']:,} params) | B={args.batch} "
              f"T={args.seq_len} | {args.warmup} warm-up + {args.steps} timed steps, best of {args.rounds} rounds | "
              f"ours -r {args.recompute}")
        print(report(ours, memory_label))
        print(report(reference, memory_label))
        print(f"ratio ours/reference: {ours['tokens_per_second'] / reference['tokens_per_second']:.2f}x tok/s, "
              f"{ours['peak_memory'] / reference['peak_memory']:.2f}x peak memory")


if __name__ == "__main__":
    main()
