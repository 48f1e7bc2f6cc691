"""Tokenize throughput: our Ray Data pipeline against raw tiktoken and a multiprocessing.Pool baseline.

    python bench/tokenize_bench.py [--tokens 150e6] [--workers N]

All three run in this process's run on the same documents: the installed Python's docs joined into
FineWeb-sized documents (~1,000 tokens each). Printed: raw single-process tiktoken tok/s; the Pool + imap
baseline (llm.c's fineweb.py approach: read, tokenize in a Pool, write shards) end to end; our pipeline end to
end (read -> filter -> tokenize -> write, Ray cluster already up) at two input sizes, and its steady state
(the marginal rate between the two sizes, which cancels the fixed start-up of actors and plan); the ratios
per core; and the peak private memory (RSS less shared pages, so Ray's shared-memory object store is not
counted once per process that maps it) of the driver plus all Ray workers at both sizes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402  (installed with ray[default])
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines.shards import shard_name, write_shard  # noqa: E402
from pipelines.sources import python_docs_documents  # noqa: E402
from pipelines.tokenize import TokenizeConfig, tokenize  # noqa: E402
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding  # noqa: E402

SHARD_SIZE = 10_000_000
FILES = 8


def fineweb_sized_documents(target_tokens: int) -> list[str]:
    """Docstrings glued into ~4,000-character documents, repeated until there are about target_tokens."""
    pieces = [d["text"] for d in python_docs_documents()]
    documents, current = [], []
    for piece in pieces:
        current.append(piece)
        if sum(map(len, current)) > 4000:
            documents.append("\n\n".join(current))
            current = []
    per_copy = sum(len(d) for d in documents) / 4.0  # ~4 characters per token in English prose
    copies = max(1, round(target_tokens / per_copy))
    return [f"{doc} ({copy})" for copy in range(copies) for doc in documents]


def write_parquet(documents: list[str], directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(documents) // FILES)
    for i in range(FILES):
        table = pa.table({"text": documents[i * per_file:(i + 1) * per_file]})
        pq.write_table(table, directory / f"part_{i:02d}.parquet", row_group_size=2048)
    return str(directory / "*.parquet")


def raw_tiktoken(documents: list[str]) -> float:
    encode = gpt2_encoding().encode_ordinary
    started = time.perf_counter()
    tokens = sum(len(encode(d)) + 1 for d in documents)
    return tokens / (time.perf_counter() - started)


def _encode_for_pool(text: str) -> bytes:
    tokens = array("H", (EOT_TOKEN,))
    tokens.fromlist(gpt2_encoding().encode_ordinary(text))
    return tokens.tobytes()


def pool_baseline(pattern: str, out_dir: Path, processes: int) -> float:
    """llm.c fineweb.py's shape: a Pool tokenizes documents via imap; the parent fills fixed-size shards."""
    started = time.perf_counter()
    paths = sorted(Path(pattern).parent.glob("*.parquet"))
    texts = (text for path in paths for text in pq.read_table(path, columns=["text"])["text"].to_pylist())
    buffer, index, total = bytearray(), 0, 0
    with multiprocessing.Pool(processes) as pool:
        for tokens in pool.imap(_encode_for_pool, texts, chunksize=16):
            buffer += tokens
            total += len(tokens) // 2
            while len(buffer) >= 2 * SHARD_SIZE:
                write_shard(out_dir / shard_name("pool", index), memoryview(buffer)[:2 * SHARD_SIZE].cast("H"))
                del buffer[:2 * SHARD_SIZE]
                index += 1
        if buffer:
            write_shard(out_dir / shard_name("pool", index), memoryview(buffer).cast("H"))
    return total / (time.perf_counter() - started)


class PeakMemory:
    """Samples the summed private memory of this process and every Ray process while the pipeline runs."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if proc.info["pid"] == os.getpid() or cmdline.startswith("ray::"):
                    total += proc.info["memory_info"].rss - proc.info["memory_info"].shared
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ours(pattern: str, out_dir: Path, workers: int | None) -> tuple[int, float, int, int]:
    """(tokens, seconds, peak private bytes, actors) of one end-to-end run of the pipeline."""
    config = TokenizeConfig(source="files", input=pattern, output_dir=out_dir, prefix="ours",
                            shard_size=SHARD_SIZE, num_workers=workers, overwrite=True)
    with PeakMemory() as memory:
        started = time.perf_counter()
        manifest = tokenize(config)
        elapsed = time.perf_counter() - started
    return manifest["total_tokens"], elapsed, memory.peak, manifest["num_workers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=150e6, help="approximate tokens in the large input")
    parser.add_argument("--workers", type=int, help="tokenizer actors and Pool processes (default: CPU count)")
    args = parser.parse_args()
    import ray

    from pipelines.cluster import connect

    cores = args.workers or os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="tokenize_bench_"))
    try:
        large_docs = fineweb_sized_documents(int(args.tokens))
        small_docs = large_docs[:len(large_docs) // 4]
        large = write_parquet(large_docs, work / "large")
        small = write_parquet(small_docs, work / "small")
        print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
              f"{len(large_docs):,} docs; {cores} workers")

        raw = raw_tiktoken(large_docs)
        (work / "pool").mkdir()
        pool = pool_baseline(large, work / "pool", cores)
        started = time.perf_counter()
        connect()
        print(f"ray cluster start (not counted below): {time.perf_counter() - started:.1f}s, "
              f"{ray.cluster_resources().get('CPU')} CPUs")
        small_tokens, small_s, small_mem, _ = ours(small, work / "ours_small", args.workers)
        large_tokens, large_s, large_mem, workers = ours(large, work / "ours_large", args.workers)
        end_to_end = large_tokens / large_s
        steady = (large_tokens - small_tokens) / (large_s - small_s)

        print(f"raw tiktoken, 1 process          : {raw:12,.0f} tok/s")
        print(f"multiprocessing.Pool({cores}) + imap   : {pool:12,.0f} tok/s end to end")
        print(f"ours, {workers} actors, end to end      : {end_to_end:12,.0f} tok/s "
              f"({large_tokens:,} tokens in {large_s:.1f}s; {small_tokens:,} in {small_s:.1f}s)")
        print(f"ours, {workers} actors, steady state    : {steady:12,.0f} tok/s")
        print(f"end to end / (raw x {workers} cores)    : {end_to_end / (raw * workers):.2f}   (target >= 0.90)")
        print(f"steady state / (raw x {workers} cores)  : {steady / (raw * workers):.2f}")
        print(f"end to end / Pool baseline       : {end_to_end / pool:.2f}   (target >= 1.00)")
        print(f"peak private memory, driver + Ray: {small_mem / 2**20:,.0f} MiB at {small_tokens:,} tokens, "
              f"{large_mem / 2**20:,.0f} MiB at {large_tokens:,} tokens")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
