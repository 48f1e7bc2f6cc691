"""Monitoring on a real `ray start --head`: Debian's Prometheus scraping a run.py run's gauges, the Grafana
dashboard's queries against it, `python -m training.monitor install`, the Train state API, the driver log.

One 2-worker run (-h 1, ~1 min) serves every test. The head exports metrics every 2 s instead of Ray's 10 s
(`metrics_report_interval_ms`) and Prometheus scrapes every 1 s, so a series missing from one export shows.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.ray_head import free_ports, ray_head
from tests.test_train import make_shards
from training.gauges import SERIES
from training.monitor import (
    CORE_DASHBOARD_FILE_NAME,
    DASHBOARD_FILE_NAME,
    DASHBOARD_JSON,
    FIRST_PANEL_ID,
    dashboard_json,
    install,
)

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "evals" / "data" / "hellaswag_smoke.jsonl"
RUN_NAME = "monitored"
# Val loss and HellaSwag change every -v steps only: the steps between are what must stay visible.
STEPS, EVERY = 300, 150
EXPORT_INTERVAL_S = 2
SCRAPE_INTERVAL_S = 1
# On CPU the engine has no peak FLOPs to divide by: MFU is never set, so its series and panel stay empty.
NOT_ON_CPU = {"raygpt2_mfu"}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    if not shutil.which("prometheus"):
        pytest.fail("Debian's prometheus is not installed: `make system-deps` (run by `make test`) installs it")
    # 4 logical CPUs: 2 workers x 1 and 2 HellaSwag tasks x 0.5.
    with ray_head(tmp_path_factory.mktemp("ray"),
                  f'--system-config={{"metrics_report_interval_ms": {EXPORT_INTERVAL_S * 1000}}}', num_cpus=4) as head:
        yield head


@pytest.fixture(scope="module")
def prometheus(head):
    """`python -m training.monitor install` on the head, Prometheus at a free loopback port, Grafana off."""
    (port,) = free_ports(1)
    os.environ["RAY_PROMETHEUS_HOST"] = url = f"http://127.0.0.1:{port}"
    try:
        servers = install(head.temp_dir, grafana=False, scrape_interval=f"{SCRAPE_INTERVAL_S}s")
    finally:
        del os.environ["RAY_PROMETHEUS_HOST"]
    assert len(servers) == 1
    yield url
    os.killpg(servers[0].pid, signal.SIGTERM)
    servers[0].wait(timeout=30)


def query(prometheus: str, promql: str, at: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": promql, "time": at})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query?{params}", timeout=30) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def run(head, prometheus, tmp_path_factory):
    """run.py on the head as a user runs it (`--address`); its output is the driver log."""
    data = make_shards(tmp_path_factory.mktemp("shards"), tokens_per_shard=20_000)
    out = tmp_path_factory.mktemp("runs") / RUN_NAME
    started = time.time()
    driver = subprocess.run(
        [sys.executable, "training/run.py", "--address", head.gcs_address, "--workers", "2", "--cpus-per-worker",
         "1", "-i", str(data / "*_train_*.bin"), "-j", str(data / "*_val_*.bin"), "-o", str(out), "-e", "L2H2C64",
         "-b", "4", "-t", "64", "-x", str(STEPS), "-v", str(EVERY), "-m", "2", "-s", str(EVERY), "-g", "8",
         "-h", "1", "--hellaswag-file", str(SMOKE), "--gpu-hour-usd", "1.0"],
        cwd=REPO, env=head.env, capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
    return {"log": driver.stdout + driver.stderr, "started": started, "ended": time.time(), "out": out}


def samples(prometheus: str, selector: str, run: dict) -> dict[str, list[tuple[float, float]]]:
    """Every raw sample Prometheus stored during the run, per metric name (one series each)."""
    window = int(time.time() - run["started"]) + 5
    by_name = {}
    for series in query(prometheus, f"{selector}[{window}s]", time.time()):
        name = series["metric"]["__name__"]
        assert name not in by_name, f"{name}: more than one series: {series['metric']}"
        by_name[name] = [(float(t), float(v)) for t, v in series["values"]]
    return by_name


def test_every_series_is_in_every_scrape_while_the_run_is_alive(head, prometheus, run):
    gauges = samples(prometheus, f'{{__name__=~"ray_raygpt2_.+", run="{RUN_NAME}"}}', run)
    assert set(gauges) == {f"ray_{s.name}" for s in SERIES if s.name not in NOT_ON_CPU}
    # The scrapes of the head's metrics export that succeeded (a failed one would be no fault of ours).
    target = f'up{{instance=~".+:{head.metrics_export_port}"}}'
    scrapes = [t for t, up in samples(prometheus, target, run)["up"] if up == 1]
    steps = gauges["ray_raygpt2_step"]
    alive = [t for t in scrapes if steps[0][0] <= t <= steps[-1][0]]
    assert steps[-1][1] == STEPS and len(alive) > 40, (steps[-1], len(alive))
    for name, values in gauges.items():
        present = {t for t, _ in values}
        missing = [round(t - steps[0][0], 1) for t in alive if t >= values[0][0] and t not in present]
        assert not missing, f"{name} missing from scrapes at {missing} s into the run"
        assert values[-1][0] == steps[-1][0], f"{name} ended before the run did"
    for name in ("train_loss", "lr", "grad_norm", "tokens_per_second", "val_loss", "elapsed_seconds"):
        assert gauges[f"ray_raygpt2_{name}"][0][0] - steps[0][0] <= 2 * EXPORT_INTERVAL_S, name
    # Val loss is set at steps 0, 150 and 300 only: it must have stayed in the export for longer than the
    # ~20 s after which Ray drops a gauge that is not set again, or this test proves nothing.
    unchanged = _longest_constant_stretch(gauges["ray_raygpt2_val_loss"])
    assert unchanged > 25, f"val loss stayed {unchanged:.0f} s only: the run is too short to show a gap"


def _longest_constant_stretch(values: list[tuple[float, float]]) -> float:
    longest, since = 0.0, values[0]
    for t, v in values:
        if v != since[1]:
            since = (t, v)
        longest = max(longest, t - since[0])
    return longest


def test_zz_debug_dump(run):
    Path("/tmp/monexp/driver.log").write_text(run["log"])
    print("run seconds", run["ended"] - run["started"])
