"""Merge outcome metrics: how each merge scores against its own parents, per task (and per group).

Generic over the score's origin, so behaviour (lm-eval) and internals (probe accuracy) share one definition:
`compute_outcomes(scores, lineages, kind)` with `scores` = model, task, value, stderr (nullable),
higher_is_better, plus optional key columns `level` ("task" | "group") and `metric` that pass through.

Per merge M with parents P_1..P_k and one (task, level, metric) key, scores are first oriented so that higher
is better (o = value, or -value where higher_is_better is false). On that key:

- expert E = the parent with the highest oriented score, aux A = the parent with the lowest (for two parents:
  the better and the worse parent on THIS task; for our family the domain child is the expert on its domain).
- relation (the seed paper's Figs 3-4, plus "unresolved"), decided by `relation_test`:
  "paired_bootstrap" where `paired` (evaluation.paired) holds the merge's paired tests against both E and A on the
  items both answered: "better" if the 95% CI of o_M - o_E lies above 0, "worse" if that of o_M - o_A lies below
  0, "between" only if the tests place the merge between its parents (the CI of o_M - o_E lies below 0 AND that
  of o_M - o_A above 0), else "unresolved": the tests cannot tell it from a parent (a merge within noise of a
  parent is not "between" it and the other). The differences, CIs and p-values are in diff_expert*, diff_aux*,
  p_expert, p_aux.
  "stderr" otherwise (scores without items): the same four outcomes with "beyond one standard error of the
  difference", tol_X = sqrt(se_M^2 + se_X^2), in place of "the CI excludes 0": "better" if o_M - o_E > tol_E,
  "worse" if o_A - o_M > tol_A, "between" if o_E - o_M > tol_E and o_M - o_A > tol_A, else "unresolved". A
  missing stderr counts as 0 (an exact score).
- delta_expert = o_M - o_E, delta_aux = o_M - o_A (SimMerge, Δexpert / Δaux: positive = merge is better).
- gap_closed = (o_M - o_A) / (o_E - o_A) (SimMerge GapClosed): 0 = no better than the weaker parent,
  1 = reaches the expert; undefined (NaN) when the parents tie.
- normalized = value_M / value_E (MergeBench normalized performance: merged score over the expert's score);
  value_E / value_M for lower-is-better metrics so that 1 = expert level and >1 = better either way.
  Undefined (NaN) when the denominator is not positive.
- merge_gain = o_M - mean_i(o_Pi) (Model Kinship, Hu et al. 2025: merged performance minus the parents' mean).

`parameters` carries the merge's requested method parameters (JSON, sorted keys): merges of one parent pair by one
method that differ in one parameter form a dose-response series (reports.primary).

Every undefined number is NaN with the reason in `reason` (joined by "; "), never inf and never an exception:
a merge or parent without a score (or a metric whose direction is unknown) gives a row with null relation and
NaN metrics, and says why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import polars as pl

from evaluation.paired import PAIRED_SCHEMA

if TYPE_CHECKING:  # the class only: importing merging.merge costs seconds (torch) that reports need not pay
    from merging.merge import MergeLineage

OPTIONAL_KEYS = ("level", "metric")
_NAN = float("nan")


def metric_key() -> pl.Expr:
    """A behaviour row's `metric` key for outcomes (and correlations): lm-eval's metric name, with its filter
    appended ("exact_match,strict-match") unless the filter is "none"."""
    return pl.when(pl.col("filter") == "none").then(pl.col("metric")).otherwise(
        pl.concat_str("metric", "filter", separator=","))


def _key_columns(scores: pl.DataFrame) -> list[str]:
    return ["task", *(c for c in OPTIONAL_KEYS if c in scores.columns)]


def _lineage_frame(lineages: Sequence[MergeLineage]) -> pl.DataFrame:
    return pl.DataFrame(
        {"model": [m.model for m in lineages], "method": [m.method for m in lineages],
         "parent_a": [m.parents[0] for m in lineages],
         "parent_b": [m.parents[1] if len(m.parents) > 1 else None for m in lineages],
         "parents": [list(m.parents) for m in lineages],
         "parameters": [json.dumps(m.parameters, sort_keys=True) for m in lineages]},
        schema={"model": pl.String, "method": pl.String, "parent_a": pl.String, "parent_b": pl.String,
                "parents": pl.List(pl.String), "parameters": pl.String})


def _oriented(scores: pl.DataFrame) -> pl.DataFrame:
    sign = pl.when(pl.col("higher_is_better")).then(1.0).when(~pl.col("higher_is_better")).then(-1.0)
    value = pl.col("value").cast(pl.Float64).fill_nan(None)  # a NaN score is a missing score
    return scores.with_columns(
        value, pl.col("stderr").cast(pl.Float64).fill_nan(None).fill_null(0.0), (value * sign).alias("o"))


def _parent_summary(lineage: pl.DataFrame, scores: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Per (merge, key): expert and aux parent with their scores, parents' mean, and who lacks a score."""
    parents = (lineage.select("model", "parents").explode("parents").rename({"parents": "parent"})
               .with_columns(pl.int_range(pl.len()).over("model").alias("position")))
    merge_keys = lineage.select("model").join(scores.select(keys).unique(), how="cross")
    rows = merge_keys.join(parents, on="model").join(
        scores.select(*keys, pl.col("model").alias("parent"), "value", "stderr", "o"),
        on=[*keys, "parent"], how="left")
    scored = pl.col("o").is_not_null()
    ranked = lambda name: pl.col(name).filter(scored).sort_by(  # noqa: E731 - best first; ties: lineage order
        pl.col("o").filter(scored), pl.col("position").filter(scored), descending=[True, False])
    return rows.group_by("model", *keys).agg(
        pl.col("parent").filter(pl.col("value").is_null()).alias("unscored"),
        ranked("parent").first().alias("expert"), ranked("value").first().alias("value_expert"),
        ranked("stderr").first().alias("se_expert"), ranked("o").first().alias("o_expert"),
        ranked("parent").last().alias("aux"), ranked("stderr").last().alias("se_aux"),
        ranked("o").last().alias("o_aux"), pl.col("o").mean().alias("o_parents_mean"))


def _safe_ratio(num: pl.Expr, den: pl.Expr, defined: pl.Expr) -> pl.Expr:
    return pl.when(defined).then(num / den).otherwise(pl.lit(_NAN))


def _paired_columns(paired: pl.DataFrame | None, keys: list[str], role: str) -> pl.DataFrame:
    """The paired test of each (merge, key) against its `role` parent ("expert" | "aux"), columns suffixed."""
    if paired is None:
        paired = pl.DataFrame(schema={"model": pl.String, "parent": pl.String, **{k: pl.String for k in keys},
                                      **PAIRED_SCHEMA})
    return paired.select("model", pl.col("parent").alias(role), *keys,
                         pl.col("diff").alias(f"diff_{role}"), pl.col("ci_low").alias(f"diff_{role}_low"),
                         pl.col("ci_high").alias(f"diff_{role}_high"), pl.col("p").alias(f"p_{role}"),
                         pl.col("n_items").alias(f"n_items_{role}"))


def compute_outcomes(scores: pl.DataFrame, lineages: Sequence[MergeLineage], kind: str,
                     paired: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per (merge, task[, level, metric]): relation, gap_closed, normalized and the extras above.

    `paired`: evaluation.paired's tests (model, parent, the scores' key columns, diff, ci_low, ci_high, p,
    n_items); rows without a test for both parents fall back to the stderr bands.
    """
    keys = _key_columns(scores)
    scores = _oriented(scores)
    lineage = _lineage_frame(lineages)
    summary = _parent_summary(lineage, scores, keys)
    merged = scores.select(*keys, "model", pl.col("value").alias("value_merge"),
                           pl.col("stderr").alias("se_merge"), pl.col("o").alias("o_merge"))
    hib = scores.group_by(keys).agg(pl.col("higher_is_better").drop_nulls().first().alias("hib"))
    frame = (summary.join(merged, on=["model", *keys], how="left")
             .join(hib, on=keys, how="left").join(lineage.drop("parents"), on="model")
             .join(_paired_columns(paired, keys, "expert"), on=["model", "expert", *keys], how="left")
             .join(_paired_columns(paired, keys, "aux"), on=["model", "aux", *keys], how="left"))

    complete = (pl.col("o_merge").is_not_null() & pl.col("unscored").list.len().eq(0)
                & pl.col("o_expert").is_not_null())
    tol_e = (pl.col("se_merge").pow(2) + pl.col("se_expert").pow(2)).sqrt()
    tol_a = (pl.col("se_merge").pow(2) + pl.col("se_aux").pow(2)).sqrt()
    gap = pl.col("o_expert") - pl.col("o_aux")
    norm_num = pl.when(pl.col("hib")).then(pl.col("value_merge")).otherwise(pl.col("value_expert"))
    norm_den = pl.when(pl.col("hib")).then(pl.col("value_expert")).otherwise(pl.col("value_merge"))
    nan_if_incomplete = lambda expr: pl.when(complete).then(expr).otherwise(pl.lit(_NAN))  # noqa: E731

    missing = pl.concat_list(
        pl.when(pl.col("value_merge").is_null()).then(pl.col("model")).otherwise(pl.lit(None, pl.String)),
        pl.col("unscored")).list.drop_nulls()
    reasons = pl.concat_list(
        pl.when(missing.list.len() > 0).then(pl.lit("no score for ") + missing.list.join(", ")),
        pl.when(pl.col("hib").is_null()).then(pl.lit("higher_is_better unknown: cannot orient the scores")),
        pl.when(complete & (gap == 0)).then(pl.lit("gap_closed undefined: parents score equal")),
        pl.when(complete & (norm_den <= 0)).then(
            pl.lit("normalized undefined: non-positive denominator score")),
    ).list.drop_nulls()

    tested = pl.col("diff_expert").is_not_null() & pl.col("diff_aux").is_not_null()
    out = frame.with_columns(
        pl.lit(kind).alias("kind"),
        pl.when(~complete).then(pl.lit(None, pl.String)).when(tested).then(pl.lit("paired_bootstrap"))
        .otherwise(pl.lit("stderr")).alias("relation_test"),
        pl.when(~complete).then(pl.lit(None, pl.String))
        .when(tested & (pl.col("diff_expert_low") > 0)).then(pl.lit("better"))
        .when(tested & (pl.col("diff_aux_high") < 0)).then(pl.lit("worse"))
        .when(tested & (pl.col("diff_expert_high") < 0) & (pl.col("diff_aux_low") > 0)).then(pl.lit("between"))
        .when(tested).then(pl.lit("unresolved"))
        .when(pl.col("o_merge") - pl.col("o_expert") > tol_e).then(pl.lit("better"))
        .when(pl.col("o_aux") - pl.col("o_merge") > tol_a).then(pl.lit("worse"))
        .when((pl.col("o_expert") - pl.col("o_merge") > tol_e) & (pl.col("o_merge") - pl.col("o_aux") > tol_a))
        .then(pl.lit("between"))
        .otherwise(pl.lit("unresolved")).alias("relation"),
        _safe_ratio(pl.col("o_merge") - pl.col("o_aux"), gap, complete & (gap != 0)).alias("gap_closed"),
        _safe_ratio(norm_num, norm_den, complete & (norm_den > 0)).alias("normalized"),
        nan_if_incomplete(pl.col("o_merge") - pl.col("o_expert")).alias("delta_expert"),
        nan_if_incomplete(pl.col("o_merge") - pl.col("o_aux")).alias("delta_aux"),
        nan_if_incomplete(pl.col("o_merge") - pl.col("o_parents_mean")).alias("merge_gain"),
        pl.when(complete).then(pl.col("expert")).alias("expert"),
        pl.when(complete).then(pl.col("aux")).alias("aux"),
        pl.when(complete).then(pl.col("value_expert")).alias("value_expert"),
        pl.when(reasons.list.len() > 0).then(reasons.list.join("; ")).alias("reason"),
    )
    return out.select(
        "model", "method", "parameters", "parent_a", "parent_b", *keys, "kind", "relation", "gap_closed", "normalized",
        "delta_expert", "delta_aux", "merge_gain", "expert", "aux", "value_merge", "value_expert", "relation_test",
        *(c for role in ("expert", "aux") for c in (f"diff_{role}", f"diff_{role}_low", f"diff_{role}_high",
                                                    f"p_{role}", f"n_items_{role}")), "reason",
    ).sort("model", *keys)


def cached_outcomes(cache_dir: Path | None, kind: str, inputs: Sequence[Path], lineages: Sequence[MergeLineage],
                    seed: int, compute: Callable[[], pl.DataFrame], sources: Sequence[Path] = ()) -> pl.DataFrame:
    """`compute()`'s outcome rows of `kind`, cached by the content of the `inputs` tables, the lineages, the seed of
    the paired tests and the code that computes them (this module, evaluation.paired and `sources`)."""
    from dataclasses import asdict

    from evaluation import paired
    from runstore.cache import ALL_MODELS, cache_key, cached_frame, code_version, content_digest

    key = cache_key("outcomes", kind, code_version(__file__, paired.__file__, *sources), content_digest(inputs),
                    [asdict(lineage) for lineage in lineages], seed)
    return cached_frame(cache_dir, f"{kind}_outcomes", ALL_MODELS, key, compute)[0]
