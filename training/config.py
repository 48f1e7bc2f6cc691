"""Training configuration: one dataclass whose fields and defaults mirror llm.c's `train_gpt2.cu` flags.

The CLI keeps llm.c's single-letter flags (with long aliases) so llm.c run scripts translate one to one.
`-h` is left free for HellaSwag eval, as in llm.c, so `--help` is the only help flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from common import cli
from common.cluster import lost_in_job_copy

LR_SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A bad flag value or flag combination; the message names the flag."""


@dataclass
class TrainConfig:
    train_data: str = "dev/data/tinyshakespeare/tiny_shakespeare_train.bin"
    val_data: str = "dev/data/tinyshakespeare/tiny_shakespeare_val.bin"
    output_dir: str | None = None
    # llm.c defaults to loading gpt2_124M_bf16.bin; we have no pretrained file, so the default is its shape.
    model: str = "d12"
    micro_batch: int = 4
    seq_len: int = 1024
    total_batch_tokens: int = -1
    learning_rate: float = 3e-4
    final_lr_frac: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    max_steps: int = -1
    val_every: int = 20
    val_batches: int = 20
    sample_every: int = 20
    gen_tokens: int = 64
    checkpoint_every: int = 0
    checkpoints_keep: int = 0
    resume: int = 0
    recompute: int = 1
    zero_stage: int = 0
    skip_loss_z: float = 0.0
    skip_grad_z: float = 0.0
    gelu_fusion: int = -1
    tf32: int = 1
    overfit_single_batch: int = 0
    seed: int = 42
    device: str = "auto"
    resume_from: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        positive = {"-b": self.micro_batch, "-t": self.seq_len, "-m": self.val_batches}
        for flag, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        not_negative = {"-l": self.learning_rate, "-c": self.weight_decay, "-sl": self.skip_loss_z,
                        "-sg": self.skip_grad_z, "-v": self.val_every, "-s": self.sample_every, "-g": self.gen_tokens,
                        "-n": self.checkpoint_every, "-nk": self.checkpoints_keep}
        for flag, value in not_negative.items():
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
        if self.output_dir and (why := lost_in_job_copy(self.output_dir)):
            raise ConfigError(f"-o {self.output_dir}: {why}")
        if self.output_dir and os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ConfigError(f"-o {self.output_dir}: exists and is not a directory")
        if self.output_dir and self.resume_from and "://" not in self.output_dir and Path(
                self.output_dir).resolve().is_relative_to(Path(self.resume_from).resolve()):
            raise ConfigError(f"-o {self.output_dir}: inside --resume-from {self.resume_from}, which this run reads; "
                              "give the run its own directory")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"-k {self.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.final_lr_frac <= 1.0:
            raise ConfigError(f"-q must be in [0, 1], got {self.final_lr_frac}")
        if self.recompute not in (0, 1, 2):
            raise ConfigError(f"-r must be 0, 1 or 2, got {self.recompute}")
        if self.zero_stage not in (0, 1):
            raise ConfigError(f"-z {self.zero_stage}: only ZeRO stages 0 and 1 are supported")
        if self.warmup_steps < 0 or self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"-u/-x out of range: -u {self.warmup_steps} -x {self.max_steps}")
        if self.gelu_fusion not in (-1, 0, 1, 2):
            raise ConfigError(f"-ge must be -1, 0, 1 or 2, got {self.gelu_fusion}")
        for flag, value in (("-n", self.checkpoint_every), ("-y", self.resume)):
            if value and not self.output_dir:
                raise ConfigError(f"{flag} {value} needs an output directory (-o)")

    def tokens_per_step(self, world_size: int) -> int:
        """-d; llm.c's -d -1 means one micro-batch per rank: B x T x ranks."""
        if self.total_batch_tokens == -1:
            return self.micro_batch * self.seq_len * world_size
        return self.total_batch_tokens

    def micro_batches_per_step(self, world_size: int) -> int:
        """Micro-batches of B sequences in one optimizer step, all ranks together. Rank r of W runs every W-th
        one from the r-th, so W need not divide them (the gradient weighs micro-batches, not ranks), but every
        rank needs at least one."""
        micro_tokens = self.micro_batch * self.seq_len
        tokens = self.tokens_per_step(world_size)
        if tokens <= 0 or tokens % micro_tokens:
            raise ConfigError(f"-d {self.total_batch_tokens} is not a positive multiple of -b {self.micro_batch} x "
                              f"-t {self.seq_len} = {micro_tokens} tokens")
        if tokens // micro_tokens < world_size:
            raise ConfigError(f"-d {tokens} is {tokens // micro_tokens} micro-batch(es) of -b {self.micro_batch} x "
                              f"-t {self.seq_len}, fewer than the {world_size} ranks (each needs one): lower -b or "
                              "the number of ranks")
        return tokens // micro_tokens


# Fields that shape the optimisation: a run resumed with other values would not be the run that was saved.
# (The micro-batch and the rank count may change as long as the tokens per step stay; -x may grow.)
RUN_DEFINING = {"model": "-e", "seq_len": "-t", "learning_rate": "-l", "final_lr_frac": "-q", "warmup_steps": "-u",
                "lr_schedule": "-k", "weight_decay": "-c", "skip_loss_z": "-sl", "skip_grad_z": "-sg",
                "overfit_single_batch": "-a", "seed": "--seed"}


# (flags, field, type, help); llm.c's letters first, then our long alias.
_FLAGS: list[tuple[tuple[str, ...], str, type, str]] = [
    (("-i", "--train-data"), "train_data", str, "glob of train token shards"),
    (("-j", "--val-data"), "val_data", str, "glob of val token shards ('' = no validation)"),
    (("-o", "--output-dir"), "output_dir", str, "directory for main.log and checkpoints"),
    (("-e", "--model"), "model", str, "d6/d12/d24/d36/d48, LxHyCz (e.g. L2H2C64), or an llm.c model .bin"),
    (("-b", "--micro-batch"), "micro_batch", int, "micro-batch size per rank"),
    (("-t", "--seq-len"), "seq_len", int, "sequence length (<= 1024)"),
    (("-d", "--total-batch"), "total_batch_tokens", int, "tokens per optimizer step (-1 = B*T*ranks)"),
    (("-l", "--learning-rate"), "learning_rate", float, "max learning rate"),
    (("-q", "--final-lr-frac"), "final_lr_frac", float, "final LR as a fraction of -l"),
    (("-u", "--warmup"), "warmup_steps", int, "linear warmup steps"),
    (("-k", "--lr-schedule"), "lr_schedule", str, "cosine, linear or constant"),
    (("-c", "--weight-decay"), "weight_decay", float, "AdamW weight decay on 2-D parameters"),
    (("-x", "--max-steps"), "max_steps", int, "optimizer steps (-1 = one epoch of the train shards)"),
    (("-v", "--val-every"), "val_every", int, "validate every N steps"),
    (("-m", "--val-batches"), "val_batches", int, "max validation batches per eval"),
    (("-s", "--sample-every"), "sample_every", int, "generate a sample every N steps"),
    (("-g", "--gen-tokens"), "gen_tokens", int, "tokens to generate per sample"),
    (("-n", "--checkpoint-every"), "checkpoint_every", int, "checkpoint every N steps (0 = only at the end)"),
    (("-nk", "--checkpoints-keep"), "checkpoints_keep", int, "keep only the newest N checkpoints (0 = all)"),
    (("-y", "--resume"), "resume", int, "1 = resume from the latest complete checkpoint in -o"),
    (("-r", "--recompute"), "recompute", int, "recompute in backward: 0 none, 1 GELU, 2 GELU+LayerNorm"),
    (("-z", "--zero-stage"), "zero_stage", int, "0 = replicated optimizer, 1 = ZeRO-1 sharded optimizer"),
    (("-sl", "--skip-loss-z"), "skip_loss_z", float, "skip the update when the loss z-score exceeds this"),
    (("-sg", "--skip-grad-z"), "skip_grad_z", float, "skip the update when the grad-norm z-score exceeds this"),
    (("-ge", "--gelu-fusion"), "gelu_fusion", int, "0 off, 1/2 torch.compile the blocks, -1 = on for CUDA"),
    (("-f", "--tf32"), "tf32", int, "allow TF32 matmuls on CUDA"),
    (("-a", "--overfit-single-batch"), "overfit_single_batch", int, "1 = train on the first batch only"),
    (("--seed",), "seed", int, "seed for init and data order"),
    (("--device",), "device", str, "auto, cpu, cuda or cuda:N"),
    (("--resume-from",), "resume_from", str, "resume from this checkpoint directory"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description="GPT-2 pretraining, llm.c train_gpt2cu flags", add_help=False,
    )
    parser.add_argument("--help", action="help", help="show this message and exit")
    defaults = TrainConfig()
    for flags, field, kind, text in _FLAGS:
        default = getattr(defaults, field)
        parser.add_argument(*flags, dest=field, type=kind, default=default, help=f"{text} (default: {default})")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard an earlier run's main.log and checkpoints in -o (without -y 1 a used -o is "
                             "refused)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig in a namespace parsed by build_parser() or a parser that has it as a parent."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return config_from_args(build_parser().parse_args(argv))
