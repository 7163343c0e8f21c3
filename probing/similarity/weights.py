"""Weight-space selector features (SimMerge structural signals, Model Kinship, task-vector statistics), streamed.

Every feature of every pair is a function of a few sufficient statistics — a Gram matrix, sums, and counts of
(non-)zero and sign-agreeing coordinates — which add up over tensors. So one pass reads each tensor of every
model once, in row chunks, and accumulates those statistics per scope (global, per layer, per module type);
features are derived at the end. Feature names and meanings: `probing.similarity.registry`, docs/FEATURES.md.

Rows of the Gram matrix are the base parameters θ_b (at the base's index) and task vectors δ_i = θ_i − θ_b for
the other models: parameter-space dot products follow as θ_i·θ_j = θ_b·θ_b + θ_b·δ_i + θ_b·δ_j + δ_i·δ_j, and
distances come from the small δ Gram, which avoids the cancellation of ‖θ_i‖² + ‖θ_j‖² − 2θ_i·θ_j.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from merging.checkpoints import content_digest
from merging.streaming import StreamedCheckpoint, layer_of, module_of, stream_chunks
from probing.similarity.registry import conform
from reports.cache import ALL_MODELS, cached_frame
from reports.cache import cache_key as make_key
from reports.cache import content_digest as files_digest

ZERO_RTOL = 1e-6  # |δ| ≤ ZERO_RTOL·|θ_base| counts as unchanged: ~8 float32 ulps, far below any real update
CHUNK_BYTES = 64 << 20  # working set of one chunk across all models (float64 values + float32 signs)
_EXACT_FLOAT32_COUNT = 1 << 24  # sign Grams run in float32, exact for counts below this
PAIR_FEATURES = ("cosine", "l2_distance", "param_norm_a", "param_norm_b", "kinship_pearson", "kinship_cosine",
                 "kinship_cosine_abs", "kinship_euclidean", "sign_conflict")
MODEL_FEATURES = ("param_norm", "tv_norm", "tv_zero_frac")
GROUP_FEATURES = ("kinship_pearson", "kinship_cosine", "kinship_cosine_abs", "kinship_euclidean")
SCHEMA = {"model_a": pl.String, "model_b": pl.String, "feature": pl.String, "scope": pl.String,
          "layer": pl.Int64, "module": pl.String, "value": pl.Float64, "n": pl.Int64, "source": pl.String}

Key = tuple[str, int | None, str | None]  # (scope, layer, module)


@dataclass
class Stats:
    """Sufficient statistics of one scope; rows/columns follow the model order, index `base` holds θ_b."""

    n: int
    gram: np.ndarray  # N×N dot products of the rows (θ_b at the base index, δ_i elsewhere)
    sums: np.ndarray  # N: Σ δ_i (0 for the base)
    agree: np.ndarray  # N×N: coordinates where δ_i, δ_j are both non-near-zero with the same sign
    conflict: np.ndarray  # N×N: ... with opposite signs

    def __iadd__(self, other: Stats) -> Stats:
        self.n += other.n
        for field in ("gram", "sums", "agree", "conflict"):
            getattr(self, field).__iadd__(getattr(other, field))
        return self

    def copy(self) -> Stats:
        return Stats(self.n, self.gram.copy(), self.sums.copy(), self.agree.copy(), self.conflict.copy())


def chunk_stats(chunks: list[torch.Tensor], base: int, zero_rtol: float) -> Stats:
    """Statistics of one chunk (one tensor row range per model, any float dtype), in few passes over memory.

    A ones row appended to the float64 matrix makes the Gram carry the sums too; positive/negative change
    indicators P, M stacked as [P; M] give agreements (PPᵀ + MMᵀ) and conflicts (PMᵀ + MPᵀ) from one float32
    matmul, exact while a chunk has fewer than 2**24 elements.
    """
    count, size = len(chunks), chunks[0].numel()
    rows = torch.empty((count + 1, size), dtype=torch.float64)
    for row, chunk in zip(rows, chunks):
        row.copy_(chunk.reshape(-1))
    theta_b = rows[base].clone()  # float64 operands: mixed-dtype elementwise ops are several times slower
    rows[:count] -= theta_b
    rows[base] = theta_b
    rows[count] = 1.0
    threshold = theta_b.abs_().mul_(zero_rtol)
    signs = torch.empty((2 * count, size), dtype=torch.float32)
    signs[:count] = rows[:count] > threshold
    signs[count:] = rows[:count] < -threshold
    signs[base] = signs[count + base] = 0.0
    gram = (rows @ rows.T).numpy()
    blocks = (signs @ signs.T).double().numpy()
    pp, pm, mp, mm = blocks[:count, :count], blocks[:count, count:], blocks[count:, :count], blocks[count:, count:]
    return Stats(n=size, gram=gram[:count, :count].copy(), sums=gram[:count, count].copy(), agree=pp + mm,
                 conflict=pm + mp)


def scope_keys(name: str) -> list[Key]:
    layer = layer_of(name)
    keys: list[Key] = [("global", None, None), ("module", None, module_of(name))]
    return keys + ([("layer", layer, None)] if layer is not None else [])


def accumulate(models: dict[str, Path], base: str, zero_rtol: float = ZERO_RTOL,
               chunk_bytes: int = CHUNK_BYTES) -> dict[Key, Stats]:
    """One streamed pass over every checkpoint: sufficient statistics per scope.

    Tensor names and shapes must agree (run `merging.preflight.check_structure` first; it is called here too).
    """
    from merging.preflight import PreflightError, check_structure

    names = list(models)
    checkpoints = [StreamedCheckpoint(models[name], remap_bytes=chunk_bytes // len(names)) for name in names]
    try:
        problems = check_structure(dict(zip(names, checkpoints)), reference=base)
        if problems:
            raise PreflightError(problems)
        max_elements = max(1, min(chunk_bytes // (16 * len(names)), _EXACT_FLOAT32_COUNT - 1))
        base_index = names.index(base)
        totals: dict[Key, Stats] = {}
        tensor_names = checkpoints[base_index].names
        for name, chunks in tqdm(stream_chunks(checkpoints, tensor_names, max_elements), desc="weight features",
                                 disable=None, leave=False):
            stats = chunk_stats(chunks, base_index, zero_rtol)
            for key in scope_keys(name):
                if key in totals:
                    totals[key] += stats
                else:
                    totals[key] = stats.copy()
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()
    return totals


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN (a null in the table) where the denominator is 0: the feature is undefined."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def derive(stats: Stats, base: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(pair features as N×N matrices, model features as N-vectors) from one scope's statistics."""
    delta = stats.gram.copy()
    delta[base, :] = delta[:, base] = 0.0
    cross = stats.gram[base].copy()
    cross[base] = 0.0
    theta = stats.gram[base, base] + cross[:, None] + cross[None, :] + delta
    norms = np.sqrt(np.diag(theta))
    tv_sq = np.diag(delta)
    distance = np.sqrt(np.clip(tv_sq[:, None] + tv_sq[None, :] - 2 * delta, 0.0, None))
    kin_cos = np.clip(_ratio(delta, np.sqrt(np.outer(tv_sq, tv_sq))), -1.0, 1.0)
    cov = delta - np.outer(stats.sums, stats.sums) / stats.n
    pearson = np.clip(_ratio(cov, np.sqrt(np.clip(np.outer(np.diag(cov), np.diag(cov)), 0.0, None))), -1.0, 1.0)
    pairs = {
        "cosine": np.clip(_ratio(theta, np.outer(norms, norms)), -1.0, 1.0),
        "l2_distance": distance,
        "param_norm_a": np.repeat(norms[:, None], len(norms), axis=1),
        "param_norm_b": np.repeat(norms[None, :], len(norms), axis=0),
        "kinship_pearson": pearson,
        "kinship_cosine": kin_cos,
        "kinship_cosine_abs": np.abs(kin_cos),
        "kinship_euclidean": distance,  # ‖δ_a − δ_b‖ = ‖θ_a − θ_b‖: the same number, named as each paper does
        "sign_conflict": _ratio(stats.conflict, stats.agree + stats.conflict),
    }
    per_model = {"param_norm": norms, "tv_norm": np.sqrt(tv_sq), "tv_zero_frac": 1.0 - np.diag(stats.agree) / stats.n}
    return pairs, per_model


def _frame(columns: dict[str, list]) -> pl.DataFrame:
    frame = pl.DataFrame({k: np.concatenate(v).tolist() if v else [] for k, v in columns.items()}, schema=SCHEMA)
    return conform(frame.with_columns(pl.col("value").fill_nan(None)))


def feature_rows(totals: dict[Key, Stats], names: list[str], base: str,
                 groups: dict[str, tuple[str, ...]] | None = None) -> pl.DataFrame:
    """The similarity rows (model_a, model_b, feature, scope, layer, module, value, n, source)."""
    columns: dict[str, list] = {k: [] for k in SCHEMA}
    first, second = np.triu_indices(len(names), k=1)
    named = np.array(names, dtype=object)
    group_index = {label: [names.index(m) for m in members] for label, members in (groups or {}).items()}

    def add(model_a, model_b, feature: str, key: Key, n: int, values: np.ndarray) -> None:
        size = len(values)
        scope, layer, module = key
        for column, value in (("model_a", model_a), ("model_b", model_b), ("feature", feature), ("scope", scope),
                              ("layer", layer), ("module", module), ("n", n), ("source", "weights")):
            columns[column].append(np.full(size, value, dtype=object))
        columns["value"].append(np.asarray(values, dtype=np.float64))

    for key, stats in sorted(totals.items(), key=lambda item: (item[0][0], item[0][1] or 0, item[0][2] or "")):
        pairs, per_model = derive(stats, names.index(base))
        for feature, matrix in pairs.items():
            add(named[first], named[second], feature, key, stats.n, matrix[first, second])
        for feature, vector in per_model.items():
            add(named, None, feature, key, stats.n, vector)
        for label, members in group_index.items():
            a, b = np.triu_indices(len(members), k=1)
            rows, cols = np.array(members)[a], np.array(members)[b]
            for feature in GROUP_FEATURES:
                add(np.array([label], dtype=object), None, f"group_{feature}", key, stats.n,
                    [pairs[feature][rows, cols].mean()])
    return _frame(columns)


def weight_features(models: dict[str, Path], base: str, groups: dict[str, tuple[str, ...]] | None = None,
                    zero_rtol: float = ZERO_RTOL, chunk_bytes: int = CHUNK_BYTES) -> pl.DataFrame:
    """Every weight feature for every pair of `models` (name -> checkpoint folder), task vectors against `base`.

    `groups` maps a label (a merge's name) to the models it combines: group kinship = mean over their pairs.
    """
    if base not in models:
        raise ValueError(f"base {base!r} is not one of the models ({', '.join(models)})")
    return feature_rows(accumulate(models, base, zero_rtol, chunk_bytes), list(models), base, groups)


def code_version() -> str:
    """Digest of the code that computes the features: a change to it invalidates cached results."""
    import merging.streaming

    return files_digest([Path(merging.streaming.__file__), Path(__file__)])


def cache_key(models: dict[str, Path], base: str, groups: dict[str, tuple[str, ...]] | None,
              zero_rtol: float) -> str:
    return make_key("weight_features", code_version(), [[name, content_digest(path)] for name, path in models.items()],
                     base, {k: list(v) for k, v in (groups or {}).items()}, zero_rtol)


def cached_weight_features(models: dict[str, Path], base: str, cache_dir: Path,
                           groups: dict[str, tuple[str, ...]] | None = None,
                           zero_rtol: float = ZERO_RTOL) -> tuple[pl.DataFrame, bool]:
    """`weight_features`, kept in `cache_dir` by content of every model + code version; (rows, was_cached)."""
    return cached_frame(cache_dir, "weight_features", ALL_MODELS, cache_key(models, base, groups, zero_rtol),
                        lambda: weight_features(models, base, groups, zero_rtol))
