"""What the driver keeps of a run outside its workers: a small Ray actor beside the driver, and the Ray Train callback
that feeds it.

This module imports nothing heavy on purpose: the actor's process imports it, and a torch import there would
cost every run seconds of CPU.
"""

from __future__ import annotations

from typing import Any


class RunRecords:
    """What one fit's workers must find after a restart, kept outside them: a Ray actor with no CPU, created by
    the driver beside itself.

    * the first deterministic error (NaN loss, bad data, ...): restarted workers stop at once with it, and the
      driver reports it;
    * the worker groups: when each started and with how many workers, and why the one before failed (Ray Train's
      controller reports worker errors here). Each new group's rank 0 reads them to record a resize and to
      count the worker-hours used."""

    def __init__(self):
        self.error: tuple[str, bool] | None = None
        self.starts: list[tuple[float, int]] = []  # (time.time(), workers)
        self.failure: str | None = None  # why the running group failed, until the next one starts

    def record_error(self, message: str, bad_input: bool) -> None:
        if self.error is None:
            self.error = message, bad_input

    def first_error(self) -> tuple[str, bool] | None:
        """(message, bad_input) of the first error recorded."""
        return self.error

    def group_failed(self, reason: str) -> None:
        if self.failure is None:  # the first error tells; the others are its echoes on the other ranks
            self.failure = reason

    def group_started(self, at: float, workers: int) -> tuple[list[tuple[float, int]], str | None]:
        """Every group start so far, this one last, and why the group before it failed (None: it did not)."""
        self.starts.append((at, workers))
        failure, self.failure = self.failure, None
        return list(self.starts), failure


def report_group_failures(records) -> Any:
    """A ray.train.UserCallback, run by Ray Train's controller, that tells `records` (a RunRecords actor) why a
    worker group failed. Made here because the launcher imports Ray only once it runs."""
    from ray.train import UserCallback

    class ReportGroupFailures(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            def cause_first(item: tuple[int, Exception]) -> tuple[bool, int]:
                # A lost node shows as its workers' failed health checks; the survivors' errors (a collective
                # whose peer vanished) follow from it.
                return "HealthCheck" not in type(item[1]).__name__, item[0]

            rank, error = min(worker_exceptions.items(), key=cause_first)
            first_line = (str(error).strip().splitlines() or [""])[0][:160]
            records.group_failed.remote(f"rank {rank} failed: {type(error).__name__}: {first_line}")

    return ReportGroupFailures()
