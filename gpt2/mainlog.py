"""llm.c's `main.log`: the one module that writes, trims and reads it.

Lines are llm.c's: `s:%d trl:%f lr:%e norm:%f` (train loss, after step s's update), `s:%d tel:%f` (val loss
at step s) and `s:%d eval:%f` (HellaSwag acc_norm of the checkpoint at step s), plus two streams of ours:
`s:%d core:%f` (the CORE metric of the checkpoint at step s, run.py --core-every) and `s:%d workers:%d`,
written when a run resumes at step s with another number of ranks than trained before it (an elastic
resize). They have the two fields llm.c's dev/vislog notebook asserts for every stream but trl, so the
notebook reads them as more streams and plots what it always did. The notebook keeps the last value
per step of each stream, so every stream is written in step order, HellaSwag results included, however
late an eval finishes. Lines are only ever appended, whole, one write each: the training loop and the eval
collector append to the same file independently.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from common.files import atomic_write

_LINE = re.compile(r"^s:(\d+) (trl|tel|eval|core|workers):([-+0-9.eEnaif]+)")
STREAMS = ("trl", "tel", "eval", "core", "workers")


def trim(path: Path, resume_step: int) -> None:
    """Keep what a run resumed at `resume_step` will not write again: train lines of steps before it (step S's
    update came after checkpoint S) and val / eval / workers lines up to it."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if (match := _LINE.match(line)) and int(match[1]) < resume_step + (match[2] != "trl")]
    with atomic_write(path, "w") as f:  # a crash mid-trim leaves the old log, never a cut one
        f.write("".join(kept))


class MainLog:
    """The training loop's writer: a fresh run starts the file empty, a resumed one trims it first."""

    def __init__(self, path: Path, resume_step: int | None):
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        else:
            trim(path, resume_step)
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the run

    def train(self, step: int, loss: float, lr: float, norm: float) -> None:
        self.file.write(f"s:{step} trl:{loss:.6f} lr:{lr:.6e} norm:{norm:.4f}\n")

    def val(self, step: int, loss: float) -> None:
        self.file.write(f"s:{step} tel:{loss:.6f}\n")

    def close(self) -> None:
        self.file.close()


class EvalLog:
    """An eval's lines (`stream`: eval = HellaSwag, core = CORE) in step order: holds each result until every
    earlier expected step has its line (or was given up), then appends."""

    def __init__(self, path: str | os.PathLike, stream: str = "eval"):
        self.path, self.stream = Path(path), stream
        self._pending: set[int] = set()
        self._finished: dict[int, float | None] = {}

    def expect(self, step: int) -> None:
        """An eval for `step` is under way: later steps' lines wait for it."""
        self._pending.add(step)

    def record(self, step: int, value: float) -> list[int]:
        """Store `step`'s result; returns the steps whose lines were written now."""
        return self._resolve(step, value)

    def give_up(self, step: int) -> list[int]:
        """`step`'s eval failed or was skipped: write no line for it and stop holding later steps back."""
        return self._resolve(step, None)

    def _resolve(self, step: int, value: float | None) -> list[int]:
        self._pending.discard(step)
        self._finished[step] = value
        first_waiting = min(self._pending, default=None)
        ready = sorted(s for s in self._finished if first_waiting is None or s < first_waiting)
        values = {s: self._finished.pop(s) for s in ready}
        written = [s for s in ready if values[s] is not None]
        if written:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write("".join(f"s:{s} {self.stream}:{values[s]:.6f}\n" for s in written))
        return written


def record_workers(path: Path, step: int, workers: int) -> None:
    """The run resumes at `step` on `workers` ranks: one whole line, appended (before the trainer trims the
    file for its resume, which keeps it)."""
    with open(path, "a") as f:
        f.write(f"s:{step} workers:{workers}\n")


def read(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{'trl': [(step, value)], 'tel': [...], 'eval': [...], 'core': [...], 'workers': [...]} in step order; a
    later line for a step wins."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        if match := _LINE.match(line):
            series[match[2]][int(match[1])] = float(match[3])
    return {kind: sorted(series[kind].items()) for kind in STREAMS}
