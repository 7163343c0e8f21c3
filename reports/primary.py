"""The primary analyses: the few questions a run is built to answer, declared here before any data is seen.

Each is one family of tests (Benjamini–Hochberg within it), tested by Pearson r with the correlation stage's
permutation p and paired bootstrap CI (reports.correlations), over the units named in its declaration; everything
else the correlation stage computes is exploratory. A test's x must take at least `reports.power.MIN_DISTINCT`
distinct values over its units, else it reports a reason instead of an r.

- inside_vs_outside: per paradigm (a task that is both a probing task and a behaviour task of the same name, the
  minimal-pair interface) and per phenomenon (the mean over its paradigms), a model's internal competence (probe
  headline score at its best layer chosen on dev, scored on test) vs its minimal-pair behaviour; units: models.
- dose_response: for every parent pair merged by one method at several values of one parameter (a series: same
  parents, same method, the other parameters equal), each score of the merge (behaviour per task and group;
  internals, the layer-mean probe score, per task and phenomenon) vs that parameter; units: the series' merges.
- selector_pair: parent-pair selector features (global scope; `parent_pair` and `parent_group`) vs merge outcomes
  (gap closed, merge gain, per group/phenomenon), units: distinct parent pairs (the outcome is the mean over the
  pair's merges): a pair's feature takes one value for all its merges, so merges are not independent units.
- selector_merge: merge-level features (the merge's own, and the merge vs its parents) vs the same outcomes;
  units: merges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import polars as pl

from reports.correlations import (X_KEYS, Y_KEYS, variable_rows, behavior_variables, competence_variables, correlate,
                                  outcome_variables, selector_variables)

PRIMARY = "primary"
TEST = "Pearson r, two-sided permutation p, paired bootstrap 95% CI, Benjamini–Hochberg q within the analysis"
PAIR_KINDS = ("parent_pair", "parent_group")
OUTCOME_MEASURES = ("gap_closed", "merge_gain")


@dataclass(frozen=True)
class PrimaryAnalysis:
    name: str
    question: str
    unit: str
    test: str = TEST

    @property
    def family(self) -> str:
        return f"{PRIMARY}:{self.name}"


ANALYSES = (
    PrimaryAnalysis("inside_vs_outside", "Per paradigm and per phenomenon: does internal competence (probe at the "
                    "best layer chosen on dev, scored on test) track minimal-pair behaviour on the same sentences?",
                    "models"),
    PrimaryAnalysis("dose_response", "For every parent pair merged by one method at several weights: do the "
                    "merge's competence and behaviour follow the weight?", "merges of one series"),
    PrimaryAnalysis("selector_pair", "Do parent-pair selector features predict merge outcomes?", "parent pairs"),
    PrimaryAnalysis("selector_merge", "Do merge-level selector features predict merge outcomes?", "merges"),
)
BY_NAME = {a.name: a for a in ANALYSES}


def _run(name: str, xs: pl.DataFrame, ys: pl.DataFrame, seed: int, resamples: int, permutations: int,
         same_name: bool = False) -> pl.DataFrame:
    analysis = BY_NAME[name]
    return correlate(xs, ys, analysis.family, analysis.unit, seed, resamples, permutations, kind=PRIMARY,
                     methods=("pearson",), same_name=same_name)


def inside_outside_variables(probes: pl.DataFrame, behavior: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """x (competence, best layer on dev; layer mean where probes recorded no dev scores) and y (behaviour) per
    paradigm and phenomenon, restricted to the tasks both tables hold (joined on the task name)."""
    tasks = behavior.filter(pl.col("level") == "task") if "level" in behavior.columns else behavior
    shared = set(tasks["task"]) & set(probes["task"])
    probes = probes.filter(pl.col("task").is_in(shared))
    xs = competence_variables(probes)
    view = "best_layer" if (xs["view"] == "best_layer").any() else "layer_mean"
    xs = xs.filter(pl.col("view") == view)
    ys = behavior_variables(tasks.filter(pl.col("task").is_in(shared)))
    phenomena = probes.select("task", "phenomenon").unique()
    per_phenomenon = (ys.join(phenomena, left_on="y", right_on="task")
                      .group_by("unit", "phenomenon", "y_kind", "y_metric", maintain_order=True)
                      .agg(pl.col("value").mean())
                      .select("unit", pl.col("phenomenon").alias("y"), "y_kind", pl.lit("phenomenon").alias("y_level"),
                              "y_metric", "value"))
    return xs, pl.concat([ys.with_columns(pl.lit("task").alias("y_level")), per_phenomenon], how="diagonal_relaxed")


def dose_series(outcomes: pl.DataFrame) -> list[dict]:
    """Every series: merges of one (parents, method) whose parameters differ in exactly one key; with the key and
    each merge's value of it."""
    if "parameters" not in outcomes.columns:
        return []
    merges = outcomes.select("model", "method", "parent_a", "parent_b", "parameters").unique().sort("model")
    found = []
    for (method, a, b), group in merges.group_by("method", "parent_a", "parent_b", maintain_order=True):
        params = {row["model"]: json.loads(row["parameters"] or "{}") for row in group.iter_rows(named=True)}
        keys = sorted({k for p in params.values() for k in p})
        varying = [k for k in keys if len({p.get(k) for p in params.values()}) > 1]
        if len(params) >= 2 and len(varying) == 1:
            key = varying[0]
            found.append({"name": f"{key} ({a}+{b}, {method})", "parent_a": a, "parent_b": b, "method": method,
                          "key": key, "values": {m: p.get(key) for m, p in params.items() if p.get(key) is not None}})
    return found


def dose_variables(outcomes: pl.DataFrame, series: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """x (the series' parameter) and y (each score of the merge: behaviour and internals, every key) over the
    series' merges."""
    values = series["values"]
    xs = variable_rows(pl.DataFrame({"unit": list(values), "value": [float(v) for v in values.values()]},
                                 schema={"unit": pl.String, "value": pl.Float64}),
                    X_KEYS, x=series["name"], x_kind="merge_parameter", x_level="merge")
    rows = outcomes.filter(pl.col("model").is_in(list(values)))
    level = pl.col("level") if "level" in rows.columns else pl.lit("task")
    metric = pl.col("metric") if "metric" in rows.columns else pl.lit(None, pl.String)
    ys = variable_rows(rows.select(pl.col("model").alias("unit"), pl.col("task").alias("y"), pl.col("kind").alias(
        "y_kind"), level.alias("y_level"), metric.alias("y_metric"), pl.col("value_merge").alias("value")), Y_KEYS)
    return xs, ys


def selector_split(similarity: pl.DataFrame, outcomes: pl.DataFrame) -> dict[str, tuple[pl.DataFrame, pl.DataFrame]]:
    """(x, y) per selector analysis: pair-level features and outcomes (mean over the pair's merges) keyed by
    parent pair; merge-level features and outcomes keyed by merge. Global-scope features; gap closed and merge gain
    per group."""
    xs = selector_variables(similarity, outcomes).filter(pl.col("view").is_null())
    ys = outcome_variables(outcomes).filter(pl.col("y_kind").str.contains("|".join(OUTCOME_MEASURES))
                                            & (pl.col("y_level").is_null() | (pl.col("y_level") == "group")))
    pair = outcomes.select("model", pl.concat_str("parent_a", "parent_b", separator="+").alias("pair")).unique()
    to_pair = lambda frame, keys: (frame.join(pair, left_on="unit", right_on="model")  # noqa: E731
                                   .group_by("pair", *keys, maintain_order=True).agg(pl.col("value").mean())
                                   .rename({"pair": "unit"}).select("unit", *keys, "value"))
    pair_xs = to_pair(xs.filter(pl.col("x_kind").is_in(PAIR_KINDS)), list(X_KEYS))
    return {"selector_pair": (pair_xs, to_pair(ys, list(Y_KEYS))),
            "selector_merge": (xs.filter(~pl.col("x_kind").is_in(PAIR_KINDS)), ys)}


def primary_tests(tables: Mapping[str, pl.DataFrame | None], seed: int, resamples: int,
                  permutations: int) -> pl.DataFrame:
    """Every primary analysis's tests that the run's tables allow (an analysis whose tables are missing has none)."""
    frames = []
    probes, behavior, outcomes, similarity = (tables.get(n) for n in ("probes", "behavior", "outcomes", "similarity"))
    if probes is not None and behavior is not None:
        frames.append(_run("inside_vs_outside", *inside_outside_variables(probes, behavior), seed, resamples,
                           permutations, same_name=True))
    if outcomes is not None:
        for series in dose_series(outcomes):
            frames.append(_run("dose_response", *dose_variables(outcomes, series), seed, resamples, permutations))
    if outcomes is not None and similarity is not None:
        for name, (xs, ys) in selector_split(similarity, outcomes).items():
            frames.append(_run(name, xs, ys, seed, resamples, permutations))
    frames = [f for f in frames if not f.is_empty()]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
