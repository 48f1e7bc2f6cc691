"""A user's cluster, used as the README says: a real `ray start --head` with its dashboard, `python -m
training.monitor install` (Debian's Prometheus, no Grafana), `ray job submit -- python pipelines/tokenize.py`, then
`ray job submit -- python training/run.py` on the shards it wrote, HellaSwag and CORE beside the training.

One head, one tokenize job and one 2-worker training run serve every test here: a head and a Ray Train fit are
the expensive parts. The head exports metrics every 5 s instead of Ray's 10 s (`metrics_report_interval_ms`;
Ray's agent keeps a gauge for two such intervals, so much shorter ones drop series on a loaded machine) and
Prometheus scrapes every 1 s, so a series missing from one export shows.
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
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_documents, run_cli
from training.launcher.local_cluster import RAY, free_ports, ray_head
from training.ops.gauges import SERIES
from training.ops.monitor import (
    CORE_DASHBOARD_FILE_NAME,
    DASHBOARD_FILE_NAME,
    DASHBOARD_JSON,
    PANEL_IDS,
    dashboard_json,
    install,
)

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "evals" / "data" / "hellaswag_smoke.jsonl"
CORE_SMOKE = REPO / "evals" / "data" / "core_smoke"
RUN_NAME = "monitored"
STEPS, EVERY = 100, 50
EXPORT_INTERVAL_S = 5
# On CPU the engine has no peak FLOPs to divide by: MFU is never set, so its series and panel stay empty.
NOT_ON_CPU = {"raygpt2_mfu"}
# Ray drops a gauge ~20 s after it was last set; this one is set once and must stay well past that.
PROBE_RUN, PROBE_VALUE, PROBE_WATCH_S = "keep-alive-probe", 2.5, 35
PROBE = f"""
import sys, time
import ray
from training.ops.gauges import RunGauges
ray.init(address=sys.argv[1])
RunGauges({PROBE_RUN!r}).update({{"val_loss": {PROBE_VALUE}}})
print("set", flush=True)
time.sleep(3600)
"""


def test_checked_in_dashboard_is_the_generated_one():
    assert DASHBOARD_JSON.read_text() == dashboard_json(), "run `python -m training.monitor dashboard`"


@pytest.fixture(scope="module")
def head():
    if not shutil.which("prometheus"):
        pytest.fail("Debian's prometheus is not installed: `make system-deps` (part of `make test`) installs it")
    # 4 logical CPUs: 2 workers x 1 and 2 HellaSwag tasks x 0.5.
    with ray_head(num_cpus=4,
                  system_config={"metrics_report_interval_ms": EXPORT_INTERVAL_S * 1000}) as head:
        yield head


@pytest.fixture(scope="module")
def prometheus(head):
    """`install` on the head as a user runs it, with Prometheus at a free loopback port and no Grafana."""
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_PROMETHEUS_HOST", url)  # where the Ray dashboard would look for it
        (server,) = install(head.temp_dir, grafana=False, scrape_interval="1s")
    yield url
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def probe(head, prometheus):
    """A driver on the head that sets one gauge once, then idles through the run."""
    driver = subprocess.Popen([sys.executable, "-c", PROBE, head.gcs_address], cwd=REPO, env=head.env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert driver.stdout.readline() == "set\n"
    yield time.time()
    driver.terminate()
    driver.wait(timeout=30)


def get(url: str) -> dict:
    """A dashboard API answer, with the auth token the head was started with (RAY_AUTH_MODE=token)."""
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def submit(head, submission_id: str, *command: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python COMMAND...` as a user types it; waits for the job to end."""
    return subprocess.run([*RAY, "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
                           "--working-dir", ".", "--", "python", *command],
                          cwd=REPO, env=head.env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def shards(head, tmp_path_factory) -> dict:
    """The tokenize job: 300 documents in units of ~5 kB, shards of 3,000 tokens."""
    root = tmp_path_factory.mktemp("tokenize")
    docs = [d for d in make_documents(300, seed=2) if d["text"].strip()]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    job = submit(head, "tokenize-1", "pipelines/tokenize.py", "--input", str(root / "docs.jsonl"),
                 "-o", str(root / "shards"), "--shard-size", "3000", "--unit-bytes", "5000")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    return {"dir": root / "shards", "manifest": json.loads((root / "shards" / "manifest.json").read_text())}


@pytest.fixture(scope="module")
def run(head, prometheus, probe, shards, tmp_path_factory) -> dict:
    """run.py submitted as a job on the tokenize job's shards; its driver log is the job's log."""
    out = tmp_path_factory.mktemp("runs") / RUN_NAME
    started = time.time()
    job = submit(head, "train-1", "training/run.py", "--workers", "2", "--cpus-per-worker", "1",
                 "-i", str(shards["dir"] / "*_train_*.bin"), "-j", str(shards["dir"] / "*_val_*.bin"), "-o", str(out),
                 "-e", "L2H2C64", "-b", "2", "-t", "32", "-x", str(STEPS), "-v", str(EVERY), "-n", str(EVERY),
                 "-m", "2", "-s", str(EVERY), "-g", "8", "-h", "1", "--hellaswag-file", str(SMOKE),
                 "--core-every", str(EVERY), "--core-bundle", str(CORE_SMOKE), "--gpu-hour-usd", "1.0")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    # What the cluster says of the job afterwards, as `ray job status` and `ray job logs` show it to a user.
    status = subprocess.run([*RAY, "job", "status", "--address", head.dashboard_url, "train-1"], env=head.env,
                            capture_output=True, text=True, timeout=60)
    logs = subprocess.run([*RAY, "job", "logs", "--address", head.dashboard_url, "train-1"], env=head.env,
                          capture_output=True, text=True, timeout=60)
    return {"out": out, "submitted": job.stdout, "status": status.stdout + status.stderr, "log": logs.stdout,
            "started": started}


def query(prometheus: str, promql: str, at: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": promql, "time": at})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query?{params}", timeout=30) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def stored(prometheus: str, selector: str, since: float) -> dict[str, list[tuple[float, float]]]:
    """Every raw sample Prometheus stored since `since`, per metric name (one series each)."""
    now = time.time()
    by_name = {}
    for series in query(prometheus, f"{selector}[{int(now - since) + 5}s]", now):
        name = series["metric"]["__name__"]
        assert name not in by_name, f"{name}: more than one series: {series['metric']}"
        by_name[name] = [(float(t), float(v)) for t, v in series["values"]]
    return by_name


def successful_scrapes(prometheus: str, head, since: float) -> list[float]:
    """When Prometheus scraped the head's metrics export and got an answer (a failed scrape is no gap of ours)."""
    up = stored(prometheus, f'up{{instance=~".+:{head.metrics_export_port}"}}', since)["up"]
    return [t for t, value in up if value == 1]


def assert_in_every_scrape(name: str, values: list[tuple[float, float]], scrapes: list[float], until: float):
    present = {t for t, _ in values}
    missing = [round(t - values[0][0], 1) for t in scrapes if values[0][0] <= t <= until and t not in present]
    assert not missing, f"{name} missing from the scrapes {missing} s after it first appeared"


def test_install_provisions_the_dashboard_and_rows_on_the_metrics_tab(head, prometheus):
    folder = next(head.temp_dir.glob("session_*/metrics/grafana/dashboards"))
    assert (folder / DASHBOARD_FILE_NAME).read_text() == dashboard_json()
    core_file = folder / CORE_DASHBOARD_FILE_NAME
    core = json.loads(core_file.read_text())
    assert core["uid"] == "rayDefaultDashboard"  # still the one the Metrics tab embeds
    ours = [p for p in core["panels"] if p["id"] in PANEL_IDS]
    assert ours == json.loads(dashboard_json())["panels"] and core["panels"][:len(ours)] == ours
    boxes = [(p["gridPos"]["x"], p["gridPos"]["y"], p["gridPos"]["w"], p["gridPos"]["h"]) for p in core["panels"]]
    cells = Counter((x + dx, y + dy) for x, y, w, h in boxes for dx in range(w) for dy in range(h))
    assert max(cells.values()) == 1, "panels overlap"
    assert len({p["id"] for p in core["panels"]}) == len(core["panels"])
    assert [v["name"] for v in core["templating"]["list"]].count("run") == 1
    # Again from the command line: the same files (nothing added twice), no server started.
    again = subprocess.run([sys.executable, "-m", "training.monitor", "install", "--temp-dir", str(head.temp_dir),
                            "--no-prometheus", "--no-grafana"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(core_file.read_text()) == core


def test_the_tokenize_job_is_listed_on_the_dashboard(head, shards):
    """The job's Ray Data pipeline on the dashboard's data API (what its Jobs page shows): named operators, rows,
    state FINISHED."""
    job_id = get(f"{head.dashboard_url}/api/jobs/tokenize-1")["job_id"]
    datasets = get(f"{head.dashboard_url}/api/data/datasets/{job_id}")["datasets"]
    assert len(datasets) == 1, datasets
    (dataset,) = datasets
    assert dataset["state"] == "FINISHED"
    operators = {op["name"]: op for op in dataset["operators"]}
    # read and Filter are fused into the Tokenize actor pool; WriteShards is an actor pool of its own
    fused = "ReadJSON->MapBatches(Filter)->MapBatches(Tokenize)"
    assert [name for name in operators if name != "Input"] == [fused, "MapBatches(WriteShards)"], list(operators)
    assert all(op["state"] == "FINISHED" for op in operators.values()), operators
    manifest = shards["manifest"]
    units = manifest["units"]
    assert units > 1
    # a block per work unit all the way, and a row per unit out of Tokenize: its counters
    assert operators[fused]["total_rows"] == units
    assert operators["MapBatches(WriteShards)"]["total_rows"] == units
    assert dataset["progress"] == dataset["total"] == units


def test_a_relative_output_path_in_a_submitted_job_is_refused(head, shards, run, tmp_path, monkeypatch):
    """A job's driver runs in Ray's copy of --working-dir, which Ray deletes with what it holds: a relative -o
    (tokenize.py's default, llm.c's `-o log124M`) would leave the shards or the run there, and a relative
    export or plot the file. One line each, and nothing is written into the copy. tokenize.py is submitted as
    a user types it; the other commands get what Ray gave that job's driver (its job config, its cwd) and run
    through their main(argv)."""
    docs = shards["dir"].parent / "docs.jsonl"
    job = submit(head, "relative-tokenize", "pipelines/tokenize.py", "--input", str(docs))
    # `ray job submit` shows the job's log, then the same lines again in its status message
    errors = {line for line in job.stdout.splitlines() if ": error: " in line}
    assert job.returncode != 0 and len(errors) == 1, job.stdout[-3000:] + job.stderr[-3000:]
    (line,) = errors
    copy = re.search(r"lands in Ray's temporary copy of that directory \((.+?)\), which Ray deletes; give an "
                     r"absolute path or a URL", line)
    assert line.startswith("tokenize.py: error: -o data/edu_fineweb10B (the default): "), line
    assert copy and "runtime_resources" in copy[1] and not (Path(copy[1]) / "data").exists(), line
    job_config = get(f"{head.dashboard_url}/api/jobs/relative-tokenize")["runtime_env"]
    assert job_config.get("working_dir"), job_config  # what the driver read its job config from

    copy = tmp_path / "working_dir_copy"
    copy.mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_config}))
    cases = [("training/run.py", "-o log124M: ",
              ["-i", str(shards["dir"] / "*_train_*.bin"), "-o", "log124M"]),
             ("training/export.py", "--llmc model.bin: ", [str(run["out"]), "--llmc", "model.bin"]),
             ("training/plot.py", "-o main.png: ", [str(run["out"]), "-o", "main.png"]),
             ("demo.py", "--out out/demo: ", [])]
    for script, culprit, argv in cases:  # run in-process, argparse names the program after pytest
        done = run_cli(script, argv)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and f": error: {culprit}" in lines[0], (script, lines)
        assert f"lands in Ray's temporary copy of that directory ({copy})" in lines[-1], lines[-1]
    assert not any(copy.iterdir())


def test_ray_job_submit_runs_the_launcher_and_its_log_is_the_engine_console(run):
    assert "Job 'train-1' succeeded" in run["submitted"], run["submitted"][-3000:]
    assert "Job 'train-1' succeeded" in run["status"], run["status"]
    # one line per step with that step's loss from main.log, forwarded from rank 0
    losses = {int(s): float(v) for s, v in re.findall(r"^s:(\d+) trl:(\S+)", (run["out"] / "main.log").read_text(),
                                                      re.M)}
    printed = {int(s) - 1: float(v) for s, v in re.findall(rf"step +(\d+)/{STEPS} \| loss (\S+)", run["log"])}
    assert sorted(losses) == list(range(STEPS)) and printed == pytest.approx(losses, abs=1e-6), (printed, losses)
    assert sorted(p.name for p in run["out"].glob("ckpt_*")) == [f"ckpt_{EVERY:08d}", f"ckpt_{STEPS:08d}"]
    summary = json.loads((run["out"] / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["workers"] == 2


def test_every_series_is_in_every_scrape_while_the_run_is_alive(head, prometheus, run):
    gauges = stored(prometheus, f'{{__name__=~"ray_raygpt2_.+", run="{RUN_NAME}"}}', run["started"])
    assert set(gauges) == {f"ray_{s.name}" for s in SERIES if s.name not in NOT_ON_CPU}
    steps = gauges["ray_raygpt2_step"]
    assert steps[-1][1] == STEPS
    scrapes = successful_scrapes(prometheus, head, run["started"])
    assert len([t for t in scrapes if steps[0][0] <= t <= steps[-1][0]]) >= 10
    for name, values in gauges.items():
        assert_in_every_scrape(name, values, scrapes, until=steps[-1][0])
        assert values[-1][0] == steps[-1][0], f"{name} left the export before the run ended"
    for name in ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_second", "elapsed_seconds"):
        assert gauges[f"ray_raygpt2_{name}"][0][0] <= steps[0][0] + 2 * EXPORT_INTERVAL_S, f"{name} came late"


def test_a_value_set_once_stays_in_the_export(prometheus, head, probe, run):
    time.sleep(max(0.0, probe + PROBE_WATCH_S - time.time()))  # the run usually took longer already
    (values,) = stored(prometheus, f'ray_raygpt2_val_loss{{run="{PROBE_RUN}"}}', probe - 5).values()
    assert {value for _, value in values} == {PROBE_VALUE}
    scrapes = successful_scrapes(prometheus, head, probe - 5)
    assert_in_every_scrape("the probe's val loss", values, scrapes, until=scrapes[-1])
    assert values[-1][0] - values[0][0] > PROBE_WATCH_S - 2 * EXPORT_INTERVAL_S


def test_every_dashboard_query_returns_data(prometheus, run):
    at = max(t for t, _ in stored(prometheus, f'ray_raygpt2_step{{run="{RUN_NAME}"}}', run["started"])
             ["ray_raygpt2_step"])
    panels = json.loads(DASHBOARD_JSON.read_text())["panels"]
    targets = [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]
    assert len(targets) == len(SERIES)
    values = {}
    for title, expr in targets:
        promql = expr.replace("$SessionName", ".+").replace("$run", RUN_NAME)  # Grafana's "All" and one run
        result = query(prometheus, promql, at)
        if any(f"ray_{name}{{" in expr for name in NOT_ON_CPU):
            assert result == [], title
        else:
            assert [r["metric"] for r in result] == [{"run": RUN_NAME}], (title, expr)
            values[re.search(r"ray_(\w+)\{", expr)[1]] = float(result[0]["value"][1])
    assert values["raygpt2_step"] == STEPS and values["raygpt2_val_loss"] > 0
    assert 0 <= values["raygpt2_hellaswag_acc_norm"] <= 1 and values["raygpt2_estimated_cost_usd"] > 0
    # The template variables' label_values(metric, label), as Grafana asks Prometheus for them.
    variables = {v["name"]: v["query"]["query"] for v in json.loads(DASHBOARD_JSON.read_text())["templating"]["list"]
                 if v["type"] == "query"}
    assert set(variables) == {"SessionName", "run"}
    for name, label_values in variables.items():
        metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", label_values).groups()
        params = urllib.parse.urlencode({"match[]": metric.replace("$SessionName", ".+"), "start": at - 60})
        with urllib.request.urlopen(f"{prometheus}/api/v1/label/{label}/values?{params}", timeout=30) as response:
            found = json.load(response)["data"]
        assert found and (name != "run" or RUN_NAME in found), (name, found)


def test_train_state_api_shows_the_run(head, run):
    runs = [r for r in get(f"{head.dashboard_url}/api/train/v2/runs/v1")["train_runs"] if r["name"] == RUN_NAME]
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED", runs
    assert sorted(w["world_rank"] for w in runs[0]["attempts"][-1]["workers"]) == [0, 1]


def test_driver_log_is_the_engine_console_once_without_ray_train_report_lines(run):
    log = run["log"]
    assert "Reporting training result" not in log
    engine = [re.sub(r"^(\x1b\[\d+m)?\(RayTrainWorker pid=\d+(, ip=[\d.]+)?\)(\x1b\[0m)? ", "", line)
              for line in log.splitlines() if "RayTrainWorker pid=" in line]
    steps = [int(m[1]) for line in engine if (m := re.match(rf"step +(\d+)/{STEPS} \| loss", line))]
    assert steps == list(range(1, STEPS + 1))
    assert sum(line.startswith("val loss ") for line in engine) == 3  # steps 0, 50 and 100
    assert sum(line == "generating:" for line in engine) == 2
    for step in (EVERY, STEPS):  # a result, or on a slow machine "skipped" (not the last step's)
        assert sum(line.startswith(f"step {step} | hellaswag ") for line in engine) == 1
        assert sum(line.startswith(f"progress {step}/{STEPS} steps") for line in engine) == 1
    assert sum(line.startswith(f"step {STEPS} | hellaswag acc_norm") for line in engine) == 1
    sample_markup = {"generating:", "---"}  # around each sample's text
    repeated = [line for line, count in Counter(engine).items() if count > 1 and line not in sample_markup]
    # Ray marks a line that several processes printed at once "[repeated Nx across cluster]".
    assert not repeated and not [line for line in engine if "[repeated" in line], repeated


def test_cluster_yaml_head_runs_prometheus_and_grafana_with_the_dashboard():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    setup = " ".join(config["head_setup_commands"])
    assert "apt-get install" in setup and " prometheus" in setup and "install -y -qq grafana" in setup
    start = config["head_start_ray_commands"]
    head_start = next(i for i, command in enumerate(start) if "ray start --head" in command)
    assert start.index("python -m training.monitor install") > head_start  # after Ray wrote the session's files
