"""What a run reports on the console: MFU as llm.c computes it and llm.c's step line."""

from __future__ import annotations

from gpt2.model import GPTConfig

# Dense bf16 tensor-core peaks in TFLOP/s; matched in order against torch.cuda.get_device_name().
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM names: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),  # the eval node type in cluster.yaml (242 is with sparsity)
]


def peak_flops(device_name: str | None, bf16: bool) -> float | None:
    """Promised FLOP/s for this device and precision, or None when we do not know it."""
    if not device_name or not bf16:
        return None
    for marker, tflops in BF16_PEAK_TFLOPS:
        if marker in device_name:
            return tflops * 1e12
    return None


def flops_per_token(num_params: int, config: GPTConfig, seq_len: int) -> int:
    """llm.c's estimate: 6N for the matmuls with weights plus 6*L*C*T for attention."""
    return 6 * num_params + 6 * config.n_layer * config.n_embd * seq_len


def mfu(tokens_per_second: float, flops_per_tok: int, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_second * flops_per_tok / peak


def step_line(step: int, total: int, loss: float, zloss: float, norm: float, zgrad: float, lr: float,
              ms: float, mfu_value: float | None, tokens_per_second: float) -> str:
    mfu_text = "n/a" if mfu_value is None else f"{100 * mfu_value:.1f}%"
    return (f"step {step:4d}/{total} | loss {loss:7.6f} ({zloss:+.2f}z)| norm {norm:6.4f} ({zgrad:+.2f}z)| "
            f"lr {lr:.2e} | {ms:.2f} ms | {mfu_text} MFU | {tokens_per_second:.0f} tok/s")
