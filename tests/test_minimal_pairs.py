"""Minimal-pair folders: the reader and the probing converter on the real BLiMP files (../shared/blimp, read from
there, never copied), the reader's one-line errors, `merge-eval validate`, and the behaviour task's score against
a hand computation of summed token log-likelihoods on the tiny model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_minimal_pairs, write_tiny_config

from evaluation.minimal_pairs import MinimalPairError, PairSelection, read_paradigm, read_source
from flows.cli import main
from probing.holmes import PHENOMENA
from probing.minimal_pair_tasks import minimal_pair_tasks, paradigm_task

BLIMP = Path(__file__).resolve().parents[1].parent / "shared" / "blimp"
needs_blimp = pytest.mark.skipif(not (BLIMP / "data").is_dir(), reason="BLiMP is not at ../shared/blimp")
SVA = "regular_plural_subject_verb_agreement_1"


@needs_blimp
def test_reader_on_real_blimp():
    lines = [json.loads(line) for line in (BLIMP / "data" / f"{SVA}.jsonl").read_text().splitlines()]
    paradigm, = read_source(BLIMP, "blimp", [SVA])
    assert paradigm.name == f"blimp-{SVA}" and len(paradigm.pairs) == len(lines) == 1000
    assert (paradigm.field, paradigm.linguistics_term, paradigm.lexically_identical) == (
        "morphology", "subject_verb_agreement", False)
    assert [(p.pair_id, p.good, p.bad) for p in paradigm.pairs] == [
        (r["pairID"], r["sentence_good"], r["sentence_bad"]) for r in lines]
    first = read_paradigm(BLIMP / "data" / f"{SVA}.jsonl", "blimp", pairs=200)
    assert first.pairs == paradigm.pairs[:200] and first.digest != paradigm.digest
    assert len({p.digest for p in read_source(BLIMP, "blimp")}) == 67, "one digest per paradigm"


@needs_blimp
def test_converter_on_real_blimp():
    task, = minimal_pair_tasks([PairSelection("blimp", str(BLIMP), (SVA,))])
    paradigm, = read_source(BLIMP, "blimp", [SVA])
    assert task.name == f"blimp-{SVA}" and task.task_type == "SENTENCE" and task.probe_type == "sentence"
    assert task.label_names == ("bad", "good") and task.num_labels == 2
    assert task.inputs[:2] == ((paradigm.pairs[0].good,), (paradigm.pairs[0].bad,))
    assert task.labels.tolist() == [1, 0] * 1000 and task.ids[:2] == ("0-good", "0-bad")
    assert (task.splits[0::2] == task.splits[1::2]).all(), "a pair's two sentences share a split"
    assert Counter(task.splits.tolist()) == {"train": 1400, "dev": 200, "test": 400}
    assert (task.phenomenon, task.competence) == ("morphology", "subject_verb_agreement")
    # splits follow the pairID, not the line order
    assert dict(zip(task.ids, task.splits)) == dict(zip(*_reversed_task(paradigm)))
    tasks = {t.name: t for t in minimal_pair_tasks([PairSelection("blimp", str(BLIMP), pairs=10)])}
    assert len(tasks) == 67 and all(t.phenomenon in PHENOMENA for t in tasks.values())
    # Holmes's labels, not BLiMP's fields: principle_A_case_2's field is "syntax/semantics", only_npi_scope's
    # "syntax_semantics"; Holmes files both under syntax
    assert tasks["blimp-principle_A_case_2"].phenomenon == tasks["blimp-only_npi_scope"].phenomenon == "syntax"
    assert tasks["blimp-npi_present_1"].phenomenon == "semantics"


def _reversed_task(paradigm):
    from dataclasses import replace

    task = paradigm_task(replace(paradigm, pairs=paradigm.pairs[::-1]))
    return task.ids, task.splits


def test_split_key_is_honoured(tmp_path):
    folder = write_minimal_pairs(tmp_path / "pairs", pairs=6)
    path = folder / "data" / "subject_verb_agreement.jsonl"
    splits = ["train", "train", "dev", "test", "train", "test"]
    rows = [json.loads(line) | {"split": split} for line, split in zip(path.read_text().splitlines(), splits)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = paradigm_task(read_paradigm(path, "suite"))
    assert task.splits.tolist() == np.repeat(splits, 2).tolist()


def test_a_paradigm_is_parsed_once_per_content(tmp_path, monkeypatch):
    """A run reads its suite for every model; the same bytes are parsed once, an edited file (same size, same
    path) again, and a broken file fails on every read."""
    import evaluation.minimal_pairs as minimal_pairs

    parsed = Counter()
    original = minimal_pairs._pair
    monkeypatch.setattr(minimal_pairs, "_pair", lambda record, path, number: parsed.update([path.name]) or
                        original(record, path, number))
    folder = write_minimal_pairs(tmp_path / "pairs", pairs=6)
    first = read_source(folder, "suite")
    assert read_source(folder, "suite") == first and sum(parsed.values()) == 12, "6 lines of 2 files, parsed once"
    path = folder / "data" / "subject_verb_agreement.jsonl"
    path.write_text(path.read_text().replace("cat", "dog"))
    edited = read_paradigm(path, "suite")
    assert parsed["subject_verb_agreement.jsonl"] == 12 and edited.digest != first[1].digest
    assert "dog" in edited.pairs[0].good and read_paradigm(path, "suite", pairs=3).pairs == edited.pairs[:3]
    _damaged(folder, lambda line: line[:-1])
    for _ in range(2):
        with pytest.raises(MinimalPairError, match="line 2: not JSON"):
            read_paradigm(path, "suite")


def _damaged(folder: Path, edit) -> Path:
    path = folder / "data" / "subject_verb_agreement.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = edit(lines[1])
    path.write_text("\n".join(lines) + "\n")
    return path


def _drop(key):
    return lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != key})


def _set(key, value):
    return lambda line: json.dumps(json.loads(line) | {key: value})


@pytest.mark.parametrize("edit, message", [
    (lambda line: line[:-1], "line 2: not JSON"),
    (_drop("sentence_bad"), "line 2: missing key 'sentence_bad'"),
    (_drop("pairID"), "line 2: missing key 'pairID'"),
    (_set("UID", "other"), "line 2: key 'UID' is 'other', but the file is named subject_verb_agreement.jsonl"),
    (_set("field", "syntax"), "line 2: key 'field' is 'syntax', line 1 has 'morphology'"),
    (_set("pairID", "0"), "line 2: key 'pairID' '0' repeats line 1"),
    (_set("sentence_good", ""), "line 2: key 'sentence_good' must be a non-empty string"),
    (_set("split", "validation"), "line 2: key 'split' is 'validation', not one of train, dev, test"),
    (lambda line: "[1, 2]", "line 2: expected a JSON object, got list"),
])
def test_reader_errors_name_file_line_and_key(tmp_path, edit, message):
    path = _damaged(write_minimal_pairs(tmp_path / "pairs"), edit)
    with pytest.raises(MinimalPairError) as error:
        read_source(tmp_path / "pairs", "suite")
    assert str(error.value) == f"{path}: {message}" or str(error.value).startswith(f"{path}: {message}")
    assert "\n" not in str(error.value)


def test_validate_names_a_folder_that_is_not_blimp(tiny_family, tmp_path, capsys):
    holmes = Path(__file__).parent / "fixtures" / "holmes"  # a Holmes folder is not BLiMP's layout
    config = write_tiny_config(tmp_path / "c.yaml", tiny_family, minimal_pairs=[
        {"source": str(holmes)}, {"source": str(tmp_path / "pairs"), "name": "mine", "paradigms": ["nope"]}])
    assert main(["validate", str(config)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"error: {config}: minimal_pairs[0].source={str(holmes)!r}: {holmes}: not a minimal-pair folder in BLiMP's "
        "layout (no data/*.jsonl)",
        f"error: {config}: minimal_pairs[1].source={str(tmp_path / 'pairs')!r}: {tmp_path / 'pairs'}: unknown "
        "paradigm(s) ['nope']; known: determiner_noun_agreement, subject_verb_agreement"]
    config = write_tiny_config(tmp_path / "c.yaml", tiny_family)  # (re)writes tmp_path / "pairs"
    _damaged(tmp_path / "pairs", _drop("linguistics_term"))
    assert main(["validate", str(config)]) == 2
    assert "subject_verb_agreement.jsonl: line 2: missing key 'linguistics_term'" in capsys.readouterr().err


def test_config_refuses_the_old_bundled_probing_data_and_clashing_names(tiny_family, tmp_path, capsys):
    config = write_tiny_config(tmp_path / "c.yaml", tiny_family, probing={"data": "bundled"},
                               minimal_pairs=[{"source": "a"}, {"source": "b"}])
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "probing.data: the bundled suite is now minimal pairs" in err
    assert "minimal_pairs: two sources named 'blimp'" in err


def test_behavior_acc_equals_hand_computed_log_likelihoods(tiny_family, tmp_path):
    """acc per pair = 1 exactly when the good sentence's summed token log-likelihood (after the tokenizer's prefix
    token, lm-eval's context for an empty prompt) is the higher; computed by hand from one forward pass each."""
    from evaluation.behavior import BehaviorSettings, evaluate, sample_items, tidy
    from merging.checkpoints import LoadOptions, load_model

    folder = write_minimal_pairs(tmp_path / "pairs", pairs=8)
    model, tokenizer = load_model(tiny_family["a"], LoadOptions(precision="float32", device="cpu"))
    settings = BehaviorSettings(suites=(), batch_size=4, minimal_pairs=(PairSelection("tiny", str(folder)),))
    raw = evaluate(model, tokenizer, settings)
    raw["merge_eval"] = {"settings": {"suites": [], "minimal_pairs": [{"source": "tiny"}]}}
    items = sample_items(raw, "a").filter(metric="acc")

    def loglikelihood(sentence: str) -> float:
        ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(sentence, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        return logprobs.gather(1, ids[0, 1:, None]).sum().item()

    for paradigm in read_source(folder, "tiny"):
        expected = [float(loglikelihood(p.good) >= loglikelihood(p.bad)) for p in paradigm.pairs]
        got = items.filter(task=paradigm.name).sort("doc_id")
        assert got["doc_id"].to_list() == list(range(8)) and got["value"].to_list() == expected
        assert 0 < sum(expected) < 8 or paradigm.uid == "determiner_noun_agreement"  # not a constant by accident
    rows = tidy(raw, "a")
    term = rows.filter(task="tiny:subject_verb_agreement", metric="acc").row(0, named=True)
    assert term["group"] == "tiny" and term["level"] == "group" and term["suite"] == "tiny" and term["n"] == 8


def test_changed_pairs_change_their_own_keys_only(tmp_path):
    """A paradigm's digest (its captures' and probes' key) follows its own selected lines; behaviour's key follows
    every selected paradigm's content, not the folder's path."""
    from evaluation.behavior import BehaviorSettings

    folder = write_minimal_pairs(tmp_path / "pairs")
    before = {t.name: t.digest for t in minimal_pair_tasks([PairSelection("tiny", str(folder))])}
    settings = BehaviorSettings(suites=(), minimal_pairs=(PairSelection("tiny", str(folder)),))
    key = settings.cache_key("model")
    moved = folder.rename(tmp_path / "moved")
    assert BehaviorSettings(suites=(), minimal_pairs=(PairSelection("tiny", str(moved)),)).cache_key("model") == key
    _damaged(moved, _set("sentence_good", "the cats sit here."))
    after = {t.name: t.digest for t in minimal_pair_tasks([PairSelection("tiny", str(moved))])}
    assert after["tiny-determiner_noun_agreement"] == before["tiny-determiner_noun_agreement"]
    assert after["tiny-subject_verb_agreement"] != before["tiny-subject_verb_agreement"]
    assert BehaviorSettings(suites=(), minimal_pairs=(PairSelection("tiny", str(moved)),)).cache_key("model") != key
    limited = {t.name: t.digest for t in minimal_pair_tasks([PairSelection("tiny", str(moved), pairs=6)])}
    assert limited["tiny-determiner_noun_agreement"] != after["tiny-determiner_noun_agreement"]
