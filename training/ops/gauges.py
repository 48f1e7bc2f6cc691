"""A run's Prometheus gauges, set by rank 0 and exported by Ray as `ray_raygpt2_<name>{run=<run name>,...}`.

Ray's metrics agent serves them on every node's `--metrics-export-port` (`/metrics`); Prometheus scrapes that
and the Grafana dashboard (training/ops/monitor.py) plots them. `SERIES` is the one list of what is exported:
names, help text with units, and the key each one takes from the metrics run.py hands `RunGauges.update`.

Ray 2.60 drops a gauge from the export when it has not been set for ~20 s (seen on a `ray start` head:
a gauge set once vanished after 18 s while its actor lived on). A run has such pauses (validation,
checkpoints of a large model, HellaSwag in-loop), and val loss and HellaSwag change only every -v steps,
so `RunGauges` re-sets every value it knows from a daemon thread every `KEEP_ALIVE_S` seconds, besides
setting them at once on each update: every series is in every scrape while the run's rank 0 is alive,
and drops out ~20 s after it ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "raygpt2_"
# Well inside Ray's ~20 s expiry, and cheap: a dozen gauge sets.
KEEP_ALIVE_S = 5.0


@dataclass(frozen=True)
class Series:
    """One exported gauge: `ray_<name>` in Prometheus, `key` in the metrics dict `RunGauges.update` takes."""

    key: str
    name: str
    help: str
    grafana_unit: str  # Grafana's unit id for panels of this series


SERIES: tuple[Series, ...] = (
    Series("loss", "raygpt2_train_loss", "Train loss of the last step: cross-entropy in nats per token, mean "
                                         "over ranks and micro-steps", "none"),
    Series("val_loss", "raygpt2_val_loss", "Validation loss of the last -v evaluation: cross-entropy in nats per "
                                           "token, mean over ranks", "none"),
    Series("lr", "raygpt2_lr", "Learning rate of the last step (warmup and schedule applied)", "none"),
    Series("norm", "raygpt2_grad_norm", "Global L2 norm of the gradients of the last step, before clipping to 1.0",
           "none"),
    Series("tokens_per_second", "raygpt2_tokens_per_second", "Training throughput of the last step, all workers "
                                                             "together, in tokens per second", "suffix: tok/s"),
    Series("mfu", "raygpt2_mfu", "Model FLOPs utilisation of the last step as a fraction 0-1 (llm.c's 6N+6LCT "
                                 "flops per token over the GPUs' bf16 peak); absent on CPU and unknown GPUs",
           "percentunit"),
    Series("step", "raygpt2_step", "Optimizer steps done", "none"),
    Series("workers", "raygpt2_workers", "Training workers (ranks) in the current worker group; an elastic run "
                                         "(--min-workers) changes it when Ray Train resizes the group", "none"),
    Series("elapsed_s", "raygpt2_elapsed_seconds", "Wall-clock time since the launch, in seconds", "s"),
    Series("eta_s", "raygpt2_eta_seconds", "Estimated time to the last step, in seconds (mean time of the last 20 "
                                           "steps, validation and checkpoints included)", "s"),
    Series("cost_usd", "raygpt2_estimated_cost_usd", "Estimated cost so far in US dollars (worker-hours used x "
                                                     "--gpu-hour-usd; elapsed hours x workers unless an elastic run "
                                                     "resized); absent on CPU without a price",
           "currencyUSD"),
    Series("hellaswag_acc", "raygpt2_hellaswag_acc", "HellaSwag accuracy of the last -h 1 eval as a fraction 0-1",
           "percentunit"),
    Series("hellaswag_acc_norm", "raygpt2_hellaswag_acc_norm", "HellaSwag acc_norm (llm.c's headline number) of "
                                                               "the last -h 1 eval as a fraction 0-1",
           "percentunit"),
    Series("core", "raygpt2_core", "CORE (DCLM's in-context suite: centered accuracy averaged over its tasks, as "
                                   "nanochat scores it) of the last --core-every eval", "none"),
)


class RunGauges:
    """The gauges of run `run_name`, on the process that reports them (rank 0).

    `update(metrics)` takes any of the `SERIES` keys (others are ignored; a None value means not known yet),
    sets those and re-sets every value seen before, so each series carries its latest value at every scrape.
    """

    def __init__(self, run_name: str):
        from ray.util.metrics import Gauge

        self._gauges = {}
        for series in SERIES:
            gauge = Gauge(series.name, description=series.help, tag_keys=("run",))
            gauge.set_default_tags({"run": run_name})
            self._gauges[series.key] = gauge
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._keep_alive, name="raygpt2-gauges", daemon=True).start()

    def update(self, metrics: Mapping[str, object]) -> None:
        with self._lock:
            self._values.update({key: float(metrics[key]) for key in self._gauges.keys() & metrics.keys()
                                 if metrics[key] is not None})
            self._publish()

    def _publish(self) -> None:
        for key, value in self._values.items():
            self._gauges[key].set(value)

    def _keep_alive(self) -> None:
        # A daemon thread: it ends with the worker process, and so does the run's presence in the export.
        while True:
            time.sleep(KEEP_ALIVE_S)
            with self._lock:
                self._publish()
