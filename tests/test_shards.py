import struct

import numpy as np
import pytest

from pipelines.shards import (
    HEADER_BYTES,
    ShardFormatError,
    read_header,
    read_shard,
    shard_name,
    write_shard,
)
from tests.helpers import file_sha256


def test_header_and_layout_follow_llmc_spec(tmp_path):
    tokens = np.array([50256, 15496, 995, 0, 65535], dtype=np.uint16)
    path = tmp_path / "s.bin"
    digest = write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 256 * 4 + 2 * len(tokens)
    assert raw[:12] == struct.pack("<iii", 20240520, 1, len(tokens))
    assert raw[12:HEADER_BYTES] == bytes(HEADER_BYTES - 12)
    assert struct.unpack(f"<{len(tokens)}H", raw[HEADER_BYTES:]) == tuple(tokens.tolist())
    assert digest == file_sha256(path)


def test_round_trip_is_a_memmap(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=10_000).astype(np.uint16)
    write_shard(tmp_path / "s.bin", tokens)
    loaded = read_shard(tmp_path / "s.bin")
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, tokens)
    assert read_header(tmp_path / "s.bin") == 10_000


def test_names_put_val_first():
    assert shard_name("edu_fineweb", 0) == "edu_fineweb_val_000000.bin"
    assert shard_name("edu_fineweb", 12) == "edu_fineweb_train_000012.bin"


def test_write_is_atomic_and_rejects_out_of_range_ids(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(10, dtype=np.uint16))
    with pytest.raises(ValueError, match="uint16"):
        write_shard(path, np.array([70_000]))
    np.testing.assert_array_equal(read_shard(path), np.arange(10))  # the earlier shard is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # and no temp file is left behind


def _corrupt(tmp_path, header=(20240520, 1, 4), body_tokens=4, extra=b""):
    path = tmp_path / "bad.bin"
    head = np.zeros(256, dtype="<i4")
    head[:3] = header
    path.write_bytes(head.tobytes() + bytes(2 * body_tokens) + extra)
    return path


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"header": (12345, 1, 4)}, "bad magic 12345"),
        ({"header": (20240520, 7, 4)}, "unsupported version 7"),
        ({"body_tokens": 3}, "truncated"),
        ({"extra": b"\0\0"}, "size mismatch"),
    ],
)
def test_validation_errors_name_the_file(tmp_path, kwargs, message):
    path = _corrupt(tmp_path, **kwargs)
    with pytest.raises(ShardFormatError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value)


def test_truncated_header_and_missing_file(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x00" * 100)
    with pytest.raises(ShardFormatError, match="truncated header"):
        read_header(short)
    with pytest.raises(ShardFormatError, match="cannot read"):
        read_header(tmp_path / "missing.bin")
