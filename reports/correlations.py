"""The correlation stage: does internal competence track behaviour, and do selector features predict merge outcomes?

`correlations(tables)` is a pure function over the run's tables (behavior, probes, similarity, outcomes) that
returns the rows of correlations.parquet. Two analyses, each a set of (x, y) variable pairs over units:

- competence × behaviour, across models (units: every model of the run). x = probe competence (headline metric:
  macro-F1, Pearson for regression; mean over seeds) per task and per phenomenon (the mean of its tasks' layer
  curves), at four views: `best_layer` (each model's own best layer, picked on the test split as `merge-eval
  probes` shows it: optimistic), `last_layer` (the seed paper's view),
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
alternative analyses of the same one, so none is pooled). Units missing either value are dropped pairwise.
n < 3 or a constant x or y gives NaN with the reason, checked before scipy sees the data (no warnings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import polars as pl
from scipy import stats

from evaluation.outcomes import metric_key
from evaluation import paired
from evaluation.paired import bootstrap_counts
from reports.cache import cache_key, cached_outputs, code_version, content_digest
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
_CHUNK_BYTES = 128 << 20  # working set of one chunk of tests' bootstrap arrays (~4 of [tests, resamples, n])


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
    """Global and per-layer similarity rows with their view, named `source:feature` when sources are recorded,
    plus `:stat` for summary rows (functional features summarised over layers/tokens: mean, median, q25...)."""
    scope = pl.col("scope") if "scope" in similarity.columns else pl.when(pl.col("layer").is_null()).then(
        pl.lit("global")).otherwise(pl.lit("layer"))
    name = pl.concat_str("source", "feature", separator=":") if "source" in similarity.columns else pl.col("feature")
    if "stat" in similarity.columns:
        name = pl.when(pl.col("stat").is_null()).then(name).otherwise(pl.concat_str(name, "stat", separator=":"))
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
    """Features of the model pair (merges[first], merges[second]) in either stored order, keyed by the merge.
    Ordered features (KL) are stored in both orders: the (second, first) direction is named `x:reverse`."""
    forward, backward = (merges.join(features, left_on=[a, b], right_on=["model_a", "model_b"])
                         for a, b in ((first, second), (second, first)))
    keys = ["model", "x", "view", "layer"]
    ordered = backward.join(forward.select(keys), on=keys, how="semi", nulls_equal=True)
    backward = pl.concat([backward.join(ordered.select(keys), on=keys, how="anti", nulls_equal=True),
                          ordered.with_columns(pl.concat_str("x", pl.lit("reverse"), separator=":"))])
    return pl.concat([forward, backward]).select(pl.col("model").alias("unit"), "x", "view", "layer", "value",
                                                 pl.lit(kind).alias("x_kind"))


# ---------------------------------------------------------------------------------------------------- statistics

def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] multiplicities of each unit in paired bootstrap resamples, drawn exactly as
    scipy.stats.bootstrap(paired=True, rng=np.random.default_rng(seed)) draws its resampled indices."""
    return bootstrap_counts(n, resamples, np.random.default_rng(seed))


def _signs(values: np.ndarray) -> np.ndarray:
    """[T, n, n] sign(v_i - v_j) for each row of [T, n]."""
    return np.sign(values[:, :, None] - values[:, None, :])


class _Side:
    """What the resamples need of one side's distinct rows alone ([U, n], none constant), given the resamples'
    unit multiplicities `counts` [B, n] (moments of the z-scored rows, centred average ranks, untied pairs)."""

    def __init__(self, values: np.ndarray, counts: np.ndarray):
        n = values.shape[1]
        self.upper = np.triu_indices(n, 1)
        self.pair_counts = (counts[:, self.upper[0]] * counts[:, self.upper[1]]).T  # [pairs, B]
        self.rows, self.index = np.unique(values, axis=0, return_inverse=True)
        self.index = self.index.ravel()
        signs = _signs(self.rows)
        self.signs = signs[:, self.upper[0], self.upper[1]]  # [U, pairs]
        self.untied = np.abs(self.signs) @ self.pair_counts  # resample position pairs with differing values
        centred = self.rows - self.rows.mean(-1, keepdims=True)
        self.z = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True))  # z-scores: little cancellation below
        self.mean = self.z @ counts.T / n
        self.var = (self.z * self.z) @ counts.T / n - self.mean ** 2
        # average rank within a resample: rank_i = #{below} + (#{tied} + 1) / 2, weighted mean (n + 1) / 2;
        # signs[u, j, i] = sign(v_j - v_i) < 0 where unit j is below unit i
        self.ranks = counts @ ((signs < 0) + (signs == 0) / 2) + 0.5 - (n + 1) / 2  # [U, B, n]
        self.rank_var = np.einsum("bi,ubi,ubi->ub", counts, self.ranks, self.ranks) / n


def bootstrap_r(x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each method's r on every resample ([T, B]) of every test (rows of x, y [T, n], neither constant), with
    resamples given as unit multiplicities `counts` [B, n]; NaN where a resample's x or y is constant.

    Hand-written instead of scipy.stats.bootstrap's per-test statistic calls: with multiplicities every statistic
    is a few matrix products, shared by the tests of one x (or y) row, so the tens of thousands of tests of a run
    take seconds, not the minutes of calling scipy per test (whose quantiles also turn NaN as soon as one resample
    is degenerate). tests/test_correlations.py checks equality with scipy.stats.bootstrap and with scipy.stats on
    explicitly resampled data. Sums over a resample's position pairs are quadratic forms in the multiplicities
    (copies of one unit are tied pairs), taken over the unit pairs i < j.
    """
    n = x.shape[1]
    sx, sy = _Side(x, counts), _Side(y, counts)
    ix, iy = sx.index, sy.index
    defined = (sx.untied[ix] > 0) & (sy.untied[iy] > 0)
    found = {}
    with np.errstate(invalid="ignore", divide="ignore"):  # degenerate resamples, set to NaN below
        # Kendall tau-b: concordant minus discordant pairs over sqrt of the pairs untied in x and in y
        found["kendall"] = (sx.signs[ix] * sy.signs[iy]) @ sx.pair_counts / np.sqrt(sx.untied[ix] * sy.untied[iy])
        cov = (sx.z[ix] * sy.z[iy]) @ counts.T / n - sx.mean[ix] * sy.mean[iy]
        found["pearson"] = cov / np.sqrt(sx.var[ix] * sy.var[iy])
        cross = np.einsum("bi,tbi,tbi->tb", counts, sx.ranks[ix], sy.ranks[iy]) / n
        found["spearman"] = cross / np.sqrt(sx.rank_var[ix] * sy.rank_var[iy])
    return {method: np.where(defined, np.clip(r, -1, 1), np.nan) for method, r in found.items()}


def percentile_interval(boot: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Per row of [T, B], the percentile interval over the finite resamples (numpy's linear quantile, which
    scipy.stats.bootstrap uses too); NaN where none is finite. np.nanquantile gives the same, one row at a time."""
    ordered = np.sort(boot, -1)  # NaN last
    finite = np.isfinite(boot).sum(-1)
    last = np.maximum(finite - 1, 0)
    rows = np.arange(len(boot))
    bounds = []
    for level in ((1 - confidence) / 2, (1 + confidence) / 2):
        position = level * last
        below = np.floor(position).astype(int)
        low, high = ordered[rows, below], ordered[rows, np.minimum(below + 1, last)]
        bounds.append(np.where(finite > 0, low + (position - below) * (high - low), np.nan))
    return bounds[0], bounds[1]


def kendall(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy.stats.kendalltau (tau-b, method auto) for every row pair of [T, n], called once per distinct
    sufficient statistic: tau and its p depend only on n, concordant minus discordant pairs and, for x and for y,
    scipy's three tie sums over tie groups of size t (t(t-1)/2, t(t-1)(t-2), t(t-1)(2t+5)). Real tables repeat
    these a lot, so ~10^4 tests cost ~10^2 scipy calls of ~1 ms, not 10^4."""
    sx, sy = _signs(x), _signs(y)
    keys = [np.full(len(x), x.shape[1]), 0.5 * (sx * sy).sum((1, 2))]
    for s in (sx, sy):
        group = (s == 0).sum(-1).astype(float)  # each unit's tie-group size t; a group's sum = its units' sum / t
        keys += [((group - 1) / 2).sum(-1), ((group - 1) * (group - 2)).sum(-1),
                 ((group - 1) * (2 * group + 5)).sum(-1)]
    _, first, inverse = np.unique(np.rint(np.stack(keys, 1)).astype(np.int64), axis=0, return_index=True,
                                  return_inverse=True)
    found = [stats.kendalltau(x[i], y[i]) for i in first]
    r = np.array([f.statistic for f in found], dtype=float)
    p = np.array([f.pvalue for f in found], dtype=float)
    return r[inverse.ravel()], p[inverse.ravel()]


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


def undefined_reasons(x: np.ndarray, y: np.ndarray, units: str) -> list[str | None]:
    """Per row pair of [T, n]: why no correlation is defined (n < 3, a constant side), or None."""
    n = x.shape[1]
    if n < 3:
        return [f"n < 3 ({n} {units} with both values)"] * len(x)
    flat_x, flat_y = (np.all(v == v[:, :1], axis=1) for v in (x, y))
    names = {(True, False): "x", (False, True): "y", (True, True): "x and y"}
    return [f"{names[fx, fy]} constant over the {n} {units}" if fx or fy else None
            for fx, fy in zip(flat_x.tolist(), flat_y.tolist())]


def correlate_block(x: np.ndarray, y: np.ndarray, units: str, seed: int, resamples: int) -> pl.DataFrame:
    """Every method's n, r, CI, p and reason for tests over the same number of units (rows of x, y [T, n]),
    with the test's row index in `test`."""
    tests, n = x.shape
    reasons = undefined_reasons(x, y, units)
    ok = np.flatnonzero([reason is None for reason in reasons])
    found = {m: {k: np.full(tests, np.nan) for k in ("r", "p", "ci_low", "ci_high")} for m in METHODS}
    if len(ok):
        for method in METHODS:
            found[method]["r"][ok], found[method]["p"][ok] = point_estimates(method, x[ok], y[ok])
        counts = resample_counts(n, resamples, seed)
        size = max(1, _CHUNK_BYTES // (8 * 4 * resamples * n))  # ~4 arrays of [tests, resamples, n] per chunk
        ok = ok[np.argsort(np.unique(x[ok], axis=0, return_inverse=True)[1].ravel(), kind="stable")]
        for start in range(0, len(ok), size):  # tests of one x row together: a chunk holds few distinct x rows
            chosen = ok[start:start + size]
            for method, boot in bootstrap_r(x[chosen], y[chosen], counts).items():
                found[method]["ci_low"][chosen], found[method]["ci_high"][chosen] = percentile_interval(boot)
    return pl.concat([pl.DataFrame({"test": np.arange(tests), "method": method, "n": n, **found[method],
                                    "reason": reasons}, schema_overrides={"n": pl.Int64, "reason": pl.String})
                      for method in METHODS])


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


INPUT_TABLES = ("behavior", "probes", "similarity", "outcomes")


def correlate_run(tables_dir: Path, seed: int = 0, resamples: int = RESAMPLES, cache_dir: Path | None = None) -> Path:
    """Read the run's tables from `tables_dir`, write correlations.parquet beside them; with a `cache_dir`, only
    when the input tables' content, the settings or this code changed since it was last written."""
    inputs = [p for p in (Path(tables_dir) / f"{name}.parquet" for name in INPUT_TABLES) if p.is_file()]
    key = cache_key("correlations", code_version(__file__, paired.__file__), content_digest(inputs), seed, resamples)
    target = Path(tables_dir) / "correlations.parquet"

    def make() -> None:
        tables = {name: read_table(tables_dir, name) for name in INPUT_TABLES}
        write_table(tables_dir, "correlations", correlations(tables, seed, resamples))

    cached_outputs(cache_dir, "correlations", key, [target], make)
    return target
