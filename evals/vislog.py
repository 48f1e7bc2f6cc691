"""HellaSwag results as llm.c's main.log lines (`s:%d eval:%f`, acc_norm), in step order.

llm.c's dev/vislog notebook reads main.log line by line and plots each stream in file order, so the eval
stream must be written in step order even when a later checkpoint's eval finishes first. Lines are only
ever appended, whole, with one write each: the training loop keeps its own append handle on the same file.
"""

from __future__ import annotations

import os
from pathlib import Path


def eval_line(step: int, acc_norm: float) -> str:
    return f"s:{step} eval:{acc_norm:.6f}\n"


class EvalLog:
    """Holds each result until every earlier expected step has its line (or was given up), then appends."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._pending: set[int] = set()
        self._finished: dict[int, float | None] = {}

    def expect(self, step: int) -> None:
        """An eval for `step` is under way: later steps' lines wait for it."""
        self._pending.add(step)

    def record(self, step: int, acc_norm: float) -> list[int]:
        """Store `step`'s result; returns the steps whose lines were written now."""
        return self._resolve(step, acc_norm)

    def give_up(self, step: int) -> list[int]:
        """`step`'s eval failed: write no line for it and stop holding later steps back."""
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
                f.write("".join(eval_line(s, values[s]) for s in written))
        return written
