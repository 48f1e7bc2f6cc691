"""Elastic worker groups: the same stream at any size, resumes at other sizes, spot nodes reclaimed mid-run.

Runs at another size are compared to an uninterrupted 2-worker run within float tolerance, not bitwise: the
same micro-batches' gradients are summed in another order (on one rank rather than across ranks by DDP's
all-reduce) and ZeRO-1 shards the Adam update differently, which moves last bits; Adam then turns a last-bit
difference in a gradient that is zero in exact arithmetic (the attention key bias) into a weight difference
well above float epsilon. Measured here after 10 steps at another size: weights within 3e-6, Adam moments
within 4e-9, train losses within 1e-7 relative. The tolerances (weights 1e-4, one tenth of an lr-1e-3 update;
losses 1e-5 relative) leave room for that and for a longer run, and are far below what another batch of
sequences or a lost optimizer state gives (losses off by ~1e-3 relative, weights by ~lr per step).
"""

import json
import re
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from gpt2.checkpoint import load_part, read_state
from gpt2.mainlog import read
from tests.helpers import REPO, RUN_EVERY, RUN_STEPS, ReportGate, make_shards, run_flags, wait_for
from training.config import ConfigError, TrainConfig
from training.data import ShardLoader
from training.launcher.elastic import check_group_sizes, uneven_split_note
from training.launcher.flags import parse_run_flags
from training.launcher.launch import main
from training.launcher.local_cluster import alive_nodes, kill_tree, ray_head, ray_node
from training.launcher.progress import Progress

STEPS, EVERY = RUN_STEPS, RUN_EVERY  # -d 256: 4 micro-steps on one worker, 2 each on two, 2/1/1 on three


def assert_same_training(run: Path, reference: Path, step: int) -> None:
    """`run`'s checkpoint `step` holds the weights, Adam state and data position of `reference`'s."""
    ours, theirs = run / f"ckpt_{step:08d}", reference / f"ckpt_{step:08d}"
    for name, tensor in load_part(theirs, "model.pt").items():
        torch.testing.assert_close(load_part(ours, "model.pt")[name], tensor, atol=1e-4, rtol=1e-4, msg=name)
    for index, state in load_part(theirs, "optimizer.pt")["state"].items():
        for key, tensor in state.items():
            torch.testing.assert_close(load_part(ours, "optimizer.pt")["state"][index][key], tensor, atol=1e-6,
                                       rtol=1e-3, msg=f"{index}/{key}")
    assert read_state(ours)["train_loader"] == read_state(theirs)["train_loader"]


def assert_same_losses(run: Path, reference: Path) -> None:
    ours, theirs = dict(read(run / "main.log")["trl"]), dict(read(reference / "main.log")["trl"])
    assert ours and all(ours[s] == pytest.approx(theirs[s], rel=1e-5) for s in ours), (ours, theirs)


def _step_batches(pattern: str, world: int, batch: int, micro_batches: int, steps: int,
                  resume: dict | None = None) -> tuple[list[torch.Tensor], dict]:
    """The sequences of each step as `world` ranks of `batch` read them, put back in stream order (micro-batch
    j is rank j % world's (j // world)-th), and the data position after the last step."""
    loaders = [ShardLoader(pattern, "-i", batch, 16, rank, world, seed=5) for rank in range(world)]
    for loader in loaders:
        if resume:
            loader.load_state_dict(resume)
    out = []
    for _ in range(steps):
        per_rank = [loader.next_step(micro_batches) for loader in loaders]
        out.append(torch.cat([per_rank[j % world][j // world][0] for j in range(micro_batches)]))
    return out, loaders[0].state_dict()


def test_every_size_reads_the_same_sequences_and_continues_the_stream_at_another(tmp_path):
    # 3 train shards of 62 sequences of -t 16; a step of 12 sequences: steps span shards and, after 15, epochs.
    pattern = str(make_shards(tmp_path, tokens_per_shard=1000, shards=4) / "*_train_*.bin")
    one_rank, _ = _step_batches(pattern, 1, 12, 1, 20)
    assert len({tuple(row.tolist()) for step in one_rank[:15] for row in step}) == 15 * 12  # none twice an epoch
    for world, batch, micro_batches in ((2, 2, 6), (3, 4, 3), (4, 1, 12), (5, 2, 6)):  # 5 ranks: 2/1/1/1/1
        steps, _ = _step_batches(pattern, world, batch, micro_batches, 20)
        assert all(torch.equal(a, b) for a, b in zip(steps, one_rank, strict=True)), (world, batch)
    first, position = _step_batches(pattern, 2, 3, 4, 7)  # 7 steps on 2 ranks, then on to 3 ranks
    rest, _ = _step_batches(pattern, 3, 2, 6, 13, resume=position)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, one_rank, strict=True))


def test_sizes_that_cannot_keep_the_global_batch_are_refused_naming_those_that_can():
    config = TrainConfig(micro_batch=2, seq_len=32, total_batch_tokens=256)
    check_group_sizes(config, 1, 4)
    assert "a group of 3 worker(s) splits them unevenly" in uneven_split_note(config, 1, 4)
    assert uneven_split_note(config, 1, 2) is None
    with pytest.raises(ConfigError, match=r"^--min-workers 2 --workers 6: -d 256 is 4 micro-batch\(es\) of -b 2 x "
                                          r"-t 32 per step, too few for a group of 5-6 workers .*sizes that keep "
                                          r"-d: 2-4;"):
        check_group_sizes(config, 2, 6)
    with pytest.raises(ConfigError, match=r"^-d 250 is not a positive multiple of -b 2 x -t 32 = 64 tokens$"):
        check_group_sizes(TrainConfig(micro_batch=2, seq_len=32, total_batch_tokens=250), 1, 2)


def test_an_elastic_run_survives_any_number_of_reclaims_unless_told_otherwise():
    def restarts(*flags: str) -> int:
        return parse_run_flags(["--workers", "4", *flags])[1].restarts()

    assert restarts("--min-workers", "2") == -1 and restarts() == 3
    assert restarts("--min-workers", "2", "--max-failures", "5") == 5


def test_cost_counts_the_worker_hours_of_each_group_size():
    now = time.time()
    progress = Progress(now - 3 * 3600, 8, usd_per_worker_hour=2.0)  # 8 workers for 2 h, then 4 for 1 h
    progress.resized(now - 3600, 4)
    assert progress.worker_hours() == pytest.approx(20, rel=1e-3) and progress.cost() == pytest.approx(40, rel=1e-3)
    assert "(20.00 worker-hours x $2.00/h; 4 worker(s) now)" in progress.line(10, 20)
    assert progress.summary(10, 1024, "cpu")["worker_hours"] == pytest.approx(20, rel=1e-3)


def test_a_two_worker_checkpoint_resumes_on_three_workers_splitting_steps_unevenly(reference_run, run_shards,
                                                                                   tmp_path):
    """-d is 4 micro-batches: 2/1/1 on 3 workers, ZeRO-1 state re-sharded over 3. (Resuming on 1 worker: the
    reclaimed-node test below.)"""
    out = tmp_path / "three_workers"
    resume_at, until = 2 * EVERY, 4 * EVERY
    assert main([*run_flags(run_shards, out), "--workers", "3", "-x", str(until),
                 "--resume-from", str(reference_run / f"ckpt_{resume_at:08d}")]) == 0
    assert_same_training(out, reference_run, until)
    log = (out / "main.log").read_text().splitlines()
    assert log[0] == f"s:{resume_at} workers:3"  # the resize, recorded where the run resumed
    assert [int(line.split()[0][2:]) for line in log if " trl:" in line] == list(range(resume_at, until))
    assert_same_losses(out, reference_run)


class SpotMetadata(BaseHTTPRequestHandler):
    """EC2's instance metadata service as IMDSv2 answers it: a token by PUT, then GETs that carry it; the
    spot notice once `notice_at` is set. Setting it also expires the token, as the real one's TTL would."""

    token = "token-1"
    notice_at: datetime | None = None

    def do_PUT(self) -> None:
        if self.path != "/latest/api/token" or "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
            return self._answer(400)
        self._answer(200, self.token)

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self._answer(401)
        if self.path == "/latest/meta-data/instance-id":
            return self._answer(200, "i-0123456789abcdef0")
        if self.path == "/latest/meta-data/spot/instance-action" and self.notice_at:
            return self._answer(200, json.dumps({"action": "terminate",
                                                 "time": self.notice_at.strftime("%Y-%m-%dT%H:%M:%SZ")}))
        self._answer(404)

    def _answer(self, status: int, body: str = "") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


@contextmanager
def spot_metadata():
    """A metadata service on a free local port, yielding (its URL, its handler class, to post a notice)."""
    handler = type("Metadata", (SpotMetadata,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler
    finally:
        server.shutdown()


def post_spot_notice(metadata: type[SpotMetadata], seconds: int) -> None:
    metadata.notice_at = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    metadata.token = "token-2"


def spot_watch(*flags: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training.ops.spot_watch", *flags], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_spot_watcher_finds_the_node_it_runs_on_and_exits_off_ec2_or_off_a_cluster(ray_cluster):
    off_ec2 = subprocess.run([sys.executable, "-m", "training.ops.spot_watch", "--metadata-url", "http://127.0.0.1:9"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert off_ec2.returncode == 0 and "no EC2 instance metadata at http://127.0.0.1:9" in off_ec2.stdout
    with spot_metadata() as (url, _):
        nowhere = subprocess.run([sys.executable, "-m", "training.ops.spot_watch", "--metadata-url", url, "--address",
                                  "127.0.0.1:9"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert nowhere.returncode == 2 and nowhere.stderr.count("\n") == 1, nowhere.stderr
        assert "error: --address 127.0.0.1:9: no Ray cluster answers there" in nowhere.stderr
        address = ray_cluster.get_runtime_context().gcs_address
        no_such_node = subprocess.run([sys.executable, "-m", "training.ops.spot_watch", "--metadata-url", url,
                                       "--address", address, "--node-id", "ab" * 28],
                                      cwd=REPO, capture_output=True, text=True, timeout=60)
        assert no_such_node.returncode == 2, no_such_node.stderr
        assert no_such_node.stderr.strip().splitlines()[-1].endswith(
            f"error: --node-id {'ab' * 28}: no live node of the cluster at {address} has it"), no_such_node.stderr
        watcher = spot_watch("--metadata-url", url, "--address", ray_cluster.get_runtime_context().gcs_address)
        try:
            first_line = watcher.stdout.readline()
        finally:
            watcher.kill()
            watcher.wait()
    assert first_line.startswith(f"spot watch: node {ray_cluster.get_runtime_context().get_node_id()}, "), first_line


# run.py as a user runs it against the three-node cluster, with the tests' report gates passed to launch_run:
# argv[1] is a JSON list of ReportGate arguments [directory, checkpoint, name].
GATED_RUN = """
import json, sys
from tests.helpers import ReportGate
from training.launcher.launch import main
sys.exit(main(sys.argv[2:], callbacks=[ReportGate(*gate) for gate in json.loads(sys.argv[1])]))
"""


@pytest.fixture
def spot_head():
    """A head of one CPU that notices a dead node within ~2 s (`health_check_failure_threshold` missed checks
    of `health_check_period_ms`); the test adds the nodes it reclaims before its run starts. A head of its
    own: Ray Train sizes an elastic group from the cluster's AutoscalingCoordinator (an actor of Ray Data),
    whose view of the nodes is refreshed every 20 s, so on a head shared with an earlier run a run could start
    before that view holds the new nodes, and start smaller."""
    fast_detection = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    with ray_head(num_cpus=1, system_config=fast_detection) as head:
        yield head


def preemption_seen(head) -> bool:
    """Ray Train's preemption watcher (an actor of the run) logs the drain it has seen, then marks every worker
    preempted: from then on the run's next report learns of it."""
    return any("PreemptionWatcher: preemption detected" in log.read_text(errors="replace")
               for log in head.temp_dir.rglob("worker-*.err"))


def test_spot_reclaims_with_and_without_notice_leave_the_run_on_one_worker_with_the_same_result(
        reference_run, run_shards, spot_head, tmp_path):
    """`run.py --workers 3 --min-workers 1` on the head and two more nodes of one CPU each, both of them spot
    capacity that is reclaimed while the run goes on:

    1. with notice: the run is held at its first report while EC2's spot notice appears in the first node's
       instance metadata and that node's `training.ops.spot_watch` drains it for preemption with the notice's
       deadline; let go once Ray Train's preemption watcher has seen the drain, the run checkpoints at once,
       off the -n schedule, and is held at that checkpoint while the node's process tree is SIGKILLed. The
       group restarts on 2 workers from it: without the just-in-time checkpoint it would have gone back to
       the last -n one.
    2. without notice (no drain, as when a spot instance is simply reclaimed): held at the checkpoint of step
       2 x -n, which Ray has registered, the second node's tree is SIGKILLed. The group restarts on 1 worker
       from that checkpoint and finishes.

    Every step is trained once, and the result is the uninterrupted 2-worker run's."""
    out = tmp_path / "spot"
    # A report (and with it a look at the notice) at every step. Later flags win over RUN_FLAGS; neither
    # changes the numbers.
    flags = run_flags(run_shards, out, "--report-interval", "0")
    reclaim_at = 2 * EVERY
    at_first_report = ReportGate(tmp_path / "first_report", checkpoint=False)
    at_notice_checkpoint = ReportGate(tmp_path / "notice_checkpoint")
    at_later_checkpoint = ReportGate(tmp_path / "later_checkpoint", name=f"ckpt_{reclaim_at:08d}")
    gates = [at_first_report, at_notice_checkpoint, at_later_checkpoint]
    head = spot_head
    with ExitStack() as nodes:
        noticed = nodes.enter_context(ray_node(head, num_cpus=1))
        (noticed_id,) = [n["node_id"] for n in alive_nodes(head) if not n["is_head_node"]]
        unnoticed = nodes.enter_context(ray_node(head, num_cpus=1))
        metadata_url, metadata = nodes.enter_context(spot_metadata())
        # three nodes on one machine: the watcher is told which one it stands for
        watcher = spot_watch("--metadata-url", metadata_url, "--address", head.gcs_address, "--node-id", noticed_id,
                             "--interval", "0.2", env=head.env)
        seen: dict[str, object] = {}

        def reclaim() -> None:
            at_first_report.wait_until_held()
            post_spot_notice(metadata, seconds=60)
            seen["watcher"] = watcher.communicate(timeout=120)[0]  # it exits once it has drained
            wait_for(lambda: preemption_seen(head), "Ray Train's preemption watcher to see the drain")
            at_first_report.release()
            seen["notice_checkpoint"] = at_notice_checkpoint.wait_until_held()
            kill_tree(noticed.pid)
            at_notice_checkpoint.release()
            at_later_checkpoint.wait_until_held()
            seen["finished"] = (out / f"ckpt_{STEPS:08d}").exists()
            kill_tree(unnoticed.pid)
            at_later_checkpoint.release()

        reclaimer = threading.Thread(target=reclaim, daemon=True)
        reclaimer.start()
        run = subprocess.run([sys.executable, "-c", GATED_RUN,
                              json.dumps([[str(g.directory), g.checkpoint, g.name] for g in gates]),
                              "--address", head.gcs_address, "--workers", "3", "--min-workers", "1", *flags],
                             cwd=REPO, env={**head.env, "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.1"},
                             capture_output=True, text=True, timeout=600)
        reclaimer.join()
        if watcher.poll() is None:
            watcher.kill()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert watcher.returncode == 0 and re.search(r"EC2 will terminate this instance in \d+ s; draining "
                                                 f"node {noticed_id}", seen["watcher"]), seen
    assert seen["finished"] is False, "the second node was not reclaimed while the run was in progress"
    shown = "\n".join(line for line in run.stdout.splitlines() if "step " not in line)[-6000:]
    notice = re.search(r"preemption notice: rank\(s\) \d on a node being drained, reclaimed in \d+ s; "
                       r"checkpointing at step (\d+)", run.stdout)
    # each node's log monitor forwards the session's worker logs, which nodes on one machine share: a line
    # reaches the driver once per live node
    resizes = list(dict.fromkeys(re.findall(r"resize: (\d) -> (\d) workers at step (\d+)", run.stdout)))
    assert notice and len(resizes) == 2, shown
    noticed_at = int(notice[1])
    assert 0 < noticed_at < reclaim_at and noticed_at % EVERY, shown  # at once, not on the -n schedule
    assert seen["notice_checkpoint"] == f"ckpt_{noticed_at:08d}"
    assert resizes == [("3", "2", str(noticed_at)), ("2", "1", str(reclaim_at))], shown
    assert re.search(rf"resize: 2 -> 1 workers at step {reclaim_at} \(rank \d failed: ", run.stdout), shown
    log = (out / "main.log").read_text().splitlines()
    assert [int(line.split()[0][2:]) for line in log if " trl:" in line] == list(range(STEPS))  # no gap, no repeat
    assert f"s:{noticed_at} workers:2" in log and f"s:{reclaim_at} workers:1" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 1 and summary["worker_hours"] < 3 * summary["elapsed_s"] / 3600  # part on fewer
    assert_same_training(out, reference_run, STEPS)
    assert_same_losses(out, reference_run)
