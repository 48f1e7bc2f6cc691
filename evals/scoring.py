"""HellaSwag scoring, batched: many examples per forward pass, the result equal to one-at-a-time scoring.

For each example the four rows are context + ending. A row's score is the cross-entropy of its ending
tokens, each predicted from the position before it. acc picks the ending with the lowest summed loss,
acc_norm the lowest mean loss per ending token (llm.c's headline number).

Layout: the four rows share their context, so each example is packed into one sequence, context then the
four endings, with position ids restarting after the context for every ending and an attention mask
letting each ending see the context and its own earlier tokens only. The model computes exactly what the
four separate rows would give, with the context run once instead of four times. Sequences are sorted by
length and right-padded into batches of at most `batch_tokens` tokens. Logits are computed only at the
positions that predict ending tokens, in chunks, never as (rows, T, vocab).

The plan depends only on the examples and `batch_tokens`, so however the batches are later split across
tasks, every example is scored in the same batch with the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from evals.hellaswag_data import NUM_ENDINGS, Example
from gpt2.model import GPT, GPTConfig, autocast_for

DEFAULT_BATCH_TOKENS = {"cpu": 2048, "cuda": 65536}
# Logit elements materialised at once (64 MiB of fp32): bounds memory for any batch size.
_LOGIT_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Batch:
    """Packed, padded examples plus, flattened, every (row, position, target) to score."""

    tokens: np.ndarray  # (examples, T) int64: context, then the four endings
    positions: np.ndarray  # (examples, T) position ids: each ending continues from the end of the context
    segments: np.ndarray  # (examples, T) 0 = context, k = ending k (1-4), 5 = padding
    example_index: np.ndarray  # (examples,)
    labels: np.ndarray  # (examples,)
    score_rows: np.ndarray  # (n,) row of each scored position
    score_positions: np.ndarray  # (n,) column whose output predicts the target
    score_endings: np.ndarray  # (n,) which of the batch's 4 * examples endings the target belongs to
    targets: np.ndarray  # (n,) the ending token being predicted
    ending_lengths: np.ndarray  # (4 * examples,)


@dataclass(frozen=True)
class Scores:
    """Per-example ending losses, in example-index order."""

    example_index: np.ndarray  # (examples,)
    labels: np.ndarray  # (examples,)
    sum_loss: np.ndarray  # (examples, 4)
    mean_loss: np.ndarray  # (examples, 4)

    @classmethod
    def concatenate(cls, parts: Iterable[Scores]) -> Scores:
        parts = list(parts)
        index = np.concatenate([p.example_index for p in parts])
        order = np.argsort(index, kind="stable")
        return cls(index[order], *(np.concatenate([getattr(p, f) for p in parts])[order]
                                   for f in ("labels", "sum_loss", "mean_loss")))


def packed_length(example: Example) -> int:
    return len(example.context) + sum(len(ending) for ending in example.endings)


def _build_batch(examples: Sequence[Example]) -> Batch:
    width = max(packed_length(example) for example in examples)
    tokens = np.zeros((len(examples), width), dtype=np.int64)
    positions = np.zeros((len(examples), width), dtype=np.int64)
    segments = np.full((len(examples), width), NUM_ENDINGS + 1, dtype=np.int64)
    rows, columns, endings, targets, lengths = [], [], [], [], []
    for row, example in enumerate(examples):
        context = len(example.context)
        tokens[row, :context] = example.context
        positions[row, :context] = np.arange(context)
        segments[row, :context] = 0
        start = context
        for k, ending in enumerate(example.endings):
            span = slice(start, start + len(ending))
            tokens[row, span] = ending
            positions[row, span] = np.arange(context, context + len(ending))
            segments[row, span] = k + 1
            # The first ending token is predicted by the last context token, the rest by their predecessor.
            columns.append(np.concatenate([[context - 1], np.arange(start, start + len(ending) - 1)]))
            rows.append(np.full(len(ending), row))
            endings.append(np.full(len(ending), NUM_ENDINGS * row + k))
            targets.append(np.asarray(ending))
            lengths.append(len(ending))
            start += len(ending)
    return Batch(tokens, positions, segments, np.array([ex.index for ex in examples]),
                 np.array([ex.label for ex in examples]), np.concatenate(rows), np.concatenate(columns),
                 np.concatenate(endings), np.concatenate(targets).astype(np.int64), np.array(lengths))


def plan_batches(examples: Sequence[Example], batch_tokens: int) -> list[Batch]:
    """Longest examples first, each batch holding as many as fit in `batch_tokens` padded tokens (at least one)."""
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    ordered = sorted(examples, key=lambda ex: (-packed_length(ex), ex.index))
    batches, current = [], []
    for example in ordered:
        width = packed_length(current[0] if current else example)
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(_build_batch(current))
            current = []
        current.append(example)
    if current:
        batches.append(_build_batch(current))
    return batches


def _packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) True where a position may attend: earlier positions of the context or of its own ending."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    visible = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    return (causal & visible)[:, None]


def _token_losses(hidden: torch.Tensor, unembedding: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each (hidden row, target), logits computed a chunk of rows at a time."""
    step = max(1, _LOGIT_CHUNK_ELEMENTS // unembedding.shape[0])
    losses = []
    for start in range(0, hidden.shape[0], step):
        logits = (hidden[start:start + step] @ unembedding.t()).float()
        target = targets[start:start + step, None]
        losses.append(torch.logsumexp(logits, 1) - logits.gather(1, target).squeeze(1))
    return torch.cat(losses)


@torch.no_grad()
def score_batch(model: GPT, batch: Batch) -> Scores:
    device = model.wte.weight.device
    longest_row = batch.positions.max(1)
    if longest_row.max() >= model.config.block_size:
        raise ValueError(f"HellaSwag example {batch.example_index[longest_row.argmax()]}: context + ending is "
                         f"{longest_row.max() + 1} tokens, more than the model's block size {model.config.block_size}")

    def as_tensor(array: np.ndarray) -> torch.Tensor:  # a copy: arrays from Ray's object store are read-only
        return torch.tensor(array, device=device)

    with autocast_for(device):
        hidden = model.hidden_states(as_tensor(batch.tokens), as_tensor(batch.positions),
                                     _packed_attention_mask(as_tensor(batch.segments)))
        scored = hidden[as_tensor(batch.score_rows), as_tensor(batch.score_positions)]
        losses = _token_losses(scored, model.wte.weight[: model.config.vocab_size], as_tensor(batch.targets))
    # Sums in float64 so the order tokens are added in does not move the last digits.
    sums = torch.zeros(len(batch.ending_lengths), dtype=torch.float64, device=device)
    sums.index_add_(0, as_tensor(batch.score_endings), losses.double())
    means = sums / as_tensor(batch.ending_lengths)
    return Scores(batch.example_index, batch.labels, sums.view(-1, NUM_ENDINGS).cpu().numpy(),
                  means.view(-1, NUM_ENDINGS).cpu().numpy())


def score_batches(model: GPT, batches: Sequence[Batch]) -> Scores:
    return Scores.concatenate(score_batch(model, batch) for batch in batches)


def counts(scores: Scores) -> tuple[int, int, int]:
    """(correct by summed loss, correct by mean loss, examples); argmin takes the first ending on exact ties,
    as torch does. Counts of disjoint parts add up to the counts of the whole."""
    return (int((scores.sum_loss.argmin(1) == scores.labels).sum()),
            int((scores.mean_loss.argmin(1) == scores.labels).sum()), len(scores.labels))


def summarize_counts(num_correct: int, num_correct_norm: int, total: int) -> dict[str, float | int]:
    return {"acc": num_correct / total, "acc_norm": num_correct_norm / total, "num_correct": num_correct,
            "num_correct_norm": num_correct_norm, "num_total": total}


def summarize(scores: Scores) -> dict[str, float | int]:
    """acc / acc_norm and the counts behind them."""
    return summarize_counts(*counts(scores))


def forward_flops(config: GPTConfig, batches: Sequence[Batch]) -> int:
    """FLOPs of scoring `batches` as planned (padding included): per token 24*L*C^2 for the block matmuls and
    4*L*W*C for attention over the batch width W, plus 2*C*V per scored position for the logits."""
    L, C, V = config.n_layer, config.n_embd, config.vocab_size
    return sum(b.tokens.size * (24 * L * C * C + 4 * L * b.tokens.shape[1] * C) + 2 * C * V * b.targets.size
               for b in batches)


def default_batch_tokens(device: torch.device | str) -> int:
    return DEFAULT_BATCH_TOKENS.get(torch.device(device).type, DEFAULT_BATCH_TOKENS["cpu"])


def score_live_model(model: GPT, batches: Sequence[Batch]) -> Scores:
    """Score with a model that may be in training: eval mode for the call, and its compiled blocks run eagerly
    (the eval's many batch shapes would each compile anew). It is handed back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            return score_batches(model, batches)
    finally:
        model.train(was_training)


def evaluate(model: GPT, examples: Sequence[Example], batch_tokens: int | None = None) -> dict[str, float | int]:
    """Score `examples` in this process (no Ray) on the model's device: for machines without Ray, and the
    reference every distributed path must equal."""
    batches = plan_batches(examples, batch_tokens or default_batch_tokens(model.wte.weight.device))
    return summarize(score_live_model(model, batches))
