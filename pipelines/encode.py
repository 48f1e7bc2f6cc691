"""Encoding a work unit: BPE its filtered documents and write the unit's tokens (and counters) to -o.

Runs in the actors of the job's Ray Data stage `Tokenize` (pipelines.dataset), one GPT-2 encoder each, built
once. Nothing but a few counters goes on down the pipeline: the tokens go straight to the output directory,
so the job has no single process that every token must cross.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from pipelines.dedup import HASH_ROW
from pipelines.filters import DROP_REASONS
from pipelines.shards import TOKEN_DTYPE
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding
from pipelines.workdir import OutputDir, unit_file

EOT = np.array([EOT_TOKEN], dtype=np.uint32)


def text_hash(text: str) -> int:
    """The 64-bit hash --dedup compares documents by."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class UnitEncoder:
    """One GPT-2 encoder, built once per Tokenize actor; encodes the filtered documents of one unit at a time."""

    def __init__(self, out: OutputDir, dedup: bool):
        self.out = out
        self.dedup = dedup
        encoding = gpt2_encoding()
        # encode_ordinary's tokens as a uint32 array: tiktoken documents encode(text, disallowed_special=())
        # as equal to encode_ordinary, and the array skips building a Python int per token (~10% of the CPU)
        self.encode = functools.partial(encoding.encode_to_numpy, disallowed_special=())

    def encode_unit(self, unit: int, texts: list[str], docs: int, dropped: np.ndarray) -> dict:
        """Encode the kept `texts` of `unit` (of `docs` read, `dropped` per reason) and write them; returns
        the unit's counters (also written beside its tokens, last: their presence marks the unit done)."""
        pieces = []  # EOT, then the document's tokens, for every kept document
        hashes, lengths = [], []
        for text in texts:
            pieces += (EOT, self.encode(text))
            if self.dedup:
                hashes.append(text_hash(text))
                lengths.append(1 + pieces[-1].size)
        # straight into uint16 (GPT-2's 50,257 ids fit): no uint32 copy of the whole unit in between
        tokens = (np.concatenate(pieces, dtype=TOKEN_DTYPE, casting="unsafe") if pieces
                  else np.zeros(0, TOKEN_DTYPE))
        with self.out.write(unit_file(unit, "tokens")) as f:
            f.write(tokens)
        if self.dedup:
            rows = np.zeros(len(hashes), dtype=HASH_ROW)
            rows["hash"], rows["unit"], rows["tokens"] = hashes, unit, lengths
            rows["doc"] = np.arange(len(hashes))
            with self.out.write(unit_file(unit, "hashes.npy")) as f:
                np.save(f, rows)
        counters = {"unit": unit, "tokens": int(tokens.size), "docs": docs,
                    "dropped": dict(zip(DROP_REASONS[1:], dropped[1:].tolist(), strict=True))}
        self.out.write_json(unit_file(unit, "json"), counters)
        return counters
