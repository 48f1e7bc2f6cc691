"""The runs' Grafana dashboard, and one command that sets Prometheus + Grafana up on a Ray head node.

    ray start --head ...                              # then, on the head node:
    python -m training.monitor install                # provision the dashboard, start Prometheus and Grafana
    python -m training.monitor dashboard              # regenerate the checked-in training/ops/grafana/raygpt2.json

The dashboard plots the gauges of training/ops/gauges.py, one row per run (the `run` template variable).
`install` sets it up the way Ray does its own dashboards, on the head node's current session:
  * writes it into the session's Grafana provisioning folder (`<temp-dir>/session_latest/metrics/grafana/
    dashboards/`, which Ray's `grafana.ini` provisions as the "Ray" folder), and adds its rows at the top of
    Ray's Core dashboard there: that is the dashboard the Ray dashboard's Metrics tab embeds;
  * starts Prometheus, scraping every node in Ray's service-discovery file, and Grafana with Ray's
    generated `metrics/grafana/grafana.ini`, unless they already answer, at the addresses the Ray
    dashboard reads: RAY_PROMETHEUS_HOST (default http://localhost:9090) and RAY_GRAFANA_HOST (default
    http://localhost:3000).
Ray rewrites its Grafana folder whenever the head starts, so run `install` after every `ray start --head`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from common import cli
from training.ops.gauges import PREFIX, SERIES


class MonitorError(Exception):
    """What keeps `install` from provisioning or starting a server, as one line."""

DASHBOARD_UID = "raygpt2"
DASHBOARD_JSON = Path(__file__).resolve().parent / "grafana" / "raygpt2.json"
DASHBOARD_FILE_NAME = "raygpt2_grafana_dashboard.json"
# Ray's Core dashboard: the Metrics tab embeds it (Ray 2.60's Metrics.tsx embeds `dashboardUids.default`).
CORE_DASHBOARD_FILE_NAME = "default_grafana_dashboard.json"
# Ray's panel ids stay below 1100; ours are a block of their own so `install` can find and replace them.
FIRST_PANEL_ID = 2000
PANEL_IDS = range(FIRST_PANEL_ID, FIRST_PANEL_ID + 100)
PANEL_HEIGHT = 8
DEFAULT_PROMETHEUS_HOST = "http://localhost:9090"  # Ray's defaults when RAY_*_HOST are unset
DEFAULT_GRAFANA_HOST = "http://localhost:3000"
RAY_SCRAPE_INTERVAL = "10s"  # Ray's generated prometheus.yml
PROMETHEUS_DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")  # what Prometheus accepts for an interval
# Ray's service-discovery file for Prometheus (ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE), in each
# session dir and linked from the temp dir to the latest session's.
SERVICE_DISCOVERY = "prom_metrics_service_discovery.json"

BY_KEY = {series.key: series for series in SERIES}
# (title, panel type, width of 24, [(series key, legend)]): one row of these per run.
PANELS = (
    ("Loss", "timeseries", 8, [("loss", "train"), ("val_loss", "val")]),
    ("HellaSwag (-h 1)", "timeseries", 8, [("hellaswag_acc_norm", "acc_norm"), ("hellaswag_acc", "acc")]),
    ("CORE (--core-every)", "timeseries", 8, [("core", "CORE")]),
    ("Learning rate", "timeseries", 8, [("lr", "lr")]),
    ("Gradient norm", "timeseries", 8, [("norm", "grad norm")]),
    ("Throughput", "timeseries", 8, [("tokens_per_second", "tok/s")]),
    ("MFU", "timeseries", 9, [("mfu", "MFU")]),
    ("Step", "stat", 3, [("step", "step")]),
    ("Workers", "stat", 3, [("workers", "workers")]),
    ("Elapsed", "stat", 3, [("elapsed_s", "elapsed")]),
    ("ETA", "stat", 3, [("eta_s", "ETA")]),
    ("Est. cost", "stat", 3, [("cost_usd", "USD")]),
)


def promql(series_key: str) -> str:
    """The query of one series in the dashboard: this run's value, whichever worker process reported it
    (after a restart Ray Train's new rank 0 is a new `WorkerId` while the old series lingers ~20 s)."""
    return f'max by (run) (ray_{BY_KEY[series_key].name}{{SessionName=~"$SessionName", run=~"$run"}})'


def _variable(name: str, query: str, description: str, multi: bool) -> dict[str, Any]:
    return {
        "name": name, "type": "query", "datasource": "${datasource}", "definition": query,
        "query": {"query": query, "refId": f"{name}-query"}, "description": description, "refresh": 2,
        "includeAll": True, "allValue": ".+", "multi": multi, "sort": 1, "hide": 0,
        "current": {"selected": True, "text": ["All"] if multi else "All", "value": ["$__all"] if multi else "$__all"},
        "options": [],
    }


# The Core dashboard has `datasource` and `SessionName` variables of its own (the Metrics tab sets both);
# ours are the same names, so the panels work unchanged in either dashboard.
DATASOURCE_VARIABLE = {"name": "datasource", "type": "datasource", "query": "prometheus", "hide": 2,
                       "current": {"selected": False}, "options": []}
SESSION_VARIABLE = _variable("SessionName", f"label_values(ray_{PREFIX}step, SessionName)",
                             "Ray session (cluster start) of the runs", multi=False)
RUN_VARIABLE = _variable("run", f'label_values(ray_{PREFIX}step{{SessionName=~"$SessionName"}}, run)',
                         "Training run: the basename of run.py's -o", multi=True)


def _panel(panel_id: int, title: str, kind: str, grid: dict[str, int], targets: list[tuple[str, str]]) -> dict:
    series = [BY_KEY[key] for key, _ in targets]
    panel = {
        "id": panel_id, "type": kind, "title": title, "datasource": "${datasource}", "gridPos": grid,
        "description": "\n".join(f"ray_{s.name}: {s.help}." for s in series),
        "fieldConfig": {"defaults": {"unit": series[0].grafana_unit}, "overrides": []},
        "targets": [{"expr": promql(key), "legendFormat": legend, "refId": chr(ord("A") + i)}
                    for i, (key, legend) in enumerate(targets)],
    }
    if kind == "stat":
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "none", "graphMode": "none", "textMode": "value"}
    else:
        panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "none"}}
    return panel


def run_panels() -> list[dict[str, Any]]:
    """A row repeated for every selected run, with its panels laid out left to right below it."""
    panels = [{"id": FIRST_PANEL_ID, "type": "row", "title": "raygpt2 run $run", "repeat": "run",
               "collapsed": False, "panels": [], "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0}}]
    x, y = 0, 1
    for panel_id, (title, kind, width, targets) in enumerate(PANELS, start=FIRST_PANEL_ID + 1):
        if x + width > 24:
            x, y = 0, y + PANEL_HEIGHT
        panels.append(_panel(panel_id, title, kind, {"h": PANEL_HEIGHT, "w": width, "x": x, "y": y}, targets))
        x += width
    return panels


def dashboard() -> dict[str, Any]:
    """The standalone dashboard, as checked in at training/ops/grafana/raygpt2.json."""
    return {
        "uid": DASHBOARD_UID, "title": "raygpt2 training runs", "tags": ["raygpt2"], "editable": True,
        "schemaVersion": 39, "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "graphTooltip": 1,
        "templating": {"list": [DATASOURCE_VARIABLE, SESSION_VARIABLE, RUN_VARIABLE]},
        "panels": run_panels(), "annotations": {"list": []}, "links": [],
    }


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def add_to_core_dashboard(core: dict[str, Any]) -> dict[str, Any]:
    """Ray's Core dashboard with our run rows on top (replacing any an earlier `install` added)."""
    core = copy.deepcopy(core)
    ours = run_panels()
    ray_panels = [p for p in core["panels"] if p["id"] not in PANEL_IDS]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in ours)
    shift = height - min(p["gridPos"]["y"] for p in ray_panels)
    for panel in ray_panels:
        panel["gridPos"]["y"] += shift
    variables = core["templating"]["list"]
    if not any(v["name"] == RUN_VARIABLE["name"] for v in variables):
        variables.append(RUN_VARIABLE)
    return {**core, "panels": ours + ray_panels}


def _metrics_root(temp_dir: Path) -> Path:
    """Where the head's dashboard wrote its Prometheus and Grafana configs (Ray's metrics_head.py)."""
    session = temp_dir / "session_latest"
    if not session.exists():
        raise MonitorError(f"--temp-dir {temp_dir}: no Ray session there: start the head first (ray start --head)")
    return Path(os.environ.get("RAY_METRICS_OUTPUT_ROOT", session.resolve() / "metrics"))


def provision(temp_dir: Path) -> Path:
    """Write our dashboard and our rows in Ray's Core dashboard into the session's Grafana dashboards folder."""
    metrics = _metrics_root(temp_dir)
    folder = Path(os.environ.get("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", metrics / "grafana" / "dashboards"))
    core_file = folder / CORE_DASHBOARD_FILE_NAME
    if not core_file.exists():
        raise MonitorError(f"{core_file} is missing: is the head's dashboard (ray[default]) up?")
    (folder / DASHBOARD_FILE_NAME).write_text(dashboard_json())
    core_file.write_text(json.dumps(add_to_core_dashboard(json.loads(core_file.read_text())), indent=2))
    return folder


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _start(name: str, command: list[str], log: Path, health_url: str,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server detached from this command (it outlives it) and wait until it answers."""
    with open(log, "ab") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while not _answers(health_url):
        if server.poll() is not None or time.monotonic() > deadline:
            raise MonitorError(f"{name} did not come up; see {log}")
        time.sleep(0.5)
    print(f"{name}: started at {health_url.split('/api/')[0]} (pid {server.pid}, log {log})", flush=True)
    return server


def prometheus_config(temp_dir: Path, scrape_interval: str) -> dict[str, Any]:
    """Ray's generated prometheus.yml, but reading Ray's service-discovery file (every node's metrics export
    address) at the temp dir's link to the latest session's copy, so the server outlives a head restart."""
    return {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": scrape_interval},
        "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [str(temp_dir / SERVICE_DISCOVERY)]}]}],
    }


def start_prometheus(temp_dir: Path, host: str, scrape_interval: str) -> subprocess.Popen | None:
    """Prometheus on this node at `host`, unless one answers there already (then None)."""
    if _answers(f"{host}/api/v1/query?query=vector(1)"):
        print(f"prometheus: already answering at {host}", flush=True)
        return None
    if not shutil.which("prometheus"):
        raise MonitorError("no prometheus on PATH (Debian/Ubuntu: apt-get install prometheus)")
    folder = temp_dir / "prometheus"
    folder.mkdir(exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(json.dumps(prometheus_config(temp_dir, scrape_interval), indent=2))  # JSON is YAML
    url = urlparse(host)
    return _start("prometheus", ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                                 f"--web.listen-address={url.hostname}:{url.port}"],
                  folder / "prometheus.log", f"{host}/api/v1/query?query=vector(1)")


def start_grafana(temp_dir: Path, host: str) -> subprocess.Popen | None:
    """Grafana on this node at `host` with Ray's grafana.ini (its provisioning: Ray's Prometheus datasource
    and the session's dashboards folder), unless one answers there already (then None)."""
    if _answers(f"{host}/api/health"):
        print(f"grafana: already answering at {host}", flush=True)
        return None
    if shutil.which("grafana"):  # Grafana 10+; `grafana-server` is the older, deprecated entry point
        command = ["grafana", "server"]
    elif shutil.which("grafana-server"):
        command = ["grafana-server"]
    else:
        raise MonitorError("no grafana on PATH (see cluster.yaml's head_setup_commands)")
    packaged = Path("/usr/share/grafana")  # the .deb's home; a tarball's is the parent of its bin/
    home = packaged if packaged.is_dir() else Path(shutil.which(command[0])).resolve().parents[1]
    folder = temp_dir / "grafana"
    folder.mkdir(exist_ok=True)
    url = urlparse(host)
    # Grafana reads GF_<SECTION>_<KEY> over its ini: its state stays in the temp dir, it listens where Ray looks.
    env = {"GF_PATHS_DATA": str(folder / "data"), "GF_PATHS_LOGS": str(folder / "log"),
           "GF_PATHS_PLUGINS": str(folder / "plugins"), "GF_SERVER_HTTP_ADDR": url.hostname,
           "GF_SERVER_HTTP_PORT": str(url.port)}
    config = _metrics_root(temp_dir) / "grafana" / "grafana.ini"
    return _start("grafana", [*command, f"--homepath={home}", f"--config={config}"], folder / "grafana.log",
                  f"{host}/api/health", env)


def install(temp_dir: Path, prometheus: bool = True, grafana: bool = True,
            scrape_interval: str = RAY_SCRAPE_INTERVAL) -> list[subprocess.Popen]:
    """Provision the dashboard on the head's session and start the servers asked for; returns those started."""
    folder = provision(temp_dir)
    print(f"dashboard: {DASHBOARD_FILE_NAME}, and run rows atop Ray's Core dashboard, in {folder}", flush=True)
    prometheus_host = os.environ.get("RAY_PROMETHEUS_HOST", DEFAULT_PROMETHEUS_HOST)
    grafana_host = os.environ.get("RAY_GRAFANA_HOST", DEFAULT_GRAFANA_HOST)
    started = [start_prometheus(temp_dir, prometheus_host, scrape_interval) if prometheus else None,
               start_grafana(temp_dir, grafana_host) if grafana else None]
    if grafana:
        iframe = os.environ.get("RAY_GRAFANA_IFRAME_HOST", grafana_host)
        print(f"Metrics tab: embeds Grafana from {iframe} (your browser must reach it: forward the port, or "
              "start the head with RAY_GRAFANA_IFRAME_HOST set to an address it reaches)", flush=True)
    return [server for server in started if server]


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m training.monitor", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("install", help="provision the dashboard on this head node's Ray session and "
                                                "start Prometheus and Grafana if they do not answer yet")
    setup.add_argument("--temp-dir", type=Path, default=Path("/tmp/ray"), help="ray start's --temp-dir "
                                                                               "(default: /tmp/ray)")
    for server, where in (("prometheus", "RAY_PROMETHEUS_HOST"), ("grafana", "RAY_GRAFANA_HOST")):
        setup.add_argument(f"--{server}", action=argparse.BooleanOptionalAction, default=True,
                           help=f"start {server} at {where} if none answers there (default: yes)")
    setup.add_argument("--scrape-interval", default=RAY_SCRAPE_INTERVAL,
                       help=f"Prometheus scrape interval (default: {RAY_SCRAPE_INTERVAL}, as Ray's config; Ray "
                            "exports custom metrics every 10 s)")
    commands.add_parser("dashboard", help=f"regenerate {DASHBOARD_JSON.relative_to(DASHBOARD_JSON.parents[2])} "
                                          "(after a change to the panels or training/ops/gauges.py)")
    args = parser.parse_args(argv)
    if args.command == "install" and not PROMETHEUS_DURATION.fullmatch(args.scrape_interval):
        parser.error(f"--scrape-interval {args.scrape_interval}: not a Prometheus duration (e.g. 1s, 500ms, 1m)")
    if args.command == "dashboard":
        DASHBOARD_JSON.write_text(dashboard_json())
        print(f"wrote {DASHBOARD_JSON}")
    else:
        try:
            install(args.temp_dir, args.prometheus, args.grafana, args.scrape_interval)
        except MonitorError as err:
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
