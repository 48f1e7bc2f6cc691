"""What a run reports: MFU as llm.c computes it, the console step line, and llm.c's `main.log`."""

from __future__ import annotations

import re
from pathlib import Path

from training.model import GPTConfig

# Dense bf16 tensor-core peaks in TFLOP/s; matched in order against torch.cuda.get_device_name().
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM names: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("A100", 312.0),
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


_LINE = re.compile(r"^s:(\d+) (\w+):")


class MainLog:
    """llm.c's main.log (`s:%d trl:%f`, `s:%d tel:%f`), which llm.c's dev/vislog notebook plots.

    On resume from step S the file keeps what the interrupted run wrote up to the checkpoint: train lines
    of steps before S (step S's update came after the checkpoint) and val lines up to S; later lines
    would be duplicated by the resumed run, so they are dropped.
    """

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        kept: list[str] = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines(keepends=True):
                match = _LINE.match(line)
                if match and int(match[1]) < resume_step + (match[2] != "trl"):
                    kept.append(line)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(kept))
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the run

    def train(self, step: int, loss: float, lr: float, norm: float) -> None:
        self.file.write(f"s:{step} trl:{loss:.6f} lr:{lr:.6e} norm:{norm:.4f}\n")

    def val(self, step: int, loss: float) -> None:
        self.file.write(f"s:{step} tel:{loss:.6f}\n")

    def close(self) -> None:
        self.file.close()
