"""Holmes reader: round trip, safe parsing of hostile rows, clear errors; the committed suite is reproducible."""

from __future__ import annotations

import filecmp
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from probing.build_suite import SUITE_DIR, build
from probing.holmes import HolmesError, Span, find_tasks, read_task, write_task

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
        find_tasks(SUITE_DIR, ["nope"])


def test_committed_suite_is_what_the_generator_builds(tmp_path):
    build(tmp_path / "suite")
    committed = sorted(p.relative_to(SUITE_DIR) for p in SUITE_DIR.rglob("*") if p.is_file())
    generated = sorted(p.relative_to(tmp_path / "suite") for p in (tmp_path / "suite").rglob("*") if p.is_file())
    assert committed == generated
    assert all(filecmp.cmp(SUITE_DIR / p, tmp_path / "suite" / p, shallow=False) for p in committed)


def test_suite_coverage_balance_and_gold_spans():
    tasks = find_tasks(SUITE_DIR)
    assert len(tasks) >= 20
    assert {t.phenomenon for t in tasks} == {"morphology", "syntax", "semantics", "reasoning", "discourse"}
    assert len({t.probe_type for t in tasks}) >= 3
    for task in tasks:
        assert set(task.splits) == {"train", "dev", "test"}
        assert len({repr(i) for i in zip(task.inputs, task.contexts)}) == len(task.inputs), task.name
        if not task.regression:
            counts = Counter(task.labels.tolist())
            assert len(counts) == task.num_labels and max(counts.values()) - min(counts.values()) <= 1, task.name
        for inputs, contexts in zip(task.inputs, task.contexts):
            for element in inputs:
                if isinstance(element, Span):
                    assert contexts[element.context_index][element.start:element.end] == element.text
