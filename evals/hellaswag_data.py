"""HellaSwag examples as token ids: the validation jsonl (downloaded once and cached) or llm.c's eval `.bin`.

Rendering follows llm.c / build-nanogpt: context = GPT-2 tokens of `ctx`, each ending = tokens of
`" " + ending` (the leading space because GPT-2's BPE attaches spaces to the following word).

llm.c's eval file (dev/data/data_common.py write_evalfile): a 256 int32 header (magic 20240522, version 1,
number of examples, longest example in bytes), then per example a stream of uint16: 65535 delimiter, the
example's size in bytes (delimiter included), its index, its label, the number of completions, then the
context as (length, tokens...) and each completion as (length, tokens...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import cache_root, fetch, jsonl_records
from pipelines.tokenizer import gpt2_encoding

CANONICAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
CACHED_NAME = "hellaswag_val.jsonl"
NUM_ENDINGS = 4
EVAL_MAGIC = 20240522
EVAL_VERSION = 1
HEADER_INTS = 256
_EXAMPLE_START = 2**16 - 1


class HellaSwagFormatError(ValueError):
    """Input that is not valid HellaSwag data; the message names the file and line or example."""


def default_data_dir() -> Path:
    """Where the downloaded validation set is cached (read when asked: the environment may change)."""
    return cache_root() / "hellaswag"


@dataclass(frozen=True)
class Example:
    """One rendered example: `index` is its position in the source, `label` the correct ending."""

    index: int
    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]
    label: int


def check_fits(examples: list[Example], block_size: int, source: str | os.PathLike) -> None:
    """Refuse examples that a model of `block_size` positions cannot score: context + an ending longer than it."""
    for example in examples:
        longest = len(example.context) + max(len(ending) for ending in example.endings)
        if longest > block_size:
            raise HellaSwagFormatError(f"{source}: example {example.index}: context + ending is {longest} tokens, "
                                       f"more than the model's block size {block_size}")


def _check_record(record: object) -> str | None:
    """Why a parsed jsonl line is not a HellaSwag example, or None when it is one."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for field in ("ctx", "endings", "label"):
        if field not in record:
            return f"missing field {field!r}"
    if not isinstance(record["ctx"], str) or not record["ctx"]:
        return "'ctx' must be a non-empty string"
    endings = record["endings"]
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS:
        return f"'endings' must be a list of {NUM_ENDINGS} strings"
    if not all(isinstance(ending, str) for ending in endings):
        return f"'endings' must be a list of {NUM_ENDINGS} strings"
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        return f"'label' must be an integer 0-{NUM_ENDINGS - 1}, got {label!r}"
    return None


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Examples from a HellaSwag-schema jsonl file (blank lines skipped), tokenized with GPT-2's BPE."""
    encoding = gpt2_encoding()
    examples = []
    for _, record in jsonl_records(Path(path), _check_record, HellaSwagFormatError):
        # encode_ordinary: text that happens to contain "<|endoftext|>" is scored as text, not as EOT.
        endings = tuple(tuple(encoding.encode_ordinary(" " + ending)) for ending in record["endings"])
        examples.append(Example(len(examples), tuple(encoding.encode_ordinary(record["ctx"])), endings,
                                record["label"]))
    return examples


def read_eval_bin(path: str | os.PathLike) -> list[Example]:
    """Examples from an llm.c eval file (magic 20240522); only 4-ending examples, as HellaSwag has."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise HellaSwagFormatError(f"{path}: cannot read llm.c eval file ({err.strerror})") from err
    if len(raw) < HEADER_INTS * 4 or len(raw) % 2:
        raise HellaSwagFormatError(f"{path}: too short or odd-sized for an llm.c eval file")
    header = np.frombuffer(raw[: HEADER_INTS * 4], dtype="<i4")
    if header[0] != EVAL_MAGIC:
        raise HellaSwagFormatError(f"{path}: bad magic {header[0]}, expected {EVAL_MAGIC} (not an llm.c eval file)")
    if header[1] != EVAL_VERSION:
        raise HellaSwagFormatError(f"{path}: unsupported eval file version {header[1]}, expected {EVAL_VERSION}")
    stream = np.frombuffer(raw[HEADER_INTS * 4:], dtype="<u2").astype(np.int64)
    examples = []
    pos = 0
    for number in range(int(header[2])):
        where = f"{path}: example {number} (uint16 offset {pos})"
        if pos + 5 > len(stream) or stream[pos] != _EXAMPLE_START:
            raise HellaSwagFormatError(f"{where}: missing example delimiter, truncated or corrupt")
        size, index, label, num_endings = (int(v) for v in stream[pos + 1: pos + 5])
        end = pos + size // 2
        if size % 2 or end > len(stream):
            raise HellaSwagFormatError(f"{where}: size {size} bytes runs past the end of the file")
        if num_endings != NUM_ENDINGS or not 0 <= label < num_endings:
            raise HellaSwagFormatError(f"{where}: {num_endings} endings with label {label}, expected 4 and 0-3")
        cursor = pos + 5
        spans = []
        for _ in range(1 + num_endings):  # the context, then each ending: (length, tokens...)
            length = int(stream[cursor]) if cursor < end else -1
            if length <= 0 or cursor + 1 + length > end:
                raise HellaSwagFormatError(f"{where}: empty or overlong token run at offset {cursor}")
            spans.append(tuple(int(t) for t in stream[cursor + 1: cursor + 1 + length]))
            cursor += 1 + length
        if cursor != end:
            raise HellaSwagFormatError(f"{where}: size field says {size} bytes, contents take {2 * (cursor - pos)}")
        examples.append(Example(index, spans[0], tuple(spans[1:]), label))
        pos = end
    if pos != len(stream):
        raise HellaSwagFormatError(f"{path}: {len(stream) - pos} uint16s after the {header[2]} examples the header "
                                   "declares")
    if not examples:
        raise HellaSwagFormatError(f"{path}: no examples")
    return examples


def download(url: str, destination: Path, timeout: float = 60.0) -> Path:
    try:
        return fetch(url, destination, timeout)
    except OSError as err:
        raise HellaSwagFormatError(f"cannot download HellaSwag from {url}: {err}") from err


def is_eval_bin(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == np.array([EVAL_MAGIC], dtype="<i4").tobytes()


def load_examples(file: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                  url: str = CANONICAL_URL) -> list[Example]:
    """Examples from `file` (jsonl, or llm.c eval .bin by its magic) or else from the cached validation set
    in `data_dir` (default: default_data_dir()), downloading it from `url` on first use."""
    if file is None:
        path = Path(data_dir or default_data_dir()) / CACHED_NAME
        if not path.exists():
            download(url, path)
    else:
        path = Path(file)
        if not path.is_file():
            raise HellaSwagFormatError(f"--file {path}: no such file")
    return read_eval_bin(path) if is_eval_bin(path) else read_jsonl(path)
