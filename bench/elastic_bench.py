"""What a reclaimed or an added node costs an elastic run: steps redone and resize latency, demo-size model.

A two-node Ray cluster on this machine (a `ray start --head` and a second `ray start --address` node, one
worker slot each, Ray's default failure detection), and `training/run.py --workers 2 --min-workers 1` on it
with the demo's model (L4H4C128, -b 8 -t 64; -d 1024: one micro-batch per worker at 2, two at 1). Halfway
between two checkpoints the second node's process tree is SIGKILLed, as a reclaimed spot node vanishes; once
the run goes on at 1 worker a fresh node joins and Ray Train grows the group back (`--resize-interval`).

For each resize: steps redone (trained past the checkpoint the new group resumes from: lost work) and the
latency from the event (the kill; the new node listed alive) to the first step at the new size, split at the
new group's `workers` line in main.log into detection + restart and resume (checkpoint load, model build,
first step). Times come from watching main.log, which rank 0 writes line by line as it goes (the console
reaches the driver through Ray's log forwarding, late on a busy machine). From those and the checkpoint
write time it prints, per reclaim rate, the checkpoint interval that keeps the expected loss (restart latency
+ half an interval redone, per reclaim) under 1% of the run.

    python bench/elastic_bench.py                   # 160 steps, a checkpoint every 20
    python bench/elastic_bench.py --every 10 --reclaims-per-hour 0.5 2
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2.checkpoint import save_checkpoint
from gpt2.model import GPT, GPTConfig
from gpt2.rundir import MAIN_LOG, MODEL_PART, OPTIMIZER_PART, RNG_PART
from pipelines.shards import write_random_shards
from training.config import TrainConfig
from training.launcher.local_cluster import kill_tree, ray_head, ray_node
from training.train import make_optimizer

REPO = Path(__file__).resolve().parents[1]
MODEL, BATCH, SEQ = "L4H4C128", 8, 64
TRAIN = re.compile(r"^s:(\d+) trl:")
WORKERS = re.compile(r"^s:(\d+) workers:(\d+)$")
POLL_S = 0.02


class MainLogWatch:
    """main.log's lines, each with the time this process first saw it (rank 0 writes whole lines at once).
    When a resumed run trims the file, the lines it writes again count as new."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[tuple[float, str]] = []  # (time.time(), line) in the order seen
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        current: list[str] = []
        while True:
            text = self.path.read_text() if self.path.exists() else ""
            lines = text[:text.rfind("\n") + 1].splitlines()  # complete lines only
            kept = 0
            while kept < min(len(lines), len(current)) and lines[kept] == current[kept]:
                kept += 1
            now = time.time()
            self.lines += [(now, line) for line in lines[kept:]]
            current = lines
            time.sleep(POLL_S)

    def wait_for(self, pattern: re.Pattern, after: float, timeout: float = 1800) -> tuple[float, re.Match]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for at, line in list(self.lines):
                if at >= after and (match := pattern.search(line)):
                    return at, match
            time.sleep(POLL_S)
        raise TimeoutError(f"main.log: no line matching {pattern.pattern}")

    def last_step(self, until: float) -> int:
        return max(int(m[1]) for at, line in self.lines if at <= until and (m := TRAIN.search(line)))

    def step_seconds(self, since: float, until: float) -> float:
        """Wall time per step between two moments: the median over spans of 5 steps (polling is 20 ms)."""
        seen = [at for at, line in self.lines if since <= at <= until and TRAIN.search(line)]
        spans = sorted((seen[i + 5] - seen[i]) / 5 for i in range(len(seen) - 5))
        return spans[len(spans) // 2]


@dataclass
class Resize:
    old: int
    new: int
    steps_redone: int
    detect_and_restart_s: float
    resume_s: float

    @property
    def latency_s(self) -> float:
        return self.detect_and_restart_s + self.resume_s


def measure_resize(log: MainLogWatch, event_at: float, old: int) -> Resize:
    """From the event to the new group's `workers` line (its rank 0 writes it before the engine starts), and on
    to its first train line."""
    resized_at, resize = log.wait_for(WORKERS, after=event_at)
    stepped_at, _ = log.wait_for(re.compile(rf"^s:{resize[1]} trl:"), after=resized_at)
    redone = log.last_step(resized_at) + 1 - int(resize[1])
    return Resize(old, int(resize[2]), redone, resized_at - event_at, stepped_at - resized_at)


def checkpoint_seconds(directory: Path) -> float:
    """Writing one checkpoint of the model with its Adam state (what rank 0 does every -n steps)."""
    model = GPT(GPTConfig.from_descriptor(MODEL))
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"), sharded=False)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
    optimizer.step()  # Adam state exists, as in a real checkpoint
    parts = {MODEL_PART: model.state_dict(), OPTIMIZER_PART: optimizer.state_dict(), RNG_PART: {}}
    started = time.perf_counter()
    save_checkpoint(directory, 1, parts, {})
    return time.perf_counter() - started


def interval_for(loss: float, reclaims_per_hour: float, latency_s: float, step_s: float) -> int | None:
    """Largest checkpoint interval (steps) whose expected loss per hour of run, reclaims x (latency + half an
    interval redone), stays under `loss`; None when the latency alone exceeds it."""
    budget_s = loss * 3600 / reclaims_per_hour - latency_s
    return int(2 * budget_s / step_s) if budget_s > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--every", type=int, default=20, help="checkpoint interval -n (steps)")
    parser.add_argument("--resize-interval", type=float, default=10.0, help="run.py --resize-interval (s)")
    parser.add_argument("--reclaims-per-hour", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="elastic_bench_"))
    data = work / "shards"
    write_random_shards(data, tokens_per_shard=200_000)
    out = work / "run"
    command = [sys.executable, "training/run.py", "--workers", "2", "--min-workers", "1", "--cpus-per-worker", "1",
               "--resize-interval", str(args.resize_interval), "-i", str(data / "*_train_*.bin"), "-j", "",
               "-o", str(out), "-e", MODEL, "-b", str(BATCH), "-t", str(SEQ), "-d", str(2 * BATCH * SEQ),
               "-x", str(args.steps), "-s", "0", "-n", str(args.every), "-l", "2e-3"]
    log = MainLogWatch(out / MAIN_LOG)
    (work / "ray").mkdir()
    with ray_head(num_cpus=1) as head, ExitStack() as stack:
        node = stack.enter_context(ray_node(head, num_cpus=1))
        console = stack.enter_context(open(work / "run.log", "w"))
        run = stack.enter_context(subprocess.Popen([*command, "--address", head.gcs_address], cwd=REPO,
                                                   env=head.env, stdout=console, stderr=subprocess.STDOUT))
        stack.callback(run.kill)  # first on the way out, should anything fail before run.py ends
        started, _ = log.wait_for(re.compile(r"^s:0 trl:"), after=0)
        kill_step = args.every + args.every // 2  # halfway between the first two checkpoints
        killed_at, _ = log.wait_for(re.compile(rf"^s:{kill_step - 1} trl:"), after=started)
        kill_tree(node.pid)
        down = measure_resize(log, killed_at, old=2)
        one_worker_from = time.time()
        stack.enter_context(ray_node(head, num_cpus=1))
        node_up_at = time.time()
        up = measure_resize(log, node_up_at, old=1)
        run.wait(timeout=1800)
    if run.returncode != 0:
        sys.exit((work / "run.log").read_text()[-5000:])
    two_workers_s, one_worker_s = log.step_seconds(started, killed_at), log.step_seconds(one_worker_from, node_up_at)
    checkpoint_s = checkpoint_seconds(work / "ckpt")
    print(f"machine: {torch.get_num_threads()} CPU threads, no GPU | model {MODEL}, -b {BATCH} -t {SEQ} -d "
          f"{2 * BATCH * SEQ} | checkpoint every {args.every} steps | --resize-interval {args.resize_interval:g} s")
    print(f"step time      : {two_workers_s:.3f} s at 2 workers, {one_worker_s:.3f} s at 1 worker (wall, median)")
    print(f"checkpoint     : {checkpoint_s:.3f} s to write (model + Adam state)")
    for name, event, resize in (("node reclaimed", "kill", down), ("node added", "node alive", up)):
        print(f"{name:15s}: {resize.old} -> {resize.new} workers | {resize.steps_redone} step(s) redone | latency "
              f"{resize.latency_s:.1f} s from {event} to the first step at {resize.new} "
              f"({resize.detect_and_restart_s:.1f} s detection + restart, {resize.resume_s:.1f} s resume)")
    latency = max(down.latency_s, up.latency_s)
    print(f"checkpoint interval keeping expected lost work < 1% (reclaims x ({latency:.0f} s latency + half an "
          f"interval of {two_workers_s:.3f} s steps redone)):")
    for rate in args.reclaims_per_hour:
        steps = interval_for(0.01, rate, latency, two_workers_s)
        verdict = f"-n {steps} or fewer" if steps else "not reachable: the restart latency alone exceeds 1%"
        print(f"  {rate:4g} reclaim(s) per hour: {verdict}")


if __name__ == "__main__":
    main()
