"""The report's findings summary: what a researcher wants first, computed from the tables (pure functions).

- the best merge per view (behaviour, internals): highest mean normalized score over its task comparisons
  (MergeBench: merged score / the expert parent's score, 1 = expert level), with its relation counts; gap closed
  is summarised by its median, since parents that score alike make its denominator tiny and its mean explode;
- how many merge-vs-parent comparisons the data resolves (the merge above or below both parents, beyond noise);
- the strongest correlations surviving Benjamini–Hochberg FDR (q < 0.05), and what did not.
"""

from __future__ import annotations

import polars as pl

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
    ).sort("kind", "normalized", "merge_gain", descending=[False, True, True], nulls_last=True)
    return {kind: ranked.filter(pl.col("kind") == kind).to_dicts() for kind in _kinds(ranked)}


def _kinds(frame: pl.DataFrame) -> list[str]:
    present = set(frame["kind"])
    return [k for k in KIND_LABELS if k in present] + sorted(present - set(KIND_LABELS))


def _parent_resolved(side: str) -> pl.Expr:
    """A merge-vs-one-parent paired test whose 95% CI of the difference excludes 0."""
    low, high = pl.col(f"diff_{side}_low"), pl.col(f"diff_{side}_high")
    return ((low > 0) | (high < 0)).fill_null(False)


def resolved_comparisons(outcomes: pl.DataFrame) -> list[dict]:
    """Per kind: task comparisons in total, resolved (better or worse than both parents), between (placed between
    them by the tests), unresolved (the tests cannot tell the merge from a parent), undecided (a score missing);
    and, where paired tests ran, the merge-vs-one-parent tests and how many of them resolve a difference."""
    rows = _task_rows(outcomes)
    paired = "diff_expert_low" in rows.columns
    tests = [(pl.col("relation_test") == "paired_bootstrap").sum().mul(2).alias("parent_tests"),
             (_parent_resolved("expert") & (pl.col("relation_test") == "paired_bootstrap")).sum().add(
                 (_parent_resolved("aux") & (pl.col("relation_test") == "paired_bootstrap")).sum())
             .alias("parent_resolved")] if paired and "relation_test" in rows.columns else []
    counts = rows.group_by("kind").agg(
        pl.len().alias("total"), pl.col("relation").is_in(["better", "worse"]).sum().alias("resolved"),
        (pl.col("relation") == "better").sum().alias("better"), (pl.col("relation") == "worse").sum().alias("worse"),
        (pl.col("relation") == "between").sum().alias("between"),
        (pl.col("relation") == "unresolved").sum().alias("unresolved"), pl.col("relation").is_null().sum().alias("undecided"),
        *tests)
    order = {k: i for i, k in enumerate(_kinds(counts))}
    return sorted(counts.to_dicts(), key=lambda r: order[r["kind"]])


def _significant() -> pl.Expr:
    """q < 0.05 with a defined r; a null or NaN q is never significant."""
    return (pl.col("r").is_finite() & pl.col("q").is_finite() & (pl.col("q") < SIGNIFICANT)).fill_null(False)


def significant_correlations(correlations: pl.DataFrame, limit: int = TOP_CORRELATIONS) -> list[dict]:
    """The strongest |r| among tests with q < 0.05 (NaN q never counts as significant)."""
    found = correlations.filter(_significant())
    return found.sort(pl.col("r").abs(), descending=True).head(limit).to_dicts()


def correlation_tally(correlations: pl.DataFrame) -> list[dict]:
    """Per family: tests run, significant (q < 0.05), not significant, undefined (NaN r) and why."""
    frame = correlations
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
