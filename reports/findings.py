"""The report's findings summary: what a researcher wants first, computed from the tables (pure functions).

In page order: the known answer (reports.known), the primary analyses (reports.primary: each with its unit, n and
the smallest |r| it detects at 80% power; only unflagged significant tests headline), what changed for every model
(reports.changes), then the rest:
- the best merge per view (behaviour, internals): highest mean normalized score over its task comparisons
  (MergeBench: merged score / the expert parent's score, 1 = expert level), with its relation counts; gap closed
  is summarised by its median, since parents that score alike make its denominator tiny and its mean explode;
- how many merge-vs-parent comparisons the data resolves (the merge above or below both parents, beyond noise);
- the strongest exploratory correlations surviving Benjamini–Hochberg FDR (q < 0.05) within their own families,
  and what did not.
"""

from __future__ import annotations

import polars as pl

from reports.changes import BANDS
from reports.power import min_detectable_r
from reports.primary import ANALYSES

SIGNIFICANT = 0.05
TOP_CORRELATIONS = 10
KIND_LABELS = {"behavior": "behaviour", "internals": "internals"}
RELATIONS = ("better", "between", "worse", "unresolved")


def _task_rows(outcomes: pl.DataFrame) -> pl.DataFrame:
    return outcomes.filter(pl.col("level") == "task") if "level" in outcomes.columns else outcomes


def _finite(column: str) -> pl.Expr:
    return pl.col(column).filter(pl.col(column).is_finite())


def merge_ranking(outcomes: pl.DataFrame) -> dict[str, list[dict]]:
    """Per kind: merges ranked by mean normalized score (then mean merge gain), with the median gap closed and
    their relation counts."""
    rows = _task_rows(outcomes)
    ranked = rows.group_by("kind", "model", "method").agg(
        _finite("normalized").mean(), _finite("gap_closed").median(), _finite("merge_gain").mean(),
        pl.len().alias("comparisons"),
        *[(pl.col("relation") == r).sum().alias(r) for r in RELATIONS],
    ).sort("kind", "normalized", "merge_gain", "model", descending=[False, True, True, False], nulls_last=True)
    return {kind: ranked.filter(pl.col("kind") == kind).to_dicts() for kind in _kinds(ranked)}


def _kinds(frame: pl.DataFrame) -> list[str]:
    present = set(frame["kind"])
    return [k for k in KIND_LABELS if k in present] + sorted(present - set(KIND_LABELS))


def _parent_resolved(side: str) -> pl.Expr:
    """A merge-vs-one-parent paired test whose 95% CI of the difference excludes 0."""
    low, high = pl.col(f"diff_{side}_low"), pl.col(f"diff_{side}_high")
    return ((low > 0) | (high < 0)).fill_null(False)


def resolved_comparisons(outcomes: pl.DataFrame) -> list[dict]:
    """Per kind: task comparisons in total, resolved (better or worse than both parents, or between
    them by the tests), unresolved (the tests cannot tell the merge from a parent), undecided (a score missing);
    and, where paired tests ran, the merge-vs-one-parent tests and how many of them resolve a difference."""
    rows = _task_rows(outcomes)
    paired = "diff_expert_low" in rows.columns
    tests = [(pl.col("relation_test") == "paired_bootstrap").sum().mul(2).alias("parent_tests"),
             (_parent_resolved("expert") & (pl.col("relation_test") == "paired_bootstrap")).sum().add(
                 (_parent_resolved("aux") & (pl.col("relation_test") == "paired_bootstrap")).sum())
             .alias("parent_resolved")] if paired and "relation_test" in rows.columns else []
    counts = rows.group_by("kind").agg(
        pl.len().alias("total"), pl.col("relation").is_in(["better", "worse", "between"]).sum().alias("resolved"),
        (pl.col("relation") == "better").sum().alias("better"), (pl.col("relation") == "worse").sum().alias("worse"),
        (pl.col("relation") == "between").sum().alias("between"),
        (pl.col("relation") == "unresolved").sum().alias("unresolved"),
        pl.col("relation").is_null().sum().alias("undecided"),
        *tests)
    order = {k: i for i, k in enumerate(_kinds(counts))}
    return sorted(counts.to_dicts(), key=lambda r: order[r["kind"]])


def _significant() -> pl.Expr:
    """q < 0.05 with a defined r; a null or NaN q is never significant."""
    return (pl.col("r").is_finite() & pl.col("q").is_finite() & (pl.col("q") < SIGNIFICANT)).fill_null(False)


def _analysis(correlations: pl.DataFrame, kind: str) -> pl.DataFrame:
    """The tests of one kind of analysis (a table without the column predates primary analyses: all exploratory)."""
    if "analysis" not in correlations.columns:
        return correlations if kind == "exploratory" else correlations.clear()
    return correlations.filter(pl.col("analysis") == kind)


def significant_correlations(correlations: pl.DataFrame, limit: int = TOP_CORRELATIONS) -> list[dict]:
    """The strongest |r| among exploratory tests with q < 0.05 (NaN q never counts as significant)."""
    found = _analysis(correlations, "exploratory").filter(_significant())
    return found.sort(pl.col("r").abs(), descending=True).head(limit).to_dicts()


def _headline() -> pl.Expr:
    """Significant, and none of the flags that make an r unfit to lead (|r| = 1, ties, one unit deciding)."""
    return _significant() & pl.col("flags").is_null()


def headline_correlations(correlations: pl.DataFrame, limit: int = TOP_CORRELATIONS) -> list[dict]:
    """What may lead a summary: the strongest significant, unflagged tests of the primary analyses."""
    if "analysis" not in correlations.columns:
        return []
    found = _analysis(correlations, "primary").filter(_headline())
    return found.sort(pl.col("r").abs(), descending=True).head(limit).to_dicts()


def primary_summary(correlations: pl.DataFrame, limit: int = TOP_CORRELATIONS) -> list[dict]:
    """Per declared primary analysis: its question, unit and test; how many tests it ran and over how many units;
    the smallest |r| detectable at 80% power at its largest effective n; what is significant (headline: no
    flags), and why tests reported no r."""
    if "analysis" not in correlations.columns:
        return []
    primary = _analysis(correlations, "primary")
    found = []
    for analysis in ANALYSES:
        rows = primary.filter(pl.col("family").str.starts_with(analysis.family + "|"))
        defined = rows.filter(pl.col("r").is_finite().fill_null(False))
        effective = defined["n_effective"].max() if defined.height else None
        found.append({
            "name": analysis.name, "question": analysis.question, "unit": analysis.unit, "test": analysis.test,
            "tests": rows.height, "defined": defined.height,
            "n_min": rows["n"].min() if rows.height else None, "n_max": rows["n"].max() if rows.height else None,
            "n_effective": effective, "detectable": min_detectable_r(effective),
            "significant": defined.filter(_significant()).height,
            "headline": defined.filter(_headline()).sort(pl.col("r").abs(), descending=True).head(limit).to_dicts(),
            "flagged": defined.filter(_significant() & pl.col("flags").is_not_null()).sort(
                pl.col("r").abs(), descending=True).head(limit).to_dicts(),
            "reasons": rows.filter(~pl.col("r").is_finite().fill_null(False))["reason"].drop_nulls().unique()
            .sort().head(3).to_list()})
    return found


def what_changed(changes: pl.DataFrame) -> list[dict]:
    """Per model (and reference): its significant differences (q < 0.05 over the model's tests), phenomena first,
    each inside test with the bands where it shows; and how many tests it had."""
    band_rank = {b: i for i, b in enumerate(BANDS)}
    found = []
    for (model, reference, comparison), rows in changes.group_by("model", "reference", "comparison",
                                                                 maintain_order=True):
        hits = rows.filter(pl.col("significant").fill_null(False)).with_columns(
            pl.col("band").replace_strict(band_rank, default=-1, return_dtype=pl.Int64).alias("rank"))
        grouped = hits.sort("rank").group_by("side", "level", "task", maintain_order=True).agg(
            pl.col("band").drop_nulls(), pl.col("layers").drop_nulls(), pl.col("diff").first(),
            pl.col("ci_low").first(), pl.col("ci_high").first(), pl.col("q").first(), pl.col("n_items").first())
        ordered = grouped.sort(pl.col("level") != "phenomenon", "side", pl.col("diff").abs(),
                               descending=[False, False, True])
        found.append({"model": model, "reference": reference, "comparison": comparison, "tests": rows.height,
                      "differences": ordered.to_dicts(),
                      "phenomena": sorted(set(hits.filter(pl.col("level") == "phenomenon")["task"]))})
    order = {"base": 0, "parent": 1}
    return sorted(found, key=lambda r: (order.get(r["comparison"], 2), r["model"], r["reference"]))


def correlation_tally(correlations: pl.DataFrame) -> list[dict]:
    """Per exploratory family: tests run, significant (q < 0.05), not significant, undefined (NaN r) and why."""
    frame = _analysis(correlations, "exploratory")
    if "family" not in frame.columns:
        frame = frame.with_columns(pl.col("method").alias("family"))
    reason = pl.col("reason") if "reason" in frame.columns else pl.lit(None, pl.String)
    defined = pl.col("r").is_finite().fill_null(False)
    significant = _significant()
    return frame.with_columns(reason.alias("reason")).group_by("family").agg(
        pl.len().alias("tests"), significant.sum().alias("significant"),
        (defined & ~significant).sum().alias("not_significant"), (~defined).sum().alias("undefined"),
        pl.col("reason").filter(~defined).drop_nulls().unique().sort().head(3).alias("reasons"),
    ).sort("family").to_dicts()
