"""Batched scoring of token rows that share a prefix (HellaSwag's endings, CORE's choices): many examples per
forward pass, the result equal to one-at-a-time scoring.

An example is a few rows (one per ending / choice), each with a span of tokens to score: a row's score is
the cross-entropy of its span's tokens, each predicted from the position before it, and whether every one
of them is the model's greedy (argmax) prediction. The rows are packed into one sequence: the token prefix
they all share, then each row's rest, with position ids continuing from the prefix for every rest and an
attention mask letting each rest see the prefix and its own earlier tokens only. The model computes
exactly what the separate rows would give, with the prefix run once. Sequences are sorted by length and
right-padded into batches of at most `batch_tokens` tokens. Logits are computed only at the positions that
predict scored tokens, in chunks, never as (rows, T, vocab).

HellaSwag (llm.c): the rows are context + ending, the span the ending; acc picks the ending with the lowest
summed loss, acc_norm the lowest mean loss per ending token (llm.c's headline number).

The plan depends only on the examples and `batch_tokens`, so however the batches are later split across
tasks, every example is scored in the same batch with the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evals.core_data import common_length
from evals.hellaswag_data import NUM_ENDINGS, Example
from gpt2.model import GPT, GPTConfig, autocast_for

Result = dict[str, Any]  # an eval's scores, as summarized, recorded and reported
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "cuda": 65536}
# Logit elements materialised at once (64 MiB of fp32): bounds memory for any batch size.
_LOGIT_CHUNK_ELEMENTS = 1 << 24
_PADDING = -1  # segment id of padding


@dataclass(frozen=True)
class Packed:
    """Rows of one example as one sequence: the prefix they share, then each row's rest."""

    index: int
    label: int
    prefix: Sequence[int]  # tuples (HellaSwag) or int32 arrays (CORE)
    rests: tuple[Sequence[int], ...]
    spans: tuple[tuple[int, int], ...]  # [start, end) of each row's scored tokens, in row coordinates
    first_row: int = 0  # the example's row number of rests[0]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(rest) for rest in self.rests)


def pack_rows(index: int, label: int, rows: Sequence[Sequence[int]],
              spans: Sequence[tuple[int, int]]) -> list[Packed]:
    """An example's rows packed around their shared prefix; or, when they share less than half their mean length
    (rows cut to the context by different amounts), one sequence per row: packing would save little and make
    attention quadratic in the rows' total length."""
    shared = common_length(rows)
    if len(rows) > 1 and 2 * shared * len(rows) < sum(len(row) for row in rows):
        return [Packed(index, label, row, ((),), (span,), k) for k, (row, span) in
                enumerate(zip(rows, spans, strict=True))]
    return [Packed(index, label, rows[0][:shared], tuple(row[shared:] for row in rows), tuple(spans))]


def pack_hellaswag(example: Example) -> Packed:
    context = len(example.context)
    return Packed(example.index, example.label, example.context, example.endings,
                  tuple((context, context + len(ending)) for ending in example.endings))


@dataclass(frozen=True)
class Batch:
    """Packed, padded examples plus, flattened, every (sequence, position, target) to score."""

    tokens: np.ndarray  # (examples, T) int32: prefix, then each row's rest
    positions: np.ndarray  # (examples, T) position ids: each rest continues from the end of the prefix
    segments: np.ndarray  # (examples, T) 0 = prefix, k = row k's rest (1-based), -1 = padding
    example_index: np.ndarray  # (examples,)
    labels: np.ndarray  # (examples,)
    row_example: np.ndarray  # (rows,) which of the batch's examples each row belongs to
    row_number: np.ndarray  # (rows,) the row's number within its example
    row_tokens: np.ndarray  # (rows,) scored tokens per row
    score_rows: np.ndarray  # (n,) sequence of each scored position
    score_positions: np.ndarray  # (n,) column whose output predicts the target
    score_owner: np.ndarray  # (n,) which of the batch's rows the target belongs to
    targets: np.ndarray  # (n,) the token being predicted


@dataclass(frozen=True)
class RowScores:
    """Per row, in example-index order (an example's rows in their order)."""

    example_index: np.ndarray  # (rows,)
    row_number: np.ndarray  # (rows,) within its example
    labels: np.ndarray  # (rows,) the row's example's label
    sum_loss: np.ndarray  # (rows,) float64
    num_tokens: np.ndarray  # (rows,)
    greedy: np.ndarray  # (rows,) bool: every scored token is the argmax of its prediction

    @property
    def mean_loss(self) -> np.ndarray:
        """Per scored token; NaN for a row with nothing to score."""
        with np.errstate(invalid="ignore"):
            return self.sum_loss / self.num_tokens

    @classmethod
    def concatenate(cls, parts: Iterable[RowScores]) -> RowScores:
        parts = list(parts)
        index = np.concatenate([p.example_index for p in parts])
        row = np.concatenate([p.row_number for p in parts])
        order = np.lexsort((row, index))
        return cls(index[order], row[order], *(np.concatenate([getattr(p, f) for p in parts])[order]
                                               for f in ("labels", "sum_loss", "num_tokens", "greedy")))


@dataclass(frozen=True)
class Scores:
    """HellaSwag's per-example ending losses, in example-index order."""

    example_index: np.ndarray  # (examples,)
    labels: np.ndarray  # (examples,)
    sum_loss: np.ndarray  # (examples, 4)
    mean_loss: np.ndarray  # (examples, 4)

    @classmethod
    def of(cls, rows: RowScores) -> Scores:
        return cls(rows.example_index[::NUM_ENDINGS], rows.labels[::NUM_ENDINGS],
                   rows.sum_loss.reshape(-1, NUM_ENDINGS), rows.mean_loss.reshape(-1, NUM_ENDINGS))


def _build_batch(examples: Sequence[Packed]) -> Batch:
    width = max(example.length for example in examples)
    tokens = np.zeros((len(examples), width), dtype=np.int32)
    positions = np.zeros((len(examples), width), dtype=np.int32)
    segments = np.full((len(examples), width), _PADDING, dtype=np.int32)
    rows, columns, owners, targets, row_example, row_number, row_tokens = [], [], [], [], [], [], []
    for sequence, example in enumerate(examples):
        shared = len(example.prefix)
        tokens[sequence, :shared] = example.prefix
        positions[sequence, :shared] = np.arange(shared)
        segments[sequence, :shared] = 0
        start = shared
        for k, (rest, (first, end)) in enumerate(zip(example.rests, example.spans, strict=True)):
            span = slice(start, start + len(rest))
            tokens[sequence, span] = rest
            positions[sequence, span] = np.arange(shared, shared + len(rest))
            segments[sequence, span] = k + 1
            # Token t of the row is predicted by the output at row position t - 1, which lies in the prefix
            # or in this row's rest.
            predictor = np.arange(first - 1, end - 1)
            columns.append(np.where(predictor < shared, predictor, start + predictor - shared))
            rows.append(np.full(end - first, sequence))
            owners.append(np.full(end - first, len(row_tokens)))
            targets.append(np.concatenate([example.prefix, rest])[first:end].astype(np.int64))
            row_example.append(sequence)
            row_number.append(example.first_row + k)
            row_tokens.append(end - first)
            start += len(rest)
    return Batch(tokens, positions, segments, np.array([ex.index for ex in examples]),
                 np.array([ex.label for ex in examples]), np.array(row_example), np.array(row_number),
                 np.array(row_tokens),
                 np.concatenate(rows).astype(np.int64), np.concatenate(columns).astype(np.int64),
                 np.concatenate(owners).astype(np.int64), np.concatenate(targets))


def plan_packed(examples: Sequence[Packed], batch_tokens: int) -> list[Batch]:
    """Longest examples first, each batch holding as many as fit in `batch_tokens` padded tokens (at least one)."""
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    ordered = sorted(examples, key=lambda ex: (-ex.length, ex.index, ex.first_row))
    batches, current = [], []
    for example in ordered:
        width = (current[0] if current else example).length
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(_build_batch(current))
            current = []
        current.append(example)
    if current:
        batches.append(_build_batch(current))
    return batches


def plan_batches(examples: Sequence[Example], batch_tokens: int) -> list[Batch]:
    """HellaSwag examples planned into batches (see `plan_packed`)."""
    return plan_packed([pack_hellaswag(example) for example in examples], batch_tokens)


def _packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) True where a position may attend: earlier positions of the prefix or of its own rest."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    visible = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    return (causal & visible)[:, None]


def _token_scores(hidden: torch.Tensor, unembedding: torch.Tensor,
                  targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each (hidden row, target) and whether the target is the argmax, logits computed a
    chunk of rows at a time."""
    step = max(1, _LOGIT_CHUNK_ELEMENTS // unembedding.shape[0])
    losses, hits = [hidden.new_zeros(0, dtype=torch.float32)], [targets.new_zeros(0, dtype=torch.bool)]
    for start in range(0, hidden.shape[0], step):
        logits = (hidden[start:start + step] @ unembedding.t()).float()
        target = targets[start:start + step, None]
        losses.append(torch.logsumexp(logits, 1) - logits.gather(1, target).squeeze(1))
        hits.append(logits.argmax(1) == target.squeeze(1))
    return torch.cat(losses), torch.cat(hits)


@torch.no_grad()
def score_batch(model: GPT, batch: Batch) -> RowScores:
    device = model.wte.weight.device
    longest_row = batch.positions.max(1)
    if longest_row.max() >= model.config.block_size:
        raise ValueError(f"example {batch.example_index[longest_row.argmax()]}: a row is {longest_row.max() + 1} "
                         f"tokens, more than the model's block size {model.config.block_size}")

    def as_tensor(array: np.ndarray) -> torch.Tensor:  # a copy: arrays from Ray's object store are read-only
        return torch.tensor(array, device=device)

    with autocast_for(device):
        hidden = model.hidden_states(as_tensor(batch.tokens).long(), as_tensor(batch.positions).long(),
                                     _packed_attention_mask(as_tensor(batch.segments)))
        scored = hidden[as_tensor(batch.score_rows), as_tensor(batch.score_positions)]
        losses, hits = _token_scores(scored, model.wte.weight[: model.config.vocab_size], as_tensor(batch.targets))
    owners = as_tensor(batch.score_owner)
    # Sums in float64 so the order tokens are added in does not move the last digits.
    sums = torch.zeros(len(batch.row_tokens), dtype=torch.float64, device=device)
    sums.index_add_(0, owners, losses.double())
    misses = torch.zeros(len(batch.row_tokens), dtype=torch.int64, device=device)
    misses.index_add_(0, owners, (~hits).long())
    return RowScores(batch.example_index[batch.row_example], batch.row_number, batch.labels[batch.row_example],
                     sums.cpu().numpy(), batch.row_tokens, (misses == 0).cpu().numpy())


def score_rows(model: GPT, batches: Sequence[Batch]) -> RowScores:
    return RowScores.concatenate(score_batch(model, batch) for batch in batches)


def score_batches(model: GPT, batches: Sequence[Batch]) -> Scores:
    """HellaSwag's per-example scores."""
    return Scores.of(score_rows(model, batches))


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


def hellaswag_result(rows: RowScores) -> dict[str, float | int]:
    return summarize(Scores.of(rows))


def forward_flops(config: GPTConfig, batches: Sequence[Batch]) -> int:
    """FLOPs of scoring `batches` as planned (padding included): per token 24*L*C^2 for the block matmuls and
    4*L*W*C for attention over the batch width W, plus 2*C*V per scored position for the logits."""
    L, C, V = config.n_layer, config.n_embd, config.vocab_size
    return sum(b.tokens.size * (24 * L * C * C + 4 * L * b.tokens.shape[1] * C) + 2 * C * V * b.targets.size
               for b in batches)


def default_batch_tokens(device: torch.device | str) -> int:
    return DEFAULT_BATCH_TOKENS.get(torch.device(device).type, DEFAULT_BATCH_TOKENS["cpu"])


def score_live_model(model: GPT, batches: Sequence[Batch]) -> RowScores:
    """Score with a model that may be in training: eval mode for the call, and its compiled blocks run eagerly
    (the eval's many batch shapes would each compile anew). It is handed back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            return score_rows(model, batches)
    finally:
        model.train(was_training)


def evaluate(model: GPT, examples: Sequence[Example], batch_tokens: int | None = None) -> dict[str, float | int]:
    """Score `examples` in this process (no Ray) on the model's device: for machines without Ray, and the
    reference every distributed path must equal."""
    batches = plan_batches(examples, batch_tokens or default_batch_tokens(model.wte.weight.device))
    return hellaswag_result(score_live_model(model, batches))
