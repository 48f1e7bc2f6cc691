"""The job's one kind of Ray actor: encodes units, assembles shards and runs --dedup's shuffle.

Every step of the job runs in these processes, started once with the tokenizer built and everything
imported, so no step pays for starting Ray workers of its own; on a cluster they spread over the nodes (or
only the data nodes, with --node-resource). Each method is a thin door to the module that owns the step.
"""

from __future__ import annotations

import socket

import numpy as np

from pipelines import assemble, dedup
from pipelines.encode import EncodeJob, UnitEncoder
from pipelines.plan import ShardPlan, WorkUnit


class TokenizeWorker:
    def __init__(self, job: EncodeJob):
        self.out = job.out
        self.encoder = UnitEncoder(job)

    def ready(self) -> str:
        """Answered once the tokenizer is built: the node the worker runs on."""
        return socket.gethostname()

    def encode_unit(self, unit: WorkUnit, prefetch: WorkUnit | None = None) -> dict:
        return self.encoder.encode_unit(unit, prefetch)

    def assemble_shards(self, prefix: str, shards: list[ShardPlan],
                        duplicates: dict[int, tuple[str, ...]]) -> list[dict]:
        return assemble.assemble_shards(self.out, prefix, shards, duplicates)

    def partition_hashes(self, units: list[int], partitions: int) -> list[np.ndarray] | np.ndarray:
        return dedup.partition_hashes(self.out, units, partitions)

    def later_copies(self, partition: int, *parts: np.ndarray) -> dict:
        return dedup.later_copies(self.out, partition, *parts)
