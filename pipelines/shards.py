"""llm.c's token shard format: the one place that writes, reads and validates `.bin` shards.

Layout (llm.c dev/data/data_common.py): a header of 256 little-endian int32 — magic 20240520, version 1,
token count, zeros — followed by the tokens as little-endian uint16.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import numpy as np

from common.files import atomic_write, is_url, local_path

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_SHARD_TOKENS = np.iinfo("<i4").max  # the header stores the token count as int32


class ShardFormatError(ValueError):
    """A file that is not a valid llm.c token shard; the message names the file."""


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot start shard names, or None: a name goes into the output directory, never elsewhere."""
    if not prefix or any(part in prefix for part in ("/", "\\", os.sep, "..", "*", "?", "[")):
        return "a shard name prefix, not a path (no '/', '..' or wildcards); the shards go into the output directory"
    return None


def shard_name(prefix: str, index: int) -> str:
    """llm.c's naming: shard 0 is the validation split, every later shard is train."""
    split = "val" if index == 0 else "train"
    return f"{prefix}_{split}_{index:06d}.bin"


def encode_header(num_tokens: int) -> bytes:
    if not 0 <= num_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds 0 to {MAX_SHARD_TOKENS:,} tokens (int32 header), not {num_tokens:,}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, num_tokens)
    return header.tobytes()


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write `tokens` as a shard atomically (temp name, fsync, rename); returns the file's sha256."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError(f"{path}: token ids must fit in uint16")
    return write_shard_chunks(path, tokens.size, [tokens.astype(TOKEN_DTYPE, copy=False)])


def write_shard_chunks(path: str | os.PathLike, num_tokens: int,
                       chunks: Iterable[bytes | memoryview | np.ndarray]) -> str:
    """Write a shard whose body (little-endian uint16 tokens) arrives in pieces, atomically; returns its
    sha256. The pieces must add up to exactly `num_tokens` tokens, or nothing is written."""
    header = encode_header(num_tokens)
    digest = hashlib.sha256(header)
    body_bytes = 0
    with atomic_write(path) as f:
        f.write(header)
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            digest.update(view)
            f.write(view)
            body_bytes += view.nbytes
        if body_bytes != TOKEN_DTYPE.itemsize * num_tokens:
            raise ValueError(f"{path}: {body_bytes} body bytes for a header of {num_tokens} tokens")
    return digest.hexdigest()


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size (local path or fsspec URL); returns its token count."""
    try:
        if is_url(path):
            import fsspec

            fs, target = fsspec.core.url_to_fs(str(path))
            size = fs.size(target)
            raw = fs.cat_file(target, start=0, end=HEADER_BYTES)
        else:
            path = local_path(path)
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw = f.read(HEADER_BYTES)
    except OSError as err:
        raise ShardFormatError(f"{path}: cannot read shard ({err.strerror or err})") from err
    if len(raw) < HEADER_BYTES:
        raise ShardFormatError(f"{path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
    magic, version, num_tokens = np.frombuffer(raw, dtype="<i4", count=3)
    if magic != MAGIC:
        raise ShardFormatError(f"{path}: bad magic {magic}, expected {MAGIC} (not an llm.c token shard)")
    if version != VERSION:
        raise ShardFormatError(f"{path}: unsupported version {version}, expected {VERSION}")
    if num_tokens < 0:
        raise ShardFormatError(f"{path}: negative token count {num_tokens}")
    expected = HEADER_BYTES + TOKEN_DTYPE.itemsize * int(num_tokens)
    if size != expected:
        kind = "truncated" if size < expected else "size mismatch"
        raise ShardFormatError(
            f"{path}: {kind}: {size} bytes on disk, header says {num_tokens} tokens = {expected} bytes"
        )
    return int(num_tokens)


def read_shard(path: str | os.PathLike) -> np.memmap:
    """The shard's tokens as a read-only uint16 memmap (validated first)."""
    num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def write_random_shards(directory: str | os.PathLike, prefix: str = "rand", shards: int = 3,
                        tokens_per_shard: int = 4000, seed: int = 0) -> list[str]:
    """Shards of uniformly random GPT-2 token ids, llm.c-named (shard 0 val, the rest train): data for
    benchmarks and tests that measure the machinery, not the model. Returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [os.path.join(directory, shard_name(prefix, index)) for index in range(shards)]
    for path in paths:
        write_shard(path, rng.integers(0, 50257, tokens_per_shard))
    return paths
