"""Batches from llm.c token shards, each rank reading a disjoint slice of one shared global stream.

A shard of n tokens holds (n - 1) // T sequences of T+1 tokens (consecutive sequences share one token, the
last target). Each global batch is the next `world * B` sequences of the current shard's order; rank r
takes the r-th group of B. Per epoch the train stream permutes the shard order and each shard's sequence
order from (seed, epoch), identically on every rank, so ranks never overlap and a run with 2 ranks of B
sees exactly the batches of 1 rank with 2*B. The position is three integers, saved in checkpoints.
"""

from __future__ import annotations

import glob

import numpy as np
import torch

from gpt2.model import GPT2_VOCAB
from pipelines.shards import ShardFormatError, read_shard
from training.config import ConfigError


class ShardLoader:
    def __init__(self, pattern: str, flag: str, batch: int, seq_len: int, rank: int = 0, world: int = 1,
                 seed: int = 42, shuffle: bool = True, vocab_size: int = GPT2_VOCAB):
        self.files = sorted(glob.glob(pattern))
        if not self.files:
            raise ConfigError(f"{flag} {pattern!r}: no files match")
        self.shards = [read_shard(path) for path in self.files]
        self.batch, self.seq_len, self.rank, self.world = batch, seq_len, rank, world
        self.seed, self.shuffle, self.vocab_size = seed, shuffle, vocab_size
        self.checked: set[int] = set()  # shards whose token ids are known to fit the vocabulary
        self.num_seqs = [max(0, (len(tokens) - 1) // seq_len) for tokens in self.shards]
        self.global_batch = world * batch
        if max(self.num_seqs) < self.global_batch:
            raise ConfigError(
                f"{flag} {pattern!r}: no shard holds one global batch of {world} rank(s) x -b {batch} "
                f"sequences of -t {seq_len}+1 tokens (largest shard: {max(len(s) for s in self.shards)} tokens)"
            )
        self.batches_per_epoch = sum(n // self.global_batch for n in self.num_seqs)
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

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, T) int64 on CPU, for this rank."""
        shard_order, seq_orders = self._epoch_orders()
        while self.seq_pos + self.global_batch > self.num_seqs[shard_order[self.shard_pos]]:
            self.shard_pos, self.seq_pos = self.shard_pos + 1, 0
            if self.shard_pos == len(self.shards):
                self.epoch, self.shard_pos = self.epoch + 1, 0
                shard_order, seq_orders = self._epoch_orders()
        shard = shard_order[self.shard_pos]
        self._check_tokens(shard)
        first = self.seq_pos + self.rank * self.batch
        starts = seq_orders[shard][first:first + self.batch] * self.seq_len
        rows = np.asarray(self.shards[shard][starts[:, None] + np.arange(self.seq_len + 1)], dtype=np.int64)
        self.seq_pos += self.global_batch
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
