"""Functional similarity: each measure against an independent reference (scikit-learn cosine, the HSIC form of
CKA, torch.distributions KL), its invariances, and a model against itself through the real capture store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from scipy.stats import ortho_group
from sklearn.metrics.pairwise import cosine_similarity

from merging.checkpoints import LoadOptions, load_model
from probing.capture import Batch, TopK
from probing.hooks import HookRunner
from probing.similarity.functional import (activation_cosine, cached_functional_features, functional_features,
                                           functional_jobs, linear_cka, pattern_cosine, topk_kl)
from probing.similarity.registry import FEATURES
from probing.similarity.unlabeled import TokenWindows
from probing.store import CaptureStore, capture_model, model_ref


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from centred Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC = tr(KHLH)."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


def test_cka_equals_hsic_form_and_is_invariant():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    y = x @ rng.normal(size=(8, 12)) + 0.5 * rng.normal(size=(60, 12))
    value = linear_cka(torch.from_numpy(x), torch.from_numpy(y))
    assert value == pytest.approx(hsic_cka(x, y), rel=1e-10) and 0 < value < 1
    rotated = 3.7 * y @ ortho_group.rvs(12, random_state=1)
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(rotated)) == pytest.approx(value, rel=1e-10)
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(1.0, rel=1e-12)


def test_cosines_equal_scikit_learn():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    expected = np.diag(cosine_similarity(x, y)).mean()
    assert activation_cosine(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-12)
    a, b = rng.random((5, 3, 10)), rng.random((5, 3, 10))  # [windows, heads, packed pattern]
    per_head = [cosine_similarity(a[:, h].reshape(1, -1), b[:, h].reshape(1, -1))[0, 0] for h in range(3)]
    np.testing.assert_allclose(pattern_cosine(torch.from_numpy(a), torch.from_numpy(b)), per_head, rtol=1e-12)


def test_topk_kl_equals_torch_distributions():
    torch.manual_seed(0)
    logits_a, logits_b = torch.randn(2, 7, 40) * 2, torch.randn(2, 7, 40) * 2
    batch = Batch(torch.zeros(2, 7), torch.ones(2, 7), torch.arange(2)[:, None])
    full = TopK(k=40)
    a, b = full(logits_a, batch), full(logits_b, batch)
    a, b = ({k: v[:, 0] for k, v in d.items()} for d in (a, b))
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logits_a),
                                                 torch.distributions.Categorical(logits=logits_b)).reshape(-1)
    torch.testing.assert_close(topk_kl(a, b, 40), expected.double(), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(topk_kl(b, a, 40), topk_kl(a, b, 40))  # ordered: KL is not symmetric
    truncated = TopK(k=20)
    ta, tb = ({k: v[:, 0] for k, v in truncated(x, batch).items()} for x in (logits_a, logits_b))
    approx = topk_kl(ta, tb, 40)
    assert (approx - expected.double()).abs().mean() < 0.1 * expected.mean()
    torch.testing.assert_close(topk_kl(ta, ta, 40), torch.zeros(14, dtype=torch.float64), atol=1e-6, rtol=0)


def test_model_against_itself_through_the_store(tiny_family, tmp_path):
    windows = TokenWindows(tokens=96, window=24)
    store = CaptureStore(tmp_path / "captures")
    models = [model_ref(name, tiny_family[name]) for name in ("a", "b")]
    for model in models:
        runner = HookRunner(*load_model(model.folder, LoadOptions()))
        capture_model(runner, model, functional_jobs(windows, model.n_blocks, top_k=64), store, "float32",
                      log=lambda _: None)
    twin = model_ref("a-again", tiny_family["a"])
    rows = functional_features([*models, twin], windows, store, "float32", top_k=64)
    self_rows = rows.filter((pl.col("model_a") == "a") & (pl.col("model_b") == "a-again")
                            | (pl.col("model_a") == "a-again") & (pl.col("model_b") == "a"))
    expected = {"activation_cosine": 1.0, "cka": 1.0, "attention_cosine": 1.0, "kl": 0.0}
    for feature, value in expected.items():
        values = self_rows.filter(pl.col("feature") == feature)["value"]
        assert len(values) > 0
        np.testing.assert_allclose(values, value, atol=1e-6)
    other = rows.filter((pl.col("model_a") == "a") & (pl.col("model_b") == "b"))
    assert (other.filter(pl.col("feature") == "kl")["value"] > 1e-4).all()
    assert (other.filter(pl.col("feature") == "cka")["value"] < 1 - 1e-6).any()
    for feature, scope in rows.select("feature", "scope").unique().iter_rows():
        assert FEATURES[feature].source == "functional" and scope in FEATURES[feature].scopes


def test_topk_rest_mass_of_a_peaked_distribution_is_kept():
    """1 - Σ top-k underflows to 0 in float32 when one token holds almost all mass; the rest must not be lost."""
    logits = torch.zeros(1, 1, 40)
    logits[..., 0] = 30.0
    other = torch.randn(1, 1, 40)
    batch = Batch(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long))
    peaked, flat = ({k: v[:, 0] for k, v in TopK(k=5)(x, batch).items()} for x in (logits, other))
    expected_rest = torch.logsumexp(torch.log_softmax(logits, -1)[..., 5:], -1)  # the 35 tokens outside the top 5
    torch.testing.assert_close(peaked["log_rest"].reshape(()), expected_rest.reshape(()), atol=1e-4, rtol=1e-5)
    assert torch.isfinite(topk_kl(flat, peaked, 40)).all()


def test_all_pairs_at_once_equal_the_per_pair_measures(tiny_family, tmp_path):
    """`functional_features` computes each feature for all pairs of a layer in one product; every value equals the
    per-pair float64 measure on the same stored captures, for all pairs and for a subset whose hubs are not
    contiguous (the incremental case: one model added to a run)."""
    windows = TokenWindows(tokens=96, window=24)
    store = CaptureStore(tmp_path / "captures")
    models = [model_ref(name, tiny_family[name]) for name in ("a", "b", "base")]
    for model in models:
        capture_model(HookRunner(*load_model(model.folder, LoadOptions())), model,
                      functional_jobs(windows, model.n_blocks, top_k=64), store, "float32", log=lambda _: None)
    job = functional_jobs(windows, models[0].n_blocks, top_k=64)[0]

    def stored(model, request):
        return store.load(job.key(request, model.digest, "float32"))

    def expected(a, b) -> dict[tuple, float]:
        out = {}
        for layer, request in enumerate(job.requests[:4]):
            x, y = (stored(m, request)["value"].double().flatten(0, 1) for m in (a, b))
            out[("activation_cosine", layer, None)] = activation_cosine(x, y)
            out[("cka", layer, None)] = linear_cka(x, y)
        for block, request in enumerate(job.requests[4:7]):
            for head, v in enumerate(pattern_cosine(stored(a, request)["value"], stored(b, request)["value"])):
                out[("attention_cosine", block + 1, head)] = v.item()
        kl = topk_kl(stored(a, job.requests[-1]), stored(b, job.requests[-1]), a.vocab_size)
        out[("kl", None, "mean")] = kl.mean().item()
        return out

    for pairs in (None, [(models[0], models[1]), (models[2], models[1])]):
        rows = functional_features(models, windows, store, "float32", top_k=64, pairs=pairs)
        for a, b in pairs or [(models[0], models[1]), (models[0], models[2]), (models[1], models[2])]:
            mine = rows.filter((pl.col("model_a") == a.name) & (pl.col("model_b") == b.name))
            found = {(f, layer, head if f == "attention_cosine" else stat): v for f, layer, head, stat, v in
                     mine.select("feature", "layer", "head", "stat", "value").iter_rows()}
            for key, value in expected(a, b).items():
                assert found[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (a.name, b.name, key)


def test_models_of_identical_content_get_their_own_names_from_the_pair_cache(tiny_family, tmp_path, monkeypatch):
    """Pair entries are keyed by content: a second model with the same weights (a slerp that reduces to linear)
    hits the first one's entries, and its rows must still carry its own name, on every call; the first call's rows
    equal every later call's to the bit, although a pair's rounding depends on its place in the batched products
    (the twin's computed rows are nudged by that much here)."""
    import probing.similarity.functional as functional

    compute = functional.functional_features

    def position_dependent(*args, **kwargs):
        rows = compute(*args, **kwargs)
        twin = (pl.col("model_a") == "twin") | (pl.col("model_b") == "twin")
        return rows.with_columns(pl.when(twin).then(pl.col("value") * (1 + 1e-13)).otherwise(pl.col("value")))

    monkeypatch.setattr(functional, "functional_features", position_dependent)
    windows = TokenWindows(tokens=96, window=24)
    store = CaptureStore(tmp_path / "captures")
    models = [model_ref(name, tiny_family[name]) for name in ("a", "b")] + [model_ref("twin", tiny_family["b"])]
    for model in models[:2]:
        capture_model(HookRunner(*load_model(model.folder, LoadOptions())), model,
                      functional_jobs(windows, model.n_blocks, top_k=64), store, "float32", log=lambda _: None)
    fresh = cached_functional_features(models, windows, store, "float32", top_k=64)
    again = cached_functional_features(models, windows, store, "float32", top_k=64)
    for rows in (fresh, again):
        pairs = set(rows.select("model_a", "model_b").unique().iter_rows())
        assert {("a", "b"), ("a", "twin"), ("b", "twin")} <= pairs and pairs <= {
            ("a", "b"), ("b", "a"), ("a", "twin"), ("twin", "a"), ("b", "twin"), ("twin", "b")}
    assert fresh.equals(again)
    twin_kl = again.filter((pl.col("model_a") == "a") & (pl.col("model_b") == "twin") & (pl.col("feature") == "kl"))
    b_kl = again.filter((pl.col("model_a") == "a") & (pl.col("model_b") == "b") & (pl.col("feature") == "kl"))
    assert len(twin_kl) > 0 and twin_kl["value"].to_list() == b_kl["value"].to_list()


def test_the_similarity_set_imports_no_suite_builder():
    """Every run imports the similarity set; the suite builder's checks import scikit-learn (~0.6 s), which a run
    that fits no probe never needs."""
    import subprocess
    import sys

    code = ("import sys, probing.similarity.unlabeled as u; u.pool_text(); "
            "found = [m for m in sys.modules if m.startswith(('sklearn', 'probing.build_suite'))]; "
            "assert not found, found[:3]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
