"""Paired merge-vs-parent tests on the items both models answered: what decides better/between/worse.

Every model of a run sees the same items, so a merge and its parent are compared item by item (a paired
bootstrap over items) instead of by overlapping one-stderr bands of two unpaired scores: the items' shared
difficulty cancels out, and differences far smaller than either score's stderr are resolved.

For one (merge, parent, key) the difference d = score(merge) - score(parent) (oriented so that positive = merge
better) is recomputed on `RESAMPLES` resamples of the common items (the same resample for both models: that is
the pairing). The 95% CI is the percentile interval of the resampled d; the two-sided p is
2 (1 + #{d* on the far side of 0}) / (RESAMPLES + 1), capped at 1 (Davison & Hinkley's add-one bootstrap p: never
0 from a finite number of resamples). A score that is a mean over several tasks (a phenomenon) resamples each
task's items separately (stratified) and averages the task differences, as the score averages the tasks.

Two scores have items:
- behaviour (`behavior_paired_tests`): the mean of per-item values (lm-eval's per-sample metric; a group whose
  value is the mean over its tasks' items, lm-eval's weight_by_size, pools them);
- internals (`probing.paired.probe_paired_tests`, built on `paired_bootstrap`): per task, macro-F1 of the probe's
  test predictions (Pearson for regression) at every layer, averaged over layers; per phenomenon, the mean over
  its tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import polars as pl

if TYPE_CHECKING:  # the class only: importing merging.merge costs seconds (torch) that reports need not pay
    from merging.merge import MergeLineage

RESAMPLES = 1000
CONFIDENCE = 0.95
PAIRED_SCHEMA = {"diff": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "p": pl.Float64,
                 "n_items": pl.Int64}

Difference = Callable[[np.ndarray], np.ndarray]  # item multiplicities [B, n] -> merge minus parent score [B]


def bootstrap_counts(size: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, size] multiplicities of each item in bootstrap resamples, from the resampled indices drawn as
    scipy.stats.bootstrap draws them (rng.integers(0, size, (resamples, size)))."""
    index = rng.integers(0, size, (resamples, size)) + size * np.arange(resamples)[:, None]
    return np.bincount(index.ravel(), minlength=resamples * size).reshape(resamples, size).astype(np.float64)


def stratified_counts(sizes: Sequence[int], resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per stratum, [resamples, size] multiplicities of its items in bootstrap resamples drawn within it."""
    return [bootstrap_counts(size, resamples, rng) for size in sizes]


def paired_bootstrap(differences: Sequence[Difference], sizes: Sequence[int], seed: int = 0,
                     resamples: int = RESAMPLES) -> dict[str, float]:
    """diff, ci_low, ci_high, p of the mean over strata of each stratum's paired difference."""
    counts = stratified_counts(sizes, resamples, np.random.default_rng(seed))
    observed = np.mean([float(f(np.ones((1, n)))[0]) for f, n in zip(differences, sizes)])
    boot = np.mean([f(c) for f, c in zip(differences, counts)], axis=0)
    return bootstrap_summary(float(observed), boot, int(sum(sizes)))


def bootstrap_summary(observed: float, boot: np.ndarray, n_items: int) -> dict[str, float]:
    """diff, percentile CI, add-one two-sided p and n_items of an observed difference and its resampled values."""
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    far = min(int((boot <= 0).sum()), int((boot >= 0).sum()))
    return {"diff": float(observed), "ci_low": float(low), "ci_high": float(high),
            "p": min(1.0, 2 * (1 + far) / (len(boot) + 1)), "n_items": n_items}


def comparisons(lineages: Sequence[MergeLineage]) -> list[tuple[str, str]]:
    return [(m.model, parent) for m in lineages for parent in dict.fromkeys(m.parents)]


def paired_frame(rows: list[dict], keys: dict[str, pl.DataType]) -> pl.DataFrame:
    schema = {"model": pl.String, "parent": pl.String, **keys, **PAIRED_SCHEMA}
    return pl.DataFrame(rows, schema=schema)


def mean_difference(merge: np.ndarray, parent: np.ndarray) -> Difference:
    delta = merge - parent
    return lambda counts: counts @ delta / counts.sum(-1)


def behavior_paired_tests(items: pl.DataFrame, lineages: Sequence[MergeLineage], seed: int = 0,
                          resamples: int = RESAMPLES) -> pl.DataFrame:
    """Paired tests of every merge against each parent on per-item scores whose mean is the score.

    `items`: model, task, level, metric, item (str), value, higher_is_better — evaluation.behavior.outcome_items.
    """
    keys = ["task", "level", "metric"]
    oriented = items.with_columns(
        pl.when(pl.col("higher_is_better")).then(pl.col("value")).otherwise(-pl.col("value")).alias("value"))
    by_model = oriented.partition_by("model", as_dict=True)
    rows = []
    for merge, parent in comparisons(lineages):
        if (merge,) not in by_model or (parent,) not in by_model:
            continue
        both = by_model[(merge,)].join(by_model[(parent,)], on=[*keys, "item"], suffix="_parent").filter(
            pl.col("value").is_not_null() & pl.col("value_parent").is_not_null()).sort("item")
        for key, block in both.partition_by(keys, as_dict=True).items():
            found = paired_bootstrap([mean_difference(block["value"].to_numpy(), block["value_parent"].to_numpy())],
                                     [block.height], seed, resamples)
            rows.append({"model": merge, "parent": parent, **dict(zip(keys, key)), **found})
    return paired_frame(rows, {"task": pl.String, "level": pl.String, "metric": pl.String})
