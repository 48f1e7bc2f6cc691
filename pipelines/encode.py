"""Encoding a work unit: read it, filter it, BPE it, and write the unit's tokens (and counters) to -o.

Runs in the actors of the job's Ray Data stage `Tokenize`, one GPT-2 encoder each, built once. Nothing but
a few counters goes back to the driver: the tokens go straight to the output directory, so the job has no
single process that every token must cross.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.dedup import HASH_ROW
from pipelines.filters import DROP_REASONS, FilterConfig, drop_reasons
from pipelines.plan import WorkUnit
from pipelines.shards import TOKEN_DTYPE, ShardFormatError
from pipelines.sources import InputError, InputFiles
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding
from pipelines.workdir import OutputDir, unit_file

EOT = np.array([EOT_TOKEN], dtype=np.uint32)


def text_hash(text: str) -> int:
    """The 64-bit hash --dedup compares documents by."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class EncodeJob:
    """What every worker needs for every unit, sent once when it starts."""

    inputs: InputFiles
    out: OutputDir
    filters: FilterConfig
    columns: list[str]  # text and the filter columns that exist
    batch_rows: int


class UnitEncoder:
    def __init__(self, job: EncodeJob):
        self.job = job
        encoding = gpt2_encoding()
        # encode_ordinary's tokens as a uint32 array: tiktoken documents encode(text, disallowed_special=())
        # as equal to encode_ordinary, and the array skips building a Python int per token (~10% of the CPU)
        self.encode = functools.partial(encoding.encode_to_numpy, disallowed_special=())

    def encode_unit(self, unit: WorkUnit) -> dict:
        """Read, filter and encode `unit` and write it; returns its counters (also written beside its tokens)."""
        tables = [self.job.inputs.read(piece, self.job.columns, self.job.batch_rows) for piece in unit.pieces]
        return self._encode_and_write(unit, tables)

    def _encode_and_write(self, unit: WorkUnit, tables: list[pa.Table]) -> dict:
        dedup = self.job.filters.dedup
        pieces = []  # EOT, then the document's tokens, for every kept document
        hashes, lengths = [], []
        dropped = np.zeros(len(DROP_REASONS), dtype=np.int64)
        for table in tables:
            reasons = drop_reasons(table, self.job.filters)
            dropped += np.bincount(reasons, minlength=len(DROP_REASONS))
            for text, reason in zip(table["text"].to_pylist(), reasons.tolist(), strict=True):
                if reason:
                    continue
                pieces += (EOT, self.encode(text))
                if dedup:
                    hashes.append(text_hash(text))
                    lengths.append(1 + pieces[-1].size)
        # straight into uint16 (GPT-2's 50,257 ids fit): no uint32 copy of the whole unit in between
        tokens = (np.concatenate(pieces, dtype=TOKEN_DTYPE, casting="unsafe") if pieces
                  else np.zeros(0, TOKEN_DTYPE))

        out = self.job.out
        with out.write(unit_file(unit.index, "tokens")) as f:
            f.write(tokens)
        if dedup:
            rows = np.zeros(len(hashes), dtype=HASH_ROW)
            rows["hash"], rows["unit"], rows["tokens"] = hashes, unit.index, lengths
            rows["doc"] = np.arange(len(hashes))
            with out.write(unit_file(unit.index, "hashes.npy")) as f:
                np.save(f, rows)
        counters = {"unit": unit.index, "tokens": int(tokens.size), "docs": int(sum(t.num_rows for t in tables)),
                    "dropped": dict(zip(DROP_REASONS[1:], dropped[1:].tolist(), strict=True))}
        out.write_json(unit_file(unit.index, "json"), counters)  # last: its presence marks the unit done
        return counters


class Tokenize:
    """The job's Ray Data stage (map_batches on an actor pool): work units in, as JSON, their counters out;
    each unit's tokens are written to -o by the actor. An input error comes back as a row naming it, not as
    a failed task: the driver stops the job with that one line, where Ray Data would print a traceback."""

    def __init__(self, job: EncodeJob):
        self.encoder = UnitEncoder(job)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        units = [WorkUnit.from_dict(json.loads(unit)) for unit in batch["unit"]]
        try:
            counters = [self.encoder.encode_unit(unit) for unit in units]
        except (InputError, ShardFormatError) as err:
            return {"counters": np.array([""]), "error": np.array([str(err)])}
        return {"counters": np.array([json.dumps(c) for c in counters]), "error": np.array([""] * len(counters))}
