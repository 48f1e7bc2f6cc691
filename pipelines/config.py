"""The tokenize job's flags (TokenizeConfig, llm.c's defaults) and where its documents come from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from common.cluster import lost_in_job_copy
from common.files import is_url, local_path
from pipelines.demo import files_from_demo
from pipelines.filters import FilterConfig
from pipelines.shards import MAX_SHARD_TOKENS, prefix_problem
from pipelines.sources import FINEWEB_EDU_REPO, InputError, InputFiles, files_from_glob, files_from_hub
from pipelines.workdir import OutputDir

DEMO_SHARD_SIZE = 100_000
FINEWEB_SHARD_SIZE = 100_000_000


@dataclass
class TokenizeConfig:
    source: str = "hub"  # hub | files | demo
    dataset: str = FINEWEB_EDU_REPO  # the hub dataset (source hub), resolved by the `datasets` library
    name: str = "sample-10BT"  # ... and its config
    input: str | None = None
    output_dir: str | Path | None = None  # a local directory or an fsspec URL
    prefix: str | None = None
    shard_size: int | None = None
    filters: FilterConfig = field(default_factory=FilterConfig)
    num_workers: int | None = None  # default: one tokenizer actor per CPU in the cluster
    cpus_per_worker: float | None = None  # default: the cluster's CPUs shared by the workers, at most 1 each
    batch_size: int = 1024  # rows per parquet read batch
    unit_bytes: int | None = None  # default: unit_bytes_for the input and the workers
    node_resource: str | None = None  # a custom Ray resource: run the work only on nodes that have it
    start_timeout: float = 600.0
    overwrite: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        demo = self.source == "demo"
        fineweb = self.dataset == FINEWEB_EDU_REPO
        defaulted = self.output_dir is None
        if defaulted:
            billions = self.name.removeprefix("sample-").removesuffix("T")
            self.output_dir = "data/python_docs" if demo else f"data/edu_fineweb{billions}" if fineweb \
                else f"data/{self._dataset_name()}_{self.name}"
        self.output_dir = str(self.output_dir)
        if why := lost_in_job_copy(self.output_dir):
            raise InputError(f"-o {self.output_dir}{' (the default)' if defaulted else ''}: {why}")
        if demo and is_url(self.output_dir):
            raise InputError(f"-o {self.output_dir}: --source demo builds its corpus locally; give a local -o")
        if self.prefix is None:
            self.prefix = "python_docs" if demo else "edu_fineweb" if fineweb else self._dataset_name()
        if why := prefix_problem(self.prefix):
            raise InputError(f"--prefix {self.prefix!r}: {why} (-o)")
        if self.shard_size is None:
            self.shard_size = DEMO_SHARD_SIZE if demo else FINEWEB_SHARD_SIZE
        if not 1 <= self.shard_size <= MAX_SHARD_TOKENS:
            raise InputError(f"--shard-size must be from 1 to {MAX_SHARD_TOKENS:,} (the shard header counts tokens "
                             f"in an int32), got {self.shard_size:,}")
        for flag, value, lowest in (("--num-workers", self.num_workers, 1), ("--batch-size", self.batch_size, 1),
                                    ("--unit-bytes", self.unit_bytes, 1)):
            if value is not None and value < lowest:
                raise InputError(f"{flag} must be at least {lowest}, got {value}")
        for flag, value in (("--cpus-per-worker", self.cpus_per_worker), ("--start-timeout", self.start_timeout)):
            if value is not None and not value > 0:
                raise InputError(f"{flag} must be positive, got {value:g}")


    def _dataset_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", self.dataset.rsplit("/", 1)[-1]).strip("_").lower() or "hub"


def create_output_dir(out: OutputDir) -> None:
    try:
        out.makedirs()
    except OSError as err:
        raise InputError(f"-o {out}: cannot create it ({err.strerror or err})") from err
    out.check_writable()


def resolve_inputs(config: TokenizeConfig) -> InputFiles:
    if config.source == "demo":  # the demo corpus is written into -o
        create_output_dir(OutputDir(config.output_dir))
        return files_from_demo(local_path(config.output_dir) / "demo_source")
    if config.source == "files":
        return files_from_glob(config.input)
    return files_from_hub(config.dataset, config.name)
