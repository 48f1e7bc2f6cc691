"""Rolling z-scores of loss and grad norm for llm.c's `-sl`/`-sg` update skipping (llmc/outlier_detector.h)."""

from __future__ import annotations

import math
from collections import deque

WINDOW = 128


class OutlierDetector:
    """z-score of each new value against the last WINDOW values (itself included); nan until full."""

    def __init__(self, values: list[float] | None = None):
        self.window: deque[float] = deque(values or [], maxlen=WINDOW)

    def update(self, value: float) -> float:
        full = len(self.window) == WINDOW
        self.window.append(value)
        if not full:
            return math.nan
        mean = sum(self.window) / WINDOW
        variance = sum(v * v for v in self.window) / WINDOW - mean * mean
        std = math.sqrt(max(variance, 0.0))
        return 0.0 if std == 0.0 else (value - mean) / std

    def state(self) -> list[float]:
        return list(self.window)
