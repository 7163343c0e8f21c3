"""Holmes / FlashHolmes dataset folders: `samples.csv` + `config-<control>.yaml` (see HOLMES-FORMAT.md).

Holmes parses the `inputs` and `context` cells with `eval`; we use `ast.literal_eval`, which accepts Python
literals only, so a cell such as `__import__('os').system(...)` is rejected as a malformed row instead of run.
Every malformed row raises `HolmesError` naming the file, the row (1-based, header = row 1) and the reason.
"""

from __future__ import annotations

import ast
import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from reports.errors import UserError

COLUMNS = ("inputs", "context", "topic", "org_label", "set-0", "string_label", "label", "id")
SPLITS = ("train", "dev", "test")
# Holmes probe_task_type -> the short probe type of the probes.parquet contract.
PROBE_TYPES = {
    "SENTENCE": "sentence",
    "SENTENCE_TOKENS": "span",
    "SENTENCE_SPANS": "span",
    "SENTENCE_PAIR_BI": "sentence_pair",
    "SENTENCE_PAIR_CROSS": "sentence_pair",
    "SENTENCE_PAIR_TOKENS_BI": "token_pair",
    "SENTENCE_PAIR_TOKENS_CROSS": "token_pair",
}
SPAN_TASK_TYPES = {"SENTENCE_TOKENS", "SENTENCE_SPANS", "SENTENCE_PAIR_TOKENS_BI", "SENTENCE_PAIR_TOKENS_CROSS"}


class HolmesError(UserError):
    """A Holmes dataset folder that cannot be read; the message names the file, row and reason."""


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of context[context_index]; represented by the mean of the tokens covering it."""

    text: str
    context_index: int
    start: int
    end: int


@dataclass(frozen=True)
class ProbingTask:
    name: str
    phenomenon: str
    task_type: str  # a Holmes probe_task_type
    label_names: tuple[str, ...]  # empty for regression
    contexts: tuple[tuple[str, ...], ...]
    inputs: tuple[tuple, ...]  # per item: sentences (str) or Span elements
    labels: np.ndarray  # int64 class indices, or float64 targets for regression
    splits: np.ndarray  # "train" | "dev" | "test"
    ids: tuple[str, ...]
    digest: str  # sha256 of the folder's samples.csv and config: the capture/probe cache key

    @property
    def probe_type(self) -> str:
        return PROBE_TYPES[self.task_type]

    @property
    def regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1

    def split_mask(self, split: str) -> np.ndarray:
        return self.splits == split


def _config_path(folder: Path) -> Path:
    preferred = folder / "config-none.yaml"
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob("config-*.yaml"))
    if not found:
        raise HolmesError(f"{folder}: no config-none.yaml (or other config-*.yaml) found")
    return found[0]


def _read_config(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise HolmesError(f"{path}: YAML error: {str(error).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise HolmesError(f"{path}: expected a mapping")
    task_type = config.get("probe_task_type")
    if task_type not in PROBE_TYPES:
        raise HolmesError(f"{path}: probe_task_type={task_type!r} is not one of {', '.join(PROBE_TYPES)}")
    num_labels = config.get("num_labels")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise HolmesError(f"{path}: num_labels={num_labels!r} must be a positive integer (1 = regression)")
    return config


def _literal(cell: str, field: str, where: str) -> object:
    try:
        return ast.literal_eval(cell)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
        shown = cell if len(cell) <= 60 else cell[:57] + "..."
        raise HolmesError(f"{where}: {field} is not a Python literal ({type(error).__name__}): {shown!r}") from None


def _span(element: object, contexts: tuple[str, ...], where: str) -> Span:
    if not (isinstance(element, (tuple, list)) and len(element) == 4 and isinstance(element[0], str)
            and all(isinstance(v, int) for v in element[1:])):
        raise HolmesError(f"{where}: inputs element {element!r} is not (text, context_index, char_start, char_end)")
    text, index, start, end = element
    if not 0 <= index < len(contexts):
        raise HolmesError(f"{where}: inputs context_index {index} out of range ({len(contexts)} contexts)")
    if not 0 <= start < end <= len(contexts[index]):
        raise HolmesError(f"{where}: inputs span [{start}, {end}) outside context {index} "
                          f"(length {len(contexts[index])})")
    return Span(text, index, start, end)


def _parse_row(row: dict, task_type: str, where: str) -> tuple[tuple[str, ...], tuple]:
    contexts = _literal(row["context"], "context", where)
    if isinstance(contexts, str):
        contexts = [contexts]
    if not (isinstance(contexts, (list, tuple)) and contexts and all(isinstance(c, str) for c in contexts)):
        raise HolmesError(f"{where}: context must be a non-empty list of strings")
    contexts = tuple(contexts)
    inputs = _literal(row["inputs"], "inputs", where)
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise HolmesError(f"{where}: inputs must be a non-empty list")
    if task_type in SPAN_TASK_TYPES:
        return contexts, tuple(_span(e, contexts, where) for e in inputs)
    if not all(isinstance(e, str) and e.strip() for e in inputs):
        raise HolmesError(f"{where}: inputs of a {task_type} task must be non-empty strings")
    expected = 2 if "PAIR" in task_type else 1
    if len(inputs) != expected:
        raise HolmesError(f"{where}: {task_type} needs {expected} input sentence(s), got {len(inputs)}")
    return contexts, tuple(inputs)


def _label(row: dict, num_labels: int, where: str) -> float:
    try:
        value = float(row["label"])
    except ValueError:
        raise HolmesError(f"{where}: label {row['label']!r} is not a number") from None
    if num_labels > 1 and (value != int(value) or not 0 <= value < num_labels):
        raise HolmesError(f"{where}: label {row['label']!r} is not a class index in [0, {num_labels})")
    if not np.isfinite(value):
        raise HolmesError(f"{where}: label {row['label']!r} is not finite")
    return value


def read_task(folder: str | Path) -> ProbingTask:
    """One Holmes dataset folder -> ProbingTask, rows sorted by `id` as Holmes does."""
    folder = Path(folder)
    samples = folder / "samples.csv"
    if not samples.is_file():
        raise HolmesError(f"{folder}: no samples.csv")
    config_path = _config_path(folder)
    config = _read_config(config_path)
    task_type, num_labels = config["probe_task_type"], config["num_labels"]
    raw = samples.read_bytes()
    with samples.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("inputs", "context", "set-0", "label", "id") if c not in (reader.fieldnames or ())]
        if missing:
            raise HolmesError(f"{samples}: missing column(s) {missing}")
        rows = []
        for number, row in enumerate(reader, start=2):
            where = f"{samples}: row {number}"
            if row["set-0"] not in SPLITS:
                raise HolmesError(f"{where}: set-0={row['set-0']!r} is not one of {', '.join(SPLITS)}")
            contexts, inputs = _parse_row(row, task_type, where)
            rows.append((row["id"], contexts, inputs, _label(row, num_labels, where), row["set-0"],
                         row.get("string_label", "")))
    if not rows:
        raise HolmesError(f"{samples}: no rows")
    rows.sort(key=lambda r: (int(r[0]), r[0]) if r[0].isdigit() else (float("inf"), r[0]))
    label_names: tuple[str, ...] = ()
    if num_labels > 1:
        names = {int(r[3]): r[5] or str(int(r[3])) for r in rows}
        label_names = tuple(names.get(i, str(i)) for i in range(num_labels))
    labels = np.array([r[3] for r in rows], dtype=np.float64 if num_labels == 1 else np.int64)
    digest = hashlib.sha256(raw + b"\0" + config_path.read_bytes()).hexdigest()
    return ProbingTask(name=str(config.get("probe_name") or folder.name), phenomenon=str(config.get("phenomenon",
                       "unknown")), task_type=task_type, label_names=label_names,
                       contexts=tuple(r[1] for r in rows), inputs=tuple(r[2] for r in rows), labels=labels,
                       splits=np.array([r[4] for r in rows]), ids=tuple(r[0] for r in rows), digest=digest)


def find_tasks(root: str | Path, names: list[str] | None = None) -> list[ProbingTask]:
    """Every dataset folder under `root` (a folder holding samples.csv), or only those named."""
    root = Path(root)
    if not root.is_dir():
        raise HolmesError(f"{root}: probing data folder not found")
    folders = {p.parent.name: p.parent for p in sorted(root.rglob("samples.csv"))}
    if names is not None:
        unknown = [n for n in names if n not in folders]
        if unknown:
            raise HolmesError(f"{root}: unknown probing task(s) {unknown}; known: {', '.join(sorted(folders))}")
        folders = {n: folders[n] for n in names}
    if not folders:
        raise HolmesError(f"{root}: no Holmes datasets (folders with samples.csv) found")
    return [read_task(folder) for folder in folders.values()]


def write_task(folder: str | Path, name: str, phenomenon: str, task_type: str, label_names: list[str],
               items: list[dict], extra_config: dict | None = None) -> Path:
    """Write a Holmes folder. items: {inputs, context, label, split} (+ optional topic); ids are row numbers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "samples.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for i, item in enumerate(items):
            label = item["label"]
            string_label = label_names[label] if label_names else str(label)
            writer.writerow({"inputs": repr(item["inputs"]), "context": repr(item["context"]),
                             "topic": item.get("topic", ""), "org_label": string_label, "set-0": item["split"],
                             "string_label": string_label, "label": label, "id": i})
    config = {"probe_name": name, "phenomenon": phenomenon, "probe_task_type": task_type,
              "control_task_type": "NONE", "num_labels": len(label_names) or 1, "num_probe_folds": 1,
              **(extra_config or {})}
    (folder / "config-none.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder
