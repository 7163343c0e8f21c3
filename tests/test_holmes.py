"""Holmes reader: real-format folders, round trip, safe parsing of hostile rows, clear errors; the phenomenon map
covers FlashHolmes."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from probing.holmes import (PHENOMENA, PHENOMENA_FILE, HolmesError, Span, find_tasks, phenomenon_map, read_task,
                            write_task)
from probing.stage import load_tasks

FIXTURES = Path(__file__).parent / "fixtures" / "holmes"

SPAN_ITEMS = [
    {"inputs": [("cats", 0, 4, 8)], "context": ["The cats sleep."], "label": 1, "split": "train"},
    {"inputs": [("cat", 0, 4, 7)], "context": ["The cat sleeps."], "label": 0, "split": "dev"},
    {"inputs": [("dogs", 0, 0, 4), ("run", 1, 5, 8)], "context": ["dogs bark", "they run"], "label": 1,
     "split": "test"},
]


def test_round_trip_span_and_regression(tmp_path):
    folder = write_task(tmp_path / "nn", "nn", "morphology", "SENTENCE_PAIR_TOKENS_BI", ["singular", "plural"],
                        SPAN_ITEMS)
    task = read_task(folder)
    assert (task.name, task.phenomenon, task.probe_type, task.label_names) == \
        ("nn", "morphology", "token_pair", ("singular", "plural"))
    assert task.inputs[2] == (Span("dogs", 0, 0, 4), Span("run", 1, 5, 8))
    assert task.contexts[2] == ("dogs bark", "they run")
    assert task.labels.tolist() == [1, 0, 1] and task.splits.tolist() == ["train", "dev", "test"]
    items = [{"inputs": [f"{n} words here"], "context": [f"{n} words here"], "label": n, "split": s}
             for n, s in [(3, "train"), (7, "dev"), (5, "test")]]
    reg = read_task(write_task(tmp_path / "len", "len", "syntax", "SENTENCE", [], items))
    assert reg.regression and reg.labels.dtype == np.float64 and reg.labels.tolist() == [3.0, 7.0, 5.0]
    assert reg.inputs[1] == ("7 words here",)


def _write_rows(folder: Path, rows: list[str]) -> Path:
    write_task(folder, "t", "syntax", "SENTENCE", ["a", "b"],
               [{"inputs": ["ok"], "context": ["ok"], "label": 0, "split": "train"}])
    with (folder / "samples.csv").open("a") as handle:
        handle.writelines(row + "\n" for row in rows)
    return folder


def test_hostile_inputs_rejected_without_execution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _write_rows(tmp_path / "evil", ['''"__import__('os').system('touch PWNED')",['x'],,a,train,a,0,1'''])
    with pytest.raises(HolmesError) as error:
        read_task(folder)
    message = str(error.value)
    assert "samples.csv: row 3" in message and "inputs is not a Python literal" in message
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("row, reason", [
    ("\"['ok']\",\"['ok']\",,a,validation,a,0,1", "set-0='validation'"),
    ("\"['ok']\",\"['ok']\",,a,train,a,5,1", "not a class index"),
    ("\"[('ok', 0, 0, 9)]\",\"['ok']\",,a,train,a,0,1", "must be non-empty strings"),
    ("\"['a', 'b']\",\"['ok']\",,a,train,a,0,1", "needs 1 input sentence"),
])
def test_malformed_rows_name_file_row_reason(tmp_path, row, reason):
    with pytest.raises(HolmesError, match=rf"samples.csv: row 3: .*{reason}"):
        read_task(_write_rows(tmp_path / "bad", [row]))


def test_span_outside_context_rejected(tmp_path):
    items = [{"inputs": [("cats", 0, 4, 40)], "context": ["The cats sleep."], "label": 0, "split": "train"}]
    with pytest.raises(HolmesError, match=r"row 2: inputs span \[4, 40\) outside context 0"):
        read_task(write_task(tmp_path / "s", "s", "syntax", "SENTENCE_TOKENS", ["a", "b"], items))


def test_unknown_task_and_missing_folder(tmp_path):
    with pytest.raises(HolmesError, match="not found"):
        find_tasks(tmp_path / "nope")
    with pytest.raises(HolmesError, match=r"unknown probing task\(s\) \['nope'\]"):
        find_tasks(FIXTURES, ["nope"])


def test_real_format_folders_of_every_probe_type():
    """Hand-written folders shaped like Holmes's own (see fixtures/holmes/README.md)."""
    tasks = {t.name: t for t in find_tasks(FIXTURES)}
    assert {n: (t.task_type, t.probe_type, t.phenomenon, t.competence) for n, t in tasks.items()} == {
        "blimp-determiner_noun_agreement_1": ("SENTENCE", "sentence", "morphology", "determiner noun agreement"),
        "pos": ("SENTENCE_TOKENS", "span", "syntax", "part-of-speech"),
        "protoroles-volition": ("SENTENCE_PAIR_TOKENS_BI", "token_pair", "semantics", "protoroles"),
        "next-sentence-prediction": ("SENTENCE_PAIR_BI", "sentence_pair", "discourse", "next sentence prediction"),
    }
    blimp = tasks["blimp-determiner_noun_agreement_1"]  # empty context cells, tuple inputs, sorted by id
    assert blimp.ids[:3] == ("0", "1", "2") and blimp.inputs[0] == ("Paul washed this cup.",)
    assert blimp.inputs[2] == ("We didn't sell these cars.",) and blimp.contexts[0] == ()
    assert blimp.label_names == ("1", "0") and blimp.labels[:2].tolist() == [0, 1]  # org label 1 = acceptable
    assert blimp.splits[:4].tolist() == ["test"] * 4
    pairs = tasks["protoroles-volition"]
    assert pairs.inputs[0] == (Span("chased", 0, 8, 14), Span("dog", 0, 4, 7))
    assert pairs.contexts[0] == ("The dog chased the ball .",) and pairs.label_names == ("False", "True")
    assert tasks["next-sentence-prediction"].inputs[-1] == ("The dog was hungry.", "Clocks tell time.")
    for task in tasks.values():
        assert Counter(task.splits.tolist()) == {"train": 8, "dev": 4, "test": 4}, task.name
        for inputs, contexts in zip(task.inputs, task.contexts):
            for element in inputs:
                if isinstance(element, Span):
                    assert contexts[element.context_index][element.start:element.end] == element.text


def _copy(name: str, tmp_path: Path, as_name: str | None = None) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / (as_name or name)))


def _rewrite(samples: Path, edit) -> None:
    with samples.open(newline="") as handle:
        rows = list(csv.reader(handle))
    with samples.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(edit(rows))


def test_columns_by_name_and_id_optional(tmp_path):
    """Holmes reads columns by name and falls back to the row index when there is no id column."""
    folder = _copy("pos", tmp_path)
    original = read_task(folder)
    order = [4, 2, 6, 0, 1, 5, 3]  # set-0, topic, label, inputs, context, string_label, org_label; no id
    _rewrite(folder / "samples.csv", lambda rows: [[row[i] for i in order] for row in rows])
    shuffled = read_task(folder)
    assert shuffled.ids == tuple(str(i) for i in range(16))
    assert (shuffled.inputs, shuffled.contexts) == (original.inputs, original.contexts)
    assert shuffled.labels.tolist() == original.labels.tolist() and shuffled.label_names == ("NOUN", "VERB")


@pytest.mark.parametrize("edit, reason", [
    (lambda rows: rows[:3] + [[*rows[3][:1], "", *rows[3][2:]]] + rows[4:],
     r"row 4: context is empty, but SENTENCE_TOKENS inputs are spans into it"),
    (lambda rows: rows[:2] + [rows[2] + ["extra"]] + rows[3:], r"row 3: 9 cells, the header has 8"),
    (lambda rows: rows[:2] + [["", *rows[2][1:]]] + rows[3:], r"row 3: inputs is empty"),
    (lambda rows: rows[:2] + [["(('cat', 0, 4, 7, 1),)", *rows[2][1:]]] + rows[3:],
     r"row 3: inputs element \('cat', 0, 4, 7, 1\) is not \(text, context_index"),
])
def test_malformed_real_rows_name_file_row_reason(tmp_path, edit, reason):
    folder = _copy("pos", tmp_path)
    _rewrite(folder / "samples.csv", edit)
    with pytest.raises(HolmesError, match=rf"pos/samples.csv: {reason}"):
        read_task(folder)


def test_grouped_spans_refused_with_reason(tmp_path):
    folder = _copy("pos", tmp_path)
    (folder / "config-none.yaml").write_text((folder / "config-none.yaml").read_text().replace(
        "SENTENCE_TOKENS", "SENTENCE_SPANS"))
    _rewrite(folder / "samples.csv", lambda rows: rows[:2] + [["(('cat', 0, 4, 7, 0),)", *rows[2][1:]]] + rows[3:])
    with pytest.raises(HolmesError, match=r"row 3: grouped SENTENCE_SPANS inputs \(5-tuples\) are not supported"):
        read_task(folder)


def test_pair_folder_reads_its_bi_none_config(tmp_path):
    folder = _copy("next-sentence-prediction", tmp_path)
    assert read_task(folder).task_type == "SENTENCE_PAIR_BI"
    (folder / "config-bi-none.yaml").unlink()
    assert read_task(folder).task_type == "SENTENCE_PAIR_CROSS"


def test_same_name_in_two_subtrees_is_an_error_naming_both(tmp_path):
    first = _copy("pos", tmp_path / "holmes")
    second = _copy("pos", tmp_path / "flash-holmes")
    with pytest.raises(HolmesError, match="two datasets named 'pos'") as error:
        find_tasks(tmp_path)
    assert str(first) in str(error.value) and str(second) in str(error.value)


def test_unknown_datasets_reported_once(tmp_path):
    _copy("pos", tmp_path)
    _copy("pos", tmp_path, "my-own-task")
    _copy("pos", tmp_path, "my-other-task")
    warnings: list[str] = []
    tasks = load_tasks(str(tmp_path), warn=warnings.append)
    assert {t.name: t.phenomenon for t in tasks} == {"my-other-task": "unknown", "my-own-task": "unknown",
                                                     "pos": "syntax"}
    assert len(warnings) == 1 and warnings[0].endswith("my-other-task, my-own-task")
    load_tasks(str(tmp_path), ["pos"], warn=warnings.append)
    assert len(warnings) == 1


FLASH_HOLMES_DATASETS = 190  # HOLMES-FORMAT.md: 125 sentence, 34 token-pair, 27 token, 4 sentence-pair


def test_phenomenon_map_covers_every_flash_holmes_dataset():
    with PHENOMENA_FILE.open(newline="") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    names = [r["dataset"] for r in rows]
    assert len(names) == len(set(names)) == len(phenomenon_map()) == 208
    flash = {name: entry for name, entry in phenomenon_map().items() if entry.flash_holmes}
    assert len(flash) == FLASH_HOLMES_DATASETS
    assert all(entry.phenomenon in PHENOMENA and entry.competence for entry in phenomenon_map().values())
    assert Counter(e.probe_type for e in flash.values()) == {"sentence": 125, "token_pair": 34, "span": 27,
                                                             "sentence_pair": 4}
    assert Counter(e.phenomenon for e in flash.values())["morphology"] == 19
    assert phenomenon_map()["blimp-causative"].phenomenon == "syntax"
    assert phenomenon_map()["SemAntoNeg"].competence == "negation"
