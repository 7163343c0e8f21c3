"""The correlation stage: does internal competence track behaviour, and do selector features predict merge outcomes?

`correlations(tables)` is a pure function over the run's tables (behavior, probes, similarity, outcomes) that
returns the rows of correlations.parquet. Two analyses, each a set of (x, y) variable pairs over units:

- competence × behaviour, across models (units: every model of the run). x = probe competence (headline metric:
  macro-F1, Pearson for regression; mean over seeds) per task and per phenomenon (the mean of its tasks' layer
  curves), at four views: `best_layer` (each model's own best layer, chosen on the probes' dev scores and scored
  on test; left out for probes without dev scores), `last_layer` (the seed paper's view),
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

Each pair gets Pearson, Spearman and Kendall (tau-b) r exactly as scipy.stats computes them, a permutation p-value
(below), a paired percentile bootstrap 95% CI for r, and a Benjamini–Hochberg q (scipy.stats.false_discovery_control)
within its declared `family` = analysis|view|method (views of one analysis answer different questions; the three
methods are alternative analyses of the same one, so none is pooled). Units missing either value are dropped
pairwise. n < 3 or a constant x or y gives NaN with the reason, checked before scipy sees the data (no warnings).

These are the exploratory sweep (`analysis` = exploratory); reports.primary declares the primary analyses, run
through the same statistics in families of their own. Every test records its effective n (`n_effective`: the
distinct x values over its units) and the smallest |r| it detects at 80% power there (`min_detectable_r`); below
`reports.power.MIN_DISTINCT` distinct x values it reports a reason instead of r ("x takes 2 values over 10
merges: parent-pair feature"). `flags` marks what must never headline: |r| = 1, ties in x or y, one unit deciding.

Why permutation p-values: a run has 5–15 units, and behaviour metrics saturate (8 of 9 models at 1.0), so the
asymptotic and normal-theory p-values scipy reports are wrong exactly where they matter (r = ±1 at n = 5 gives p = 0).
Permuting the pairing of x and y is exact under exchangeability whatever n and the ties: all n! pairings where
n! <= `permutations` (p is then >= 1/n!·(ties), so five merges can never give p < 1/120), else that many random
pairings with the (b+1)/(B+1) correction — scipy.stats.permutation_test's definitions with |r| as the statistic.
Tests where one side is equal for all units but one get a `note`: one unit decides their r.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Mapping

import numpy as np
import polars as pl
from scipy import stats

from evaluation import paired
from evaluation.outcomes import metric_key
from evaluation.paired import bootstrap_counts
from reports.power import MIN_DISTINCT, min_detectable_r, too_few_values
from runstore.cache import cache_key, cached_outputs, code_version, content_digest
from runstore.tables import read_table, write_table

METHODS = ("pearson", "spearman", "kendall")
RESAMPLES = 1000
PERMUTATIONS = 9999
CONFIDENCE = 0.95
HEADLINE_METRICS = ("macro_f1", "pearson")  # the probing stage's per-task score: classification, regression
OUTCOME_MEASURES = ("gap_closed", "merge_gain", "relation")
RELATION_CODE = {"better": 1.0, "between": 0.0, "worse": -1.0}
X_KEYS = ("x", "x_kind", "x_level", "view", "layer")
Y_KEYS = ("y", "y_kind", "y_level", "y_metric")
SCHEMA = {"family": pl.String, "analysis": pl.String, "unit": pl.String, "x": pl.String, "x_kind": pl.String,
          "x_level": pl.String, "y": pl.String, "y_kind": pl.String, "y_level": pl.String, "y_metric": pl.String,
          "view": pl.String, "layer": pl.Int64, "method": pl.String, "n": pl.Int64, "n_effective": pl.Int64,
          "min_detectable_r": pl.Float64, "r": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
          "p": pl.Float64, "p_test": pl.String, "q": pl.Float64, "reason": pl.String, "note": pl.String,
          "flags": pl.String}
EXPLORATORY = "exploratory"
_CHUNK_BYTES = 128 << 20  # working set of one chunk of tests' bootstrap arrays (~4 of [tests, resamples, n])
# statistics this close count as tied: scipy.stats.permutation_test's relative tolerance, plus an absolute one so
# that an r of 0 that rounding left at 1e-17 ties with the re-pairings that give exactly 0 (p = 1, as it should)
_RELATIVE_TIE, _ABSOLUTE_TIE = 100 * np.finfo(float).eps, 1e-12


# ---------------------------------------------------------------------------------------------------- variables

def variable_rows(frame: pl.DataFrame, keys: tuple[str, ...], **constants) -> pl.DataFrame:
    """Long variable rows (unit, *keys, value), with missing key columns null and NaN values dropped."""
    frame = frame.with_columns(**{k: pl.lit(v) for k, v in constants.items()})
    columns = [pl.col(k) if k in frame.columns else pl.lit(None) for k in keys]
    types = {k: SCHEMA.get(k, pl.String) for k in keys}
    return (frame.select(pl.col("unit").cast(pl.String), *[c.cast(types[k]).alias(k) for c, k in zip(columns, keys)],
                         pl.col("value").cast(pl.Float64))
            .filter(pl.col("value").is_not_null() & pl.col("value").is_finite()))


def competence_variables(probes: pl.DataFrame) -> pl.DataFrame:
    """x rows (unit = model) of competence per task and per phenomenon at every view."""
    curves = competence_curves(probes)
    dev = "dev" in curves.columns
    views = curves.group_by("model", "x", "x_level", maintain_order=True).agg(
        *([best_on_dev().alias("best_layer")] if dev else []), pl.col("value").last().alias("last_layer"),
        pl.col("value").mean().alias("layer_mean"))
    per_view = views.unpivot([c for c in ("best_layer", "last_layer", "layer_mean") if c in views.columns],
                             index=["model", "x", "x_level"], variable_name="view")
    both = pl.concat([per_view.with_columns(pl.lit(None, pl.Int64).alias("layer")),
                      curves.drop("dev", strict=False).with_columns(pl.lit("per_layer").alias("view"))],
                     how="diagonal_relaxed")
    return variable_rows(both.rename({"model": "unit"}), X_KEYS, x_kind="competence")


def competence_curves(probes: pl.DataFrame) -> pl.DataFrame:
    """Per (model, x = task or phenomenon, layer): the headline test score (mean over seeds; a phenomenon's is the
    mean of its tasks' curves) and, where probes recorded it (`dev_value`), the same on the dev split as `dev`."""
    headline = probes.filter(pl.col("metric").is_in(HEADLINE_METRICS))
    dev = "dev_value" in headline.columns and headline["dev_value"].is_not_null().any()
    means = [pl.col("value").mean(), *([pl.col("dev").mean()] if dev else [])]
    # groups in a fixed order (maintain_order): a mean summed in another order can break a tie between two models
    # by 1e-16 and move Spearman and Kendall r, so the same tables must always give the same sums
    tasks = (headline.with_columns(pl.col("dev_value").alias("dev")) if dev else headline).group_by(
        "model", "task", "phenomenon", "layer", maintain_order=True).agg(*means)
    kept = ["value", *(["dev"] if dev else [])]
    return pl.concat([
        tasks.select("model", pl.col("task").alias("x"), pl.lit("task").alias("x_level"), "layer", *kept),
        tasks.group_by("model", "phenomenon", "layer", maintain_order=True).agg(*means).select(
            "model", pl.col("phenomenon").alias("x"), pl.lit("phenomenon").alias("x_level"), "layer", *kept),
    ]).sort("model", "x_level", "x", "layer")


def best_on_dev() -> pl.Expr:
    """In a group of one curve's layers: the test score at the layer with the best dev score (the first on ties),
    so the layer is chosen on data the reported score does not come from."""
    return pl.col("value").get(pl.col("dev").fill_null(-np.inf).arg_max())


def behavior_variables(behavior: pl.DataFrame) -> pl.DataFrame:
    """y rows (unit = model) of behaviour per task and group, one per metric."""
    frame = behavior.with_columns(metric_key().alias("y_metric") if "filter" in behavior.columns
                                  else pl.col("metric").alias("y_metric"))
    level = pl.col("level") if "level" in frame.columns else pl.lit("task")
    return variable_rows(frame.select(pl.col("model").alias("unit"), pl.col("task").alias("y"), level.alias("y_level"),
                                   "y_metric", "value"), Y_KEYS, y_kind="behavior")


def outcome_variables(outcomes: pl.DataFrame) -> pl.DataFrame:
    """y rows (unit = merge) of each outcome measure, per kind, task/group and metric; relation coded -1/0/1."""
    relation = pl.col("relation").replace_strict(RELATION_CODE, default=None, return_dtype=pl.Float64)
    frame = outcomes.with_columns(relation.alias("relation"),
                                  *(pl.lit(None, pl.String).alias(c) for c in ("level", "metric")
                                    if c not in outcomes.columns))
    long = frame.unpivot(list(OUTCOME_MEASURES), index=["model", "kind", "task", "level", "metric"],
                         variable_name="measure")
    return variable_rows(long.select(
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
    return variable_rows(pl.concat([_pairs(merges, features, "parent_a", "parent_b", "parent_pair"), own, *to_parents,
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


def point_estimates(method: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """r of every row pair of [T, n] (n >= 3, no constant row): scipy.stats's pearsonr, spearmanr and kendalltau
    (tau-b) statistics, vectorised over rows (only pearsonr is), as the dot products of `_dot_terms`."""
    return (_dot_terms(method, x) * _dot_terms(method, y)).sum(-1)


def null_pairings(n: int, permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """[P, n] re-pairings of one side under the null, and whether they are all n! of them (an exact test) — as
    scipy.stats.permutation_test(permutation_type="pairings") decides."""
    if math.factorial(n) <= permutations:
        return np.array(list(itertools.permutations(range(n)))), True
    return np.random.default_rng(seed).permuted(np.tile(np.arange(n), (permutations, 1)), axis=1), False


def _dot_terms(method: str, values: np.ndarray) -> np.ndarray:
    """Per row of [T, n]: the unit vector whose dot product with the other side's is the method's r — z-scores
    (Pearson), z-scored average ranks (Spearman), or the signs of the pairs i < j over the root of the untied
    pairs (Kendall's tau-b: concordant minus discordant pairs over the root of the pairs untied in x times those
    untied in y). Re-pairing the units permutes a side's entries (its pairs, for Kendall) and keeps the norm."""
    if method == "kendall":
        upper = np.triu_indices(values.shape[1], 1)
        signs = _signs(values)[:, upper[0], upper[1]]
        return signs / np.sqrt(np.abs(signs).sum(-1, keepdims=True))
    if method == "spearman":
        values = stats.rankdata(values, axis=-1)
    centred = values - values.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).sum(-1, keepdims=True))


def permutation_p(method: str, x: np.ndarray, y: np.ndarray, permutations: int,
                  seed: int) -> tuple[np.ndarray, str]:
    """Two-sided permutation p of every row pair of [T, n] (n >= 3, no constant row), with |r| as the statistic,
    and how it was drawn.

    Hand-written instead of a scipy.stats.permutation_test call per test: the null of every test that shares one
    side's row is one matrix product against that row's re-pairings, so a run's ~10^5 tests take seconds.
    tests/test_correlations.py checks equality with scipy.stats.permutation_test. The side with fewer distinct rows
    is the one re-paired (the null of a pairing is the same either way).
    """
    if len(np.unique(x, axis=0)) < len(np.unique(y, axis=0)):
        x, y = y, x
    order, exact = null_pairings(x.shape[1], permutations, seed)
    fixed = _dot_terms(method, x)
    rows, index = np.unique(y, axis=0, return_inverse=True)
    index = index.ravel()
    row_terms = _dot_terms(method, rows)
    if method == "kendall":
        upper = np.triu_indices(x.shape[1], 1)
        pairs = order[:, upper[0]], order[:, upper[1]]
        # [P, pairs]: the re-paired pair signs, scaled as in the row's terms (each untied pair weighs the same)
        nulls = (np.sign(row[pairs[0]] - row[pairs[1]]) * np.abs(terms).max() for row, terms in zip(rows, row_terms))
    else:
        nulls = (terms[order] for terms in row_terms)  # [P, n]
    extreme = np.zeros(len(x))
    size = max(1, _CHUNK_BYTES // (8 * len(order)))
    for row, (terms, null) in enumerate(zip(row_terms, nulls)):
        tests = np.flatnonzero(index == row)
        for start in range(0, len(tests), size):
            chosen = tests[start:start + size]
            least = np.abs(fixed[chosen] @ terms) * (1 - _RELATIVE_TIE) - _ABSOLUTE_TIE  # as extreme as observed
            extreme[chosen] = (np.abs(fixed[chosen] @ null.T) >= least[:, None]).sum(-1)
    if exact:
        return extreme / len(order), f"permutation: all {len(order)} pairings"
    return (extreme + 1) / (len(order) + 1), f"permutation: {len(order)} random pairings"


def _flagged_sides(flag_x: np.ndarray, flag_y: np.ndarray, message: str) -> list[str | None]:
    """Per row pair: `message` after the flagged side(s) ("x", "y" or "x and y"), or None where neither is."""
    names = {(True, False): "x", (False, True): "y", (True, True): "x and y"}
    return [f"{names[a, b]} {message}" if a or b else None for a, b in zip(flag_x.tolist(), flag_y.tolist())]


def one_unit_notes(x: np.ndarray, y: np.ndarray, units: str) -> list[str | None]:
    """Per row pair of [T, n]: a note where x or y is equal for all units but one (one unit decides r)."""
    n = x.shape[1]
    lone_x, lone_y = ((v[:, :, None] == v[:, None, :]).sum(-1).max(-1) == n - 1 for v in (x, y))
    return _flagged_sides(lone_x, lone_y, f"equal for all {units} but one: one unit decides r")


def undefined_reasons(x: np.ndarray, y: np.ndarray, units: str) -> list[str | None]:
    """Per row pair of [T, n]: why no correlation is defined (n < 3, a constant side), or None."""
    n = x.shape[1]
    if n < 3:
        return [f"n < 3 ({n} {units} with both values)"] * len(x)
    flat_x, flat_y = (np.all(v == v[:, :1], axis=1) for v in (x, y))
    return _flagged_sides(flat_x, flat_y, f"constant over the {n} {units}")


PERFECT = 0.9995  # |r| at or above it prints as 1.000 (three decimals, the report's precision)


# Ties flag a test when more than this share of its units share their value with another unit: then groups of
# units, not units, decide r. One tied pair among 16 models (two minimal-pair accuracies of 0.735 at 200 pairs)
# does not; one among 5 merges, or a parent-pair feature's repeated values, does.
TIED_SHARE = 0.2


def distinct_and_tied(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of [T, n], from one sort: how many distinct values it takes, and how many units share their value
    with at least one other unit."""
    equal = np.diff(np.sort(values, -1), axis=-1) == 0
    no = np.zeros((len(values), 1), dtype=bool)
    tied = (np.concatenate([equal, no], -1) | np.concatenate([no, equal], -1)).sum(-1)
    return values.shape[-1] - equal.sum(-1), tied


def test_flags(r: np.ndarray, tied_x: np.ndarray, tied_y: np.ndarray, notes: list[str | None],
               n: int) -> list[str | None]:
    """Per test: why its r must not headline a report even where it is significant — |r| = 1 as printed (|r| >=
    `PERFECT`: a perfect fit over a handful of units says more about the units than the relation; -0.9996 reads
    as -1.000 in the report), ties in x or y (more than `TIED_SHARE` of the units tied: groups of units decide),
    one unit deciding r — joined by "; ", or None."""
    flags = []
    for value, tx, ty, note in zip(r, tied_x, tied_y, notes):
        found = [] if not np.isfinite(value) else [
            *(["|r| = 1"] if abs(value) >= PERFECT else []),
            *([f"x ties ({tx} of {n} units tied)"] if tx > TIED_SHARE * n else []),
            *([f"y ties ({ty} of {n} units tied)"] if ty > TIED_SHARE * n else []),
            *(["one unit decides"] if note else [])]
        flags.append("; ".join(found) or None)
    return flags


def correlate_block(x: np.ndarray, y: np.ndarray, units: str, seed: int, resamples: int,
                    permutations: int = PERMUTATIONS, methods: tuple[str, ...] = METHODS,
                    min_distinct: int = MIN_DISTINCT) -> pl.DataFrame:
    """Every method's n, effective n (distinct x values), the smallest |r| detectable at that n, r, CI, p (and how
    it was drawn), reason, note and flags for tests over the same number of units (rows of x, y [T, n]), with the
    test's row index in `test`. Below `min_distinct` distinct x values a test gets a reason, no r."""
    tests, n = x.shape
    (distinct_x, tied_x), (_, tied_y) = distinct_and_tied(x), distinct_and_tied(y)
    reasons = [reason or too_few_values(int(k), n, units, min_distinct)
               for reason, k in zip(undefined_reasons(x, y, units), distinct_x)]
    ok = np.flatnonzero([reason is None for reason in reasons])
    found = {m: {k: np.full(tests, np.nan) for k in ("r", "p", "ci_low", "ci_high")} for m in methods}
    drawn = {m: None for m in methods}
    notes = [None] * tests
    if len(ok):
        for index, note in zip(ok, one_unit_notes(x[ok], y[ok], units)):
            notes[index] = note
        for method in methods:
            found[method]["r"][ok] = point_estimates(method, x[ok], y[ok])
            found[method]["p"][ok], drawn[method] = permutation_p(method, x[ok], y[ok], permutations, seed)
        counts = resample_counts(n, resamples, seed)
        size = max(1, _CHUNK_BYTES // (8 * 4 * resamples * n))  # ~4 arrays of [tests, resamples, n] per chunk
        ok = ok[np.argsort(np.unique(x[ok], axis=0, return_inverse=True)[1].ravel(), kind="stable")]
        for start in range(0, len(ok), size):  # tests of one x row together: a chunk holds few distinct x rows
            chosen = ok[start:start + size]
            for method, boot in bootstrap_r(x[chosen], y[chosen], counts).items():
                if method not in found:
                    continue
                found[method]["ci_low"][chosen], found[method]["ci_high"][chosen] = percentile_interval(boot)
    tested = np.isfinite(found[methods[0]]["r"])
    detectable = [min_detectable_r(int(k)) for k in distinct_x]
    return pl.concat([pl.DataFrame({"test": np.arange(tests), "method": method, "n": n, "n_effective": distinct_x,
                                    "min_detectable_r": detectable, **found[method],
                                    "p_test": [drawn[method] if t else None for t in tested], "reason": reasons,
                                    "note": notes, "flags": test_flags(found[method]["r"], tied_x, tied_y,
                                                                       notes, n)},
                                   schema_overrides={"n": pl.Int64, "n_effective": pl.Int64, "p_test": pl.String,
                                                     "reason": pl.String, "note": pl.String, "flags": pl.String})
                      for method in methods])


# ---------------------------------------------------------------------------------------------------- the stage

def correlate(xs: pl.DataFrame, ys: pl.DataFrame, analysis: str, units: str, seed: int, resamples: int,
              permutations: int, kind: str = EXPLORATORY, methods: tuple[str, ...] = METHODS,
              same_name: bool = False, min_distinct: int = MIN_DISTINCT) -> pl.DataFrame:
    """Every (x variable, y variable) pair's tests (only those with x == y when `same_name`), over the units both
    have a value for, in the families `analysis|view|method`; `kind` ("primary" or "exploratory") goes to the
    `analysis` column."""
    # kept in a fixed order throughout: the order of tests decides how the bootstrap is chunked, and so the last
    # bits of its sums (the same config must give the same table)
    pairs = xs.join(ys, on="unit", suffix="_y", maintain_order="left_right").sort("unit", maintain_order=True)
    if same_name:
        pairs = pairs.filter(pl.col("x") == pl.col("y"))
    tests = pairs.group_by(*X_KEYS, *Y_KEYS, maintain_order=True).agg(
        pl.col("value").alias("xv"), pl.col("value_y").alias("yv"), pl.len().alias("size"))
    frames = []
    for (size,), block in tests.partition_by("size", as_dict=True).items():
        x = block["xv"].list.to_array(size).to_numpy().reshape(-1, size)
        y = block["yv"].list.to_array(size).to_numpy().reshape(-1, size)
        found = correlate_block(x, y, units, seed, resamples, permutations, methods, min_distinct).with_columns(
            pl.col("test").cast(pl.UInt32))
        frames.append(block.drop("xv", "yv", "size").with_row_index("test").join(found, on="test").drop("test"))
    if not frames:
        return pl.DataFrame(schema=SCHEMA)
    family = pl.concat_str(pl.lit(analysis), pl.col("view").fill_null("global"), "method", separator="|")
    few = pl.col("reason").str.starts_with("x takes") & pl.col("x_kind").is_not_null()
    reason = pl.when(few).then(pl.concat_str("reason", pl.lit(": "), pl.col("x_kind").str.replace_all("_", "-"),
                                             pl.lit(" feature"))).otherwise("reason")
    return pl.concat(frames).with_columns(family.alias("family"), pl.lit(None, pl.Float64).alias("q"),
                                          pl.lit(kind).alias("analysis"), pl.lit(units).alias("unit"),
                                          reason.alias("reason"))


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


def correlations(tables: Mapping[str, pl.DataFrame | None], seed: int = 0, resamples: int = RESAMPLES,
                 permutations: int = PERMUTATIONS, min_distinct: int = MIN_DISTINCT) -> pl.DataFrame:
    """correlations.parquet rows from the run's tables (any of behavior, probes, similarity, outcomes may be
    missing: its analyses are then skipped): the primary analyses (reports.primary) first, then the exploratory
    sweep below, whose tests need `min_distinct` distinct x values to report an r."""
    from reports.primary import primary_tests  # here, not at the top: reports.primary builds on this module

    frames = [primary_tests(tables, seed, resamples, permutations)]
    sweep = dict(seed=seed, resamples=resamples, permutations=permutations, min_distinct=min_distinct)
    if tables.get("probes") is not None and tables.get("behavior") is not None:
        frames.append(correlate(competence_variables(tables["probes"]), behavior_variables(tables["behavior"]),
                                "competence~behavior", "models", **sweep))
    if tables.get("similarity") is not None and tables.get("outcomes") is not None:
        xs = selector_variables(tables["similarity"], tables["outcomes"])
        ys = outcome_variables(tables["outcomes"])
        frames.append(correlate(xs.filter(pl.col("view").is_null()), ys, "selector~outcome", "merges", **sweep))
        frames.append(correlate(xs.filter(pl.col("view") == "per_layer"), ys.filter(pl.col("y_level") == "group"),
                                "selector~outcome", "merges", **sweep))
    frames = [f.select(*SCHEMA) for f in frames if not f.is_empty()]
    frame = pl.concat(frames) if frames else pl.DataFrame(schema=SCHEMA)
    return with_q(frame.cast(SCHEMA)).sort("analysis", "family", "x_kind", "x", "y_kind", "y", "y_metric", "view",
                                           "layer", "method", nulls_last=True, descending=[True] + [False] * 9)


INPUT_TABLES = ("behavior", "probes", "similarity", "outcomes")


def correlate_run(tables_dir: Path, seed: int = 0, resamples: int = RESAMPLES, permutations: int = PERMUTATIONS,
                  cache_dir: Path | None = None) -> Path:
    """Read the run's tables from `tables_dir`, write correlations.parquet beside them; with a `cache_dir`, only
    when the input tables' content, the settings or this code changed since it was last written."""
    inputs = [p for p in (Path(tables_dir) / f"{name}.parquet" for name in INPUT_TABLES) if p.is_file()]
    from reports import power, primary  # reports.primary builds on this module

    key = cache_key("correlations", code_version(__file__, paired.__file__, primary.__file__, power.__file__),
                    content_digest(inputs), seed, resamples,
                    permutations)
    target = Path(tables_dir) / "correlations.parquet"

    def make() -> None:
        tables = {name: read_table(tables_dir, name) for name in INPUT_TABLES}
        write_table(tables_dir, "correlations", correlations(tables, seed, resamples, permutations))

    cached_outputs(cache_dir, "correlations", key, [target], make)
    return target
