"""HellaSwag: data (jsonl, llm.c eval .bin, download + cache), batched scoring against a one-at-a-time
reference, HF export, the CLI, Ray fan-out identical for any K, and evals running beside a training loop."""

import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evals.hellaswag import main
from evals.hellaswag_data import EVAL_MAGIC, Example, HellaSwagFormatError, load_examples, read_jsonl
from evals.parallel import ConcurrentEvals, WeightsSnapshot, launch, prepare
from evals.scoring import evaluate, plan_batches, score_batches, summarize
from gpt2.interop import ModelSourceError, export_hf, load_gpt, write_llmc
from gpt2.mainlog import EvalLog
from gpt2.model import GPT
from pipelines.tokenizer import gpt2_encoding
from tests.helpers import HeldCPUs, hellaswag_records, random_model, run_cli, save_model, write_jsonl

REPO = Path(__file__).resolve().parents[1]

def write_eval_bin(path: Path, examples: list[Example]) -> Path:
    """llm.c's eval file, written from its spec (dev/data/data_common.py write_evalfile)."""
    stream = []
    for ex in examples:
        body = [ex.index, ex.label, len(ex.endings), len(ex.context), *ex.context]
        for ending in ex.endings:
            body += [len(ending), *ending]
        stream += [2**16 - 1, 2 * (len(body) + 2), *body]
    header = np.zeros(256, dtype="<i4")
    header[:4] = (EVAL_MAGIC, 1, len(examples), 0)
    path.write_bytes(header.tobytes() + np.array(stream, dtype="<u2").tobytes())
    return path


def reference_losses(model: GPT, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """build-nanogpt's loop for one example: 4 padded rows, full logits, masked cross-entropy."""
    rows = [list(example.context) + list(ending) for ending in example.endings]
    width = max(len(row) for row in rows)
    tokens = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros((4, width))
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(example.context): len(row)] = 1
    with torch.no_grad():
        logits = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                             reduction="none").view(4, -1) * mask[:, 1:]
    return losses.sum(1), losses.sum(1) / mask[:, 1:].sum(1)


@pytest.fixture(scope="module")
def model() -> GPT:
    return random_model()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hellaswag") / "val.jsonl", hellaswag_records(40))


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    return save_model(model, tmp_path_factory.mktemp("run"))


def test_rendering_follows_llmc(data_file):
    record = json.loads(data_file.read_text().splitlines()[3])
    example = read_jsonl(data_file)[3]
    encoding = gpt2_encoding()
    assert example.index == 3 and example.label == record["label"]
    assert example.context == tuple(encoding.encode(record["ctx"]))
    assert example.endings == tuple(tuple(encoding.encode(" " + ending)) for ending in record["endings"])


def test_batched_scores_equal_one_at_a_time_reference(model, data_file):
    examples = read_jsonl(data_file)
    batches = plan_batches(examples, batch_tokens=300)  # several examples per batch, rows of unequal length
    assert 1 < len(batches) < len(examples)
    assert any(len(set(len(ex.context) for ex in examples if ex.index in b.example_index)) > 1 for b in batches)
    scores = score_batches(model, batches)
    assert list(scores.example_index) == list(range(len(examples)))
    correct = correct_norm = 0
    for example in examples:
        total, mean = reference_losses(model, example)
        torch.testing.assert_close(torch.from_numpy(scores.sum_loss[example.index]), total.double(),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(scores.mean_loss[example.index]), mean.double(),
                                   rtol=1e-5, atol=1e-5)
        correct += int(total.argmin()) == example.label
        correct_norm += int(mean.argmin()) == example.label
    assert summarize(scores) == {"acc": correct / 40, "acc_norm": correct_norm / 40, "num_correct": correct,
                                 "num_correct_norm": correct_norm, "num_total": 40}
    assert evaluate(model, examples, batch_tokens=100_000) == summarize(scores)


@pytest.mark.parametrize(("line", "problem"), [
    ('{"ctx": "a", "endings": ["b", "c", "d"', "bad JSON"),
    ('{"ctx": "a", "label": 0}', "missing field 'endings'"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "'label' must be an integer 0-3"),
    ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}', "'endings' must be a list of 4"),
])
def test_malformed_lines_name_the_line(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", hellaswag_records(2))
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(HellaSwagFormatError, match=rf"bad.jsonl:3: {problem}"):
        load_examples(path)


def test_llmc_eval_bin_reads_like_the_jsonl(data_file, tmp_path):
    examples = read_jsonl(data_file)
    path = write_eval_bin(tmp_path / "hellaswag_val.bin", examples)
    assert load_examples(path) == examples
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(HellaSwagFormatError, match=r"truncated.bin: example 39 .*runs past the end"):
        load_examples(truncated)


def test_download_once_then_cached(data_file, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "hellaswag_val.jsonl").write_bytes(data_file.read_bytes())
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "cache"
    try:
        with pytest.raises(HellaSwagFormatError, match="cannot download HellaSwag from .*missing.jsonl"):
            load_examples(data_dir=cache, url=f"{base}/missing.jsonl")
        assert not cache.exists() or not list(cache.iterdir())  # no partial file left behind
        examples = load_examples(data_dir=cache, url=f"{base}/hellaswag_val.jsonl")
    finally:
        server.shutdown()
        server.server_close()
    assert (cache / "hellaswag_val.jsonl").read_bytes() == data_file.read_bytes()
    assert load_examples(data_dir=cache, url=f"{base}/hellaswag_val.jsonl") == examples  # server gone: the cache


def test_our_checkpoint_llmc_file_and_hf_export_score_alike(model, checkpoint, data_file, tmp_path):
    examples = read_jsonl(data_file)
    export_hf(model, tmp_path / "hf")
    write_llmc(model, tmp_path / "model.bin")
    ours = score_batches(load_gpt(checkpoint), plan_batches(examples, 2000))
    for other in (tmp_path / "hf", tmp_path / "model.bin"):
        theirs = score_batches(load_gpt(other), plan_batches(examples, 2000))
        np.testing.assert_allclose(theirs.mean_loss, ours.mean_loss, rtol=1e-5, atol=1e-5)
        assert summarize(theirs) == summarize(ours)
    with pytest.raises(ModelSourceError, match="nowhere: not a checkpoint directory"):
        load_gpt(tmp_path / "nowhere")


def test_cli_without_ray_as_a_script(checkpoint, data_file, model):
    command = [sys.executable, "evals/hellaswag.py", "--checkpoint", str(checkpoint), "--file", str(data_file),
               "--tasks", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert {k: result[k] for k in ("num_correct", "num_correct_norm", "num_total")} == {
        k: v for k, v in evaluate(model, read_jsonl(data_file)).items() if k.startswith("num")}
    bad = run_cli("evals/hellaswag.py", [*command[2:-1], "-1"])  # through main(argv): the wiring is proven above
    assert bad.returncode == 2 and "error: --tasks must be 0" in bad.stderr
    probe = "import sys, evals.hellaswag; assert 'ray' not in sys.modules, 'ray imported at load'"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, timeout=120).returncode == 0


def test_eval_log_writes_steps_in_order_whenever_results_arrive(tmp_path):
    log = EvalLog(tmp_path / "main.log")
    for step in (10, 20, 30, 40):
        log.expect(step)
    assert log.record(30, 0.3) == [] and log.record(20, 0.25) == []  # step 10 still running: both wait
    assert log.record(10, 0.2) == [10, 20, 30]
    assert log.give_up(40) == [] and not log._pending
    assert (tmp_path / "main.log").read_text() == "s:10 eval:0.200000\ns:20 eval:0.250000\ns:30 eval:0.300000\n"


def test_ray_result_is_identical_for_any_k(ray_cluster, model, checkpoint, data_file, capsys):
    expected = evaluate(model, read_jsonl(data_file), batch_tokens=600)
    for tasks in (1, 2, 3):
        handle = launch(checkpoint, data_file, tasks=tasks, batch_tokens=600)
        assert handle.result(timeout=120) == expected and handle.ready()
        assert len(handle.task_spans) == tasks
    result = main(["--checkpoint", str(checkpoint), "--file", str(data_file), "--tasks", "3"])
    assert {k: result[k] for k in expected} == evaluate(model, read_jsonl(data_file))
    run_dir_result = main(["--checkpoint", str(checkpoint.parent), "--file", str(data_file), "--tasks", "0"])
    assert {k: run_dir_result[k] for k in expected} == {k: result[k] for k in expected}  # its latest checkpoint
    with pytest.raises(SystemExit) as exit_status:
        main(["--checkpoint", str(checkpoint.parent / "nowhere"), "--file", str(data_file)])
    assert exit_status.value.code == 2
    assert re.match(r"hellaswag.py: error: --checkpoint .*nowhere: not a checkpoint", capsys.readouterr().err)


def test_evals_run_while_a_training_loop_continues(ray_cluster, data_file, tmp_path):
    """A stand-in for training/run.py: a weights snapshot every 3 steps, one eval in flight at a time, the
    loop polling once per step. The cluster's CPUs are held until step 12, so no eval task can even start
    before then: submitting must not wait for the eval, and results come in at later steps."""
    # One thread for the loop: the eval tasks get the other core, as on a cluster they get devices of their own.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_while_evaluating(ray_cluster, data_file, tmp_path)
    finally:
        torch.set_num_threads(threads)


def train_while_evaluating(ray_cluster, data_file: Path, tmp_path: Path) -> None:
    model = random_model(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 50257, (4, 33), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "run"
    collected_at, skipped = {}, {}
    step = 0
    evals = ConcurrentEvals(prepare(data_file, tasks=2, batch_tokens=600), out / "main.log",
                            report=lambda at, result, handle: collected_at.update({at: (step, result)}),
                            on_skip=lambda at, reason: skipped.update({at: reason}))
    checkpoints = {}
    held = HeldCPUs(ray_cluster.cluster_resources()["CPU"])
    # Snapshots at steps 3..12; training goes on past 12 until an eval has come back, as a longer run would.
    while step < 12 or not collected_at:
        step += 1
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 3 == 0 and step <= 12:
            checkpoints[step] = save_model(model, out, step)  # the reference below scores these
            evals.submit(step, WeightsSnapshot.of(model, torch.float32))
        evals.poll()
        if step == 12:
            assert not collected_at  # nothing could run: the loop went on while step 3's eval waited
            held.release()
    evals.finish()
    assert evals.running is evals.waiting is None  # nothing left in flight
    assert 12 in collected_at and sorted([*collected_at, *skipped]) == [3, 6, 9, 12]
    assert min(at for at, _ in collected_at.values()) > 12  # collected by a later poll, not by submit
    lines = (out / "main.log").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [f"s:{s}" for s in sorted(collected_at)]
    for at, (_, result) in collected_at.items():  # each line is its own snapshot's result
        expected = evaluate(load_gpt(checkpoints[at]), read_jsonl(data_file), batch_tokens=600)
        assert result == expected and f"s:{at} eval:{expected['acc_norm']:.6f}" in lines
