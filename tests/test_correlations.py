"""The correlation stage against scipy.stats on fixtures: r, permutation p, bootstrap CIs, BH q, undefined cases,
variables."""

from __future__ import annotations

import math
import warnings

import numpy as np
import polars as pl
import pytest
from scipy import stats

from reports.correlations import (
    METHODS,
    bootstrap_r,
    competence_variables,
    correlate_block,
    correlate_run,
    correlations,
    outcome_variables,
    permutation_p,
    resample_counts,
    selector_variables,
    with_q,
)
from runstore.tables import CONTRACT_COLUMNS, read_table, write_parquet

SCIPY = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}
MODELS = ["base", "instruct", "math", "code", "instruct+math/linear", "instruct+math/ties", "instruct+code/linear",
          "instruct+code/ties"]
MERGES = MODELS[4:]


def _probes() -> pl.DataFrame:
    """3 tasks (2 phenomena) x 4 layers x 2 seeds per model, plus accuracy rows that are not the headline metric."""
    rng = np.random.default_rng(0)
    rows = []
    for model in MODELS:
        for task, phenomenon, metric in (("t1", "syntax", "macro_f1"), ("t2", "syntax", "macro_f1"),
                                         ("t3", "numbers", "pearson")):
            base = rng.uniform(0.4, 0.9)
            for layer in range(4):
                for seed in (0, 1):
                    value = base + 0.05 * layer + rng.normal(0, 0.01)
                    dev = value + rng.normal(0, 0.05)
                    rows.append((model, task, phenomenon, layer, metric, value, dev, seed))
                    rows.append((model, task, phenomenon, layer, "accuracy", 1.0, 1.0, seed))
    return pl.DataFrame(rows, schema=["model", "task", "phenomenon", "layer", "metric", "value", "dev_value", "seed"],
                        orient="row")


def _behavior(probes: pl.DataFrame) -> pl.DataFrame:
    """Behaviour that tracks t1's competence (plus noise), a constant task, and a group."""
    rng = np.random.default_rng(1)
    t1 = probes.filter((pl.col("task") == "t1") & (pl.col("metric") == "macro_f1")).group_by("model").agg(
        pl.col("value").mean())
    rows = []
    for model, value in t1.iter_rows():
        rows += [(model, "b1", "task", "acc", "none", value + rng.normal(0, 0.02), True),
                 (model, "b2", "task", "exact_match", "strict", rng.uniform(), True),
                 (model, "flat", "task", "acc", "none", 0.5, True),
                 (model, "g", "group", "acc", "none", rng.uniform(), True)]
    return pl.DataFrame(rows, schema=["model", "task", "level", "metric", "filter", "value", "higher_is_better"],
                        orient="row")


def _outcomes() -> pl.DataFrame:
    rng = np.random.default_rng(2)
    rows = []
    for merge in MERGES:
        pa, pb = "instruct", merge.split("+")[1].split("/")[0]
        for kind in ("behavior", "internals"):
            for task, level in (("b1", "task"), ("g", "group")):
                rows.append((merge, merge.split("/")[1], pa, pb, task, level, "acc" if kind == "behavior" else None,
                             kind, rng.choice(["better", "between", "worse"]), rng.normal(), rng.normal()))
    return pl.DataFrame(rows, schema=["model", "method", "parent_a", "parent_b", "task", "level", "metric", "kind",
                                      "relation", "gap_closed", "merge_gain"], orient="row")


def _similarity() -> pl.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    models = MODELS
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            rows.append((a, b, "cosine", "global", None, rng.uniform(), "weights"))
            for layer in range(3):
                rows.append((a, b, "cosine", "layer", layer, rng.uniform(), "weights"))
            rows.append((a, b, "cosine", "module", None, rng.uniform(), "weights"))  # not used: module scope
        rows.append((a, None, "tv_norm", "global", None, rng.uniform(), "weights"))
    for merge in MERGES:
        rows.append((merge, None, "group_kinship_cosine", "global", None, rng.uniform(), "weights"))
    return pl.DataFrame(rows, schema={"model_a": pl.String, "model_b": pl.String, "feature": pl.String,
                                      "scope": pl.String, "layer": pl.Int64, "value": pl.Float64,
                                      "source": pl.String}, orient="row")


@pytest.fixture(scope="module")
def tables() -> dict[str, pl.DataFrame]:
    probes = _probes()
    return {"probes": probes, "behavior": _behavior(probes), "similarity": _similarity(), "outcomes": _outcomes()}


@pytest.fixture(scope="module")
def result(tables) -> pl.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning storm: undefined cases are caught before scipy sees them
        # 8! pairings of the models: every p an exact permutation test, comparable with scipy's exactly
        # min_distinct=2: the statistics on ties (a parent-pair feature's two values), which the default refuses
        return correlations(tables, seed=0, resamples=200, permutations=math.factorial(len(MODELS)), min_distinct=2)


def _aligned(xs: pl.DataFrame, ys: pl.DataFrame, x_filter: dict, y_filter: dict) -> tuple[np.ndarray, np.ndarray]:
    def pick(frame, conditions):
        for column, value in conditions.items():
            frame = frame.filter(pl.col(column).is_null() if value is None else pl.col(column) == value)
        return frame.select("unit", "value")

    both = pick(xs, x_filter).join(pick(ys, y_filter), on="unit").sort("unit")
    return both["value"].to_numpy(), both["value_right"].to_numpy()


def test_contract_columns_and_families(result):
    assert set(CONTRACT_COLUMNS["correlations"]) <= set(result.columns)
    assert result.schema["layer"] == pl.Int64
    families = set(result["family"])
    assert {f"competence~behavior|{view}|{m}" for view in ("best_layer", "last_layer", "layer_mean", "per_layer")
            for m in METHODS} <= families
    assert {f"selector~outcome|{scope}|{m}" for scope in ("global", "per_layer") for m in METHODS} <= families
    per_layer = result.filter(pl.col("view") == "per_layer")
    assert per_layer["layer"].null_count() == 0
    assert result.filter(pl.col("view").is_null() | (pl.col("view") != "per_layer"))["layer"].is_null().all()
    # per-layer selector features are related to group-level outcomes only
    assert set(per_layer.filter(pl.col("x_kind") != "competence")["y_level"]) == {"group"}


def _permutation_test(x: np.ndarray, y: np.ndarray, method: str, resamples: int, rng=None):
    """scipy.stats.permutation_test re-pairing x with y, |r| as the statistic (two-sided)."""
    def statistic(a, axis):
        if method == "kendall":  # scipy's kendalltau takes one pair per call
            return np.abs(np.apply_along_axis(lambda row: stats.kendalltau(row, y).statistic, axis, a))
        if method == "spearman":
            a = stats.rankdata(a, axis=axis)
            return np.abs(stats.pearsonr(a, stats.rankdata(y), axis=axis).statistic)
        return np.abs(stats.pearsonr(a, y, axis=axis).statistic)

    return stats.permutation_test((x,), statistic, permutation_type="pairings", alternative="greater",
                                  n_resamples=resamples, rng=rng)


def test_every_r_and_p_equals_scipy(tables, result):
    """Each defined test, recomputed with scipy.stats on the two aligned vectors: r as scipy's correlation
    functions give it, p as scipy.stats.permutation_test gives it over all n! pairings."""
    from reports.correlations import behavior_variables

    xs = {"competence": competence_variables(tables["probes"])}
    selector_x = selector_variables(tables["similarity"], tables["outcomes"])
    ys = {"behavior": behavior_variables(tables["behavior"]), "outcome": outcome_variables(tables["outcomes"])}
    defined = result.filter(pl.col("reason").is_null() & (pl.col("analysis") == "exploratory"))
    tied = defined.filter(pl.col("y_kind").str.ends_with("_relation") & (pl.col("x_kind") == "parent_pair"))
    over_models = defined.filter(pl.col("x_kind") == "competence")
    sample = pl.concat([over_models.filter(pl.col("method") != "kendall").sample(6, seed=0),
                        over_models.filter(pl.col("method") == "kendall").sample(1, seed=0),  # 8! scipy calls
                        defined.filter(pl.col("x_kind") != "competence").sample(30, seed=0),
                        tied.sample(6, seed=0)])  # ties on both sides
    for row in sample.iter_rows(named=True):
        x_frame = xs["competence"] if row["x_kind"] == "competence" else selector_x
        y_frame = ys["behavior"] if row["y_kind"] == "behavior" else ys["outcome"]
        x, y = _aligned(x_frame, y_frame, {k: row[k] for k in ("x", "x_kind", "view", "layer")},
                        {k: row[k] for k in ("y", "y_kind", "y_level", "y_metric")})
        assert row["n"] == len(x)
        assert row["r"] == pytest.approx(SCIPY[row["method"]](x, y).statistic, abs=1e-12), row
        if abs(row["r"]) < 1e-12:  # r = 0 up to rounding: every re-pairing is as extreme (scipy's p feels the rounding)
            assert row["p"] == 1.0
        else:
            assert row["p"] == _permutation_test(x, y, row["method"], math.factorial(len(x))).pvalue, row
        assert row["p_test"] == f"permutation: all {math.factorial(len(x))} pairings"
        assert row["ci_low"] <= row["ci_high"]


@pytest.mark.parametrize("method", METHODS)
def test_random_pairings_agree_with_scipy_within_monte_carlo_error(method):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(5, 12))
    y = np.round(x * 0.5 + rng.normal(size=(5, 12)))  # ties in y, correlations from weak to strong
    p, drawn = permutation_p(method, x, y, permutations=2000, seed=3)
    assert drawn == "permutation: 2000 random pairings"
    for xi, yi, pi in zip(x, y, p):
        expected = _permutation_test(xi, yi, method, 4000, rng=np.random.default_rng(4)).pvalue
        assert abs(pi - expected) < 4 * math.sqrt(expected * (1 - expected) * (1 / 2000 + 1 / 4000)) + 1e-3


def test_small_samples_cannot_reach_significance_they_do_not_have():
    """r = 1 over 5 merges: scipy's normal-theory p is 0; the exact permutation p is 2/120 (both perfect
    pairings), and a y equal for all units but one carries a note (one unit decides r)."""
    x = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    y = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    assert stats.pearsonr(x[0], y[0]).pvalue < 1e-10
    block = correlate_block(x, y, "merges", 0, 100)
    pearson = block.filter(pl.col("method") == "pearson").sort("test")
    assert pearson["r"][0] == pytest.approx(1.0) and pearson["p"][0] == pytest.approx(2 / 120)
    assert pearson["p_test"][0] == "permutation: all 120 pairings"
    assert pearson["note"].to_list() == [None, "y equal for all merges but one: one unit decides r"]
    assert pearson["p"][1] == pytest.approx(2 / 5)  # the lone unit at either extreme of x: 2 of 5 positions


def test_behaviour_that_tracks_competence_is_found(result):
    found = result.filter((pl.col("x") == "t1") & (pl.col("view") == "layer_mean") & (pl.col("y") == "b1")
                          & (pl.col("method") == "pearson")).row(0, named=True)
    assert found["r"] > 0.95 and found["q"] < 0.05 and found["ci_low"] > 0.5 and found["n"] == len(MODELS)


@pytest.mark.parametrize("method", METHODS)
def test_bootstrap_ci_equals_scipy_bootstrap(method):
    rng = np.random.default_rng(5)
    x = rng.normal(size=12)
    y = np.round(x + rng.normal(size=12))  # ties in y
    block = correlate_block(x[None], y[None], "models", seed=7, resamples=300).filter(pl.col("method") == method)
    statistic = lambda a, b: SCIPY[method](a, b).statistic  # noqa: E731
    expected = stats.bootstrap((x, y), statistic, paired=True, vectorized=False, method="percentile",
                               n_resamples=300, rng=np.random.default_rng(7)).confidence_interval
    row = block.row(0, named=True)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected.low, expected.high), abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_resampled_r_equals_scipy_on_each_resample_and_degenerate_ones_are_nan(method):
    """The multiplicity form against scipy on explicitly resampled data, with heavy ties: 3 distinct x values over
    5 units makes some resamples constant in x (NaN, left out of the CI)."""
    x = np.array([1.0, 1.0, 2.0, 2.0, 3.0])
    y = np.array([0.3, 0.1, 0.2, 0.9, 0.5])
    counts = resample_counts(5, 400, seed=2)
    index = np.random.default_rng(2).integers(0, 5, (400, 5))
    boot = bootstrap_r(x[None], y[None], counts)[method][0]
    expected = []
    for i in index:
        if np.all(x[i] == x[i][0]) or np.all(y[i] == y[i][0]):
            expected.append(np.nan)
        else:
            expected.append(SCIPY[method](x[i], y[i]).statistic)
    expected = np.array(expected)
    assert np.isnan(expected).sum() > 0
    np.testing.assert_allclose(boot, expected, atol=1e-12, equal_nan=True)
    row = correlate_block(x[None], y[None], "models", 2, 400, min_distinct=3).filter(pl.col("method") == method).row(0, named=True)
    finite = expected[np.isfinite(expected)]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.quantile(finite, [0.025, 0.975])))


def test_undefined_cases_give_nan_and_a_reason_without_warnings():
    x = np.array([[1.0, 2.0], [1.0, 1.0], [1.0, 2.0], [3.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two = correlate_block(x[:1], x[2:3], "merges", 0, 50)
        assert set(two["reason"]) == {"n < 3 (2 merges with both values)"}
        flat = correlate_block(np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [4.0, 4.0, 4.0]]),
                               np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [2.0, 2.0, 2.0]]), "models", 0, 50)
    reasons = flat.filter(pl.col("method") == "kendall")["reason"].to_list()
    assert reasons == ["x constant over the 3 models", "y constant over the 3 models",
                       "x and y constant over the 3 models"]
    for frame in (two, flat):
        assert frame.select(pl.col("r", "p", "ci_low", "ci_high").is_nan().all()).row(0) == (True,) * 4
        assert frame["p_test"].is_null().all()


def test_constant_behaviour_rows_carry_a_reason(result):
    flat = result.filter(pl.col("y") == "flat")
    assert flat.height > 0 and set(flat["reason"]) == {f"y constant over the {len(MODELS)} models"}
    assert flat["q"].is_nan().all()


def test_q_values_equal_a_hand_benjamini_hochberg():
    p = [0.01, 0.04, 0.03, 0.20, float("nan"), 0.001]
    frame = pl.DataFrame({"family": ["a"] * 6 + ["b"] * 2, "p": p + [0.04, 0.5]})
    q = with_q(frame).sort("family")
    # family a, m = 5 defined p: sorted 0.001, 0.01, 0.03, 0.04, 0.20 -> p*m/rank = 0.005, 0.025, 0.05, 0.05, 0.2,
    # then the running minimum from the largest rank down (no change here)
    by_p = dict(zip(q.filter(pl.col("family") == "a")["p"].to_list(), q.filter(pl.col("family") == "a")["q"]))
    assert [by_p[v] for v in (0.001, 0.01, 0.03, 0.04, 0.20)] == pytest.approx([0.005, 0.025, 0.05, 0.05, 0.2])
    assert math.isnan(q.filter(pl.col("p").is_nan())["q"][0])
    # family b, m = 2: 0.04*2/1 = 0.08, 0.5*2/2 = 0.5
    assert q.filter(pl.col("family") == "b")["q"].to_list() == pytest.approx([0.08, 0.5])


def test_q_running_minimum():
    q = with_q(pl.DataFrame({"family": ["f"] * 3, "p": [0.04, 0.045, 0.05]}))
    # p*m/rank = 0.12, 0.0675, 0.05 -> running minimum from the top: 0.05 for all three
    assert q["q"].to_list() == pytest.approx([0.05, 0.05, 0.05])


def test_competence_views_by_hand(tables):
    xs = competence_variables(tables["probes"])
    probes = tables["probes"].filter((pl.col("metric") != "accuracy") & (pl.col("model") == "math"))
    curve = {task: [probes.filter((pl.col("task") == task) & (pl.col("layer") == layer))["value"].mean()
                    for layer in range(4)] for task in ("t1", "t2")}
    syntax = np.mean([curve["t1"], curve["t2"]], axis=0)
    mine = xs.filter(pl.col("unit") == "math")

    def value(x, view, layer=None):
        rows = mine.filter((pl.col("x") == x) & (pl.col("view") == view))
        if layer is not None:
            rows = rows.filter(pl.col("layer") == layer)
        assert rows.height == 1
        return rows["value"][0]

    assert value("t1", "best_layer") == pytest.approx(max(curve["t1"]))
    assert value("t1", "last_layer") == pytest.approx(curve["t1"][3])
    assert value("t1", "layer_mean") == pytest.approx(np.mean(curve["t1"]))
    assert value("t2", "per_layer", 2) == pytest.approx(curve["t2"][2])
    assert value("syntax", "best_layer") == pytest.approx(syntax.max())
    assert value("syntax", "per_layer", 1) == pytest.approx(syntax[1])
    assert set(mine.filter(pl.col("x") == "syntax")["x_level"]) == {"phenomenon"}


def test_selector_variables_relate_features_to_each_merge(tables):
    xs = selector_variables(tables["similarity"], tables["outcomes"])
    sim = tables["similarity"].filter(pl.col("scope") == "global")

    def feature(a, b, name="cosine"):
        rows = sim.filter((pl.col("feature") == name) & (((pl.col("model_a") == a) & (pl.col("model_b") == b))
                                                         | ((pl.col("model_a") == b) & (pl.col("model_b") == a))))
        return rows["value"][0]

    merge = "instruct+code/ties"
    mine = xs.filter((pl.col("unit") == merge) & pl.col("view").is_null())
    got = {(r["x_kind"], r["x"]): r["value"] for r in mine.iter_rows(named=True)}
    assert got[("parent_pair", "weights:cosine")] == pytest.approx(feature("instruct", "code"))
    assert got[("merge_parent_a", "weights:cosine")] == pytest.approx(feature(merge, "instruct"))
    assert got[("merge_parent_b", "weights:cosine")] == pytest.approx(feature(merge, "code"))
    assert got[("merge_parents_mean", "weights:cosine")] == pytest.approx(
        (feature(merge, "instruct") + feature(merge, "code")) / 2)
    assert ("merge", "weights:tv_norm") in got and ("parent_group", "weights:group_kinship_cosine") in got
    layers = xs.filter((pl.col("unit") == merge) & (pl.col("view") == "per_layer")
                       & (pl.col("x_kind") == "parent_pair"))
    assert sorted(layers["layer"]) == [0, 1, 2]


def test_outcome_variables_code_relations():
    ys = outcome_variables(_outcomes())
    relations = ys.filter(pl.col("y_kind") == "behavior_relation")
    codes = dict(_outcomes().filter((pl.col("kind") == "behavior") & (pl.col("task") == "b1"))
                 .select("model", "relation").iter_rows())
    for unit, value in relations.filter(pl.col("y") == "b1").select("unit", "value").iter_rows():
        assert value == {"better": 1.0, "between": 0.0, "worse": -1.0}[codes[unit]]
    assert {"behavior_gap_closed", "internals_merge_gain", "internals_relation"} <= set(ys["y_kind"])


def test_missing_tables_skip_their_analysis_and_the_stage_writes_the_table(tables, tmp_path):
    only_selectors = correlations({"similarity": tables["similarity"], "outcomes": tables["outcomes"]}, resamples=50)
    assert set(only_selectors["x_kind"]) != {"competence"} and "competence" not in set(only_selectors["x_kind"])
    assert correlations({}).height == 0
    for name in ("probes", "behavior"):
        write_parquet(tables[name], tmp_path / f"{name}.parquet")  # fixtures lack columns the analysis does not use
    correlate_run(tmp_path, resamples=50)
    written = read_table(tmp_path, "correlations")
    assert written.height > 0 and set(written["x_kind"]) == {"competence"}


def test_functional_summaries_and_ordered_pairs_stay_distinct_variables():
    """Functional features carry a `stat` (mean, median...) and KL is stored for both orders of a pair: each
    summary and each direction must be its own x, never averaged into another."""
    from reports.correlations import selector_variables

    similarity = pl.DataFrame({
        "model_a": ["m", "a", "m", "a", "m"], "model_b": ["a", "m", "b", "b", "a"],
        "feature": ["kl", "kl", "kl", "cosine", "cka"], "scope": ["global"] * 5, "layer": [None] * 5,
        "value": [0.1, 0.2, 0.3, 0.9, 0.5], "source": ["functional"] * 3 + ["weights", "functional"],
        "stat": ["mean", "mean", "mean", None, "median"]}, schema_overrides={"layer": pl.Int64})
    outcomes = pl.DataFrame({"model": ["m"], "parent_a": ["a"], "parent_b": ["b"]})
    found = {(r["x"], r["x_kind"]): r["value"]
             for r in selector_variables(similarity, outcomes).iter_rows(named=True)}
    assert found == {("weights:cosine", "parent_pair"): 0.9, ("functional:kl:mean", "merge_parent_a"): 0.1,
                     ("functional:kl:mean:reverse", "merge_parent_a"): 0.2,
                     ("functional:cka:median", "merge_parent_a"): 0.5,
                     ("functional:kl:mean", "merge_parent_b"): 0.3,
                     ("functional:kl:mean", "merge_parents_mean"): pytest.approx(0.2)}


def test_competence_is_the_same_on_every_call():
    """The same probes table gives the same competence, bit for bit: group means summed in a varying order
    differ by 1e-16, which breaks ties between models and moves Spearman and Kendall r (a run-sized table)."""
    rng = np.random.default_rng(9)
    models, tasks, layers, seeds = 14, 25, 31, 3
    probes = pl.DataFrame({
        "model": np.repeat([f"m{i}" for i in range(models)], tasks * layers * seeds),
        "task": np.tile(np.repeat([f"t{i}" for i in range(tasks)], layers * seeds), models),
        "phenomenon": np.tile(np.repeat([f"p{i % 5}" for i in range(tasks)], layers * seeds), models),
        "layer": np.tile(np.repeat(np.arange(layers), seeds), models * tasks),
        "seed": np.tile(np.arange(seeds), models * tasks * layers),
        "metric": "macro_f1",
        "value": rng.choice([0.1, 0.2, 0.3, 0.7], models * tasks * layers * seeds)})
    first = competence_variables(probes)
    for _ in range(5):
        assert competence_variables(probes).equals(first)


def test_an_r_that_prints_as_one_is_flagged_with_ties_and_lone_units():
    """-0.9996 reads as -1.000 in the report, so it is flagged like an exact 1; 0.9994 is not; ties over more than
    a fifth of the units and a deciding unit get their own flags; one tied pair among 16 units does not."""
    from reports.correlations import distinct_and_tied, test_flags

    x = np.array([[1, 2, 3, 4, 5], [1, 1, 3, 3, 3], [2, 1, 2, 7, 1], [5, 4, 3, 2, 1]], dtype=float)
    assert distinct_and_tied(x)[1].tolist() == [0, 5, 4, 0]
    sixteen = np.arange(16.0)
    sixteen[3] = sixteen[4]
    assert distinct_and_tied(sixteen[None])[1].tolist() == [2]
    flags = test_flags(np.array([-0.9996, 0.9994, 1.0, 0.5, np.nan]), np.array([0, 0, 0, 2, 0]),
                       np.array([0, 0, 0, 0, 0]), [None, None, None, "x equal for all merges but one", None], n=5)
    assert flags == ["|r| = 1", None, "|r| = 1", "x ties (2 of 5 units tied); one unit decides", None]
    assert test_flags(np.array([0.6, 0.6]), np.array([2, 4]), np.array([0, 0]), [None, None], n=16) == \
        [None, "x ties (4 of 16 units tied)"]
