"""The training loop of llm.c's train_gpt2cu in PyTorch, single process or one rank of many.

    python training/train.py -i 'shards/*_train_*.bin' -j 'shards/*_val_*.bin' -o out -e d12 -b 16 -t 1024 \
        -d 524288 -l 6e-4 -u 700 -q 0.0 -c 0.1 -x 10000 -v 250 -s 20000 -n 5000 -y 1

If torch.distributed is already initialised (Ray Train, torchrun) the loop runs as that rank: DDP-wrapped
model, a disjoint slice of the data, losses averaged over ranks, rank 0 alone logging and writing
checkpoints. Each iteration follows llm.c: validate, sample, checkpoint (as due), then one optimizer step
of `-d` tokens. Checkpoint `ckpt_S` holds the state after S steps, written before step S trains.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gpt2.checkpoint import (
    CheckpointError,
    load_part,
    prune_checkpoints,
    read_state,
    save_checkpoint,
    weights_mismatch,
)
from gpt2.interop import LlmcFormatError, read_llmc
from gpt2.mainlog import MainLog
from gpt2.model import GPT, GPTConfig, autocast_for, pick_device
from gpt2.rundir import (
    MAIN_LOG,
    MODEL_PART,
    OPTIMIZER_PART,
    RNG_PART,
    RunDir,
    RunDirError,
    checkpoint_dir,
    list_checkpoints,
)
from pipelines.shards import ShardFormatError
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding
from training.config import ConfigError, TrainConfig, parse_args
from training.data import ShardLoader
from training.metrics import flops_per_token, mfu, peak_flops, step_line
from training.outliers import OutlierDetector
from training.resume import check_same_run
from training.sample import generate
from training.schedule import learning_rate

GRAD_CLIP = 1.0
SAMPLE_SEED = 1337  # llm.c's sampling RNG seed


@dataclass
class TrainHooks:
    """Callbacks for a launcher. They run on every rank, so they may make collective calls
    (e.g. ray.train.report); `on_checkpoint` fires once the directory is complete on disk; `on_eval` fires
    where llm.c evaluates HellaSwag (every -v step after step 0, and the last) with the model being trained
    (the module itself, not a DDP wrapper), a resumed run's first step included."""

    # may return True to have a checkpoint written after this step, out of -n's schedule (every rank alike)
    on_step: Callable[[dict[str, Any]], bool | None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None
    on_eval: Callable[[int, GPT], None] | None = None


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run stops before that step's update and before any checkpoint
    could hold the damage. `step` is the 1-based step, as the console numbers them."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None
    val_loss: float | None
    checkpoint: Path | None


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _build_model(config: TrainConfig) -> GPT:
    if config.model.endswith(".bin"):
        return read_llmc(config.model, config.recompute)
    try:
        model_shape = GPTConfig.from_descriptor(config.model)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return GPT(model_shape, config.recompute, config.seed)


def make_optimizer(model: GPT, config: TrainConfig, device: torch.device,
                    sharded: bool) -> torch.optim.Optimizer:
    """AdamW as llm.c: betas (0.9, 0.95), eps 1e-8, weight decay on 2-D tensors only, fused kernel."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    options = {"lr": config.learning_rate, "betas": (0.9, 0.95), "eps": 1e-8,
               "fused": device.type in ("cuda", "cpu")}
    if sharded:
        # imported here: torch.distributed.optim pulls in FSDP and DTensor, ~1 s of every worker's start-up
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **options)
    return torch.optim.AdamW(groups, **options)


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        dist.all_reduce(value)  # SUM: AVG is NCCL-only and gloo runs the CPU tests
    return value.item() / world


def _log(master: bool, text: str) -> None:
    if master:
        print(text, flush=True)


class _Run:
    """The state of one training run; `train()` is its public face."""

    def __init__(self, config: TrainConfig, hooks: TrainHooks):
        config.validate()
        self.config, self.hooks = config, hooks
        self.rank, self.world = _rank_and_world()
        self.distributed = dist.is_available() and dist.is_initialized()
        self.master = self.rank == 0
        try:
            self.device = pick_device(config.device)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.set_float32_matmul_precision("high" if config.tf32 else "highest")
        # A step of -d tokens is `micro_batches` micro-batches of B sequences, all ranks together; this rank runs
        # every world-th one from its rank on, `micro_steps` of them (uneven when world does not divide them).
        self.micro_batches = config.micro_batches_per_step(self.world)
        self.micro_steps = len(range(self.rank, self.micro_batches, self.world))
        self.model = _build_model(config)
        if config.seq_len > self.model.config.block_size:
            raise ConfigError(f"-t {config.seq_len} exceeds the model's context of {self.model.config.block_size}")
        vocab = self.model.config.vocab_size
        self.train_loader = ShardLoader(config.train_data, "-i", config.micro_batch, config.seq_len,
                                        self.rank, self.world, config.seed, shuffle=True, vocab_size=vocab)
        self.val_loader = (ShardLoader(config.val_data, "-j", config.micro_batch, config.seq_len,
                                       self.rank, self.world, config.seed, shuffle=False, vocab_size=vocab)
                           if config.val_data else None)
        steps_per_epoch = self.train_loader.sequences_per_epoch // (self.micro_batches * config.micro_batch)
        if steps_per_epoch < 1:
            raise ConfigError(f"-i: one epoch holds {self.train_loader.sequences_per_epoch} sequences of -t "
                              f"{config.seq_len}+1 tokens, fewer than one step of -d "
                              f"{config.tokens_per_step(self.world)} tokens")
        self.steps = config.max_steps if config.max_steps != -1 else steps_per_epoch
        self.sharded = config.zero_stage == 1 and self.distributed
        if config.zero_stage == 1 and not self.distributed:
            _log(self.master, "-z 1: torch.distributed is not initialised, so there is nothing to shard across")
        self.loss_outliers, self.grad_outliers = OutlierDetector(), OutlierDetector()
        self.sample_generator = torch.Generator().manual_seed(SAMPLE_SEED)
        self.start_step = 0
        resume_path = self._resume_path()
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, config, self.device, self.sharded)
        if resume_path is not None:
            self._restore(resume_path)
        self.resumed = resume_path is not None
        if config.gelu_fusion > 0 or (config.gelu_fusion == -1 and self.device.type == "cuda"):
            self.model.compile_blocks()
        # A group of one (Ray Train with one worker) has no gradients to average: DDP would only add copies.
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None) if self.distributed and self.world > 1 else None)
        self.out = Path(config.output_dir) if config.output_dir else None
        self.main_log: MainLog | None = None  # opened by run(): constructing a _Run writes nothing
        self.tokens_per_step = config.tokens_per_step(self.world)
        self.flops_per_token = flops_per_token(self.model.num_parameters(), self.model.config, config.seq_len)
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.peak = peak_flops(device_name, bf16=self.device.type == "cuda")
        c = self.model.config
        _log(self.master, f"model L{c.n_layer}H{c.n_head}C{c.n_embd}, {self.model.num_parameters():,} parameters | "
                          f"{config.micro_batch} x {config.seq_len} x {self._split()} = {self.tokens_per_step} "
                          f"tokens/step | {self.steps} steps | {device_name or self.device} | "
                          f"recompute {config.recompute} | zero {int(self.sharded)}")

    def _split(self) -> str:
        """How a step's micro-batches fall on the ranks, for the header line."""
        if self.micro_batches % self.world == 0:
            return f"{self.world} rank(s) x {self.micro_batches // self.world} micro-steps"
        fewer = self.micro_batches // self.world
        return (f"{self.micro_batches} micro-batches over {self.world} ranks ({fewer + 1} or {fewer} micro-steps "
                "each: a rank with fewer waits)")

    def _resume_path(self) -> Path | None:
        if self.config.resume_from:
            return Path(self.config.resume_from)
        if self.config.resume:
            found = list_checkpoints(self.config.output_dir)
            if found:
                return found[-1]
            _log(self.master, f"-y 1: no checkpoint in {self.config.output_dir}, starting from scratch")
        return None

    def _restore(self, path: Path) -> None:
        state = read_state(path)
        if note := check_same_run(path, state, self.config, self.model.config, self.world):
            _log(self.master, note)
        weights = load_part(path, MODEL_PART, self.device)
        if mismatch := weights_mismatch(self.model, weights):
            raise CheckpointError(f"{path / MODEL_PART}: does not fit the model its checkpoint describes: {mismatch}")
        self.model.load_state_dict(weights)
        try:
            self.optimizer.load_state_dict(load_part(path, OPTIMIZER_PART))
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path / OPTIMIZER_PART}: does not fit this model's optimizer ({err})") from err
        rng = load_part(path, RNG_PART)
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.sample_generator.set_state(rng["sample"])
        self.train_loader.load_state_dict(state["train_loader"])
        self.loss_outliers = OutlierDetector(state["outliers"]["loss"])
        self.grad_outliers = OutlierDetector(state["outliers"]["grad"])
        self.start_step = state["step"]
        _log(self.master, f"resumed from {path} at step {self.start_step}")

    def _save(self, step: int) -> Path:
        if self.sharded:
            self.optimizer.consolidate_state_dict(to=0)  # collective: every rank takes part
        path = None
        if self.master:
            rng = {"torch": torch.get_rng_state(), "sample": self.sample_generator.get_state(),
                   "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []}
            parts = {MODEL_PART: self.model.state_dict(), OPTIMIZER_PART: self.optimizer.state_dict(), RNG_PART: rng}
            state = {"model_config": self.model.config.to_dict(), "train_config": asdict(self.config),
                     "world_size": self.world, "train_loader": self.train_loader.state_dict(),
                     "outliers": {"loss": self.loss_outliers.state(), "grad": self.grad_outliers.state()}}
            path = save_checkpoint(self.out, step, parts, state)
            if self.config.checkpoints_keep > 0:
                prune_checkpoints(self.out, self.config.checkpoints_keep)
        if self.distributed:
            dist.barrier()
        path = checkpoint_dir(self.out, step) if path is None else path
        if self.hooks.on_checkpoint:
            self.hooks.on_checkpoint(step, path)
        return path

    def _checkpoint_due(self, step: int) -> bool:
        c = self.config
        return step > 0 and c.checkpoint_every > 0 and step % c.checkpoint_every == 0

    @torch.no_grad()
    def _validate(self) -> float:
        self.val_loader.reset()
        self.model.eval()
        batches = min(self.config.val_batches, self.val_loader.batches_per_epoch)
        total = torch.zeros((), device=self.device)
        for _ in range(batches):
            inputs, targets = self.val_loader.next_batch()
            with autocast_for(self.device):
                total += self.model(inputs.to(self.device), targets.to(self.device))
        self.model.train()
        return _mean_over_ranks(total, self.world) / batches

    def _sample(self) -> None:
        tokens = generate(self.model, [EOT_TOKEN], self.config.gen_tokens, self.sample_generator)
        print(f"generating:\n---\n{gpt2_encoding().decode(tokens)}\n---", flush=True)

    def _train_step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        trained = self.ddp or self.model
        micro_batches = [batch] * self.micro_steps if batch else self.train_loader.next_step(self.micro_batches)
        # Each micro-batch's loss over the mean micro-steps per rank: DDP's mean over ranks of the summed
        # gradients is then the mean over all the step's micro-batches, however unevenly the ranks share them.
        share = self.micro_batches / self.world
        for micro, (inputs, targets) in enumerate(micro_batches):
            last_micro = micro == len(micro_batches) - 1
            # DDP all-reduces gradients in backward; only the last micro-step needs to.
            with self.ddp.no_sync() if self.ddp and not last_micro else nullcontext():
                with autocast_for(self.device):
                    loss = trained(inputs.to(self.device), targets.to(self.device))
                (loss / share).backward()
            loss_sum += loss.detach()
        loss = _mean_over_ranks(loss_sum, self.world) / share
        if not math.isfinite(loss):  # every rank holds the same mean, so every rank stops here
            raise TrainingDiverged(step + 1, f"loss is {loss}; the update was not applied and no checkpoint "
                                             "was written after the last good one")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP).item()
        zloss, zgrad = self.loss_outliers.update(loss), self.grad_outliers.update(norm)
        c = self.config
        lr = learning_rate(step, c.learning_rate, c.warmup_steps, self.steps, c.final_lr_frac, c.lr_schedule)
        skip_loss = c.skip_loss_z > 0 and math.isfinite(zloss) and zloss > c.skip_loss_z
        skip_grad = c.skip_grad_z > 0 and math.isfinite(zgrad) and zgrad > c.skip_grad_z
        if skip_loss or skip_grad:
            _log(self.master, f"skipping update: loss z-score {zloss:.2f}, grad-norm z-score {zgrad:.2f}")
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        tokens_per_second = self.tokens_per_step / seconds
        mfu_value = mfu(tokens_per_second, self.flops_per_token, self.peak)
        _log(self.master, step_line(step + 1, self.steps, loss, zloss, norm, zgrad, lr, 1000 * seconds,
                                    mfu_value, tokens_per_second))
        if self.main_log:
            self.main_log.train(step, loss, lr, norm)
        return {"loss": loss, "norm": norm, "lr": lr, "ms": 1000 * seconds, "tokens_per_second": tokens_per_second,
                "mfu": mfu_value, "skipped": skip_loss or skip_grad, "total_steps": self.steps}

    def run(self) -> TrainResult:
        c = self.config
        if self.master and self.out:
            self.main_log = MainLog(self.out / MAIN_LOG, self.start_step if self.resumed else None)
        single_batch = self.train_loader.next_step(self.micro_batches)[0] if c.overfit_single_batch else None
        train_loss = val_loss = checkpoint = None
        checkpoint_asked = False
        try:
            for step in range(self.start_step, self.steps + 1):
                last = step == self.steps
                # The resumed step's validation, sample and checkpoint ran before its checkpoint was written.
                fresh = not (self.resumed and step == self.start_step)
                metrics: dict[str, Any] = {"step": step}
                if self.val_loader and fresh and ((c.val_every > 0 and step % c.val_every == 0) or last):
                    val_loss = metrics["val_loss"] = self._validate()
                    if not math.isfinite(val_loss):
                        raise TrainingDiverged(step, f"val loss is {val_loss}; no checkpoint was written for it")
                    _log(self.master, f"val loss {val_loss:.6f}")
                    if self.main_log:
                        self.main_log.val(step, val_loss)
                eval_due = (step > 0 and c.val_every > 0 and step % c.val_every == 0) or last  # llm.c's HellaSwag
                # The resumed step's too: an eval running beside training may have been lost with the run that
                # stopped, and only the hook knows whether its result was recorded.
                if self.hooks.on_eval and eval_due:
                    self.hooks.on_eval(step, self.model)
                if self.master and fresh and c.sample_every > 0 and ((step > 0 and step % c.sample_every == 0) or last):
                    self._sample()
                if self.out and fresh and (self._checkpoint_due(step) or last or checkpoint_asked):
                    checkpoint = self._save(step)
                if not last:
                    metrics.update(self._train_step(step, single_batch))
                    train_loss = metrics["loss"]
                if self.hooks.on_step and len(metrics) > 1:
                    checkpoint_asked = bool(self.hooks.on_step(metrics))
        finally:
            if self.main_log:
                self.main_log.close()
        return TrainResult(self.steps, train_loss, val_loss, checkpoint)


def train(config: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Run training as configured; as one rank of many when torch.distributed is initialised."""
    return _Run(config, hooks or TrainHooks()).run()


def main(argv: list[str] | None = None) -> int:
    try:  # validate everything, then claim -o (the first write), then train
        config = parse_args(argv)
        config.validate()
        resume = bool(config.resume or config.resume_from)
        run_dir = RunDir(config.output_dir) if config.output_dir else None
        if run_dir:
            run_dir.check(resume, config.overwrite)
        run = _Run(config, TrainHooks())
        if run_dir:
            with run_dir.claimed(resume, config.overwrite):
                run.run()
        else:
            run.run()
    except (ConfigError, CheckpointError, ShardFormatError, LlmcFormatError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: step {err.step}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
