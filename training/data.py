"""Batches from llm.c token shards: one sequence stream shared by every rank, each rank reading its own slice.

A shard of n tokens holds (n - 1) // T sequences of T+1 tokens (consecutive sequences share one token, the
last target). An epoch of the train stream is every sequence once: the shards in an order permuted from
(seed, epoch), each shard's sequences in an order permuted from (seed, epoch, shard), identically on every
rank. An optimizer step of -d tokens takes the next d / T sequences of the stream (a step may span shards,
never epochs) as micro-batches of B, and rank r of W runs micro-batches r, r + W, r + 2W, ... So which
sequences a step trains on depends on -d and -t alone, not on -b or the rank count: 2 ranks of B see exactly
the batches of 1 rank of 2B, and a run resumed at another size continues the same stream. The position is
three integers, saved in checkpoints.
"""

from __future__ import annotations

import glob
import os

import fsspec
import numpy as np
import torch

from common.lock import DirectoryLock, held_by
from gpt2.model import GPT2_VOCAB
from pipelines.shards import ShardFormatError, read_shard
from training.config import ConfigError


def shard_files(pattern: str, flag: str) -> list[str]:
    """The shards `pattern` matches, in order; ConfigError names `flag` when it matches none, or when a live job
    (tokenize.py) is still writing them: training would silently take the few shards written so far."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise ConfigError(f"{flag} {pattern!r}: no files match")
    for directory in sorted({os.path.dirname(os.path.abspath(path)) for path in files}):
        if holder := DirectoryLock(fsspec.filesystem("file"), directory).holder():
            raise ConfigError(f"{flag} {pattern!r}: {directory} is still being written by a live job "
                              f"({held_by(holder)}); train once it has finished")
    return files


class ShardLoader:
    def __init__(self, pattern: str, flag: str, batch: int, seq_len: int, rank: int = 0, world: int = 1,
                 seed: int = 42, shuffle: bool = True, vocab_size: int = GPT2_VOCAB):
        self.files = shard_files(pattern, flag)
        self.shards = [read_shard(path) for path in self.files]
        self.batch, self.seq_len, self.rank, self.world = batch, seq_len, rank, world
        self.seed, self.shuffle, self.vocab_size = seed, shuffle, vocab_size
        self.checked: set[int] = set()  # shards whose token ids are known to fit the vocabulary
        self.num_seqs = [max(0, (len(tokens) - 1) // seq_len) for tokens in self.shards]
        self.sequences_per_epoch = sum(self.num_seqs)
        if self.sequences_per_epoch < world * batch:
            raise ConfigError(
                f"{flag} {pattern!r}: holds {self.sequences_per_epoch} sequence(s) of -t {seq_len}+1 tokens, fewer "
                f"than one batch of {world} rank(s) x -b {batch}"
            )
        self.batches_per_epoch = self.sequences_per_epoch // (world * batch)  # of next_batch()
        self.epoch = self.shard_pos = self.seq_pos = 0
        self._orders: tuple[int, np.ndarray, list[np.ndarray]] | None = None

    def _epoch_orders(self) -> tuple[np.ndarray, list[np.ndarray]]:
        if self._orders is None or self._orders[0] != self.epoch:
            if self.shuffle:
                shard_order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
                seq_orders = [np.random.default_rng([self.seed, self.epoch, i]).permutation(n)
                              for i, n in enumerate(self.num_seqs)]
            else:
                shard_order = np.arange(len(self.shards))
                seq_orders = [np.arange(n) for n in self.num_seqs]
            self._orders = (self.epoch, shard_order, seq_orders)
        return self._orders[1], self._orders[2]

    def next_step(self, micro_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the next optimizer step: the step is the next `micro_batches` x B
        sequences of the stream, and rank r takes micro-batches r, r + world, ... Each is (inputs, targets),
        both (B, T) int64 on CPU."""
        shards, starts = self._take(micro_batches * self.batch)
        return [self._rows(shards[i * self.batch:(i + 1) * self.batch], starts[i * self.batch:(i + 1) * self.batch])
                for i in range(self.rank, micro_batches, self.world)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, T) int64 on CPU: this rank's B of the next world x B sequences."""
        return self.next_step(self.world)[0]

    def _take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard index and first token of each of the next `count` (at most one epoch's) sequences; they never
        span an epoch (too few left in this one: the next one starts)."""
        shard_order, seq_orders = self._epoch_orders()
        left = sum(self.num_seqs[shard] for shard in shard_order[self.shard_pos:]) - self.seq_pos
        if left < count:
            self.epoch, self.shard_pos, self.seq_pos = self.epoch + 1, 0, 0
            shard_order, seq_orders = self._epoch_orders()
        shards, starts = [], []
        while count > 0:
            shard = shard_order[self.shard_pos]
            taken = seq_orders[shard][self.seq_pos:self.seq_pos + count]
            shards.append(np.full(len(taken), shard))
            starts.append(taken * self.seq_len)
            self.seq_pos, count = self.seq_pos + len(taken), count - len(taken)
            if self.seq_pos == self.num_seqs[shard]:
                self.shard_pos, self.seq_pos = self.shard_pos + 1, 0
        return np.concatenate(shards), np.concatenate(starts)

    def _rows(self, shards: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((len(starts), self.seq_len + 1), dtype=np.int64)
        for shard in np.unique(shards):
            self._check_tokens(shard)
            here = shards == shard
            rows[here] = self.shards[shard][starts[here, None] + np.arange(self.seq_len + 1)]
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def _check_tokens(self, shard: int) -> None:
        """An id outside the vocabulary would crash the embedding far from its cause (and the same way after
        every restart): look once per shard, when it is first read, and name the shard and the offset."""
        if shard in self.checked:
            return
        tokens = self.shards[shard]
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            offset = int(np.argmax(np.asarray(tokens) >= self.vocab_size))
            raise ShardFormatError(f"{self.files[shard]}: token id {int(tokens[offset])} at token {offset} is outside "
                                   f"the model's vocabulary of {self.vocab_size}")
        self.checked.add(shard)

    def reset(self) -> None:
        self.epoch = self.shard_pos = self.seq_pos = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "seq_pos": self.seq_pos,
                "seq_len": self.seq_len, "seed": self.seed, "num_shards": len(self.files)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        expected = {"seq_len": self.seq_len, "seed": self.seed, "num_shards": len(self.files)}
        mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in mismatched.items())
            raise ConfigError(f"checkpoint's data position does not fit this run's train data ({details})")
        self.epoch, self.shard_pos, self.seq_pos = state["epoch"], state["shard_pos"], state["seq_pos"]
