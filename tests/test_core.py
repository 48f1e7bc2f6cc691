"""CORE: the bundle (reading, bad input, download + cache), the batched scorer against a plain
one-example-at-a-time implementation written here, the CLI on every model source, and Ray tasks against the
in-process result."""

import csv
import http.server
import json
import random
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from evals.core import main
from evals.core_data import CoreFormatError, locate_bundle, read_bundle, tokenize
from evals.core_scoring import evaluate_core, example_correct, plan
from evals.scoring import pack_rows, score_live_model
from gpt2.interop import export_hf, write_llmc
from gpt2.model import GPT, GPTConfig
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding
from tests.helpers import HELLASWAG_WORDS, random_model, run_cli, save_model

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 64  # the test model's block size: long few-shot prompts get cut from the left
EXAMPLES = 24
# label -> (type, shots, delimiter, random baseline in percent)
TASKS = {"mc_fewshot": ("multiple_choice", 2, " ", 25.0), "mc_answer": ("multiple_choice", 0, "\nAnswer:", 25.0),
         "schema_oneshot": ("schema", 1, " ", 50.0), "lm_fewshot": ("language_modeling", 2, " ", 0.0)}


# ---- the reference: one example at a time, as plainly as possible ---------------------------------------------
def reference_rows(kind: str, delimiter: str, shots: list[dict], item: dict) -> tuple[list[list[int]], list]:
    """Token rows (EOT first, not yet cut) and the [start, end) of each row's scored tokens."""
    encode = gpt2_encoding().encode_ordinary
    if kind == "multiple_choice":
        head = "".join(s["query"] + delimiter + s["choices"][s["gold"]] + "\n\n" for s in shots)
        rows = [[EOT_TOKEN] + encode(head + item["query"] + delimiter + c) for c in item["choices"]]
        same = 0
        while all(len(r) > same for r in rows) and len({r[same] for r in rows}) == 1:
            same += 1
        return rows, [(same, len(r)) for r in rows]
    if kind == "schema":
        head = "".join(s["context_options"][s["gold"]] + delimiter + s["continuation"] + "\n\n" for s in shots)
        rows = [[EOT_TOKEN] + encode(head + o + delimiter + item["continuation"]) for o in item["context_options"]]
        same = 0
        while all(len(r) > same for r in rows) and len({r[-1 - same] for r in rows}) == 1:
            same += 1
        return rows, [(len(r) - same, len(r)) for r in rows]
    prompt = lm_prompt(delimiter, shots, item)
    without = [EOT_TOKEN] + encode(prompt.strip())
    full = [EOT_TOKEN] + encode(prompt + item["continuation"])
    return [full], [(len(without), len(full))]


def lm_prompt(delimiter: str, shots: list[dict], item: dict) -> str:
    """A language-modeling prompt up to its continuation."""
    head = "".join(s["context"].strip() + delimiter + s["continuation"] + "\n\n" for s in shots)
    return head + item["context"].strip() + delimiter


def cut(rows: list[list[int]], spans: list) -> tuple[list[list[int]], list, int]:
    out_rows, out_spans, cropped = [], [], 0
    for row, (start, end) in zip(rows, spans, strict=True):
        drop = max(0, len(row) - CONTEXT)
        cropped += drop > 0
        out_rows.append(row[drop:])
        out_spans.append((start - drop, end - drop))
    return out_rows, out_spans, cropped


@torch.no_grad()
def reference_correct(model: GPT, kind: str, rows: list[list[int]], spans: list, gold: int | None) -> bool:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), EOT_TOKEN)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    logits = model(tokens)
    if kind == "language_modeling":
        (start, end), = spans
        return bool((logits[0, start - 1: end - 1].argmax(-1) == tokens[0, start:end]).all())
    means = [F.cross_entropy(logits[i, s - 1: e - 1], tokens[i, s:e]).item() for i, (s, e) in enumerate(spans)]
    return means.index(min(means)) == gold


def shot_indices(count: int, index: int, k: int) -> list[int]:
    others = [j for j in range(count) if j != index]
    return random.Random(1234 + index).sample(others, k)


def shots_of(records: list[dict], index: int, k: int) -> list[dict]:
    return [records[j] for j in shot_indices(len(records), index, k)]


def reference(model: GPT, bundle: Path) -> tuple[dict[str, list[bool]], int]:
    """Per task, each example's correctness in evaluation order; and how many rows were cut."""
    config = yaml.safe_load((bundle / "core.yaml").read_text())
    results, cropped = {}, 0
    for task in config["icl_tasks"]:
        lines = (bundle / "eval_data" / task["dataset_uri"]).read_text().splitlines()
        records = [json.loads(line) for line in lines]
        random.Random(1337).shuffle(records)
        kind, k = task["icl_task_type"], task["num_fewshot"][0]
        results[task["label"]] = []
        for index, item in enumerate(records):
            rows, spans, n = cut(*reference_rows(kind, task.get("continuation_delimiter", " "),
                                                 shots_of(records, index, k), item))
            cropped += n
            results[task["label"]].append(reference_correct(model, kind, rows, spans, item.get("gold")))
    return results, cropped


# ---- a bundle ---------------------------------------------------------------------------------------------
def sentence(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(HELLASWAG_WORDS, rng.integers(low, high)))


@torch.no_grad()
def make_greedy(model: GPT, records: list[dict], shots: int, delimiter: str) -> int:
    """Give some language-modeling examples the one-token continuation the model itself would write, so the
    task's accuracy is neither 0 nor 1. Only examples that are no shot of each other, so that changing one's
    continuation changes no other's prompt. Returns how many were made greedy."""
    chosen: list[int] = []
    for index in range(len(records)):
        if not any(index in shot_indices(len(records), j, shots) or j in shot_indices(len(records), index, shots)
                   for j in chosen):
            chosen.append(index)
    made = 0
    for index in chosen[::2]:
        item = records[index]
        prompt = lm_prompt(delimiter, shots_of(records, index, shots), item)
        without = [EOT_TOKEN] + gpt2_encoding().encode_ordinary(prompt.strip())
        kept = without[max(0, len(without) + 1 - CONTEXT):]  # what is left of it once the scored row is cut
        token = int(model(torch.tensor([kept]))[0, -1].argmax())
        text = gpt2_encoding().decode([token])
        candidate = {**item, "continuation": text.removeprefix(delimiter)}
        (row,), ((start, end),) = reference_rows("language_modeling", delimiter, shots_of(records, index, shots),
                                                 candidate)
        if text.startswith(delimiter) and text.strip() and row[start:end] == [token] and row[:start] == without:
            records[index] = candidate
            made += 1
    return made


def task_records(kind: str, rng: np.random.Generator) -> list[dict]:
    if kind == "multiple_choice":
        return [{"query": sentence(rng, 4, 30).capitalize() + "?",
                 "choices": (choices := [sentence(rng, 1, 6) for _ in range(rng.integers(2, 6))]),
                 "gold": int(rng.integers(0, len(choices)))} for _ in range(EXAMPLES)]
    if kind == "schema":
        return [{"context_options": (options := [sentence(rng, 3, 25) for _ in range(rng.integers(2, 4))]),
                 "continuation": sentence(rng, 2, 6) + ".", "gold": int(rng.integers(0, len(options)))}
                for _ in range(EXAMPLES)]
    return [{"context": sentence(rng, 3, 20) + ("  " if rng.random() < 0.3 else ""),
             "continuation": sentence(rng, 1, 3)} for _ in range(EXAMPLES)]


def write_bundle(directory: Path, model: GPT, seed: int = 0) -> Path:
    """A bundle whose rows, once shuffled as CORE shuffles them, come in the order built here."""
    rng = np.random.default_rng(seed)
    (directory / "eval_data" / "sub").mkdir(parents=True)
    entries, baselines = [], [["Eval Task", "Task Category", "Random baseline"]]
    for label, (kind, shots, delimiter, baseline) in TASKS.items():
        records = task_records(kind, rng)
        if kind == "language_modeling":
            assert make_greedy(model, records, shots, delimiter) >= 2
        order = list(range(len(records)))
        random.Random(1337).shuffle(order)
        on_disk = [None] * len(records)
        for position, source in enumerate(order):
            on_disk[source] = records[position]
        (directory / "eval_data" / "sub" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in on_disk))
        entries.append({"label": label, "dataset_uri": f"sub/{label}.jsonl", "num_fewshot": [shots],
                        "icl_task_type": kind, "continuation_delimiter": delimiter})
        baselines.append([label, "synthetic", baseline])
    (directory / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    with open(directory / "eval_meta_data.csv", "w", newline="") as f:
        csv.writer(f).writerows(baselines)
    return directory


@pytest.fixture(scope="module")
def model() -> GPT:
    return random_model(3, GPTConfig(2, 2, 64, block_size=CONTEXT))


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("core") / "eval_bundle", model)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    return save_model(model, tmp_path_factory.mktemp("run"))


# ---- tests ------------------------------------------------------------------------------------------------
def test_batched_core_equals_one_at_a_time_reference(model, bundle):
    expected, cropped = reference(model, bundle)
    assert cropped > 0  # left-truncation is exercised
    tasks = read_bundle(bundle)
    core_plan = plan(tasks, CONTEXT, batch_tokens=600)
    assert len(core_plan.batches) > len(tasks) and max(len(b.example_index) for b in core_plan.batches) > 1
    items = [item for task in tasks for item in tokenize(task, CONTEXT)]
    assert any(len(pack_rows(0, item.gold, item.rows, item.spans)) > 1 for item in items)  # rows cut apart
    assert any(len(pack_rows(0, item.gold, item.rows, item.spans)) == 1 < len(item.rows) for item in items)
    rows = score_live_model(model, core_plan.batches)
    assert list(example_correct(rows)) == [ok for label in TASKS for ok in expected[label]]
    result = core_plan.summarize(rows)
    for label, (_, _, _, baseline) in TASKS.items():
        accuracy = sum(expected[label]) / EXAMPLES
        assert 0 < accuracy < 1, label  # choices really differ: the comparison can fail
        assert result["tasks"][label]["accuracy"] == accuracy
        assert result["tasks"][label]["centered"] == pytest.approx((accuracy - baseline / 100) / (1 - baseline / 100))
    assert result["core"] == pytest.approx(np.mean([t["centered"] for t in result["tasks"].values()]))
    assert evaluate_core(model, tasks, batch_tokens=100_000) == result  # one example per batch or many: same


def test_max_per_task_and_only_pick_a_seeded_subset(model, bundle):
    small = read_bundle(bundle, max_per_task=5, labels=["schema_oneshot", "lm_fewshot"])
    full = {task.label: task for task in read_bundle(bundle)}
    assert [t.label for t in small] == ["schema_oneshot", "lm_fewshot"]
    assert all(t.records == full[t.label].records[:5] for t in small)


@pytest.mark.parametrize("where, change, message", [
    ("eval_data/sub/mc_fewshot.jsonl", lambda text: text.replace("}\n", "\n", 1), r"mc_fewshot.jsonl:1: bad JSON"),
    ("core.yaml", lambda text: text.replace("icl_task_type: schema", "icl_task_type: cloze"),
     r"core.yaml:\d+: task 2: field 'icl_task_type': unknown task type 'cloze'"),
    ("eval_meta_data.csv", lambda text: "\n".join(line for line in text.splitlines() if "lm_fewshot" not in line),
     r"eval_meta_data.csv: field 'Random baseline': no row for task 'lm_fewshot'"),
    ("eval_meta_data.csv", lambda text: text.replace("synthetic,50.0", "synthetic,half"),
     r"eval_meta_data.csv:4: field 'Random baseline': 'half' is not a number"),
    ("eval_data/sub/schema_oneshot.jsonl",
     lambda text: "\n".join([text.splitlines()[0], json.dumps({"context_options": ["only one"], "continuation": "x",
                                                                "gold": 0}), *text.splitlines()[1:]]),
     r"schema_oneshot.jsonl:2: field 'context_options': 1 choice\(s\), a question needs at least 2"),
    ("eval_data/sub/mc_answer.jsonl", lambda text: text.replace('"gold": ', '"gold": 7', 1),
     r"mc_answer.jsonl:1: field 'gold': must be an integer"),
])
def test_bad_bundle_is_one_line_naming_file_line_and_field(bundle, checkpoint, tmp_path, where, change, message):
    broken = tmp_path / "eval_bundle"
    write = lambda src, dst: dst.write_text(src.read_text())  # noqa: E731
    for path in bundle.rglob("*"):
        target = broken / path.relative_to(bundle)
        target.mkdir(parents=True, exist_ok=True) if path.is_dir() else write(path, target)
    (broken / where).write_text(change((broken / where).read_text()))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = subprocess.run([sys.executable, "evals/core.py", "--checkpoint", str(checkpoint), "--bundle", str(broken),
                           "--tasks", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("core.py: error: "), done.stderr
    assert re.search(message, lines[0]), lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created or changed


def test_download_once_then_cached_and_offline_names_the_flag(bundle, tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "eval_bundle.zip", "w") as zipped:
        for path in sorted(bundle.rglob("*")):
            zipped.write(path, Path("eval_bundle") / path.relative_to(bundle))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty = unset: ~/.cache
    from evals import core_data  # the default cache dir is read when the module loads; resolve it again here
    cache = core_data.cache_root() / "core"
    assert cache == tmp_path / "home" / ".cache" / "raygpt2" / "core"
    try:
        with pytest.raises(CoreFormatError, match=r"cannot download the CORE eval bundle .*--bundle DIR"):
            locate_bundle(None, cache, url.replace("eval_bundle.zip", "missing.zip"))
        assert not (cache / "eval_bundle").exists() and not list(cache.iterdir())  # nothing half-written kept
        located = locate_bundle(None, cache, url)
    finally:
        server.shutdown()
        server.server_close()
    assert located == cache / "eval_bundle" and sorted(p.name for p in cache.iterdir()) == ["eval_bundle"]
    assert [t.records for t in read_bundle(located)] == [t.records for t in read_bundle(bundle)]
    assert locate_bundle(None, cache, url) == located  # the server is gone: the cache answers


def test_cli_scores_every_model_source_alike_and_ray_tasks_equal_in_process(ray_cluster, model, bundle, checkpoint,
                                                                            tmp_path):
    expected = evaluate_core(model, read_bundle(bundle))
    export_hf(model, tmp_path / "hf")
    write_llmc(model, tmp_path / "model.bin")
    for source in (checkpoint, checkpoint.parent, tmp_path / "hf", tmp_path / "model.bin"):
        result = main(["--checkpoint", str(source), "--bundle", str(bundle), "--tasks", "0", "--device", "cpu"])
        assert result["tasks"] == expected["tasks"], source
    for tasks in (1, 2, 3):
        result = main(["--checkpoint", str(checkpoint), "--bundle", str(bundle), "--tasks", str(tasks),
                       "--batch-tokens", "600"])
        assert {k: result[k] for k in expected} == expected, tasks


def test_cli_as_a_script_on_the_smoke_bundle(checkpoint, model):
    smoke = REPO / "evals" / "data" / "core_smoke"
    command = [sys.executable, "evals/core.py", "--checkpoint", str(checkpoint), "--bundle", str(smoke), "--tasks", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["tasks"] == evaluate_core(model, read_bundle(smoke))["tasks"]
    assert sorted(result["tasks"]) == ["smoke_completion", "smoke_pronouns", "smoke_questions"]
    # refused flags through main(argv): the script's wiring is proven above
    bad = run_cli("evals/core.py", [*command[2:], "--max-per-task", "-1"])
    assert bad.returncode == 2 and bad.stderr.strip().endswith("got -1 (--help for usage)")
    few = run_cli("evals/core.py", [*command[2:], "--max-per-task", "2"])
    assert few.returncode == 2 and "'smoke_questions' is 2-shot, which needs 3 examples; it has 2 after " \
                                   "--max-per-task 2" in few.stderr
    probe = "import sys, evals.core; assert 'ray' not in sys.modules, 'ray imported at load'"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, timeout=120).returncode == 0
