"""What Ray Train costs: the same engine run (a) directly in this process and (b) through TorchTrainer with one
worker, via training/run.py's own launcher, on the same machine, one after the other.

Steady state is tokens over wall time between two steps after warm-up, the same steps in both runs, measured
between hook calls, so it includes everything Ray Train adds per step (reports, gauges, the process group).
Startup (worker group, process group, model build, first step; not the cluster) is reported separately.
`--rounds` alternates the two and keeps each one's best round, so a busy machine slows both alike.

    python bench/raytrain_overhead.py                         # d6, B=4, T=64, 60 steps on random shards
    python bench/raytrain_overhead.py -e L4H4C256 --steps 100
    python bench/raytrain_overhead.py --threads 1             # one core left to Ray's own processes
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pipelines.shards import write_random_shards
from training.launcher.flags import parse_run_flags
from training.launcher.launch import launch_run
from training.train import TrainHooks, train


def steady(times: dict[int, float], first: int, last: int, tokens_per_step: int) -> float:
    return tokens_per_step * (last - first) / (times[last] - times[first])


def run_direct(flags: list[str]) -> tuple[float, dict[int, float]]:
    """(start time, {steps done: wall time}) of the engine called in this process."""
    config, _ = parse_run_flags(flags)
    times: dict[int, float] = {}

    def on_step(metrics: dict) -> None:
        if "loss" in metrics:
            times[metrics["step"] + 1] = time.time()

    started = time.time()
    train(config, TrainHooks(on_step=on_step))
    return started, times


def run_ray(flags: list[str], record: Path) -> tuple[float, dict[int, float]]:
    """(start time, {steps done: wall time}) of the steps TorchTrainer reported, taken by a controller callback."""
    from ray.train import UserCallback

    class Timestamps(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            with open(record, "a") as file:
                file.write(json.dumps(metrics[0]) + "\n")

    started = time.time()
    launch_run(*parse_run_flags(flags), callbacks=[Timestamps()])
    reports = [json.loads(line) for line in record.read_text().splitlines()]
    return started, {r["step"]: r["timestamp"] for r in reports if "loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-e", "--model", default="d6")
    parser.add_argument("-b", "--micro-batch", type=int, default=4)
    parser.add_argument("-t", "--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from the steady state")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of direct and TorchTrainer runs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads in both runs (default: every core; fewer leaves cores to Ray's processes)")
    options = parser.parse_args()
    import ray

    threads = options.threads
    torch.set_num_threads(threads)
    ray.init("local", num_cpus=threads, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    tokens = options.micro_batch * options.seq_len
    best: dict[str, tuple[float, float]] = {}  # name -> (steady tok/s, startup s)
    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        write_random_shards(scratch_path, "bench", shards=2, tokens_per_shard=200_000)
        flags = ["-i", str(scratch_path / "*_train_*.bin"), "-j", "", "-e", options.model,
                 "-b", str(options.micro_batch), "-t", str(options.seq_len), "-x", str(options.steps),
                 "-s", "0", "-v", "0", "--seed", "1"]
        for round_index in range(options.rounds):
            direct_start, direct = run_direct([*flags, "-o", str(scratch_path / f"direct{round_index}")])
            ray_start, ray_times = run_ray([*flags, "-o", str(scratch_path / f"ray{round_index}"), "--workers", "1",
                                            "--cpus-per-worker", str(threads)],
                                           scratch_path / f"reports{round_index}.jsonl")
            # The same window in both runs: the first and last steps Ray reported after warm-up.
            window = sorted(step for step in ray_times if step > options.warmup)
            first, last = window[0], window[-1]
            for name, start, times in (("direct", direct_start, direct), ("TorchTrainer", ray_start, ray_times)):
                rate = steady(times, first, last, tokens)
                print(f"round {round_index + 1} {name:12s}: {rate:9.1f} tok/s over steps {first}..{last}", flush=True)
                if rate > best.get(name, (0.0, 0.0))[0]:
                    best[name] = (rate, times[1] - start)
    ray.shutdown()
    (direct_rate, direct_startup), (ray_rate, ray_startup) = best["direct"], best["TorchTrainer"]
    print(f"device: cpu ({threads} threads) | model {options.model} | B={options.micro_batch} T={options.seq_len} | "
          f"{options.steps} steps, best of {options.rounds} rounds")
    print(f"direct      : {direct_rate:9.1f} tok/s steady | startup to step 1 {direct_startup:6.1f} s")
    print(f"TorchTrainer: {ray_rate:9.1f} tok/s steady | startup to step 1 {ray_startup:6.1f} s "
          f"(1 worker; cluster start excluded)")
    print(f"ratio TorchTrainer/direct: {ray_rate / direct_rate:.3f} | steady-state overhead "
          f"{100 * (1 - ray_rate / direct_rate):+.1f}%")


if __name__ == "__main__":
    main()
