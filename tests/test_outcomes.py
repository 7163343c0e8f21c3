"""Merge outcome metrics against values computed by hand on a small fixture."""

from __future__ import annotations

import math

import polars as pl
import pytest

from evaluation.outcomes import compute_outcomes
from merging.merge import MergeLineage
from reports.tables import CONTRACT_COLUMNS

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


def test_within_one_stderr_of_the_expert_is_between(outcomes):
    r = row(outcomes, "m", "near")  # 0.62 - 0.6 = 0.02 < 0.0707
    assert r["relation"] == "between" and r["gap_closed"] == pytest.approx(1.2)


def test_undefined_ratios_are_nan_with_a_reason(outcomes):
    tie = row(outcomes, "m", "tie")
    assert tie["relation"] == "between" and math.isnan(tie["gap_closed"]) and tie["normalized"] == pytest.approx(1)
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
