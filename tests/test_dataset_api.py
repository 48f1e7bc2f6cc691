"""The Ray Data API: documents() -> any stage of the user's -> write_shards(), as a Ray user writes it."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from ray.data import ActorPoolStrategy

from pipelines.dataset import documents, write_shards
from pipelines.sources import InputError
from tests.helpers import (
    all_tokens,
    expected_stream,
    make_documents,
    sha256s,
    shard_paths,
    tokenize_files,
    write_parquet_files,
)

MAX_KEPT_CHARS = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_documents(300, seed=1)
    return docs, write_parquet_files(tmp_path_factory.mktemp("raw"), docs)


def quality_classifier(batch: pa.Table) -> pa.Table:
    """A CPU stand-in for a classifier stage: keeps the documents it scores well (here: short ones)."""
    return batch.filter(pc.less(pc.utf8_length(batch["text"]), MAX_KEPT_CHARS))


class QualityModel:
    """The same stage as a class, as a model is loaded once per actor (map_batches on an actor pool)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        return quality_classifier(batch)


STAGES = {
    "tasks": lambda ds: ds.map_batches(quality_classifier, batch_format="pyarrow"),
    # fractional CPUs: an actor pool holding whole CPUs would leave none to the read and write tasks
    "actors": lambda ds: ds.map_batches(QualityModel, batch_format="pyarrow",
                                        compute=ActorPoolStrategy(size=2), num_cpus=0.25),
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_user_stage_gives_the_shards_of_the_prefiltered_input(ray_cluster, corpus, tmp_path, stage):
    docs, pattern = corpus
    ds = STAGES[stage](documents(pattern, unit_bytes=5000))
    manifest = write_shards(ds, str(tmp_path / "api"), prefix="edu_fineweb", shard_size=3000)

    kept = [d for d in docs if d["text"].strip() and len(d["text"]) < MAX_KEPT_CHARS]
    assert 0 < len(kept) < len(docs) - 1 and manifest["docs"] == len(kept)
    np.testing.assert_array_equal(all_tokens(manifest, tmp_path / "api"), expected_stream(kept))
    cli = tokenize_files(write_parquet_files(tmp_path / "prefiltered", kept, files=1), tmp_path / "cli")
    assert sha256s(manifest) == sha256s(cli)
    assert [p.read_bytes() for p in shard_paths(manifest, tmp_path / "api")] == \
        [p.read_bytes() for p in shard_paths(cli, tmp_path / "cli")]
    assert not (tmp_path / "api" / "tokenize_parts").exists()


def test_write_shards_refuses_a_directory_holding_shards(ray_cluster, corpus, tmp_path):
    ds = documents(corpus[1])
    write_shards(ds, str(tmp_path), prefix="x", shard_size=10**6)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(InputError, match="already holds shards"):
        write_shards(ds, str(tmp_path), prefix="x", shard_size=10**6)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("prefix", ["../outside", "a/b", ""])
def test_write_shards_refuses_a_prefix_that_is_a_path(ray_cluster, corpus, tmp_path, prefix):
    """A shard name goes into output_dir: a prefix that climbs out of it (or names nothing) is refused before
    anything is written."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"^write_shards\(\): prefix '{re.escape(prefix)}': a shard name prefix"):
        write_shards(documents(corpus[1]), str(out), prefix=prefix, shard_size=10**6)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
