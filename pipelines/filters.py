"""Document filters, vectorised over an Arrow batch; every dropped document is attributed to one reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Reason codes index this tuple; 0 means kept. "duplicate" is decided after tokenizing, by pipelines.dedup.
DROP_REASONS = ("kept", "empty", "int_score", "score", "language_score", "min_chars", "max_chars", "duplicate")


@dataclass(frozen=True)
class FilterConfig:
    min_int_score: int | None = None
    min_score: float | None = None
    min_language_score: float | None = None
    min_chars: int = 0
    max_chars: int | None = None
    dedup: bool = False

    def threshold_columns(self) -> dict[str, float]:
        """Score columns with a threshold set, by column name."""
        thresholds = {"int_score": self.min_int_score, "score": self.min_score,
                      "language_score": self.min_language_score}
        return {column: value for column, value in thresholds.items() if value is not None}

    def to_dict(self) -> dict:
        return asdict(self)


def document_columns(columns: list[str], filters: FilterConfig) -> list[str]:
    """What the read stage reads of an input with `columns`: text and the filters' score columns it has."""
    return ["text", *[column for column in filters.threshold_columns() if column in columns]]


def drop_reasons(batch: pa.Table, config: FilterConfig) -> np.ndarray:
    """int8 per document: 0 if kept, else the index in DROP_REASONS of the first filter that dropped it.

    Score thresholds apply only where the column exists (the job reports the ones that did not apply);
    a missing score value fails its threshold.
    """
    text = batch["text"]
    reasons = np.zeros(batch.num_rows, dtype=np.int8)

    def mark(code: int, failed: pa.ChunkedArray | pa.Array) -> None:
        failed = np.asarray(pc.fill_null(failed, True), dtype=bool)
        reasons[(reasons == 0) & failed] = code

    # empty or whitespace only: byte lengths come from the offsets, and utf8_is_space stops at the first
    # non-space character, so neither reads the texts through (utf8_length would: ~1% of the BPE time)
    mark(DROP_REASONS.index("empty"), pc.or_(pc.equal(pc.binary_length(text), 0), pc.utf8_is_space(text)))
    for column, threshold in config.threshold_columns().items():
        if column in batch.column_names:
            mark(DROP_REASONS.index(column), pc.less(batch[column], threshold))
    if config.min_chars or config.max_chars is not None:
        length = pc.utf8_length(text)
        if config.min_chars:
            mark(DROP_REASONS.index("min_chars"), pc.less(length, config.min_chars))
        if config.max_chars is not None:
            mark(DROP_REASONS.index("max_chars"), pc.greater(length, config.max_chars))
    return reasons
