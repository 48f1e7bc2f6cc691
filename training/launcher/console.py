"""What a run's driver log shows of Ray Train: its warnings and errors, not its per-report INFO lines.

run.py passes `RAY_TRAIN_CONSOLE_LEVEL` to `RunConfig(logging_config=LoggingConfig(...))`, which filters the
`ray.train` loggers. Ray Train 2.60 also logs one INFO line per rank per `ray.train.report` ("Reporting
training result N: TrainingReport(...)") from a logger named by its source file (`logging.getLogger(__file__)`
in ray/train/v2/_internal/execution/context.py), which that filter misses: the record propagates to the
worker's root logger, whose console handler feeds the driver log. `quiet_ray_train_console` applies the same
level, on a worker's console handlers, to every record that comes from Ray Train's source files.
"""

from __future__ import annotations

import logging
from pathlib import Path

RAY_TRAIN_CONSOLE_LEVEL = "WARNING"


class _RayTrainSourceFilter(logging.Filter):
    def __init__(self, source_dir: str, level: int):
        super().__init__()
        self.source_dir, self.level = source_dir, level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or not record.pathname.startswith(self.source_dir)


def quiet_ray_train_console() -> None:
    """On a Ray Train worker, after Ray configured its logging: Ray Train's records below
    RAY_TRAIN_CONSOLE_LEVEL stay off the console (Ray Train's log files under the session still get them)."""
    import ray.train

    source_filter = _RayTrainSourceFilter(str(Path(ray.train.__file__).parent), logging.getLevelName(
        RAY_TRAIN_CONSOLE_LEVEL))
    for handler in logging.getLogger().handlers:
        # Console handlers are StreamHandlers; FileHandler is one too, but writes a file, not the console.
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(source_filter)
