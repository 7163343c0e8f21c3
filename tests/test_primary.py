"""Primary analyses and what a test can support, on synthetic run tables."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from scipy import stats

from reports.correlations import competence_variables, correlate, correlate_block, with_q
from reports.findings import primary_summary
from reports.power import min_detectable_r
from reports.primary import dose_series, primary_tests

MODELS = [f"m{i:02d}" for i in range(14)]
TASKS = [f"suite-t{i}" for i in range(8)]  # probing task == behaviour task (the minimal-pair interface)
PLANTED = "suite-t3"


def _inside_outside(seed: int) -> dict[str, pl.DataFrame]:
    """Probes (4 layers, dev and test) and behaviour for 14 models; behaviour tracks competence on PLANTED only."""
    rng = np.random.default_rng(seed)
    probes, behaviour = [], []
    for model in MODELS:
        for i, task in enumerate(TASKS):
            skill = rng.uniform(0.5, 0.9)
            for layer in range(4):
                value = skill - 0.05 * abs(layer - 2) + rng.normal(0, 0.01)
                probes.append((model, task, "syntax" if i < 4 else "morphology", layer, "macro_f1", value,
                               value + rng.normal(0, 0.01), 0))
            tracked = skill + rng.normal(0, 0.03) if task == PLANTED else rng.uniform(0.5, 0.9)
            behaviour.append((model, task, "task", "acc", "none", tracked, True))
    return {"probes": pl.DataFrame(probes, schema=["model", "task", "phenomenon", "layer", "metric", "value",
                                                   "dev_value", "seed"], orient="row"),
            "behavior": pl.DataFrame(behaviour, schema=["model", "task", "level", "metric", "filter", "value",
                                                        "higher_is_better"], orient="row")}


def test_the_primary_analysis_finds_the_one_planted_correlation():
    found = primary_tests(_inside_outside(0), seed=0, resamples=200, permutations=999)
    found = with_q(found)
    assert set(found["family"]) == {"primary:inside_vs_outside|best_layer|pearson"}  # one family, Pearson
    assert set(found["method"]) == {"pearson"}
    tasks = found.filter(pl.col("y_level") == "task")
    assert sorted(tasks["x"]) == TASKS and (tasks["x"] == tasks["y"]).all()  # joined on the task name only
    significant = tasks.filter(pl.col("q") < 0.05)["x"].to_list()
    assert significant == [PLANTED]
    planted = tasks.filter(pl.col("x") == PLANTED).row(0, named=True)
    assert planted["r"] > 0.9 and planted["ci_low"] > 0.5 and planted["n"] == planted["n_effective"] == 14
    assert planted["min_detectable_r"] == pytest.approx(min_detectable_r(14)) and planted["analysis"] == "primary"
    assert set(found.filter(pl.col("y_level") == "phenomenon")["x"]) == {"syntax", "morphology"}


def test_exploratory_fdr_stays_within_its_rate_over_repeated_seeds():
    """Pure noise, 40 seeds of 60 tests over 10 units: under the global null, BH at 5% makes a false discovery in
    at most 5% of the runs (its FDR is then the family-wise rate); 8 or more of 40 has probability < 0.001."""
    runs_with_discovery = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        xs = pl.DataFrame([(f"u{u}", f"x{i}", rng.normal()) for i in range(6) for u in range(10)],
                          schema=["unit", "x", "value"], orient="row")
        ys = pl.DataFrame([(f"u{u}", f"y{j}", rng.normal()) for j in range(10) for u in range(10)],
                          schema=["unit", "y", "value"], orient="row")
        frame = with_q(correlate(xs.with_columns(pl.lit(None, pl.String).alias(c) for c in ("x_kind", "x_level",
                                                                                            "view")).with_columns(
            pl.lit(None, pl.Int64).alias("layer")), ys.with_columns(
            pl.lit(None, pl.String).alias(c) for c in ("y_kind", "y_level", "y_metric")),
            "noise", "units", seed, 20, 999, methods=("pearson",)))
        assert frame.height == 60 and set(frame["analysis"]) == {"exploratory"}
        runs_with_discovery += int((frame["q"] < 0.05).any())
    assert stats.binom(40, 0.05).sf(runs_with_discovery - 1) > 0.001, runs_with_discovery


def test_a_two_valued_x_gets_a_reason_not_an_r():
    x = np.array([[0.3, 0.3, 0.3, 0.3, 0.3, 0.7, 0.7, 0.7, 0.7, 0.7]])
    y = np.random.default_rng(0).normal(size=(1, 10))
    y[0, 5:] += 3  # the two groups differ: r would be large, and say nothing about the feature
    rows = correlate_block(x, y, "merges", 0, 50)
    assert rows["r"].is_nan().all() and set(rows["n_effective"]) == {2}
    assert set(rows["reason"]) == {"x takes 2 values over 10 merges (fewer than 5)"}


def test_a_parent_pair_feature_is_tested_over_parent_pairs_and_refused_over_two():
    """Ten merges of two parent pairs: the pair feature takes two values; the selector_pair analysis tests it over
    the two pairs (too few: a reason), the merge-level feature over the ten merges."""
    rng = np.random.default_rng(1)
    merges = [(f"{pair}/m{i}", "linear", "instruct", pair) for pair in ("math", "code") for i in range(5)]
    outcomes = pl.DataFrame([(m, method, a, b, "g", "group", kind, rng.normal(), rng.normal(), "{}")
                             for m, method, a, b in merges for kind in ("behavior", "internals")],
                            schema=["model", "method", "parent_a", "parent_b", "task", "level", "kind", "gap_closed",
                                    "merge_gain", "parameters"], orient="row").with_columns(
        pl.lit("between").alias("relation"), pl.lit(None, pl.String).alias("metric"))
    similarity = pl.DataFrame(
        [("instruct", "math", "cosine", "global", None, 0.9, "weights"),
         ("instruct", "code", "cosine", "global", None, 0.8, "weights")]
        + [(m, None, "tv_norm", "global", None, rng.uniform(), "weights") for m, *_ in merges],
        schema={"model_a": pl.String, "model_b": pl.String, "feature": pl.String, "scope": pl.String,
                "layer": pl.Int64, "value": pl.Float64, "source": pl.String}, orient="row")
    found = primary_tests({"outcomes": outcomes, "similarity": similarity}, 0, 50, 999)
    pair = found.filter(pl.col("family").str.starts_with("primary:selector_pair"))
    assert set(pair["n"]) == {2} and pair["r"].is_nan().all() and set(pair["unit"]) == {"parent pairs"}
    merge = found.filter(pl.col("family").str.starts_with("primary:selector_merge") & (pl.col("x_kind") == "merge"))
    assert set(merge["n"]) == {10} and merge["r"].is_finite().all()
    # the exploratory sweep, over merges, names the feature's kind in its reason
    from reports.correlations import correlations

    sweep = correlations({"outcomes": outcomes, "similarity": similarity}, 0, 50, 999).filter(
        (pl.col("analysis") == "exploratory") & (pl.col("x_kind") == "parent_pair")
        & ~pl.col("y_kind").str.ends_with("relation"))  # relation: "between" everywhere, y constant
    assert set(sweep["reason"]) == {"x takes 2 values over 10 merges (fewer than 5): parent-pair feature"}
    summary = {s["name"]: s for s in primary_summary(found.with_columns(pl.lit(0.5).alias("q")))}
    assert summary["selector_pair"]["defined"] == 0 and summary["selector_merge"]["n_effective"] == 10


def test_best_layer_is_chosen_on_dev_and_scored_on_test():
    """Test scores peak at layer 3, dev scores at layer 1: best_layer reports the test score at layer 1."""
    test = [0.60, 0.70, 0.75, 0.90]
    dev = [0.60, 0.95, 0.70, 0.80]
    probes = pl.DataFrame({"model": "m", "task": "t", "phenomenon": "p", "layer": range(4), "metric": "macro_f1",
                           "value": test, "dev_value": dev, "seed": 0})
    best = competence_variables(probes).filter((pl.col("view") == "best_layer") & (pl.col("x_level") == "task"))
    assert best["value"].to_list() == [0.70]
    # without dev scores there is no honest best layer: the view is left out, not picked on test
    assert "best_layer" not in set(competence_variables(probes.drop("dev_value"))["view"])


def test_probes_record_dev_scores_per_layer():
    import torch

    from probing.probes import Split, probe_classification

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    x = torch.from_numpy(np.stack([y[:, None] * s + rng.normal(size=(120, 4)) for s in (0.0, 3.0)])).float()
    split = Split(*(np.arange(120) % 3 == k for k in range(3)))
    scores = probe_classification(x, y, np.zeros((0, 120), dtype=y.dtype), split, 2)
    assert scores.dev["macro_f1"].shape == (2,) and scores.dev["macro_f1"][1] > 0.9 > scores.dev["macro_f1"][0]


def _dose_outcomes(weights: list[float], slope: float, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for w in weights:
        model = f"planted+instruct/linear-{w}"
        for kind, task, level in (("internals", "morphology", "group"), ("behavior", "suite-agree", "task")):
            rows.append((model, "linear", json.dumps({"weight": w, "normalize": 1.0}), "planted", "instruct", task,
                         level, kind, slope * w + rng.normal(0, 0.02)))
    return pl.DataFrame(rows, schema=["model", "method", "parameters", "parent_a", "parent_b", "task", "level", "kind",
                                      "value_merge"], orient="row")


def test_dose_response_over_a_weight_sweep():
    weights = [0.1, 0.3, 0.5, 0.7, 0.9]
    outcomes = pl.concat([_dose_outcomes(weights, 0.5, 0),
                          _dose_outcomes([0.5], 0.5, 1).with_columns(pl.lit("slerp").alias("method"),
                                                                     pl.lit("planted+instruct/slerp").alias("model"))])
    [series] = dose_series(outcomes)  # the lone slerp merge is no series
    assert series["key"] == "weight" and sorted(series["values"].values()) == weights
    found = primary_tests({"outcomes": outcomes}, 0, 200, 999)
    assert set(found["n"]) == {5} and (found["r"] > 0.9).all() and set(found["unit"]) == {"merges of one series"}
    assert set(found["x"]) == {"weight (planted+instruct, linear)"}
    three = primary_tests({"outcomes": _dose_outcomes([0.25, 0.5, 0.75], 0.5, 0)}, 0, 50, 999)
    assert three["r"].is_nan().all() and set(three["reason"]) == {
        "x takes 3 values over 3 merges of one series (fewer than 5): merge-parameter feature"}


def test_smallest_detectable_r_is_fisher_z():
    assert math.isnan(min_detectable_r(3))
    z = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / math.sqrt(10 - 3)
    assert min_detectable_r(10) == pytest.approx(math.tanh(z))
    assert min_detectable_r(10) > min_detectable_r(30) > min_detectable_r(100)
