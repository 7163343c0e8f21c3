"""The probing stage end to end: rows per model/task/layer/seed, content caching, internals outcomes, CLI."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

import probing.stage as stage
from evaluation.outcomes import compute_outcomes
from flows.cli import main
from merging.checkpoints import LoadOptions, load_model
from merging.merge import MergeLineage
from probing.capture import LayerRunner, capture, task_features, task_requests
from probing.probes import Split, probe_classification, standardise
from probing.stage import internals_scores, load_tasks, probe_model
from reports.tables import CONTRACT_COLUMNS, write_table

TASKS = ["noun_number", "next_sentence", "sentence_length"]


@pytest.fixture(scope="module")
def tiny_probes(tiny_family, tmp_path_factory):
    cache = tmp_path_factory.mktemp("probe-cache")
    tasks = load_tasks("bundled", TASKS)
    frames = [probe_model(name, tiny_family[name], tasks, LoadOptions(), cache, seeds=[0, 1, 2], mdl=True,
                          log=lambda _: None) for name in ("base", "a", "b")]
    return pl.concat(frames, how="diagonal_relaxed"), cache, tasks


def test_rows_cover_every_model_task_layer_seed(tiny_probes):
    probes, _, _ = tiny_probes
    assert set(CONTRACT_COLUMNS["probes"]) <= set(probes.columns)
    assert probes["layer"].n_unique() == 4  # embeddings + 3 blocks of the tiny model
    metrics = probes.group_by("task").agg(pl.col("metric").unique().sort()).sort("task")
    assert metrics.rows() == [("next_sentence", ["accuracy", "compression", "macro_f1"]),
                              ("noun_number", ["accuracy", "compression", "macro_f1"]),
                              ("sentence_length", ["pearson"])]
    assert probes.height == 3 * 4 * 3 * (3 + 3 + 1)  # models x layers x seeds x metrics
    row = probes.filter((pl.col("task") == "noun_number") & (pl.col("model") == "a")).row(0, named=True)
    assert (row["phenomenon"], row["probe_type"], row["n_train"], row["n_test"]) == ("morphology", "span", 120, 40)
    sel = probes.drop_nulls("control_value")
    np.testing.assert_allclose(sel["selectivity"], sel["value"] - sel["control_value"])
    # the task probe is convex (seed-free); the control task is redrawn per seed
    per_seed = probes.filter(pl.col("metric") == "macro_f1").group_by("model", "task", "layer").agg(
        pl.col("value").n_unique().alias("values"), pl.col("control_value").n_unique().alias("controls"))
    assert per_seed["values"].max() == 1 and per_seed["controls"].max() > 1


def test_second_call_is_served_from_cache(tiny_probes, tiny_family, monkeypatch):
    probes, cache, tasks = tiny_probes

    def no_load(*args, **kwargs):
        raise AssertionError("model loaded although every capture is cached")

    monkeypatch.setattr(stage, "load_model", no_load)
    again = probe_model("a", tiny_family["a"], tasks, LoadOptions(), cache, seeds=[0, 1, 2], mdl=True,
                        log=lambda _: None)
    first = probes.filter(pl.col("model") == "a").sort("task", "metric", "seed", "layer")
    assert again.sort("task", "metric", "seed", "layer").select(first.columns).equals(first)


def test_internals_outcomes_per_task_and_phenomenon(tiny_probes):
    probes, _, _ = tiny_probes
    scores = internals_scores(probes)
    assert set(scores.filter(pl.col("level") == "group")["task"]) == {"morphology", "discourse", "syntax"}
    expected = probes.filter((pl.col("model") == "a") & (pl.col("task") == "noun_number")
                             & (pl.col("metric") == "macro_f1"))["value"].mean()
    got = scores.filter((pl.col("model") == "a") & (pl.col("task") == "noun_number"))["value"].item()
    assert got == pytest.approx(expected)
    lineage = MergeLineage(model="b", method="linear", parents=("base", "a"), base="base", parameters={})
    outcomes = compute_outcomes(scores, [lineage], kind="internals")
    assert set(outcomes["kind"]) == {"internals"} and outcomes.height == scores["task"].n_unique()
    assert set(outcomes["relation"].drop_nulls()) <= {"better", "between", "worse"}


def test_cli_probes_lists_and_shows_curves(tiny_probes, tmp_path, capsys):
    probes, _, _ = tiny_probes
    write_table(tmp_path / "tables", "probes", probes)
    assert main(["probes", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "noun_number" in listing and "base, a, b" not in listing and "a, b, base" in listing
    assert main(["probes", str(tmp_path), "--task", "noun_number", "--model", "a"]) == 0
    shown = capsys.readouterr().out
    best = probes.filter((pl.col("model") == "a") & (pl.col("task") == "noun_number")
                         & (pl.col("metric") == "macro_f1")).group_by("layer").agg(pl.col("value").mean())
    assert f"{best['value'].max():.3f}" in shown and "selectivity" in shown
    assert main(["probes", str(tmp_path), "--task", "nope"]) == 2
    assert "--task 'nope' is not in" in capsys.readouterr().err


def test_batched_probe_agrees_with_sklearn_per_layer_on_real_model():
    """All 31 layers of one real task: within 1 point macro-F1 of scikit-learn's LogisticRegression per layer."""
    from merging.family import build_family

    task = load_tasks("bundled", ["noun_number"])[0]
    requests, index = task_requests(task)
    runner = LayerRunner(*load_model(build_family(("base",))["base"], LoadOptions()))
    features = task_features(capture(runner, requests, batch_size=64), index)
    split = Split(task.split_mask("train"), task.split_mask("dev"), task.split_mask("test"))
    x = standardise(features, split.train)
    scores = probe_classification(x, task.labels, np.zeros((0, len(task.labels)), np.int64), split, 2)
    assert x.shape[0] == 31
    for layer in range(31):
        clf = LogisticRegression(C=scores.chosen_c[layer], max_iter=5000).fit(
            x[layer, split.train].numpy(), task.labels[split.train])
        reference = f1_score(task.labels[split.test], clf.predict(x[layer, split.test].numpy()), average="macro")
        assert abs(scores.task["macro_f1"][layer] - reference) <= 0.01, layer
