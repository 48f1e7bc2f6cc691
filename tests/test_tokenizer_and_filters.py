import hashlib
import os
import subprocess
import sys

import pyarrow as pa

from pipelines.filters import DROP_REASONS, FilterConfig, drop_reasons
from pipelines.tokenizer import EOT_TOKEN, R50K_SHA256, R50K_URL, gpt2_encoding, seed_r50k_cache, tokenizer_identity
from tests.helpers import REPO


def test_gpt2_encoding_matches_known_ids():
    encoding = gpt2_encoding()
    assert encoding.encode_ordinary("Hello world") == [15496, 995]
    assert encoding.n_vocab == 50257
    assert encoding.encode_single_token("<|endoftext|>") == EOT_TOKEN


def test_identity_hash_is_the_published_r50k_hash():
    assert tokenizer_identity() == {"name": "gpt2", "n_vocab": 50257, "eot": EOT_TOKEN, "ranks_sha256": R50K_SHA256}


def test_offline_fallback_seeds_an_empty_tiktoken_cache(tmp_path):
    """From an empty cache with openaipublic unreachable, the vocab comes from the openai-whisper sdist."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path)}
    script = ("from pipelines.tokenizer import gpt2_encoding, tokenizer_identity; "
              "print(gpt2_encoding().encode_ordinary('Hello world'), tokenizer_identity()['ranks_sha256'])")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.split() == ["[15496,", "995]", R50K_SHA256]
    assert len(list(tmp_path.iterdir())) >= 1  # the cache is seeded for the next process


def test_seeding_the_shared_cache_never_writes_through_a_planted_link(tmp_path, monkeypatch):
    """The vocab cache is in the shared temp dir by default: a link another user plants there at the name of a
    temp file (once `<cache name>.<pid>.tmp`) must not redirect the write into a file the link points to."""
    cache, victim = tmp_path / "cache", tmp_path / "victim.txt"
    cache.mkdir()
    victim.write_text("someone else's file\n")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    (cache / f"{hashlib.sha1(R50K_URL.encode()).hexdigest()}.{os.getpid()}.tmp").symlink_to(victim)
    seeded = seed_r50k_cache()
    assert victim.read_text() == "someone else's file\n"
    assert hashlib.sha256(seeded.read_bytes()).hexdigest() == R50K_SHA256 and not seeded.is_symlink()


def _reason_names(table, config):
    return [DROP_REASONS[r] for r in drop_reasons(table, config)]


def test_filters_attribute_each_drop_to_the_first_failing_filter():
    table = pa.table({
        "text": ["good document", "   \n\t ", None, "low score doc", "tiny", "x" * 50, "bad language"],
        "int_score": [4, 4, 4, 2, 4, 4, 4],
        "score": [3.5, 3.5, 3.5, 2.1, 3.5, 3.5, 3.5],
        "language_score": [0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.40],
    })
    config = FilterConfig(min_int_score=3, min_score=3.0, min_language_score=0.9, min_chars=5, max_chars=40)
    assert _reason_names(table, config) == [
        "kept", "empty", "empty", "int_score", "min_chars", "max_chars", "language_score"]


def test_filters_skip_absent_columns_and_missing_scores_fail():
    assert _reason_names(pa.table({"text": ["a doc"]}), FilterConfig(min_int_score=3)) == ["kept"]
    table = pa.table({"text": ["a", "b"], "score": pa.array([None, 4.0], type=pa.float64())})
    assert _reason_names(table, FilterConfig(min_score=3.0)) == ["score", "kept"]
