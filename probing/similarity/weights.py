"""Weight-space selector features (SimMerge structural signals, Model Kinship, task-vector statistics), streamed.

Every feature of every pair is a function of a few sufficient statistics — a Gram matrix, sums, and counts of
(non-)zero and sign-agreeing coordinates — which add up over tensors. So one pass reads each tensor of every
model once, in row chunks, and accumulates those statistics per scope (global, per layer, per module type);
features are derived at the end. Feature names and meanings: `probing.similarity.registry`, docs/FEATURES.md.

Rows of the Gram matrix are the base parameters θ_b (at the base's index) and task vectors δ_i = θ_i − θ_b for
the other models: parameter-space dot products follow as θ_i·θ_j = θ_b·θ_b + θ_b·δ_i + θ_b·δ_j + δ_i·δ_j, and
distances come from the small δ Gram, which avoids the cancellation of ‖θ_i‖² + ‖θ_j‖² − 2θ_i·θ_j.

An entry of those statistics for a pair depends only on the base's and the two models' contents, so the cache
keeps one entry per pair (and per model: its own row and sums): a run with one new model streams the checkpoints
once but computes only the new model's Gram rows, and the table is derived from the whole matrix as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from merging.checkpoints import content_digest
from merging.streaming import StreamedCheckpoint, layer_of, module_of, stream_chunks
from probing.similarity.registry import conform
from runstore.atomic import read_cached
from runstore.cache import cache_key as make_key
from runstore.cache import content_digest as files_digest
from runstore.cache import record
from runstore.tables import write_parquet

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
    """Sufficient statistics of one scope; columns follow the model order, index `base` holds θ_b; rows too, or
    only some models' rows (`accumulate(rows_of=...)`)."""

    n: int
    gram: np.ndarray  # R×N dot products of the rows (θ_b at the base index, δ_i elsewhere)
    sums: np.ndarray  # R: Σ δ_i (Σ θ_b for the base)
    agree: np.ndarray  # R×N: coordinates where δ_i, δ_j are both non-near-zero with the same sign
    conflict: np.ndarray  # R×N: ... with opposite signs

    def __iadd__(self, other: Stats) -> Stats:
        self.n += other.n
        for field in ("gram", "sums", "agree", "conflict"):
            getattr(self, field).__iadd__(getattr(other, field))
        return self

    def copy(self) -> Stats:
        return Stats(self.n, self.gram.copy(), self.sums.copy(), self.agree.copy(), self.conflict.copy())


def chunk_stats(chunks: list[torch.Tensor], base: int, zero_rtol: float, rows_of: list[int] | None = None) -> Stats:
    """Statistics of one chunk (one tensor row range per model, any float dtype), in few passes over memory; only
    the Gram rows of the models at `rows_of` (default: all).

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
    picked = rows[:count] if rows_of is None else rows[rows_of]
    picked_signs = signs if rows_of is None else signs[list(rows_of) + [count + i for i in rows_of]]
    gram = (picked @ rows.T).numpy()
    blocks = (picked_signs @ signs.T).double().numpy()
    r = len(picked)
    pp, pm, mp, mm = blocks[:r, :count], blocks[:r, count:], blocks[r:, :count], blocks[r:, count:]
    return Stats(n=size, gram=gram[:, :count].copy(), sums=gram[:, count].copy(), agree=pp + mm, conflict=pm + mp)


def scope_keys(name: str) -> list[Key]:
    layer = layer_of(name)
    keys: list[Key] = [("global", None, None), ("module", None, module_of(name))]
    return keys + ([("layer", layer, None)] if layer is not None else [])


def accumulate(models: dict[str, Path], base: str, zero_rtol: float = ZERO_RTOL, chunk_bytes: int = CHUNK_BYTES,
               rows_of: list[str] | None = None) -> dict[Key, Stats]:
    """One streamed pass over every checkpoint: sufficient statistics per scope (the Gram rows of the models named
    in `rows_of` only, in that order, when given).

    The base's tensors must be in every model, with the same shapes (`merging.preflight.check_structure`).
    """
    from merging.preflight import PreflightError, check_structure

    names = list(models)
    checkpoints = [StreamedCheckpoint(models[name], remap_bytes=chunk_bytes // len(names)) for name in names]
    try:
        # A model that stores more than the base (the number_erased child: its own output head, which is the base's
        # embedding, and projection biases) is compared on the tensors all of them store.
        problems = check_structure(dict(zip(names, checkpoints)), reference=base, merging=False)
        if problems:
            raise PreflightError(problems)
        max_elements = max(1, min(chunk_bytes // (16 * len(names)), _EXACT_FLOAT32_COUNT - 1))
        base_index = names.index(base)
        picked = None if rows_of is None else [names.index(name) for name in rows_of]
        totals: dict[Key, Stats] = {}
        tensor_names = [t for t in checkpoints[base_index].names if all(t in c.shapes for c in checkpoints)]
        for name, chunks in tqdm(stream_chunks(checkpoints, tensor_names, max_elements), desc="weight features",
                                 disable=None, leave=False):
            stats = chunk_stats(chunks, base_index, zero_rtol, picked)
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


Pair = tuple[int, int]  # model indices i <= j: (i, i) is a model's own entry (its Gram diagonal and sums)


def _pair_key(code: str, zero_rtol: float, digests: list[str], base: int, pair: Pair) -> str:
    """An entry's key: its role (the base's own, a model's own, base × model, model × model; a copy of the base
    must not share the base's entries) and the contents it depends on, the pair's in a fixed order."""
    i, j = pair
    role = ("base" if i == base else "own") if i == j else ("cross" if base in pair else "pair")
    return make_key("weight_pair", code, zero_rtol, digests[base], role, sorted({digests[i], digests[j]}))


def _entry(totals: dict[Key, Stats], row: int, column: int, own: bool) -> pl.DataFrame:
    """One entry's statistics per scope, from row `row` and column `column` of `accumulate`'s partial totals."""
    keys = list(totals)
    return pl.DataFrame({
        "scope": [k[0] for k in keys], "layer": [k[1] for k in keys], "module": [k[2] for k in keys],
        "n": [totals[k].n for k in keys], "gram": [float(totals[k].gram[row, column]) for k in keys],
        "agree": [float(totals[k].agree[row, column]) for k in keys],
        "conflict": [float(totals[k].conflict[row, column]) for k in keys],
        "sum": [float(totals[k].sums[row]) if own else None for k in keys]},
        schema={"scope": pl.String, "layer": pl.Int64, "module": pl.String, "n": pl.Int64, "gram": pl.Float64,
                "agree": pl.Float64, "conflict": pl.Float64, "sum": pl.Float64})


def _compute_entries(models: dict[str, Path], base: str, missing: list[Pair],
                     zero_rtol: float) -> dict[Pair, pl.DataFrame]:
    """The missing entries from one streamed pass over the base and the models they involve, computing only the
    Gram rows of a cover of them: the models missing their own entry (new ones), then one side of any pair left."""
    names = list(models)
    cover = sorted({i for i, j in missing if i == j})
    for i, j in missing:
        if i not in cover and j not in cover:
            cover.append(j)
    streamed = sorted({names.index(base), *(k for pair in missing for k in pair)})
    totals = accumulate({names[k]: models[names[k]] for k in streamed}, base, zero_rtol,
                        rows_of=None if cover == streamed else [names[k] for k in cover])
    entries = {}
    for i, j in missing:
        row, column = (i, j) if i in cover else (j, i)
        entries[(i, j)] = _entry(totals, cover.index(row), streamed.index(column), own=i == j)
    return entries


def _assemble(entries: dict[Pair, pl.DataFrame], size: int) -> dict[Key, Stats]:
    """The whole N×N statistics per scope from every entry."""
    totals: dict[Key, Stats] = {}
    for (i, j), frame in entries.items():
        for scope, layer, module, n, gram, agree, conflict, total in frame.iter_rows():
            stats = totals.setdefault((scope, layer, module), Stats(n, np.zeros((size, size)), np.zeros(size),
                                                                    np.zeros((size, size)), np.zeros((size, size))))
            for field, value in (("gram", gram), ("agree", agree), ("conflict", conflict)):
                getattr(stats, field)[i, j] = getattr(stats, field)[j, i] = value
            if i == j:
                stats.sums[i] = total
    return totals


def cached_weight_features(models: dict[str, Path], base: str, cache_dir: Path | None,
                           groups: dict[str, tuple[str, ...]] | None = None,
                           zero_rtol: float = ZERO_RTOL) -> tuple[pl.DataFrame, bool]:
    """`weight_features` from statistics cached per pair in `cache_dir/weight_features` (by the contents of the
    base and the pair, code version and `zero_rtol`): a run with new models computes only the pairs they are in.
    Each entry is reported to the ledger (a model's own entry by its name, a pair as "a|b"; the misses share the
    pass's seconds evenly). Returns (rows, whether every entry was cached)."""
    if base not in models:
        raise ValueError(f"base {base!r} is not one of the models ({', '.join(models)})")
    names, code = list(models), code_version()
    digests, base_index = [content_digest(models[name], cache_dir) for name in names], names.index(base)
    pairs = [(i, j) for i in range(len(names)) for j in range(i, len(names))]
    folder = Path(cache_dir) / "weight_features" if cache_dir is not None else None
    paths = {pair: folder / f"{_pair_key(code, zero_rtol, digests, base_index, pair)}.parquet" for pair in pairs} \
        if folder is not None else {}
    entries = {pair: read_cached(paths[pair], pl.read_parquet) if paths else None for pair in pairs}
    missing = [pair for pair in pairs if entries[pair] is None]
    started = time.perf_counter()
    if missing:
        stored: dict[Path, pl.DataFrame] = {}  # pairs of identical content share one entry: the first one computed
        for pair, frame in _compute_entries(models, base, missing, zero_rtol).items():
            entries[pair] = stored.setdefault(paths[pair], frame) if paths else frame
        for path, frame in stored.items():
            write_parquet(frame, path)
    share = (time.perf_counter() - started) / max(1, len(missing))
    for i, j in pairs:
        hit = (i, j) not in missing
        record(cache_dir, "weight_features", names[i] if i == j else f"{names[i]}|{names[j]}", hit,
               0.0 if hit else share)
    return feature_rows(_assemble(entries, len(names)), names, base, groups), not missing
