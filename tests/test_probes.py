"""Batched layerwise probes: planted features, Hewitt & Liang controls, MDL, and scikit-learn agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from scipy.stats import pearsonr

from probing.probes import (Split, control_labels, fit_logistic, logits_of, online_codelength, probe_classification,
                            probe_regression, standardise)


def planted(n=300, d=48, layers=3, seed=0):
    """Layer 0: noise; layer 1: weak signal; layer 2: a linearly separable feature planted in one direction."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(layers, n, d))
    x[1, :, 0] += 0.5 * (2 * y - 1)
    x[2, :, 3] += 4.0 * (2 * y - 1)
    order = rng.permutation(n)
    a, b = int(0.6 * n), int(0.8 * n)
    train, dev, test = (np.isin(np.arange(n), order[lo:hi]) for lo, hi in ((0, a), (a, b), (b, n)))
    return torch.from_numpy(x).float(), y, Split(train, dev, test)


def test_planted_feature_scores_high_and_control_stays_near_chance():
    x, y, split = planted()
    keys = [f"item{i}" for i in range(len(y))]
    controls = np.stack([control_labels(keys, y, seed) for seed in (0, 1, 2)])
    scores = probe_classification(standardise(x, split.train), y, controls, split, 2)
    assert scores.task["macro_f1"][2] >= 0.95 and scores.task["accuracy"][2] >= 0.95
    assert scores.task["macro_f1"][0] < 0.7  # pure noise layer
    assert np.all(np.abs(scores.control["macro_f1"][:, 2].mean() - 0.5) < 0.15)
    assert scores.task["macro_f1"][2] - scores.control["macro_f1"][:, 2].mean() > 0.3  # selectivity
    assert np.all(scores.stderr["macro_f1"][:2] > 0)


def test_control_labels_are_consistent_per_type_and_follow_the_label_distribution():
    keys = ["cat", "dog", "cat", "cup", "dog", "cat"] * 50
    labels = np.array([0, 1, 0, 1, 1, 0] * 50)
    a, b = control_labels(keys, labels, 0), control_labels(keys, labels, 0)
    np.testing.assert_array_equal(a, b)
    for key in set(keys):
        assert len({a[i] for i, k in enumerate(keys) if k == key}) == 1
    many = control_labels([str(i) for i in range(4000)], np.array([0, 0, 0, 1] * 1000), 1)
    assert abs(many.mean() - 0.25) < 0.03


def test_batched_fit_equals_sklearn_per_layer_and_c():
    x, y, split = planted(n=160, d=20)
    xs = standardise(x, split.train)
    cs = (0.05, 1.0)
    n_train = int(split.train.sum())
    l2 = torch.tensor([[1 / (c * n_train) for c in cs]] * 3)
    tr = torch.from_numpy(split.train)
    weight, bias = fit_logistic(xs[:, tr], torch.from_numpy(y[split.train]).expand(2, -1), l2, 2)
    proba = torch.softmax(logits_of(xs[:, ~tr], weight, bias), -1)
    for layer in range(3):
        for g, c in enumerate(cs):
            clf = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(xs[layer, tr].numpy(), y[split.train])
            expected = clf.predict_proba(xs[layer, ~tr].numpy())
            np.testing.assert_allclose(proba[layer, g].numpy(), expected, atol=2e-3)


def test_regression_probe_matches_ridge_and_pearson():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 200, 30))
    target = x[1] @ rng.normal(size=30) + 0.1 * rng.normal(size=200)
    split = Split(*(np.isin(np.arange(200), r) for r in (range(120), range(120, 160), range(160, 200))))
    xs = standardise(torch.from_numpy(x).float(), split.train)
    controls = np.stack([control_labels([str(i) for i in range(200)], target, 0)])
    scores = probe_regression(xs, target, controls, split, c_grid=(1.0,))
    assert scores.task["pearson"][1] > 0.95 and abs(scores.task["pearson"][0]) < 0.4
    assert abs(scores.control["pearson"][0, 1]) < 0.4
    ridge = Ridge(alpha=1.0).fit(xs[1, split.train].numpy(), target[split.train])
    expected = pearsonr(ridge.predict(xs[1, split.test].numpy()), target[split.test])[0]
    assert scores.task["pearson"][1] == pytest.approx(expected, abs=1e-4)


def test_mdl_compresses_planted_labels_better_than_control():
    x, y, split = planted()
    xs = standardise(x, split.train)
    task_bits = online_codelength(xs, y, split.train, 2, seed=0)
    control_bits = online_codelength(xs, control_labels([str(i) for i in range(len(y))], y, 0), split.train, 2, 0)
    uniform = split.train.sum()
    assert task_bits[2] < 0.5 * uniform < control_bits[2]
    assert task_bits[2] < task_bits[0]
