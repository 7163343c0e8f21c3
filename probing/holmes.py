"""Holmes / FlashHolmes dataset folders: `samples.csv` + `config-<control>.yaml` (see docs/HOLMES.md).

The reader accepts what Holmes's own loader accepts: columns found by name in any order (`id` optional, as Holmes
falls back to the row index), `context` empty for sentence tasks (Holmes never parses it for them), tuples or lists
as input literals, any of the seven probe task types and the config keys real configs carry. Holmes parses cells
with `eval`; we use `ast.literal_eval`, which accepts Python literals only, so a cell such as
`__import__('os').system(...)` is rejected as a malformed row instead of run. Every malformed row raises
`HolmesError` naming the file, the row (1-based, header = row 1) and the reason.

A task's name is its dataset folder name, the name Holmes's leaderboard uses (its `probe_name`, e.g.
`probe-blimp-causative`, is only an internal run label). The phenomenon comes from a `phenomenon` config key (the
bundled suite) or else from holmes_phenomena.csv, Holmes's per-dataset labels; any other dataset is "unknown".
"""

from __future__ import annotations

import ast
import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import yaml

from runstore.cache import content_digest as files_digest
from runstore.errors import UserError

COLUMNS = ("inputs", "context", "topic", "org_label", "set-0", "string_label", "label", "id")
REQUIRED_COLUMNS = ("inputs", "context", "set-0", "label")
SPLITS = ("train", "dev", "test")
PHENOMENA = ("morphology", "syntax", "semantics", "reasoning", "discourse")
UNKNOWN = "unknown"
PHENOMENA_FILE = Path(__file__).with_name("holmes_phenomena.csv")
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
CONTROL_TASK_TYPES = ("NONE", "PERMUTATION", "RANDOMIZATION", "RANDOM_WEIGHTS")


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
    name: str  # the dataset folder name
    phenomenon: str  # one of PHENOMENA, or UNKNOWN
    task_type: str  # a Holmes probe_task_type
    label_names: tuple[str, ...]  # empty for regression
    contexts: tuple[tuple[str, ...], ...]  # per item; empty for sentence tasks (their inputs are the text)
    inputs: tuple[tuple, ...]  # per item: sentences (str) or Span elements
    labels: np.ndarray  # int64 class indices, or float64 targets for regression
    splits: np.ndarray  # "train" | "dev" | "test"
    ids: tuple[str, ...]
    digest: str  # sha256 of the folder's samples.csv and config: the capture/probe cache key
    competence: str = ""  # Holmes's finer label (e.g. "determiner noun agreement"), "" where unknown
    scored: bool = False  # minimal pairs: each sentence is also scored whole by lm-eval (one pass serves both)

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


@dataclass(frozen=True)
class Phenomenon:
    phenomenon: str
    competence: str
    probe_type: str
    flash_holmes: bool


@cache
def phenomenon_map() -> dict[str, Phenomenon]:
    """holmes_phenomena.csv: Holmes/FlashHolmes dataset name -> its phenomenon and competence (source in the file)."""
    with PHENOMENA_FILE.open(newline="", encoding="utf-8") as handle:
        rows = csv.DictReader(line for line in handle if not line.startswith("#"))
        return {r["dataset"]: Phenomenon(r["phenomenon"], r["competence"], r["probe_type"], r["flash_holmes"] == "1")
                for r in rows}


def unknown_datasets(tasks: list[ProbingTask]) -> list[str]:
    """Names of tasks no phenomenon is known for, to be reported once per run."""
    return sorted(t.name for t in tasks if t.phenomenon == UNKNOWN)


def _config_path(folder: Path) -> Path:
    """config-none.yaml, else the first config-*-none.yaml (pair folders may ship config-bi-none.yaml and
    config-cross-none.yaml; _BI sorts first), else the first config-*.yaml. merge-eval's own controls replace
    Holmes's control variants, so only the probe type and label count matter."""
    preferred = folder / "config-none.yaml"
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob("config-*.yaml"))
    if not found:
        raise HolmesError(f"{folder}: no config-none.yaml (or other config-*.yaml) found")
    return next((p for p in found if p.stem.endswith("-none")), found[0])


def _read_config(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
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
    control = config.get("control_task_type", "NONE")
    if control not in CONTROL_TASK_TYPES:
        raise HolmesError(f"{path}: control_task_type={control!r} is not one of {', '.join(CONTROL_TASK_TYPES)}")
    if "phenomenon" in config and config["phenomenon"] not in PHENOMENA:
        raise HolmesError(f"{path}: phenomenon={config['phenomenon']!r} is not one of {', '.join(PHENOMENA)}")
    return config


def _literal(cell: str, field: str, where: str) -> object:
    if not cell.strip():
        raise HolmesError(f"{where}: {field} is empty")
    try:
        return ast.literal_eval(cell)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
        shown = cell if len(cell) <= 60 else cell[:57] + "..."
        raise HolmesError(f"{where}: {field} is not a Python literal ({type(error).__name__}): {shown!r}") from None


def _span(element: object, contexts: tuple[str, ...], task_type: str, where: str) -> Span:
    if task_type == "SENTENCE_SPANS" and isinstance(element, (tuple, list)) and len(element) == 5:
        # Holmes's grouped spans (text, context_index, start, end, group): one mean per group; capture pools
        # each span on its own, so these would be probed differently from Holmes. Refused rather than misread.
        raise HolmesError(f"{where}: grouped SENTENCE_SPANS inputs (5-tuples) are not supported: {element!r}")
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


def _contexts(cell: str, task_type: str, where: str) -> tuple[str, ...]:
    """The sentences spans index into; Holmes parses `context` only for span tasks, so only they need one."""
    if not cell.strip():
        raise HolmesError(f"{where}: context is empty, but {task_type} inputs are spans into it")
    contexts = _literal(cell, "context", where)
    if isinstance(contexts, str):
        contexts = [contexts]
    if not (isinstance(contexts, (list, tuple)) and contexts and all(isinstance(c, str) for c in contexts)):
        raise HolmesError(f"{where}: context must be a non-empty list of strings")
    return tuple(contexts)


def _parse_row(row: dict, task_type: str, where: str) -> tuple[tuple[str, ...], tuple]:
    inputs = _literal(row["inputs"], "inputs", where)
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise HolmesError(f"{where}: inputs must be a non-empty list or tuple")
    if task_type in SPAN_TASK_TYPES:
        contexts = _contexts(row["context"], task_type, where)
        return contexts, tuple(_span(e, contexts, task_type, where) for e in inputs)
    if not all(isinstance(e, str) and e.strip() for e in inputs):
        raise HolmesError(f"{where}: inputs of a {task_type} task must be non-empty strings")
    expected = 2 if "PAIR" in task_type else 1
    if len(inputs) != expected:
        raise HolmesError(f"{where}: {task_type} needs {expected} input sentence(s), got {len(inputs)}")
    return (), tuple(inputs)


def _label(row: dict, num_labels: int, where: str) -> float:
    try:
        value = float(row["label"])
    except ValueError:
        raise HolmesError(f"{where}: label {row['label']!r} is not a number") from None
    if not np.isfinite(value):
        raise HolmesError(f"{where}: label {row['label']!r} is not finite")
    if num_labels > 1 and (value != int(value) or not 0 <= value < num_labels):
        raise HolmesError(f"{where}: label {row['label']!r} is not a class index in [0, {num_labels})")
    return value


def _read_rows(samples: Path, task_type: str, num_labels: int) -> list[tuple]:
    """(id, contexts, inputs, label, split, string_label) per row, in file order."""
    # The standard csv module, not pandas: it keeps every cell a string (no NaN, no float ids), which is what
    # the literal parsing and the row-numbered errors need.
    with samples.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, restval="")
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise HolmesError(f"{samples}: missing column(s) {missing}")
        rows = []
        for index, row in enumerate(reader):
            where = f"{samples}: row {index + 2}"
            if None in row:
                raise HolmesError(f"{where}: {len(header) + len(row[None])} cells, the header has {len(header)}")
            if row["set-0"] not in SPLITS:
                raise HolmesError(f"{where}: set-0={row['set-0']!r} is not one of {', '.join(SPLITS)}")
            row_id = row["id"] if "id" in row else str(index)  # Holmes: no id column -> the row index
            if not row_id:
                raise HolmesError(f"{where}: id is empty")
            contexts, inputs = _parse_row(row, task_type, where)
            rows.append((row_id, contexts, inputs, _label(row, num_labels, where), row["set-0"],
                         row.get("string_label", "")))
    if not rows:
        raise HolmesError(f"{samples}: no rows")
    return rows


def _phenomenon(name: str, config: dict) -> tuple[str, str]:
    """(phenomenon, competence): the config's own key (the bundled suite), else Holmes's label, else unknown."""
    if "phenomenon" in config:
        return str(config["phenomenon"]), str(config.get("competence", ""))
    known = phenomenon_map().get(name)
    return (known.phenomenon, known.competence) if known else (UNKNOWN, "")


def read_task(folder: str | Path) -> ProbingTask:
    """One Holmes dataset folder -> ProbingTask named after the folder, rows sorted by `id` as Holmes does."""
    folder = Path(folder)
    samples = folder / "samples.csv"
    if not samples.is_file():
        raise HolmesError(f"{folder}: no samples.csv")
    config_path = _config_path(folder)
    config = _read_config(config_path)
    task_type, num_labels = config["probe_task_type"], config["num_labels"]
    rows = _read_rows(samples, task_type, num_labels)
    rows.sort(key=lambda r: (int(r[0]), r[0]) if r[0].isdigit() else (float("inf"), r[0]))
    label_names: tuple[str, ...] = ()
    if num_labels > 1:
        names = {int(r[3]): r[5] or str(int(r[3])) for r in rows}
        label_names = tuple(names.get(i, str(i)) for i in range(num_labels))
    labels = np.array([r[3] for r in rows], dtype=np.float64 if num_labels == 1 else np.int64)
    digest = files_digest([samples, config_path])
    phenomenon, competence = _phenomenon(folder.name, config)
    return ProbingTask(name=folder.name, phenomenon=phenomenon, task_type=task_type, label_names=label_names,
                       contexts=tuple(r[1] for r in rows), inputs=tuple(r[2] for r in rows), labels=labels,
                       splits=np.array([r[4] for r in rows]), ids=tuple(r[0] for r in rows), digest=digest,
                       competence=competence)


def dataset_folders(root: str | Path) -> dict[str, Path]:
    """Task name (folder name) -> folder, for every folder under `root` holding a samples.csv; a name found
    twice is an error, since the name is how config, tables and `merge-eval probes` refer to a task."""
    root = Path(root)
    if not root.is_dir():
        raise HolmesError(f"{root}: probing data folder not found")
    found: dict[str, list[Path]] = {}
    for samples in sorted(root.rglob("samples.csv")):
        found.setdefault(samples.parent.name, []).append(samples.parent)
    clashes = {name: folders for name, folders in found.items() if len(folders) > 1}
    if clashes:
        name, folders = next(iter(clashes.items()))
        more = f" (and {len(clashes) - 1} more names)" if len(clashes) > 1 else ""
        raise HolmesError(f"{root}: two datasets named {name!r}: {folders[0]} and {folders[1]}{more}; a task is "
                          "named by its folder, so point probing.data at one of the trees or rename one")
    if not found:
        raise HolmesError(f"{root}: no Holmes datasets (folders with samples.csv) found")
    return {name: folders[0] for name, folders in found.items()}


def find_tasks(root: str | Path, names: list[str] | None = None) -> list[ProbingTask]:
    """Every dataset folder under `root`, or only those named (by folder name)."""
    folders = dataset_folders(root)
    if names is not None:
        unknown = [n for n in names if n not in folders]
        if unknown:
            raise HolmesError(f"{root}: unknown probing task(s) {unknown}; known: {', '.join(sorted(folders))}")
        folders = {n: folders[n] for n in names}
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
