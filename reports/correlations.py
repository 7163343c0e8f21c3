"""The correlation stage: does internal competence track behaviour, and do selector features predict merge outcomes?

`correlations(tables)` is a pure function over the run's tables (behavior, probes, similarity, outcomes) that
returns the rows of correlations.parquet. Two analyses, each a set of (x, y) variable pairs over units:

- competence × behaviour, across models (units: every model of the run). x = probe competence (headline metric:
  macro-F1, Pearson for regression; mean over seeds) per task and per phenomenon (the mean of its tasks' layer
  curves), at four views: `best_layer` (each model's own best layer), `last_layer` (the seed paper's view),
  `layer_mean` (the internals outcome score) and `per_layer` (`layer` set: where in depth competence tracks
  behaviour). y = behaviour per task and group, every metric.
- selector features × merge outcomes, across merges (units: merges). x = every similarity feature (each source) at
  global scope, and per decoder layer (`view` per_layer) where the table has layer rows, related to a merge as:
  `parent_pair` (the feature of its two parents, which varies only across parent pairs), `parent_group` (its
  group_* features: the mean over its parents' pairs), `merge_parent_a` / `merge_parent_b` (merge vs that parent),
  `merge_parents_mean` (their mean), `merge` (the merge's own per-model features). y = gap_closed, merge_gain and
  relation (better 1, between 0, worse -1) for behaviour and internals outcomes, per task and group; per-layer
  features against group-level outcomes only (one depth curve per feature and outcome group — at task level that
  family would hold ~10^5 tests over ~10 merges).

Each pair gets Pearson, Spearman and Kendall (tau-b) r and p exactly as scipy.stats computes them, a paired
percentile bootstrap 95% CI for r, and a Benjamini–Hochberg q (scipy.stats.false_discovery_control) within its
declared `family` = analysis|view|method (views of one analysis answer different questions; the three methods are
alternative analyses of the same one, so neither is pooled). Units missing either value are dropped pairwise.
n < 3 or a constant x or y gives NaN with the reason, checked before scipy sees the data (no warnings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import polars as pl
from scipy import stats

from evaluation.outcomes import metric_key
from reports.tables import read_table, write_table

METHODS = ("pearson", "spearman", "kendall")
RESAMPLES = 1000
CONFIDENCE = 0.95
HEADLINE_METRICS = ("macro_f1", "pearson")  # the probing stage's per-task score: classification, regression
OUTCOME_MEASURES = ("gap_closed", "merge_gain", "relation")
RELATION_CODE = {"better": 1.0, "between": 0.0, "worse": -1.0}
X_KEYS = ("x", "x_kind", "x_level", "view", "layer")
Y_KEYS = ("y", "y_kind", "y_level", "y_metric")
SCHEMA = {"family": pl.String, "x": pl.String, "x_kind": pl.String, "x_level": pl.String, "y": pl.String,
          "y_kind": pl.String, "y_level": pl.String, "y_metric": pl.String, "view": pl.String, "layer": pl.Int64,
          "method": pl.String, "n": pl.Int64, "r": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
          "p": pl.Float64, "q": pl.Float64, "reason": pl.String}
_CHUNK_BYTES = 32 << 20  # working set of one chunk of tests' bootstrap arrays


# ---------------------------------------------------------------------------------------------------- variables

def _variables(frame: pl.DataFrame, keys: tuple[str, ...], **constants) -> pl.DataFrame:
    """Long variable rows (unit, *keys, value), with missing key columns null and NaN values dropped."""
    frame = frame.with_columns(**{k: pl.lit(v) for k, v in constants.items()})
    columns = [pl.col(k) if k in frame.columns else pl.lit(None) for k in keys]
    types = {k: SCHEMA.get(k, pl.String) for k in keys}
    return (frame.select(pl.col("unit").cast(pl.String), *[c.cast(types[k]).alias(k) for c, k in zip(columns, keys)],
                         pl.col("value").cast(pl.Float64))
            .filter(pl.col("value").is_not_null() & pl.col("value").is_finite()))


def competence_variables(probes: pl.DataFrame) -> pl.DataFrame:
    """x rows (unit = model) of competence per task and per phenomenon at every view."""
    headline = probes.filter(pl.col("metric").is_in(HEADLINE_METRICS))
    tasks = headline.group_by("model", "task", "phenomenon", "layer").agg(pl.col("value").mean())
    curves = pl.concat([
        tasks.select("model", pl.col("task").alias("x"), pl.lit("task").alias("x_level"), "layer", "value"),
        tasks.group_by("model", "phenomenon", "layer").agg(pl.col("value").mean()).select(
            "model", pl.col("phenomenon").alias("x"), pl.lit("phenomenon").alias("x_level"), "layer", "value"),
    ]).sort("model", "x_level", "x", "layer")
    views = curves.group_by("model", "x", "x_level").agg(
        pl.col("value").max().alias("best_layer"), pl.col("value").last().alias("last_layer"),
        pl.col("value").mean().alias("layer_mean"))
    per_view = views.unpivot(["best_layer", "last_layer", "layer_mean"], index=["model", "x", "x_level"],
                             variable_name="view")
    both = pl.concat([per_view.with_columns(pl.lit(None, pl.Int64).alias("layer")),
                      curves.with_columns(pl.lit("per_layer").alias("view"))], how="diagonal_relaxed")
    return _variables(both.rename({"model": "unit"}), X_KEYS, x_kind="competence")


def behavior_variables(behavior: pl.DataFrame) -> pl.DataFrame:
    """y rows (unit = model) of behaviour per task and group, one per metric."""
    frame = behavior.with_columns(metric_key().alias("y_metric") if "filter" in behavior.columns
                                  else pl.col("metric").alias("y_metric"))
    level = pl.col("level") if "level" in frame.columns else pl.lit("task")
    return _variables(frame.select(pl.col("model").alias("unit"), pl.col("task").alias("y"), level.alias("y_level"),
                                   "y_metric", "value"), Y_KEYS, y_kind="behavior")


def outcome_variables(outcomes: pl.DataFrame) -> pl.DataFrame:
    """y rows (unit = merge) of each outcome measure, per kind, task/group and metric; relation coded -1/0/1."""
    relation = pl.col("relation").replace_strict(RELATION_CODE, default=None, return_dtype=pl.Float64)
    frame = outcomes.with_columns(relation.alias("relation"),
                                  *(pl.lit(None, pl.String).alias(c) for c in ("level", "metric")
                                    if c not in outcomes.columns))
    long = frame.unpivot(list(OUTCOME_MEASURES), index=["model", "kind", "task", "level", "metric"],
                         variable_name="measure")
    return _variables(long.select(
        pl.col("model").alias("unit"), pl.col("task").alias("y"), pl.concat_str("kind", "measure", separator="_")
        .alias("y_kind"), pl.col("level").alias("y_level"), pl.col("metric").alias("y_metric"), "value"), Y_KEYS)


def _feature_rows(similarity: pl.DataFrame) -> pl.DataFrame:
    """Global and per-layer similarity rows with their view, named `source:feature` when sources are recorded."""
    scope = pl.col("scope") if "scope" in similarity.columns else pl.when(pl.col("layer").is_null()).then(
        pl.lit("global")).otherwise(pl.lit("layer"))
    name = pl.concat_str("source", "feature", separator=":") if "source" in similarity.columns else pl.col("feature")
    return similarity.with_columns(scope.alias("scope"), name.alias("x")).filter(
        pl.col("scope").is_in(["global", "layer"])).select(
        "model_a", "model_b", "x", pl.when(pl.col("scope") == "layer").then(pl.lit("per_layer")).alias("view"),
        pl.when(pl.col("scope") == "layer").then(pl.col("layer")).cast(pl.Int64).alias("layer"), "value")


def selector_variables(similarity: pl.DataFrame, outcomes: pl.DataFrame) -> pl.DataFrame:
    """x rows (unit = merge) of every feature related to each merge (see the module docstring)."""
    features = _feature_rows(similarity)
    merges = outcomes.select("model", "parent_a", "parent_b").unique()
    own = merges.join(features.filter(pl.col("model_b").is_null()), left_on="model", right_on="model_a").select(
        pl.col("model").alias("unit"), "x", "view", "layer", "value",
        pl.when(pl.col("x").str.contains(r"(^|:)group_")).then(pl.lit("parent_group")).otherwise(pl.lit("merge"))
        .alias("x_kind"))
    to_parents = [_pairs(merges, features, "model", parent, f"merge_{parent}") for parent in ("parent_a", "parent_b")]
    mean = (pl.concat(to_parents).group_by("unit", "x", "view", "layer")
            .agg(pl.col("value").mean(), pl.len().alias("parents")).filter(pl.col("parents") == 2)
            .select("unit", "x", "view", "layer", "value", pl.lit("merge_parents_mean").alias("x_kind")))
    return _variables(pl.concat([_pairs(merges, features, "parent_a", "parent_b", "parent_pair"), own, *to_parents,
                                 mean], how="diagonal_relaxed"), X_KEYS)


def _pairs(merges: pl.DataFrame, features: pl.DataFrame, first: str, second: str, kind: str) -> pl.DataFrame:
    """Features of the model pair (merges[first], merges[second]) in either stored order, keyed by the merge."""
    found = [merges.join(features, left_on=[a, b], right_on=["model_a", "model_b"])
             for a, b in ((first, second), (second, first))]
    return pl.concat(found).select(pl.col("model").alias("unit"), "x", "view", "layer", "value",
                                   pl.lit(kind).alias("x_kind"))


# ---------------------------------------------------------------------------------------------------- statistics

def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] multiplicities of each unit in paired bootstrap resamples, drawn exactly as
    scipy.stats.bootstrap(paired=True, rng=np.random.default_rng(seed)) draws its resampled indices."""
    index = np.random.default_rng(seed).integers(0, n, (resamples, n))
    return np.stack([np.bincount(row, minlength=n) for row in index]).astype(np.float64)


def _signs(values: np.ndarray) -> np.ndarray:
    """[T, n, n] sign(v_i - v_j) for each row of [T, n]."""
    return np.sign(values[:, :, None] - values[:, None, :])


def _quadratic(counts: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """½ cᵀ M c for every resample c (rows of [B, n]) and matrix M ([T, n, n]) -> [T, B]: a sum over the pairs of
    a resample's positions, since a pair of copies of one unit has sign 0."""
    return 0.5 * ((counts @ matrix) * counts).sum(-1)


def _weighted_pearson(x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pearson r of each resample given by its unit multiplicities: x, y [T, B|1, n], counts [B, n] -> [T, B]."""
    w = counts / counts.sum(-1, keepdims=True)
    dx = x - (w * x).sum(-1, keepdims=True)
    dy = y - (w * y).sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # degenerate resamples are set to NaN by the caller
        return np.clip((w * dx * dy).sum(-1) / np.sqrt((w * dx * dx).sum(-1) * (w * dy * dy).sum(-1)), -1, 1)


def bootstrap_r(method: str, x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """r of every resample ([T, B]) of every test (rows of x, y [T, n]); NaN where a resample's x or y is constant.

    Hand-written instead of scipy.stats.bootstrap's statistic calls: resamples are given as multiplicities and
    every statistic is a matrix product over them, so tens of thousands of tests share one draw and take seconds
    (scipy would index a [T, B, n] copy per test block and rank it, and its quantiles turn NaN as soon as one
    resample is degenerate). tests/test_correlations.py checks equality with scipy.stats.bootstrap.
    """
    sx, sy = _signs(x), _signs(y)
    defined = (_quadratic(counts, np.abs(sx)) > 0) & (_quadratic(counts, np.abs(sy)) > 0)
    if method == "kendall":  # tau-b: concordant minus discordant over sqrt of the pairs untied in x and in y
        with np.errstate(invalid="ignore", divide="ignore"):
            r = _quadratic(counts, sx * sy) / np.sqrt(_quadratic(counts, np.abs(sx)) * _quadratic(counts, np.abs(sy)))
        r = np.clip(r, -1, 1)
    elif method == "spearman":  # Pearson of the average ranks within each resample: rank_i = #{below} + (#{tied}+1)/2
        ranks = [counts @ (s < 0) + (counts @ (s == 0) + 1) / 2 for s in (sx, sy)]
        r = _weighted_pearson(*ranks, counts)
    else:
        r = _weighted_pearson(x[:, None], y[:, None], counts)
    return np.where(defined, r, np.nan)


def _tie_sizes(row: np.ndarray) -> tuple[int, ...]:
    counts = np.unique(row, return_counts=True)[1]
    return tuple(sorted(int(c) for c in counts if c > 1))


def kendall(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy.stats.kendalltau (tau-b, method auto) for every row of [T, n], called once per distinct sufficient
    statistic: tau and its p depend only on n, concordant minus discordant pairs and the tie-group sizes of x and
    of y, and real tables repeat these a lot (so ~10^4 tests cost ~10^2 scipy calls, not 10^4 of ~1 ms each)."""
    balance = np.rint(0.5 * (_signs(x) * _signs(y)).sum((1, 2))).astype(int)
    memo: dict[tuple, tuple[float, float]] = {}
    r, p = np.empty(len(x)), np.empty(len(x))
    for t in range(len(x)):
        key = (x.shape[1], balance[t], _tie_sizes(x[t]), _tie_sizes(y[t]))
        if key not in memo:
            found = stats.kendalltau(x[t], y[t])
            memo[key] = (float(found.statistic), float(found.pvalue))
        r[t], p[t] = memo[key]
    return r, p


def point_estimates(method: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """r and p of every row pair of [T, n] (n >= 3, no constant row), as scipy.stats computes them.

    Spearman is scipy.stats.pearsonr on the average ranks (vectorised over rows; spearmanr is not): the same r by
    definition, and pearsonr's exact null of r is spearmanr's t-test on n - 2 degrees of freedom rewritten.
    """
    if method == "kendall":
        return kendall(x, y)
    if method == "spearman":
        x, y = stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1)
    found = stats.pearsonr(x, y, axis=-1)
    return np.asarray(found.statistic, dtype=float), np.asarray(found.pvalue, dtype=float)


def _undefined_reason(n: int, x: np.ndarray, y: np.ndarray, units: str) -> str | None:
    if n < 3:
        return f"n < 3 ({n} {units} with both values)"
    flat = [name for name, v in (("x", x), ("y", y)) if np.all(v == v[0])]
    return f"{' and '.join(flat)} constant over the {n} {units}" if flat else None


def _chunks(total: int, per_test_bytes: int) -> list[slice]:
    size = max(1, _CHUNK_BYTES // max(per_test_bytes, 1))
    return [slice(i, min(i + size, total)) for i in range(0, total, size)]


def correlate_block(x: np.ndarray, y: np.ndarray, units: str, seed: int, resamples: int) -> pl.DataFrame:
    """Every method's n, r, CI, p and reason for tests over the same number of units (rows of x, y [T, n]);
    rows in the order method-major, test-minor, with the test's row index in `test`."""
    tests, n = x.shape
    reasons = [_undefined_reason(n, xi, yi, units) for xi, yi in zip(x, y)]
    ok = np.flatnonzero([reason is None for reason in reasons])
    counts = resample_counts(n, resamples, seed) if len(ok) else None
    alpha = (1 - CONFIDENCE) / 2
    frames = []
    for method in METHODS:
        r, p, low, high = (np.full(tests, np.nan) for _ in range(4))
        if len(ok):
            r[ok], p[ok] = point_estimates(method, x[ok], y[ok])
            for part in _chunks(len(ok), 8 * 4 * resamples * n * (1 if method == "pearson" else n)):
                chosen = ok[part]
                boot = bootstrap_r(method, x[chosen], y[chosen], counts)
                some = np.isfinite(boot).any(-1)  # all-NaN only when every resample is degenerate
                if some.any():
                    low[chosen[some]], high[chosen[some]] = np.nanquantile(boot[some], [alpha, 1 - alpha], axis=-1)
        frames.append(pl.DataFrame({"test": np.arange(tests), "method": method, "n": n, "r": r, "ci_low": low,
                                    "ci_high": high, "p": p, "reason": reasons},
                                   schema_overrides={"n": pl.Int64, "reason": pl.String}))
    return pl.concat(frames)


# ---------------------------------------------------------------------------------------------------- the stage

def _correlate(xs: pl.DataFrame, ys: pl.DataFrame, analysis: str, units: str, seed: int,
               resamples: int) -> pl.DataFrame:
    """Every (x variable, y variable) pair's tests, over the units both have a value for."""
    pairs = xs.join(ys, on="unit", suffix="_y").sort("unit")
    tests = pairs.group_by(*X_KEYS, *Y_KEYS).agg(pl.col("value").alias("xv"), pl.col("value_y").alias("yv"),
                                                 pl.len().alias("size"))
    frames = []
    for (size,), block in tests.partition_by("size", as_dict=True).items():
        x = block["xv"].list.to_array(size).to_numpy().reshape(-1, size)
        y = block["yv"].list.to_array(size).to_numpy().reshape(-1, size)
        found = correlate_block(x, y, units, seed, resamples).with_columns(pl.col("test").cast(pl.UInt32))
        frames.append(block.drop("xv", "yv", "size").with_row_index("test").join(found, on="test").drop("test"))
    if not frames:
        return pl.DataFrame(schema=SCHEMA)
    family = pl.concat_str(pl.lit(analysis), pl.col("view").fill_null("global"), "method", separator="|")
    return pl.concat(frames).with_columns(family.alias("family"), pl.lit(None, pl.Float64).alias("q"))


def with_q(frame: pl.DataFrame) -> pl.DataFrame:
    """Benjamini–Hochberg q within each family, over its tests with a p-value (NaN p gives NaN q)."""
    parts = []
    for block in frame.partition_by("family"):
        p = block["p"].to_numpy()
        q = np.full(len(p), np.nan)
        tested = np.isfinite(p)
        if tested.any():
            q[tested] = stats.false_discovery_control(p[tested], method="bh")
        parts.append(block.with_columns(pl.Series("q", q)))
    return pl.concat(parts) if parts else frame


def correlations(tables: Mapping[str, pl.DataFrame | None], seed: int = 0,
                 resamples: int = RESAMPLES) -> pl.DataFrame:
    """correlations.parquet rows from the run's tables (any of behavior, probes, similarity, outcomes may be
    missing: its analysis is then skipped)."""
    frames = []
    if tables.get("probes") is not None and tables.get("behavior") is not None:
        frames.append(_correlate(competence_variables(tables["probes"]), behavior_variables(tables["behavior"]),
                                 "competence~behavior", "models", seed, resamples))
    if tables.get("similarity") is not None and tables.get("outcomes") is not None:
        xs = selector_variables(tables["similarity"], tables["outcomes"])
        ys = outcome_variables(tables["outcomes"])
        frames.append(_correlate(xs.filter(pl.col("view").is_null()), ys, "selector~outcome", "merges", seed,
                                 resamples))
        frames.append(_correlate(xs.filter(pl.col("view") == "per_layer"), ys.filter(pl.col("y_level") == "group"),
                                 "selector~outcome", "merges", seed, resamples))
    frame = pl.concat([f.select(*SCHEMA) for f in frames]) if frames else pl.DataFrame(schema=SCHEMA)
    return with_q(frame.cast(SCHEMA)).sort("family", "x_kind", "x", "y_kind", "y", "y_metric", "view", "layer",
                                           "method", nulls_last=True)


def correlate_run(tables_dir: Path, seed: int = 0, resamples: int = RESAMPLES) -> Path:
    """Read the run's tables from `tables_dir`, write correlations.parquet beside them."""
    tables = {name: read_table(tables_dir, name) for name in ("behavior", "probes", "similarity", "outcomes")}
    return write_table(tables_dir, "correlations", correlations(tables, seed, resamples))
