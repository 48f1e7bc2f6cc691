"""GPT-2 BPE via tiktoken, with an offline fallback for machines that cannot reach openaipublic.

tiktoken's "gpt2" encoding downloads vocab.bpe/encoder.json on first use. Its "r50k_base" encoding has the
same ranks, pattern and special token, stored as one file whose sha256 tiktoken checks. The PyPI sdist of
openai-whisper ships that exact file, so when the normal download fails we fetch the sdist from the package
index, check the hash, place the file in tiktoken's own cache and build "gpt2" from it. With internet access
none of this runs.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import tiktoken

from common.files import atomic_write

EOT_TOKEN = 50256
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_SDIST = "openai-whisper==20250625"


def tiktoken_cache_dir() -> Path:
    """The directory tiktoken itself reads cached vocab files from (same precedence as tiktoken.load)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _extract_r50k_from_whisper_sdist(download_dir: Path) -> bytes:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         WHISPER_SDIST, "-d", str(download_dir)],
        check=True, capture_output=True, text=True,
    )
    (sdist,) = download_dir.glob("openai_whisper-*.tar.gz")
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
        return tar.extractfile(member).read()


def seed_r50k_cache() -> Path:
    """Put r50k_base.tiktoken into tiktoken's cache from the openai-whisper sdist; returns the cache file."""
    cache_file = tiktoken_cache_dir() / hashlib.sha1(R50K_URL.encode()).hexdigest()
    if cache_file.exists() and hashlib.sha256(cache_file.read_bytes()).hexdigest() == R50K_SHA256:
        return cache_file
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ranks = _extract_r50k_from_whisper_sdist(Path(tmp))
        except (subprocess.CalledProcessError, ValueError, StopIteration) as err:
            detail = getattr(err, "stderr", "") or err
            raise RuntimeError(
                f"GPT-2 vocab unavailable: openaipublic is unreachable and fetching {WHISPER_SDIST} "
                f"from the package index failed ({str(detail).strip()[:200]})"
            ) from err
    if hashlib.sha256(ranks).hexdigest() != R50K_SHA256:
        raise RuntimeError(f"{WHISPER_SDIST}: gpt2.tiktoken does not have the expected sha256 {R50K_SHA256}")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # atomic_write's temp name is random: the cache sits in the shared temp dir, where a link planted at a
    # name we could predict would redirect the write into another file
    with atomic_write(cache_file) as f:
        f.write(ranks)
    return cache_file


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding; offline, the same ranks rebuilt from the seeded r50k_base cache."""
    try:
        return tiktoken.get_encoding("gpt2")
    except OSError:  # requests' ConnectionError and friends are OSErrors
        seed_r50k_cache()
        r50k = tiktoken.get_encoding("r50k_base")
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k._pat_str,
            mergeable_ranks=r50k._mergeable_ranks,
            special_tokens=r50k._special_tokens,
            explicit_n_vocab=r50k.n_vocab,
        )


def ranks_sha256(encoding: tiktoken.Encoding) -> str:
    """sha256 of the ranks serialised in the .tiktoken file format, so GPT-2 hashes to R50K_SHA256."""
    special = {encoding.encode_single_token(name) for name in encoding.special_tokens_set}
    digest = hashlib.sha256()
    for rank in range(encoding.n_vocab):
        if rank in special:
            continue
        token = encoding.decode_single_token_bytes(rank)
        digest.update(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return digest.hexdigest()


def tokenizer_identity() -> dict[str, str | int]:
    encoding = gpt2_encoding()
    return {"name": encoding.name, "n_vocab": encoding.n_vocab, "eot": EOT_TOKEN,
            "ranks_sha256": ranks_sha256(encoding)}
