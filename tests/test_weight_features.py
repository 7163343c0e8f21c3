"""Weight features: closed forms on models with known relations, numpy agreement, streamed == whole-model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal
from safetensors.numpy import load_file
from safetensors.torch import save_file

from merging.preflight import PreflightError
from merging.streaming import layer_of, module_of
from probing.similarity.weights import accumulate, cached_weight_features, derive, weight_features
from runstore.cache import read_ledger, start_run

SHAPES = {"model.embed_tokens.weight": (12, 8), "model.norm.weight": (8,)}
for _layer in range(2):
    SHAPES |= {f"model.layers.{_layer}.self_attn.q_proj.weight": (8, 8),
               f"model.layers.{_layer}.mlp.up_proj.weight": (16, 8),
               f"model.layers.{_layer}.input_layernorm.weight": (8,)}
SIZES = [int(np.prod(s)) for s in SHAPES.values()]
C = 2.5  # scaled child: base + C·δ


def _split(vector: np.ndarray) -> dict[str, torch.Tensor]:
    parts = np.split(vector, np.cumsum(SIZES)[:-1])
    return {name: torch.from_numpy(part.reshape(shape).copy()) for (name, shape), part in zip(SHAPES.items(), parts)}


def _save(folder: Path, vector: np.ndarray, shards: int = 1, dtype=torch.float64) -> Path:
    folder.mkdir(parents=True)
    tensors = {k: v.to(dtype) for k, v in _split(vector).items()}
    names = list(tensors)
    for i, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
        save_file({names[j]: tensors[names[j]] for j in chunk}, str(folder / f"model-{i:05d}.safetensors"))
    return folder


@pytest.fixture(scope="module")
def related(tmp_path_factory) -> tuple[dict[str, Path], dict[str, np.ndarray]]:
    """base; up = base+δ; scaled = base+Cδ; neg = base−δ; orth = base+δ⊥; flip = δ with 1/4 of its signs flipped;
    tiny = changes below the near-zero tolerance. δ has exact zeros on 30% of coordinates; δ⊥ ⟂ δ and ⟂ 1."""
    rng = np.random.default_rng(0)
    dim = sum(SIZES)
    base = rng.normal(0, 0.5, dim) + 0.1
    delta = rng.normal(0.01, 0.03, dim) * (rng.random(dim) >= 0.3)
    basis = np.linalg.qr(np.stack([np.ones(dim), delta, rng.normal(size=dim)], axis=1))[0]
    orth = 0.04 * basis[:, 2] * np.sqrt(dim)
    flips = np.flatnonzero(delta)[rng.permutation(np.count_nonzero(delta))[: np.count_nonzero(delta) // 4]]
    flip = delta.copy()
    flip[flips] *= -1
    vectors = {"base": base, "up": base + delta, "scaled": base + C * delta, "neg": base - delta,
               "orth": base + orth, "flip": base + flip, "tiny": base + 1e-8 * np.abs(base)}
    root = tmp_path_factory.mktemp("related")
    paths = {name: _save(root / name, v, shards=2 if name == "up" else 1) for name, v in vectors.items()}
    truth = {"delta": delta, "orth": orth, "flipped": len(flips), "changed": np.count_nonzero(delta)}
    return paths, truth


def _value(frame: pl.DataFrame, a: str, b: str | None, feature: str, scope: str = "global") -> float:
    rows = frame.filter((pl.col("model_a") == a) & (pl.col("feature") == feature) & (pl.col("scope") == scope)
                        & (pl.col("model_b").is_null() if b is None else pl.col("model_b") == b))
    assert rows.height == 1, (a, b, feature, rows)
    return rows["value"][0]


def test_closed_forms(related):
    paths, truth = related
    frame = weight_features(paths, base="base", groups={"up+scaled+neg/x": ("up", "scaled", "neg")})
    norm = np.linalg.norm(truth["delta"])
    assert _value(frame, "up", "scaled", "kinship_cosine") == pytest.approx(1.0, abs=1e-12)
    assert _value(frame, "up", "scaled", "kinship_pearson") == pytest.approx(1.0, abs=1e-12)
    assert _value(frame, "up", "scaled", "kinship_euclidean") == pytest.approx((C - 1) * norm, rel=1e-9)
    assert _value(frame, "up", "scaled", "sign_conflict") == 0.0
    assert _value(frame, "up", "neg", "kinship_cosine") == pytest.approx(-1.0, abs=1e-12)
    assert _value(frame, "up", "neg", "kinship_cosine_abs") == pytest.approx(1.0, abs=1e-12)
    assert _value(frame, "up", "neg", "kinship_pearson") == pytest.approx(-1.0, abs=1e-12)
    assert _value(frame, "up", "neg", "l2_distance") == pytest.approx(2 * norm, rel=1e-9)
    assert _value(frame, "up", "neg", "sign_conflict") == 1.0
    assert _value(frame, "up", "orth", "kinship_cosine") == pytest.approx(0.0, abs=1e-9)
    assert _value(frame, "up", "orth", "kinship_pearson") == pytest.approx(0.0, abs=1e-9)
    assert _value(frame, "up", "orth", "kinship_euclidean") == pytest.approx(
        np.hypot(norm, np.linalg.norm(truth["orth"])), rel=1e-9)
    assert _value(frame, "up", "flip", "sign_conflict") == pytest.approx(truth["flipped"] / truth["changed"])
    assert _value(frame, "scaled", None, "tv_norm") == pytest.approx(C * norm, rel=1e-9)
    assert _value(frame, "up", None, "tv_zero_frac") == pytest.approx(1 - truth["changed"] / sum(SIZES))
    assert _value(frame, "tiny", None, "tv_zero_frac") == 1.0  # changes below ZERO_RTOL·|θ_base| are "unchanged"
    assert _value(frame, "tiny", None, "tv_norm") > 0
    assert _value(frame, "base", "up", "kinship_pearson") is None  # δ_base = 0: undefined, a null not a NaN
    assert _value(frame, "up+scaled+neg/x", None, "group_kinship_pearson") == pytest.approx(-1 / 3, abs=1e-12)
    assert _value(frame, "up", "scaled", "param_norm_b") == pytest.approx(_value(frame, "scaled", None, "param_norm"))
    # Closed forms hold tensor by tensor, so in every scope that the children change.
    per_scope = frame.filter((pl.col("model_a") == "up") & (pl.col("model_b") == "neg")
                             & (pl.col("feature") == "kinship_cosine"))
    assert per_scope["value"].to_numpy() == pytest.approx(-1.0, abs=1e-12)
    assert set(per_scope["scope"]) == {"global", "layer", "module"}


def _reference(paths: dict[str, Path], names: list[str], keep) -> dict[str, np.ndarray]:
    """Whole-model computation: every checkpoint loaded at once, concatenated into one float64 vector."""
    loaded = {}
    for name in names:
        tensors = {}
        for shard in sorted(paths[name].glob("*.safetensors")):
            tensors |= load_file(shard)
        loaded[name] = np.concatenate([tensors[t].astype(np.float64).ravel() for t in SHAPES if keep(t)])
    return loaded


@pytest.mark.parametrize("chunk_bytes", [4096, 64 << 20])
def test_streamed_equals_whole_model_numpy(related, chunk_bytes):
    paths, _ = related
    names = list(paths)
    totals = accumulate(paths, "base", chunk_bytes=chunk_bytes)
    scopes = {("global", None, None): lambda t: True, ("layer", 1, None): lambda t: layer_of(t) == 1,
              ("module", None, "mlp"): lambda t: module_of(t) == "mlp"}
    for key, keep in scopes.items():
        vectors = _reference(paths, names, keep)
        pairs, per_model = derive(totals[key], names.index("base"))
        deltas = {n: vectors[n] - vectors["base"] for n in names}
        for i, a in enumerate(names):
            assert per_model["param_norm"][i] == pytest.approx(np.linalg.norm(vectors[a]), rel=1e-12)
            for j, b in enumerate(names):
                cos = vectors[a] @ vectors[b] / np.linalg.norm(vectors[a]) / np.linalg.norm(vectors[b])
                assert pairs["cosine"][i, j] == pytest.approx(cos, abs=1e-9)
                assert pairs["l2_distance"][i, j] == pytest.approx(np.linalg.norm(vectors[a] - vectors[b]),
                                                                   rel=1e-9, abs=1e-12)
                if "base" in (a, b):
                    continue
                da, db = deltas[a], deltas[b]
                assert pairs["kinship_pearson"][i, j] == pytest.approx(np.corrcoef(da, db)[0, 1], abs=1e-9)
                assert pairs["kinship_cosine"][i, j] == pytest.approx(
                    da @ db / np.linalg.norm(da) / np.linalg.norm(db), abs=1e-9)


def test_bf16_checkpoints_accumulate_in_float64(tmp_path):
    """Low-precision weights are upcast exactly and accumulated in float64."""
    rng = np.random.default_rng(1)
    vectors = {"base": rng.normal(0, 0.5, sum(SIZES))}
    vectors["x"] = vectors["base"] + rng.normal(0, 0.05, sum(SIZES))
    paths = {n: _save(tmp_path / n, v, dtype=torch.bfloat16) for n, v in vectors.items()}
    stored = {n: np.concatenate([t.to(torch.bfloat16).double().numpy().ravel() for t in _split(v).values()])
              for n, v in vectors.items()}
    frame = weight_features(paths, "base")
    assert _value(frame, "base", None, "param_norm") == pytest.approx(np.linalg.norm(stored["base"]), rel=1e-12)
    assert _value(frame, "base", "x", "l2_distance") == pytest.approx(
        np.linalg.norm(stored["x"] - stored["base"]), rel=1e-12)


def test_tensor_mismatch_is_a_preflight_error(related, tmp_path):
    paths, _ = related
    odd = tmp_path / "odd"
    odd.mkdir()
    tensors = _split(np.zeros(sum(SIZES)))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(17, 8, dtype=torch.float64)
    save_file(tensors, str(odd / "model.safetensors"))
    with pytest.raises(PreflightError, match=r"shapes: 'odd' differs from 'base'.*up_proj.*\[17, 8\] vs \[16, 8\]"):
        weight_features({"base": paths["base"], "odd": odd}, "base")


def test_scope_parsing():
    assert layer_of("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_of("model.norm.weight") is None
    assert [module_of(n) for n in ("model.layers.3.self_attn.k_proj.bias", "model.layers.3.mlp.down_proj.weight",
                                   "model.layers.3.self_attn.q_norm.weight", "lm_head.weight",
                                   "model.embed_tokens.weight", "model.norm.weight")] == [
        "attention", "mlp", "norms", "embeddings", "embeddings", "norms"]


def test_cache_by_content(related, tmp_path):
    paths, _ = related
    models = {n: paths[n] for n in ("base", "up", "neg")}
    first, cached = cached_weight_features(models, "base", tmp_path)
    again, cached_again = cached_weight_features(models, "base", tmp_path)
    assert (cached, cached_again) == (False, True)
    assert again.equals(first)
    assert_frame_equal(first, weight_features(models, "base"), check_exact=False, rel_tol=1e-12, abs_tol=1e-12)


def test_a_new_model_computes_only_its_pairs_and_gives_the_fresh_table(tiny_family, tmp_path):
    """A run that adds a model computes only its own entry and its pairs (read from the ledger), and its table
    equals computing everything fresh: same rows, same order, values to 1e-12 (group kinship included)."""
    groups = {"a+b/x": ("a", "b")}
    start_run(tmp_path, "first")
    cached_weight_features({n: tiny_family[n] for n in ("base", "a")}, "base", tmp_path)
    start_run(tmp_path, "second")
    grown, cached = cached_weight_features(dict(tiny_family), "base", tmp_path, groups)
    ledger = read_ledger(tmp_path).filter(pl.col("run") == "second")
    assert not cached
    assert set(ledger.filter(~pl.col("hit"))["model"]) == {"b", "base|b", "a|b"}
    assert set(ledger.filter(pl.col("hit"))["model"]) == {"base", "a", "base|a"}
    assert (ledger.filter(~pl.col("hit"))["seconds"] > 0).all()
    fresh = weight_features(dict(tiny_family), "base", groups)
    assert grown.select(pl.exclude("value")).equals(fresh.select(pl.exclude("value")))
    assert_frame_equal(grown, fresh, check_exact=False, rel_tol=1e-12, abs_tol=1e-12)
    assert grown.filter(pl.col("feature").str.starts_with("group_"))["value"].is_not_null().all()


def test_partial_rows_equal_the_full_gram(related):
    """`accumulate(rows_of=...)` gives exactly those rows of the full statistics."""
    paths, _ = related
    full = accumulate(paths, "base")
    names = list(paths)
    rows = accumulate(paths, "base", rows_of=["neg", "base"])
    for key, stats in full.items():
        picked = [names.index("neg"), names.index("base")]
        for field in ("gram", "agree", "conflict"):
            np.testing.assert_allclose(getattr(rows[key], field), getattr(stats, field)[picked], rtol=1e-12)
        np.testing.assert_allclose(rows[key].sums, stats.sums[picked], rtol=1e-12)


def test_real_family_features(real_family):
    """The real embedded family: 30 layers, self-cosine 1, finite kinship, LoRA leaves embeddings and norms alone."""
    models = {n: real_family[n] for n in ("base", "instruct", "math")}
    totals = accumulate(models, "base")
    assert {layer for scope, layer, _ in totals if scope == "layer"} == set(range(30))
    pairs, per_model = derive(totals[("global", None, None)], 0)
    assert np.diag(pairs["cosine"]) == pytest.approx(1.0, abs=1e-12)
    assert np.isfinite([pairs[f][1, 2] for f in ("kinship_pearson", "kinship_cosine", "kinship_euclidean")]).all()
    assert 0 < pairs["kinship_euclidean"][1, 2] < per_model["param_norm"][0]
    assert 0 < pairs["sign_conflict"][1, 2] < 1
    assert 0 < per_model["tv_zero_frac"][1] < 1
    for module in ("embeddings", "norms"):  # the adapters target linear layers only
        _, untouched = derive(totals[("module", None, module)], 0)
        assert untouched["tv_zero_frac"] == pytest.approx(1.0)
    _, attention = derive(totals[("module", None, "attention")], 0)
    assert (attention["tv_zero_frac"][1:] < 0.5).all()


def test_twin_models_give_the_same_table_fresh_and_cached(tiny_family, tmp_path, monkeypatch):
    """Entries are keyed by content: a model with another's weights (a slerp that reduces to linear) shares its
    entries. The first run's table must equal every later run's to the bit, or the tables downstream (correlations,
    the report) are recomputed on a warm run. A Gram row's rounding depends on its position in the product (on the
    real family the twins' entries differed by ~1e-13), so the twin's computed entries are nudged by that much."""
    import probing.similarity.weights as weights

    compute = weights._compute_entries
    names = [*tiny_family, "twin"]

    def position_dependent(models, base, missing, zero_rtol):
        entries = compute(models, base, missing, zero_rtol)
        twin = names.index("twin")
        return {pair: frame.with_columns(pl.col("gram") * (1 + 1e-13)) if twin in pair else frame
                for pair, frame in entries.items()}

    monkeypatch.setattr(weights, "_compute_entries", position_dependent)
    models = {**tiny_family, "twin": tiny_family["b"]}
    first, _ = cached_weight_features(models, "base", tmp_path)
    again, cached = cached_weight_features(models, "base", tmp_path)
    assert cached and again.equals(first)
    twin = first.filter((pl.col("model_a") == "a") & (pl.col("model_b") == "twin"))
    b = first.filter((pl.col("model_a") == "a") & (pl.col("model_b") == "b"))
    assert len(twin) > 0 and twin["value"].to_list() == b["value"].to_list()
