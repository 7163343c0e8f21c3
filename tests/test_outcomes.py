"""Merge outcome metrics against values computed by hand on a small fixture."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from evaluation.outcomes import compute_outcomes
from evaluation.paired import behavior_paired_tests, paired_bootstrap
from merging.merge import MergeLineage
from probing.paired import probe_paired_tests
from runstore.tables import CONTRACT_COLUMNS

LINEAGES = [MergeLineage("m", "linear", ("a", "b"), "base"), MergeLineage("m2", "ties", ("a", "b"), "base"),
            MergeLineage("m3", "task_arithmetic", ("a", "b", "c"), "base")]
# (model, task, value, stderr, higher_is_better)
ROWS = [
    ("a", "t1", 0.5, 0.05, True), ("b", "t1", 0.7, 0.05, True), ("c", "t1", 0.1, 0.05, True),
    ("m", "t1", 0.9, 0.05, True), ("m2", "t1", 0.6, None, True), ("m3", "t1", 0.8, 0.05, True),
    ("a", "ppl", 10.0, 1.0, False), ("b", "ppl", 20.0, 1.0, False), ("m", "ppl", 25.0, 1.0, False),
    ("a", "tie", 0.3, 0.1, True), ("b", "tie", 0.3, 0.1, True), ("m", "tie", 0.3, 0.1, True),
    ("a", "zero", 0.0, 0.0, True), ("b", "zero", 0.0, 0.0, True), ("m", "zero", 0.1, 0.0, True),
    ("a", "near", 0.5, 0.05, True), ("b", "near", 0.6, 0.05, True), ("m", "near", 0.62, 0.05, True),
    ("a", "gone", 0.5, 0.05, True), ("b", "gone", 0.6, 0.05, True),
]


@pytest.fixture(scope="module")
def outcomes() -> pl.DataFrame:
    scores = pl.DataFrame(ROWS, schema={"model": pl.String, "task": pl.String, "value": pl.Float64,
                                        "stderr": pl.Float64, "higher_is_better": pl.Boolean}, orient="row")
    return compute_outcomes(scores, LINEAGES, "behavior")


def row(outcomes: pl.DataFrame, model: str, task: str) -> dict:
    found = outcomes.filter((pl.col("model") == model) & (pl.col("task") == task))
    assert found.height == 1
    return found.row(0, named=True)


def test_contract_columns_and_no_infinities(outcomes):
    assert set(CONTRACT_COLUMNS["outcomes"]) <= set(outcomes.columns)
    assert set(outcomes["kind"]) == {"behavior"}
    floats = [c for c, t in outcomes.schema.items() if t == pl.Float64]
    assert not outcomes.select(pl.any_horizontal(pl.col(floats).is_infinite()).any()).item()
    # every merge gets a row for every task: 3 merges x 6 tasks
    assert outcomes.height == 18


def test_merge_better_than_both_parents(outcomes):
    r = row(outcomes, "m", "t1")  # expert b=0.7, aux a=0.5; tolerance sqrt(0.05^2 + 0.05^2) = 0.0707
    assert (r["relation"], r["expert"], r["aux"], r["parent_a"], r["parent_b"]) == ("better", "b", "a", "a", "b")
    assert r["gap_closed"] == pytest.approx((0.9 - 0.5) / (0.7 - 0.5))  # 2.0
    assert r["normalized"] == pytest.approx(0.9 / 0.7)
    assert r["delta_expert"] == pytest.approx(0.2) and r["delta_aux"] == pytest.approx(0.4)
    assert r["merge_gain"] == pytest.approx(0.9 - 0.6)
    assert r["reason"] is None


def test_merge_between_parents_with_missing_stderr_as_exact(outcomes):
    r = row(outcomes, "m2", "t1")
    assert r["relation"] == "between" and r["method"] == "ties"
    assert r["gap_closed"] == pytest.approx(0.5) and r["normalized"] == pytest.approx(0.6 / 0.7)
    assert r["merge_gain"] == pytest.approx(0.0, abs=1e-12)


def test_lower_is_better_metric_is_oriented(outcomes):
    r = row(outcomes, "m", "ppl")  # oriented: a=-10 (expert), b=-20 (aux), m=-25
    assert (r["relation"], r["expert"], r["aux"]) == ("worse", "a", "b")
    assert r["gap_closed"] == pytest.approx((-25 + 20) / (-10 + 20))  # -0.5
    assert r["normalized"] == pytest.approx(10 / 25)
    assert r["delta_expert"] == pytest.approx(-15) and r["delta_aux"] == pytest.approx(-5)
    assert r["merge_gain"] == pytest.approx(-25 + 15)


def test_within_one_stderr_of_the_expert_is_unresolved_not_between(outcomes):
    r = row(outcomes, "m", "near")  # 0.62 - 0.6 = 0.02 < 0.0707: cannot be told from the expert
    assert r["relation"] == "unresolved" and r["gap_closed"] == pytest.approx(1.2)


def test_undefined_ratios_are_nan_with_a_reason(outcomes):
    tie = row(outcomes, "m", "tie")
    assert tie["relation"] == "unresolved" and math.isnan(tie["gap_closed"]) and tie["normalized"] == pytest.approx(1)
    assert tie["reason"] == "gap_closed undefined: parents score equal"
    zero = row(outcomes, "m", "zero")
    assert zero["relation"] == "better" and math.isnan(zero["gap_closed"]) and math.isnan(zero["normalized"])
    assert zero["reason"] == ("gap_closed undefined: parents score equal; "
                              "normalized undefined: non-positive denominator score")
    gone = row(outcomes, "m", "gone")
    assert gone["relation"] is None and all(math.isnan(gone[c]) for c in ("gap_closed", "normalized", "merge_gain"))
    assert gone["reason"] == "no score for m"
    unparented = row(outcomes, "m2", "ppl")
    assert unparented["reason"] == "no score for m2"


def test_three_parents_use_best_and_worst_and_the_mean(outcomes):
    r = row(outcomes, "m3", "t1")  # parents 0.5, 0.7, 0.1
    assert (r["expert"], r["aux"], r["parent_b"], r["relation"]) == ("b", "c", "b", "better")
    assert r["gap_closed"] == pytest.approx((0.8 - 0.1) / (0.7 - 0.1))
    assert r["merge_gain"] == pytest.approx(0.8 - (0.5 + 0.7 + 0.1) / 3)


def test_level_and_metric_keys_pass_through():
    scores = pl.DataFrame({
        "model": ["a", "b", "m"] * 2, "task": ["g"] * 6, "level": ["task"] * 3 + ["group"] * 3,
        "metric": ["acc"] * 6, "value": [0.2, 0.4, 0.3, 0.6, 0.4, 0.3], "stderr": [None] * 6,
        "higher_is_better": [True] * 6})
    out = compute_outcomes(scores, LINEAGES[:1], "internals").sort("level")
    assert out["level"].to_list() == ["group", "task"] and out["metric"].to_list() == ["acc", "acc"]
    assert out["relation"].to_list() == ["worse", "between"]
    assert out["gap_closed"].to_list() == pytest.approx([-0.5, 0.5])
    assert set(out["kind"]) == {"internals"}


def test_unknown_direction_is_reported_not_guessed():
    scores = pl.DataFrame({"model": ["a", "b", "m"], "task": ["t"] * 3, "value": [0.1, 0.2, 0.3],
                           "stderr": [0.0] * 3, "higher_is_better": [None, None, None]},
                          schema_overrides={"higher_is_better": pl.Boolean})
    r = compute_outcomes(scores, LINEAGES[:1], "behavior").row(0, named=True)
    assert r["relation"] is None and math.isnan(r["gap_closed"])
    assert r["reason"] == "higher_is_better unknown: cannot orient the scores"


# ------------------------------------------------------------------------------------- paired merge-vs-parent tests

def _by_hand(merge: np.ndarray, parent: np.ndarray, seed: int, resamples: int) -> tuple[float, float, float, float]:
    """The paired bootstrap written out: resample item indices, mean difference per resample, percentile CI and the
    add-one two-sided p."""
    index = np.random.default_rng(seed).integers(0, len(merge), (resamples, len(merge)))
    boot = np.array([(merge[i] - parent[i]).mean() for i in index])
    far = min((boot <= 0).sum(), (boot >= 0).sum())
    return ((merge - parent).mean(), np.percentile(boot, 2.5), np.percentile(boot, 97.5),
            min(1.0, 2 * (1 + far) / (resamples + 1)))


def test_paired_bootstrap_equals_a_hand_computation():
    merge = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1, 1], dtype=float)
    parent = np.array([0, 1, 0, 0, 1, 0, 0, 1, 0, 1], dtype=float)
    found = paired_bootstrap([lambda c: c @ (merge - parent) / c.sum(-1)], [10], seed=3, resamples=500)
    diff, low, high, p = _by_hand(merge, parent, 3, 500)
    assert found["diff"] == pytest.approx(0.4) == pytest.approx(diff)
    assert (found["ci_low"], found["ci_high"], found["p"]) == pytest.approx((low, high, p))
    assert found["n_items"] == 10 and low > 0  # 4 wins, no losses: resolved as better


def test_identical_answers_give_p_one():
    same = np.array([1.0, 0.0, 1.0])
    found = paired_bootstrap([lambda c: c @ (same - same) / c.sum(-1)], [3], resamples=99)
    assert (found["diff"], found["ci_low"], found["ci_high"], found["p"]) == (0.0, 0.0, 0.0, 1.0)


ITEM_LINEAGE = [MergeLineage("m", "linear", ("a", "b"), "base")]


def test_behavior_items_decide_the_relation_where_stderr_bands_cannot():
    # 40 items; b (expert) right on 20, a on 10; the merge agrees with b except on 4 items it alone gets right.
    # Unpaired stderr bands (~0.08 each) overlap; the paired test sees 4 wins and 0 losses against b.
    n = 40
    a, b = np.zeros(n), np.zeros(n)
    a[:10], b[:20] = 1, 1
    m = b.copy()
    m[20:24] = 1
    values = {"a": a, "b": b, "m": m}
    items = pl.DataFrame([(name, "t", "task", "acc", f"{i:02d}", float(v[i]), True) for name, v in values.items()
                          for i in range(n)], schema=["model", "task", "level", "metric", "item", "value",
                                                      "higher_is_better"], orient="row")
    scores = items.group_by("model", "task", "level", "metric").agg(
        pl.col("value").mean(), (pl.col("value").std() / np.sqrt(n)).alias("stderr"),
        pl.col("higher_is_better").first())
    paired = behavior_paired_tests(items, ITEM_LINEAGE, seed=0, resamples=400)
    assert sorted(paired["parent"]) == ["a", "b"] and set(paired["n_items"]) == {n}
    out = compute_outcomes(scores, ITEM_LINEAGE, "behavior", paired=paired).row(0, named=True)
    unpaired = compute_outcomes(scores, ITEM_LINEAGE, "behavior").row(0, named=True)
    assert (unpaired["relation"], unpaired["relation_test"]) == ("unresolved", "stderr")
    assert (out["relation"], out["relation_test"]) == ("better", "paired_bootstrap")
    assert (out["expert"], out["aux"]) == ("b", "a")
    diff, low, high, p = _by_hand(m, b, 0, 400)
    assert (out["diff_expert"], out["diff_expert_low"], out["diff_expert_high"], out["p_expert"]) == pytest.approx(
        (4 / 40, low, high, p))
    assert out["diff_aux"] == pytest.approx(14 / 40) and out["n_items_expert"] == n


def test_lower_is_better_items_are_oriented_and_missing_items_fall_back():
    items = pl.DataFrame([(name, "ppl", "task", "nll", str(i), float(v), False)
                          for name, vs in {"a": [1, 2, 3, 4], "b": [2, 3, 4, 5], "m": [3, 4, 5, 7]}.items()
                          for i, v in enumerate(vs)],
                         schema=["model", "task", "level", "metric", "item", "value", "higher_is_better"], orient="row")
    paired = behavior_paired_tests(items, ITEM_LINEAGE, resamples=200)
    to_a = paired.filter(pl.col("parent") == "a").row(0, named=True)
    assert to_a["diff"] == pytest.approx(-(3 + 4 + 5 + 7 - 10) / 4) and to_a["ci_high"] < 0
    scores = pl.DataFrame({"model": ["a", "b", "m"] * 2, "task": ["ppl"] * 3 + ["other"] * 3,
                           "level": ["task"] * 6, "metric": ["nll"] * 6, "value": [2.5, 3.5, 4.75, 1.0, 2.0, 1.5],
                           "stderr": [0.1] * 6, "higher_is_better": [False] * 6})
    out = compute_outcomes(scores, ITEM_LINEAGE, "behavior", paired=paired).sort("task")
    assert out["relation"].to_list() == ["between", "worse"]  # "other" has no items: stderr bands
    assert out["relation_test"].to_list() == ["stderr", "paired_bootstrap"]
    assert out["expert"].to_list() == ["a", "a"]  # lower nll is better


def _probe_items() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Two classification tasks of one phenomenon and one regression task, 2 layers, 8 test items; models a, b, m."""
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    preds = {"a": [[0, 1, 2, 0, 0, 0, 0, 1], [0, 1, 2, 0, 1, 0, 0, 1]],
             "b": [[0, 0, 0, 0, 1, 2, 0, 1], [1, 1, 2, 0, 1, 2, 0, 1]],
             "m": [[0, 1, 2, 0, 1, 2, 0, 1], [0, 1, 2, 0, 1, 2, 1, 1]]}
    reg_labels = np.linspace(0, 1, 8)
    reg = {"a": [reg_labels + 0.3 * np.sin(np.arange(8))] * 2, "b": [reg_labels ** 2] * 2, "m": [reg_labels] * 2}
    rows = []
    for model in preds:
        for layer in range(2):
            for i in range(8):
                rows.append((model, "cls1", layer, f"i{i}", float(labels[i]), float(preds[model][layer][i])))
                rows.append((model, "cls2", layer, f"i{i}", float(labels[i]), float(preds[model][1 - layer][i])))
                rows.append((model, "reg", layer, f"i{i}", float(reg_labels[i]), float(reg[model][layer][i])))
    probe_items = pl.DataFrame(rows, schema=["model", "task", "layer", "item_id", "label", "prediction"], orient="row")
    probes = pl.DataFrame({"task": ["cls1", "cls2", "reg"], "phenomenon": ["syntax", "syntax", "numbers"],
                           "metric": ["macro_f1", "macro_f1", "pearson"]})
    return probe_items, probes


def test_probe_items_paired_test_recomputes_macro_f1_per_resample():
    from sklearn.metrics import f1_score

    probe_items, probes = _probe_items()
    paired = probe_paired_tests(probe_items, probes, ITEM_LINEAGE, seed=1, resamples=40)
    assert sorted(paired.filter(pl.col("parent") == "b")["task"]) == ["cls1", "cls2", "numbers", "reg", "syntax"]

    arrays = {}
    for (model, task), rows in probe_items.sort("layer", "item_id").partition_by("model", "task", as_dict=True).items():
        arrays[model, task] = (rows.filter(pl.col("layer") == 0)["label"].to_numpy(),
                               [rows.filter(pl.col("layer") == layer)["prediction"].to_numpy() for layer in range(2)])

    def layer_mean_f1(model: str, task: str, index: np.ndarray) -> float:
        labels, preds = arrays[model, task]
        return float(np.mean([f1_score(labels[index], pred[index], average="macro") for pred in preds]))

    index = np.random.default_rng(1).integers(0, 8, (40, 8))
    boot = np.array([layer_mean_f1("m", "cls1", i) - layer_mean_f1("b", "cls1", i) for i in index])
    row = paired.filter((pl.col("parent") == "b") & (pl.col("task") == "cls1")).row(0, named=True)
    full = np.arange(8)
    assert row["diff"] == pytest.approx(layer_mean_f1("m", "cls1", full) - layer_mean_f1("b", "cls1", full))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
    assert row["level"] == "task" and row["n_items"] == 8

    # the phenomenon: each task's items resampled separately (cls1 first, then cls2), task differences averaged
    rng = np.random.default_rng(1)
    i1, i2 = rng.integers(0, 8, (40, 8)), rng.integers(0, 8, (40, 8))
    syntax = np.array([(layer_mean_f1("m", "cls1", a) - layer_mean_f1("b", "cls1", a)
                        + layer_mean_f1("m", "cls2", c) - layer_mean_f1("b", "cls2", c)) / 2 for a, c in zip(i1, i2)])
    group = paired.filter((pl.col("parent") == "b") & (pl.col("task") == "syntax")).row(0, named=True)
    assert group["level"] == "group" and group["n_items"] == 16
    assert (group["ci_low"], group["ci_high"]) == pytest.approx(tuple(np.percentile(syntax, [2.5, 97.5])))

    reg = paired.filter((pl.col("parent") == "b") & (pl.col("task") == "reg")).row(0, named=True)
    labels = np.linspace(0, 1, 8)
    assert reg["diff"] == pytest.approx(1 - np.corrcoef(labels, labels ** 2)[0, 1])


def test_internals_outcomes_use_probe_items_keys():
    from probing.stage import internals_scores

    probe_items, probes_info = _probe_items()
    scores_by_item = probe_items.group_by("model", "task", "layer").agg(pl.col("label"), pl.col("prediction"))
    paired = probe_paired_tests(probe_items, probes_info, ITEM_LINEAGE, resamples=100)
    # a probes table whose per-layer values are the items' scores, so outcomes and paired tests agree
    from sklearn.metrics import f1_score
    rows = []
    for r in scores_by_item.iter_rows(named=True):
        regression = r["task"] == "reg"
        value = (np.corrcoef(r["label"], r["prediction"])[0, 1] if regression
                 else f1_score(r["label"], r["prediction"], average="macro"))
        phenomenon = "numbers" if regression else "syntax"
        rows.append((r["model"], r["task"], phenomenon, r["layer"], "pearson" if regression else "macro_f1", value,
                     0.01, 0))
    probes = pl.DataFrame(rows, schema=["model", "task", "phenomenon", "layer", "metric", "value", "stderr", "seed"],
                          orient="row")
    out = compute_outcomes(internals_scores(probes), ITEM_LINEAGE, "internals", paired=paired)
    assert set(out["relation_test"]) == {"paired_bootstrap"} and out.height == 5
    joined = out.join(paired.rename({"parent": "expert"}), on=["model", "expert", "task", "level"])
    assert joined.height == 5
    assert joined["diff_expert"].to_list() == pytest.approx(joined["diff"].to_list())
    assert joined["diff"].to_list() == pytest.approx(joined["delta_expert"].to_list())


def _paired_rows(diffs: dict[tuple[str, str], tuple[float, float, float]]) -> pl.DataFrame:
    """Hand-made paired tests: (merge, parent) -> (diff, ci_low, ci_high) on task t."""
    return pl.DataFrame([{"model": m, "parent": p, "task": "t", "diff": d, "ci_low": lo, "ci_high": hi, "p": 0.5,
                          "n_items": 100} for (m, p), (d, lo, hi) in diffs.items()],
                        schema={"model": pl.String, "parent": pl.String, "task": pl.String, "diff": pl.Float64,
                                "ci_low": pl.Float64, "ci_high": pl.Float64, "p": pl.Float64, "n_items": pl.Int64})


def test_between_needs_both_paired_tests_and_otherwise_it_is_unresolved():
    """b is the expert (0.8), a the aux (0.4). m1's CIs put it below b and above a: between. m2 sits near b (its CI
    against b spans 0): the tests cannot place it, unresolved. m3's CI against b lies above 0: better."""
    lineages = [MergeLineage(m, "linear", ("a", "b"), "base") for m in ("m1", "m2", "m3")]
    scores = pl.DataFrame({"model": ["a", "b", "m1", "m2", "m3"], "task": ["t"] * 5,
                           "value": [0.4, 0.8, 0.6, 0.78, 0.9], "stderr": [0.01] * 5, "higher_is_better": [True] * 5})
    paired = _paired_rows({("m1", "b"): (-0.2, -0.3, -0.1), ("m1", "a"): (0.2, 0.1, 0.3),
                           ("m2", "b"): (-0.02, -0.06, 0.02), ("m2", "a"): (0.38, 0.3, 0.45),
                           ("m3", "b"): (0.1, 0.05, 0.15), ("m3", "a"): (0.5, 0.4, 0.6)})
    out = compute_outcomes(scores, lineages, "behavior", paired=paired).sort("model")
    assert out["relation"].to_list() == ["between", "unresolved", "better"]
    assert set(out["relation_test"]) == {"paired_bootstrap"}
    # without the paired tests, the stderr bands (0.014) would call m2 between: only the tests may say so
    assert compute_outcomes(scores, lineages, "behavior").sort("model")["relation"].to_list() == [
        "between", "between", "better"]
