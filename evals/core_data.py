"""CORE (DCLM's in-context-learning suite, scored as nanochat scores it): the eval bundle, read, checked and
rendered into GPT-2 token rows.

Bundle layout (DCLM's, as nanochat downloads it): `core.yaml` lists `icl_tasks`, each with `label`,
`dataset_uri` (a jsonl under `eval_data/`), `icl_task_type`, `num_fewshot` (a list; its first entry is used)
and `continuation_delimiter` (default " "); `eval_meta_data.csv` has a row per task with its `Eval Task`
label and its `Random baseline` accuracy in percent. Rows by task type:

    multiple_choice    {query, choices, gold}: one prompt per choice, query + delimiter + choice
    schema             {context_options, continuation, gold}: one prompt per context, context + delimiter +
                       continuation
    language_modeling  {context, continuation}: context.strip() + delimiter + continuation

A task's rows are shuffled with random.Random(1337) and cut to --max-per-task. Example i is preceded by
num_fewshot solved examples drawn with random.Random(1234 + i) from the task's other examples, each rendered
like the example itself (with its gold choice / context) and followed by a blank line. Every prompt is GPT-2
BPE with <|endoftext|> in front (the BOS; also the pad), cut from the left to the model's context length.
The scored tokens: for multiple choice those after the prompts' common token prefix, for schema the
prompts' common token suffix, for language modeling those after the tokens of the prompt without its
continuation (stripped of surrounding whitespace), which must be a prefix of the full prompt's.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from common.files import cache_root, fetch, jsonl_records
from pipelines.tokenizer import EOT_TOKEN, gpt2_encoding

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_NAME = "eval_bundle"  # the directory the zip holds, and its name in the cache
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
# Each task type's row fields and their kinds: text, a list of at least two texts, or an index into one.
ROW_FIELDS = {
    "multiple_choice": {"query": "text", "choices": "texts", "gold": "index"},
    "schema": {"context_options": "texts", "continuation": "text", "gold": "index"},
    "language_modeling": {"context": "text", "continuation": "text"},
}
_CHOICE_FIELD = {"multiple_choice": "choices", "schema": "context_options"}
_ENCODE_CHUNK = 256  # examples tokenized per tiktoken batch


class CoreFormatError(ValueError):
    """Input that is not a valid CORE bundle; the message names the file, line and field at fault."""


@dataclass(frozen=True)
class Task:
    label: str
    kind: str  # a ROW_FIELDS key
    num_fewshot: int
    delimiter: str
    baseline: float  # accuracy of random guessing, a fraction
    path: Path  # the jsonl
    records: tuple[dict, ...]  # shuffled, cut to --max-per-task
    lines: tuple[int, ...]  # each record's line in `path`, for messages


@dataclass(frozen=True)
class Item:
    """One example as token rows (one per choice; one for language modeling) and each row's scored span."""

    rows: tuple[np.ndarray, ...]  # int32 token ids
    spans: tuple[tuple[int, int], ...]  # [start, end) of the scored tokens in each row
    gold: int  # the right row; -1 for language modeling (correct = every span token predicted greedily)


# ---- the bundle -------------------------------------------------------------------------------------------
def _yaml_task_lines(text: str) -> list[int]:
    """The line each `icl_tasks` entry starts on (1-based), for messages; empty when the layout is odd."""
    root = yaml.compose(text)
    for key, value in root.value if isinstance(root, yaml.MappingNode) else ():
        if key.value == "icl_tasks" and isinstance(value, yaml.SequenceNode):
            return [node.start_mark.line + 1 for node in value.value]
    return []


def _read_config(path: Path) -> list[tuple[int, dict]]:
    """(line, entry) for each task of core.yaml, every field checked."""
    try:
        text = path.read_text(encoding="utf-8")
        config = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as err:
        raise CoreFormatError(f"{path}: cannot read ({err})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise CoreFormatError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from err
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list) or not config["icl_tasks"]:
        raise CoreFormatError(f"{path}: field 'icl_tasks' must be a non-empty list of tasks")
    lines = _yaml_task_lines(text)
    tasks, labels = [], set()
    for number, entry in enumerate(config["icl_tasks"]):
        line = lines[number] if number < len(lines) else number + 1
        where = f"{path}:{line}: task {number}"
        if not isinstance(entry, dict):
            raise CoreFormatError(f"{where}: not a mapping")
        for field in ("label", "dataset_uri", "icl_task_type"):
            if not isinstance(entry.get(field), str) or not entry[field]:
                raise CoreFormatError(f"{where}: field {field!r} must be a non-empty string")
        if entry["icl_task_type"] not in ROW_FIELDS:
            raise CoreFormatError(f"{where}: field 'icl_task_type': unknown task type {entry['icl_task_type']!r} "
                                  f"(expected one of {', '.join(ROW_FIELDS)})")
        shots = entry.get("num_fewshot")
        if not (isinstance(shots, list) and shots and type(shots[0]) is int and shots[0] >= 0):
            raise CoreFormatError(f"{where}: field 'num_fewshot' must be a list whose first entry is an integer >= 0")
        if not isinstance(entry.get("continuation_delimiter", " "), str):
            raise CoreFormatError(f"{where}: field 'continuation_delimiter' must be a string")
        if entry["label"] in labels:
            raise CoreFormatError(f"{where}: field 'label': task {entry['label']!r} is listed twice")
        labels.add(entry["label"])
        tasks.append((line, entry))
    return tasks


def _read_baselines(path: Path) -> dict[str, tuple[float, int]]:
    """Task label -> (random baseline as a fraction, its line) from eval_meta_data.csv."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"Eval Task", "Random baseline"} <= set(reader.fieldnames):
                raise CoreFormatError(f"{path}:1: the header must name the columns 'Eval Task' and 'Random baseline'")
            baselines = {}
            for row in reader:
                where = f"{path}:{reader.line_num}: field 'Random baseline'"
                try:
                    percent = float(row["Random baseline"])
                except (TypeError, ValueError) as err:
                    raise CoreFormatError(f"{where}: {row['Random baseline']!r} is not a number") from err
                if not 0 <= percent < 100:
                    raise CoreFormatError(f"{where}: {percent} is not a percentage in [0, 100)")
                baselines[row["Eval Task"]] = (percent / 100, reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CoreFormatError(f"{path}: cannot read ({err})") from err
    return baselines


def _row_problem(record: object, kind: str) -> str | None:
    """Why a parsed jsonl line is not a row of a `kind` task (naming the field), or None when it is one."""
    if not isinstance(record, dict):
        return "not a JSON object"
    fields = ROW_FIELDS[kind]
    for field, shape in fields.items():
        value = record.get(field)
        if field not in record:
            return f"field {field!r}: missing"
        if shape == "text" and not isinstance(value, str):
            return f"field {field!r}: must be a string"
        if shape == "texts" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return f"field {field!r}: must be a list of strings"
        if shape == "texts" and len(value) < 2:
            return f"field {field!r}: {len(value)} choice(s), a question needs at least 2"
    if "gold" in fields:
        gold, choices = record["gold"], len(record[_CHOICE_FIELD[kind]])
        if type(gold) is not int or not 0 <= gold < choices:
            return f"field 'gold': must be an integer 0-{choices - 1}, got {gold!r}"
    return None


def read_bundle(directory: str | os.PathLike, max_per_task: int | None = None,
                labels: Sequence[str] | None = None) -> list[Task]:
    """The bundle's tasks (or those named in `labels`), every file checked, each task's rows shuffled and cut
    to `max_per_task` as nanochat does."""
    directory = Path(directory)
    config_path, meta_path = directory / "core.yaml", directory / "eval_meta_data.csv"
    for needed in (config_path, meta_path):
        if not needed.is_file():
            raise CoreFormatError(f"--bundle {directory}: no {needed.name} (expected a CORE eval bundle directory "
                                  "with core.yaml, eval_meta_data.csv and eval_data/)")
    entries = _read_config(config_path)
    if labels is not None:
        known = {entry["label"] for _, entry in entries}
        if unknown := [label for label in labels if label not in known]:
            raise CoreFormatError(f"--only {','.join(unknown)}: no such task in {config_path}")
        entries = [(line, entry) for line, entry in entries if entry["label"] in labels]
    baselines = _read_baselines(meta_path)
    tasks = []
    for line, entry in entries:
        label, kind = entry["label"], entry["icl_task_type"]
        if label not in baselines:
            raise CoreFormatError(f"{meta_path}: field 'Random baseline': no row for task {label!r} "
                                  f"({config_path}:{line})")
        rows = jsonl_records(directory / "eval_data" / entry["dataset_uri"],
                             lambda record, kind=kind: _row_problem(record, kind), CoreFormatError)
        random.Random(SHUFFLE_SEED).shuffle(rows)
        rows = rows[:max_per_task] if max_per_task else rows
        shots = entry["num_fewshot"][0]
        if shots >= len(rows):
            cut = f" after --max-per-task {max_per_task}" if max_per_task else ""
            raise CoreFormatError(f"{config_path}:{line}: field 'num_fewshot': task {label!r} is {shots}-shot, which "
                                  f"needs {shots + 1} examples; it has {len(rows)}{cut}")
        tasks.append(Task(label, kind, shots, entry.get("continuation_delimiter", " "), baselines[label][0],
                          directory / "eval_data" / entry["dataset_uri"], tuple(r for _, r in rows),
                          tuple(n for n, _ in rows)))
    return tasks


# ---- download ---------------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """Where the downloaded bundle is cached (read when asked: the environment may change)."""
    return cache_root() / "core"


def download_bundle(url: str, data_dir: Path) -> Path:
    """Fetch and unpack the bundle zip into `data_dir`/eval_bundle (through a temp dir, so a cut download or
    unpack is never mistaken for the bundle); the zip itself is not kept."""
    target = data_dir / BUNDLE_NAME
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as tmp:
        archive = Path(tmp) / "eval_bundle.zip"
        try:
            fetch(url, archive)
        except OSError as err:
            raise CoreFormatError(f"cannot download the CORE eval bundle from {url} ({err}); without internet "
                                  "pass a local copy with --bundle DIR (the unzipped eval_bundle)") from err
        try:
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(tmp)
        except zipfile.BadZipFile as err:
            raise CoreFormatError(f"{url}: not a zip file ({err})") from err
        unpacked = Path(tmp) / BUNDLE_NAME
        if not (unpacked / "core.yaml").is_file():
            raise CoreFormatError(f"{url}: the zip holds no {BUNDLE_NAME}/core.yaml")
        if not target.exists():  # another process may have finished the same download meanwhile
            shutil.move(str(unpacked), target)
    return target


def locate_bundle(bundle: str | os.PathLike | None, data_dir: str | os.PathLike | None = None,
                  url: str = BUNDLE_URL) -> Path:
    """`bundle` if given, else the cached download in `data_dir` (fetched from `url` on first use)."""
    if bundle is not None:
        if not Path(bundle).is_dir():
            raise CoreFormatError(f"--bundle {bundle}: not a directory (pass the unzipped eval_bundle)")
        return Path(bundle)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    cached = data_dir / BUNDLE_NAME
    return cached if (cached / "core.yaml").is_file() else download_bundle(url, data_dir)


# ---- rendering --------------------------------------------------------------------------------------------
def _solved(task: Task, record: dict) -> str:
    """A few-shot example: rendered with its answer, then a blank line."""
    if task.kind == "multiple_choice":
        return f"{record['query']}{task.delimiter}{record['choices'][record['gold']]}\n\n"
    if task.kind == "schema":
        return f"{record['context_options'][record['gold']]}{task.delimiter}{record['continuation']}\n\n"
    return f"{record['context'].strip()}{task.delimiter}{record['continuation']}\n\n"


def fewshot_indices(task: Task, index: int) -> list[int]:
    """The examples shown before example `index`: a seeded sample of the task's other examples."""
    picks = random.Random(FEWSHOT_SEED + index).sample(range(len(task.records) - 1), task.num_fewshot)
    return [pick + (pick >= index) for pick in picks]  # positions in the list without `index`


def render(task: Task, index: int) -> list[str]:
    """Example `index`'s prompts: one per choice / context option; for language modeling the prompt without
    the continuation (stripped) and with it."""
    record = task.records[index]
    shots = "".join(_solved(task, task.records[i]) for i in fewshot_indices(task, index))
    if task.kind == "multiple_choice":
        return [f"{shots}{record['query']}{task.delimiter}{choice}" for choice in record["choices"]]
    if task.kind == "schema":
        return [f"{shots}{option}{task.delimiter}{record['continuation']}" for option in record["context_options"]]
    prompt = f"{shots}{record['context'].strip()}{task.delimiter}"
    return [prompt.strip(), prompt + record["continuation"]]


def common_length(rows: Sequence[Sequence[int]], from_end: bool = False) -> int:
    """How many leading (or trailing) tokens all rows share."""
    shortest = min(len(row) for row in rows)
    ends = np.stack([np.asarray(row)[len(row) - shortest:][::-1] if from_end else np.asarray(row)[:shortest]
                     for row in rows])
    differs = np.flatnonzero((ends != ends[0]).any(0))
    return int(differs[0]) if len(differs) else shortest


def _item(task: Task, index: int, encoded: list[list[int]], context_length: int) -> Item:
    """Example `index` from its prompts' tokens: rows (EOT first) and spans, cut to `context_length`."""
    rows = [np.array([EOT_TOKEN, *tokens], dtype=np.int32) for tokens in encoded]
    where = f"{task.path}:{task.lines[index]}"
    if task.kind == "language_modeling":
        without, row = rows
        if len(without) >= len(row) or not np.array_equal(row[: len(without)], without):
            raise CoreFormatError(f"{where}: field 'continuation': its tokens do not extend the context's "
                                  "(empty, or the tokenizer merges it into the context)")
        rows, spans = [row], [(len(without), len(row))]
    elif task.kind == "multiple_choice":
        start = common_length(rows)
        spans = [(start, len(row)) for row in rows]
    else:
        suffix = common_length(rows, from_end=True)
        spans = [(len(row) - suffix, len(row)) for row in rows]
    cut_rows, cut_spans = [], []
    for row, (start, end) in zip(rows, spans, strict=True):
        cut = max(0, len(row) - context_length)
        if start - cut < 1:  # the first scored token needs a token before it
            field = "continuation" if task.kind != "multiple_choice" else "choices"
            raise CoreFormatError(f"{where}: field {field!r}: {end - start} scored tokens do not fit after at "
                                  f"least one context token in the model's {context_length}-token context")
        cut_rows.append(row[cut:])
        cut_spans.append((start - cut, end - cut))
    return Item(tuple(cut_rows), tuple(cut_spans), task.records[index].get("gold", -1))


def tokenize(task: Task, context_length: int) -> list[Item]:
    """Every example of `task` as token rows with scored spans, rows cut from the left to `context_length`.
    Encoded a chunk of examples at a time and kept as int32 arrays: a 10-shot task's prompts run to hundreds
    of millions of tokens before they are cut."""
    items = []
    for first in range(0, len(task.records), _ENCODE_CHUNK):
        indices = range(first, min(first + _ENCODE_CHUNK, len(task.records)))
        prompts = [render(task, i) for i in indices]
        flat = gpt2_encoding().encode_ordinary_batch([p for example in prompts for p in example])
        at = 0
        for index, example in zip(indices, prompts, strict=True):
            items.append(_item(task, index, flat[at: at + len(example)], context_length))
            at += len(example)
    return items
