"""The probing stage end to end: captures into the store, rows per model/task/layer/seed from the store only,
probe caching, internals outcomes, CLI."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from conftest import probe_test_tasks
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from evaluation.outcomes import compute_outcomes
from flows.cli import main
from merging.checkpoints import LoadOptions, load_model
from merging.merge import MergeLineage
from probing.capture import capture, task_features, task_requests
from probing.hooks import HookRunner
from probing.probes import Split, probe_classification, standardise
from evaluation.minimal_pairs import PairSelection
from probing.minimal_pair_tasks import BUNDLED_DIR
from probing.stage import internals_scores, load_tasks, probe_jobs, probe_model
from probing.store import CaptureStore, capture_model, model_ref
from runstore.tables import CONTRACT_COLUMNS, write_table

SVA = "suite-subject_verb_agreement"  # a minimal-pair paradigm of the bundled suite (sentence probe)


@pytest.fixture(scope="module")
def tiny_probes(tiny_family, tmp_path_factory):
    store = CaptureStore(tmp_path_factory.mktemp("run-cache") / "captures")
    tasks = probe_test_tasks(tmp_path_factory.mktemp("tasks"), ("pos", "next-sentence-prediction"))
    frames = []
    for name in ("base", "a", "b"):
        model = model_ref(name, tiny_family[name])
        jobs = probe_jobs(tasks, model.n_blocks)
        assert store.missing(jobs, model, "float32") == jobs
        capture_model(HookRunner(*load_model(tiny_family[name], LoadOptions())), model, jobs, store, "float32",
                      log=lambda _: None)
        assert store.missing(jobs, model, "float32") == []
        frames.append(probe_model(model, tasks, store, "float32", seeds=[0, 1, 2], mdl=True, log=lambda _: None).rows)
    return pl.concat(frames, how="diagonal_relaxed"), store, tasks


def test_rows_cover_every_model_task_layer_seed(tiny_probes):
    probes, _, _ = tiny_probes
    assert set(CONTRACT_COLUMNS["probes"]) <= set(probes.columns)
    assert probes["layer"].n_unique() == 4  # embeddings + 3 blocks of the tiny model
    metrics = probes.group_by("task").agg(pl.col("metric").unique().sort()).sort("task")
    classification = ["accuracy", "compression", "macro_f1"]
    assert metrics.rows() == [("next-sentence-prediction", classification), ("pos", classification),
                              ("sentence_length", ["pearson"]), (SVA, classification)]
    assert probes.height == 3 * 4 * 3 * (3 + 3 + 3 + 1)  # models x layers x seeds x metrics
    row = probes.filter((pl.col("task") == SVA) & (pl.col("model") == "a")).row(0, named=True)
    assert (row["phenomenon"], row["probe_type"], row["n_train"], row["n_test"]) == ("morphology", "sentence", 16, 20)
    row = probes.filter((pl.col("task") == "pos") & (pl.col("model") == "a")).row(0, named=True)
    assert (row["phenomenon"], row["probe_type"], row["n_train"], row["n_test"]) == ("syntax", "span", 8, 4)
    sel = probes.drop_nulls("control_value")
    np.testing.assert_allclose(sel["selectivity"], sel["value"] - sel["control_value"])
    # the task probe is convex (seed-free); the control task is redrawn per seed
    per_seed = probes.filter(pl.col("metric") == "macro_f1").group_by("model", "task", "layer").agg(
        pl.col("value").n_unique().alias("values"), pl.col("control_value").n_unique().alias("controls"))
    assert per_seed["values"].max() == 1 and per_seed["controls"].max() > 1


def test_probing_reads_only_the_store(tiny_probes, tiny_family, tmp_path):
    probes, store, tasks = tiny_probes
    model = model_ref("a", tiny_family["a"])
    for cached in (store.root.parent / "probes").glob("*.parquet"):
        cached.unlink()  # probe results recomputed from the stored captures alone
    again = probe_model(model, tasks, store, "float32", seeds=[0, 1, 2], mdl=True, log=lambda _: None).rows
    first = probes.filter(pl.col("model") == "a").sort("task", "metric", "seed", "layer")
    assert again.sort("task", "metric", "seed", "layer").select(first.columns).equals(first)
    with pytest.raises(FileNotFoundError, match="the per-model capture step has not run"):
        probe_model(model, tasks, CaptureStore(tmp_path / "empty"), "float32", seeds=[0], log=lambda _: None)


def test_internals_outcomes_per_task_and_phenomenon(tiny_probes):
    probes, _, _ = tiny_probes
    scores = internals_scores(probes)
    assert set(scores.filter(pl.col("level") == "group")["task"]) == {"morphology", "discourse", "syntax"}
    expected = probes.filter((pl.col("model") == "a") & (pl.col("task") == SVA)
                             & (pl.col("metric") == "macro_f1"))["value"].mean()
    got = scores.filter((pl.col("model") == "a") & (pl.col("task") == SVA))["value"].item()
    assert got == pytest.approx(expected)
    lineage = MergeLineage(model="b", method="linear", parents=("base", "a"), base="base", parameters={})
    outcomes = compute_outcomes(scores, [lineage], kind="internals")
    assert set(outcomes["kind"]) == {"internals"} and outcomes.height == scores["task"].n_unique()
    assert set(outcomes["relation"].drop_nulls()) <= {"better", "between", "worse", "unresolved"}


def test_internals_scores_are_the_same_bits_in_any_row_order(tiny_probes):
    """The outcomes of a resumed run once differed from an uninterrupted run's at 1e-16: its means summed the rows
    in whatever order a group_by returned them. The same probes, shuffled, must give the same bits."""
    probes, _, _ = tiny_probes
    first = internals_scores(probes)
    for seed in range(8):
        assert internals_scores(probes.sample(fraction=1.0, shuffle=True, seed=seed)).equals(first), seed


def test_cli_probes_lists_and_shows_curves(tiny_probes, tmp_path, capsys):
    probes, _, _ = tiny_probes
    write_table(tmp_path / "tables", "probes", probes)
    assert main(["probes", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert SVA in listing and "base, a, b" not in listing and "a, b, base" in listing
    assert main(["probes", str(tmp_path), "--task", SVA, "--model", "a"]) == 0
    shown = capsys.readouterr().out
    best = probes.filter((pl.col("model") == "a") & (pl.col("task") == SVA)
                         & (pl.col("metric") == "macro_f1")).group_by("layer").agg(pl.col("value").mean())
    assert f"{best['value'].max():.3f}" in shown and "selectivity" in shown
    assert main(["probes", str(tmp_path), "--task", "nope"]) == 2
    assert "--task 'nope' is not in" in capsys.readouterr().err


def test_batched_probe_agrees_with_sklearn_per_layer_on_real_model():
    """All 31 layers of one real task (a bundled paradigm, 400 sentences): within 1 point macro-F1 of
    scikit-learn's LogisticRegression per layer."""
    from merging.family import build_family

    task, = load_tasks(None, minimal_pairs=(PairSelection("suite", str(BUNDLED_DIR), ("subject_verb_agreement",)),))
    requests, index = task_requests(task)
    runner = HookRunner(*load_model(build_family(("base",))["base"], LoadOptions()))
    features = task_features(capture(runner, requests), index)
    split = Split(task.split_mask("train"), task.split_mask("dev"), task.split_mask("test"))
    x = standardise(features, split.train)
    scores = probe_classification(x, task.labels, np.zeros((0, len(task.labels)), np.int64), split, 2)
    assert x.shape[0] == 31
    for layer in range(31):
        clf = LogisticRegression(C=scores.chosen_c[layer], max_iter=5000).fit(
            x[layer, split.train].numpy(), task.labels[split.train])
        reference = f1_score(task.labels[split.test], clf.predict(x[layer, split.test].numpy()), average="macro")
        assert abs(scores.task["macro_f1"][layer] - reference) <= 0.01, layer
