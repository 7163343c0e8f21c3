"""A small run directory for the report tests, its tables made by the stages' own pure functions.

behaviour rows come from `evaluation.behavior.tidy` over lm-eval-shaped results, probes from
`probing.stage.probe_task` over synthetic layer features (signal growing with depth), similarity from
`probing.similarity.weights.weight_features` over the tiny family and two merges averaged by hand, outcomes from
`evaluation.outcomes.compute_outcomes`, correlations computed by scipy in the contract's shape. One merge is
named like an XSS payload, so every chart and table carries it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml
from scipy import stats

XSS = "<script>alert(1)</script>"
TASKS = ["suite-subject_verb_agreement", "pos", "sentence_length"]  # conftest.probe_test_tasks
LAYERS = 4
CORRELATION_SCHEMA = {"family": pl.String, "x": pl.String, "x_kind": pl.String, "y": pl.String, "y_kind": pl.String,
                      "y_metric": pl.String, "view": pl.String, "layer": pl.Int64, "method": pl.String,
                      "n": pl.Int64, "r": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "p": pl.Float64,
                      "reason": pl.String}


def _merged(paths: dict[str, Path], out: Path, weight: float) -> Path:
    """A linear merge of the tiny children a and b, written like any checkpoint."""
    from conftest import save_tiny
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig

    a, b = (load_file(paths[name] / "model.safetensors") for name in ("a", "b"))
    state = {k: weight * a[k] + (1 - weight) * b[k] for k in a}
    return save_tiny(out, state, AutoTokenizer.from_pretrained(paths["a"]), LlamaConfig.from_pretrained(paths["a"]))


def _raw_result(scores: dict[str, float]) -> dict:
    """lm-eval's result layout: two tasks in group `grp_skill`, one ungrouped task with two metrics."""
    results = {
        "grp_skill": {"alias": "grp_skill", "acc,none": (scores["math"] + scores["code"]) / 2, "acc_stderr,none": 0.03},
        "skill_math": {"alias": " - skill_math", "acc,none": scores["math"], "acc_stderr,none": 0.02},
        "skill_code": {"alias": " - skill_code", "acc,none": scores["code"], "acc_stderr,none": 0.02},
        "language": {"alias": "language", "acc,none": scores["lang"], "acc_stderr,none": 0.025,
                     "acc_norm,none": scores["lang"] - 0.05, "acc_norm_stderr,none": "N/A"},
    }
    hib = {"acc": True, "acc_norm": True}
    return {"results": results, "group_subtasks": {"grp_skill": ["skill_math", "skill_code"]},
            "higher_is_better": {name: hib for name in results},
            "n-samples": {name: {"effective": 200} for name in ("skill_math", "skill_code", "language")}}


def _probes(models: list[str], root: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """probes and probe_items rows."""
    from conftest import probe_test_tasks

    from probing.stage import probe_task

    frames, items, tasks = [], [], probe_test_tasks(root)
    assert [task.name for task in tasks] == TASKS
    for i, model in enumerate(models):
        for task in tasks:
            rng = np.random.default_rng(i)
            n = len(task.labels)
            signal = np.asarray(task.labels, dtype=np.float32).reshape(n, 1)
            layers = [signal * (0.3 + 0.3 * layer + 0.1 * i) + rng.normal(size=(n, 6)).astype(np.float32)
                      for layer in range(LAYERS)]
            found = probe_task(torch.from_numpy(np.stack(layers)), task, seeds=[0], controls=True, mdl=False)
            frames.append(found.rows.with_columns(pl.lit(model).alias("model")))
            items.append(found.items.with_columns(pl.lit(model).alias("model")))
    return pl.concat(frames, how="diagonal_relaxed"), pl.concat(items)


def _correlations(behavior: pl.DataFrame, probes: pl.DataFrame) -> pl.DataFrame:
    """Competence (layer mean and per layer) × behaviour across models, as the correlation stage's contract."""
    headline = probes.filter(pl.col("metric").is_in(["macro_f1", "pearson"]))
    per_layer = headline.group_by("model", "task", "layer").agg(pl.col("value").mean())
    views = [("layer_mean", None, per_layer.group_by("model", "task").agg(pl.col("value").mean()))]
    views += [("per_layer", layer, per_layer.filter(pl.col("layer") == layer).drop("layer"))
              for layer in range(LAYERS)]
    tasks = behavior.filter((pl.col("level") == "task") & (pl.col("metric") == "acc"))
    rows = []
    for view, layer, competence in views:
        for x in TASKS:
            for y in sorted(tasks["task"].unique()):
                joined = competence.filter(pl.col("task") == x).join(
                    tasks.filter(pl.col("task") == y).select("model", pl.col("value").alias("b")), on="model")
                for method, test in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr),
                                     ("kendall", stats.kendalltau)):
                    r, p = test(joined["value"].to_numpy(), joined["b"].to_numpy())
                    rows.append({"family": f"competence|{view}|{method}", "x": x, "x_kind": "competence",
                                 "y": y, "y_kind": "behavior", "y_metric": "acc", "view": view, "layer": layer,
                                 "method": method, "n": joined.height, "r": float(r), "ci_low": float(r) - 0.2,
                                 "ci_high": min(1.0, float(r) + 0.2), "p": float(p), "reason": None})
    frame = pl.DataFrame(rows, schema=CORRELATION_SCHEMA)
    p, family, q = frame["p"].to_numpy(), frame["family"].to_numpy(), np.empty(frame.height)
    for name in set(family):
        q[family == name] = stats.false_discovery_control(p[family == name])
    frame = frame.with_columns(pl.Series("q", q)).select(*CORRELATION_SCHEMA, "q")
    undefined = {**rows[0], "x": "constant_feature", "r": float("nan"), "ci_low": float("nan"),
                 "ci_high": float("nan"), "p": float("nan"), "q": float("nan"), "reason": "x is constant"}
    return pl.concat([frame, pl.DataFrame([undefined], schema=frame.schema)])


_BUILT: dict[tuple, Path] = {}


def shared_run(tmp_path_factory, tiny_family: dict[str, Path]) -> Path:
    """One run directory per test session (built once, for test_report and test_report_browser alike)."""
    key = tuple(sorted((k, str(v)) for k, v in tiny_family.items()))
    if key not in _BUILT:
        _BUILT[key] = make_run(tmp_path_factory.mktemp("report-run"), tiny_family)
    return _BUILT[key]


def make_run(root: Path, tiny_family: dict[str, Path]) -> Path:
    """RUN_DIR with config.yaml and every table (behavior, probes, similarity, outcomes, correlations)."""
    from evaluation.behavior import outcome_scores, tidy
    from evaluation.outcomes import compute_outcomes
    from merging.merge import MergeLineage
    from probing.similarity.weights import weight_features
    from probing.stage import internals_scores
    from reports.changes import changes
    from runstore.tables import write_table

    lineages = [MergeLineage("a+b/linear", "linear", ("a", "b"), None, {"weight": 0.5}),
                MergeLineage(XSS, "ties", ("a", "b"), "base", {"weight": 1.0})]
    paths = dict(tiny_family)
    paths["a+b/linear"] = _merged(tiny_family, root / "models" / "linear", 0.5)
    paths[XSS] = _merged(tiny_family, root / "models" / "xss", 0.8)
    models = list(paths)
    # language rises with the model's index, as probe competence does (_probes): significant correlations.
    skills = {"base": (0.30, 0.30, 0.50), "a": (0.70, 0.35, 0.55), "b": (0.32, 0.66, 0.60),
              "a+b/linear": (0.55, 0.52, 0.65), XSS: (0.74, 0.20, 0.70)}
    behavior = pl.concat([tidy(_raw_result(dict(zip(("math", "code", "lang"), skills[m]))), m) for m in models])
    probes, probe_items = _probes(models, root / "tasks")
    weights = weight_features({m: paths[m] for m in models}, "base", {m.model: m.parents for m in lineages})
    functional = pl.DataFrame(
        [{"model_a": a, "model_b": b, "feature": "cka", "scope": "layer", "layer": layer, "module": None,
          "value": 1.0 - 0.1 * abs(i - j) - 0.02 * layer, "n": 200, "source": "functional"}
         for i, a in enumerate(models) for j, b in enumerate(models) if i < j for layer in range(LAYERS)],
        schema=weights.schema)
    outcomes = pl.concat([compute_outcomes(outcome_scores(behavior), lineages, "behavior"),
                          compute_outcomes(internals_scores(probes), lineages, "internals")], how="diagonal_relaxed")
    tables = root / "tables"
    for name, frame in (("behavior", behavior), ("probes", probes), ("similarity", pl.concat([weights, functional])),
                        ("outcomes", outcomes), ("correlations", _correlations(behavior, probes)),
                        ("changes", changes({"probes": probes, "probe_items": probe_items, "outcomes": outcomes},
                                            "base", resamples=200))):
        write_table(tables, name, frame)
    config = {"name": "report-test", "description": f"a run whose names hold markup: {XSS} & <b>bold</b>",
              "seed": 3, "models": [{"name": m, "source": str(tiny_family[m])} for m in ("base", "a", "b")],
              "base": "base", "known_effects": [{"model": "b", "tasks": ["noun_number"], "direction": "worse"}],
              "_provenance": {"config_file": "tiny.yaml", "code_revision": "0123abc", "versions": {"polars": "2.1.0"},
                              "seeds": {"global": 3, "probing": [0]}}}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root
