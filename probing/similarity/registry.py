"""Every selector feature in similarity.parquet, weight-space and functional, with its table shape.

One entry per feature name: its source (which stage computes it), level (one model, a pair, or a merge's parent
group), the scopes its rows come in, its direction and a one-line meaning. docs/FEATURES.md is tested against
this registry (tests/test_similarity_registry.py), and both producers conform their rows to `SIMILARITY_SCHEMA`.

`stat`: functional features are summarised as SimMerge does. Rows at scope `layer` / `head` hold the per-layer
(per-head) value and `stat` null; rows at scope `global` hold a summary of those values over all layers (heads),
named by `stat` (`mean`, `median`, `q25`, `q75`, `q90`). KL has no layers: its global rows summarise the
per-token KL. Weight features are exact aggregates, not summaries: `stat` null.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

SIMILARITY_SCHEMA = {"model_a": pl.String, "model_b": pl.String, "feature": pl.String, "scope": pl.String,
                     "layer": pl.Int64, "head": pl.Int64, "module": pl.String, "stat": pl.String,
                     "value": pl.Float64, "n": pl.Int64, "source": pl.String}
STATS = ("mean", "median", "q25", "q75", "q90")
QUANTILES = {"median": 0.5, "q25": 0.25, "q75": 0.75, "q90": 0.9}


@dataclass(frozen=True)
class Feature:
    name: str
    source: Literal["weights", "functional"]
    level: Literal["model", "pair", "ordered_pair", "group"]
    scopes: tuple[str, ...]  # of global | layer | module | head
    direction: Literal["similarity", "distance", "magnitude"]  # higher = more alike | lower = more alike | neither
    meaning: str


_WEIGHT_SCOPES = ("global", "layer", "module")
FEATURES = {f.name: f for f in [
    Feature("cosine", "weights", "pair", _WEIGHT_SCOPES, "similarity", "cosine of the two parameter vectors"),
    Feature("l2_distance", "weights", "pair", _WEIGHT_SCOPES, "distance", "Euclidean distance of the parameters"),
    Feature("param_norm_a", "weights", "pair", _WEIGHT_SCOPES, "magnitude", "parameter norm of model_a"),
    Feature("param_norm_b", "weights", "pair", _WEIGHT_SCOPES, "magnitude", "parameter norm of model_b"),
    Feature("kinship_pearson", "weights", "pair", _WEIGHT_SCOPES, "similarity",
            "Pearson correlation of the task vectors' coordinates"),
    Feature("kinship_cosine", "weights", "pair", _WEIGHT_SCOPES, "similarity", "signed cosine of the task vectors"),
    Feature("kinship_cosine_abs", "weights", "pair", _WEIGHT_SCOPES, "similarity",
            "absolute cosine of the task vectors (the Model Kinship code's value)"),
    Feature("kinship_euclidean", "weights", "pair", _WEIGHT_SCOPES, "distance",
            "distance of the task vectors (= l2_distance)"),
    Feature("sign_conflict", "weights", "pair", _WEIGHT_SCOPES, "distance",
            "fraction of jointly changed coordinates whose task-vector signs disagree"),
    Feature("param_norm", "weights", "model", _WEIGHT_SCOPES, "magnitude", "parameter norm"),
    Feature("tv_norm", "weights", "model", _WEIGHT_SCOPES, "magnitude", "task-vector norm (distance to the base)"),
    Feature("tv_zero_frac", "weights", "model", _WEIGHT_SCOPES, "magnitude",
            "fraction of coordinates the task vector leaves unchanged"),
    *[Feature(f"group_{name}", "weights", "group", _WEIGHT_SCOPES, direction,
              f"mean {name} over all pairs of a merge's parents (group kinship)")
      for name, direction in [("kinship_pearson", "similarity"), ("kinship_cosine", "similarity"),
                              ("kinship_cosine_abs", "similarity"), ("kinship_euclidean", "distance")]],
    Feature("activation_cosine", "functional", "pair", ("layer", "global"), "similarity",
            "mean over tokens of the cosine of the two residual-stream states (layer 0 = embeddings)"),
    Feature("cka", "functional", "pair", ("layer", "global"), "similarity",
            "linear CKA of the two layers' token representations"),
    Feature("attention_cosine", "functional", "pair", ("head", "global"), "similarity",
            "cosine of one head's attention patterns over all windows of the similarity set"),
    Feature("kl", "functional", "ordered_pair", ("global",), "distance",
            "KL(p_a ‖ p_b) of the next-token distributions, per token, in nats (top-k approximation)"),
]}


def conform(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` with every similarity column, in order and type (absent columns null)."""
    return frame.select([(pl.col(c) if c in frame.columns else pl.lit(None)).cast(t).alias(c)
                         for c, t in SIMILARITY_SCHEMA.items()])


def summary_rows(values, **columns) -> list[dict]:
    """Global rows summarising `values` (per layer, head or token) as SimMerge does: mean + quantiles."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    stats = {"mean": values.mean()} | {name: np.quantile(values, q) for name, q in QUANTILES.items()}
    return [{**columns, "scope": "global", "stat": stat, "value": float(stats[stat]), "n": len(values)}
            for stat in STATS]


def feature_table() -> str:
    """The feature index of docs/FEATURES.md (tested to match): `python -m probing.similarity.registry`."""
    lines = ["| feature | source | level | scopes | direction | meaning |", "|---|---|---|---|---|---|"]
    lines += [f"| `{f.name}` | {f.source} | {f.level} | {', '.join(f.scopes)} | {f.direction} | {f.meaning} |"
              for f in FEATURES.values()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(feature_table())
