"""Batched layerwise probes: planted features, Hewitt & Liang controls, MDL, and scikit-learn agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from scipy.stats import pearsonr
from sklearn.metrics import f1_score

from scipy.optimize import minimize_scalar

from probing.probes import (Split, _line_search, control_labels, fit_logistic, logits_of, online_codelength,
                            probe_classification, probe_regression, standardise)


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
    assert scores.test_pred.shape == (3, split.test.sum())
    for layer in range(3):
        assert scores.task["macro_f1"][layer] == pytest.approx(
            f1_score(y[split.test], scores.test_pred[layer], average="macro"))


def test_control_labels_are_consistent_per_type_and_follow_the_label_distribution():
    keys = ["cat", "dog", "cat", "cup", "dog", "cat"] * 50
    labels = np.array([0, 1, 0, 1, 1, 0] * 50)
    a, b = control_labels(keys, labels, 0), control_labels(keys, labels, 0)
    np.testing.assert_array_equal(a, b)
    for key in set(keys):
        assert len({a[i] for i, k in enumerate(keys) if k == key}) == 1
    many = control_labels([str(i) for i in range(4000)], np.array([0, 0, 0, 1] * 1000), 1)
    assert abs(many.mean() - 0.25) < 0.03


def sklearn_objective(x: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, c: float) -> float:
    """scikit-learn's LogisticRegression objective: C x summed log-loss + |coef|²/2 (intercept unpenalised), with
    one sigmoid for two classes and a full softmax otherwise."""
    logits = x @ coef.T + intercept
    if coef.shape[0] == 1:
        logits = np.concatenate([np.zeros_like(logits), logits], 1)
    logits -= logits.max(1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return c * -log_p[np.arange(len(y)), y].sum() + 0.5 * (coef ** 2).sum()


def as_sklearn(weight: torch.Tensor, bias: torch.Tensor, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Our [d, C] / [C] fit in scikit-learn's layout (binary: the one sigmoid vector, our class-1 column)."""
    w, b = weight.double().numpy().T, bias.double().numpy()
    return (w[1:], b[1:]) if classes == 2 else (w, b)


@pytest.mark.parametrize("classes", [2, 3, 4, 7])
def test_fit_reaches_sklearns_optimum_for_every_layer_and_c(classes):
    """d > n as on real features (rank-n kernel), and d < n (x spans fewer directions than there are items)."""
    rng = np.random.default_rng(classes)
    n, cs = 60, (0.01, 1.0, 30.0)
    y = np.arange(n) % classes
    for d in (100, 15):
        x = rng.normal(size=(2, n, d)) + 0.4 * y[None, :, None] * (rng.normal(size=d) > 1)
        xt = torch.from_numpy(x).float()
        l2 = torch.tensor([[1 / (c * n) for c in cs]] * 2)
        weight, bias = fit_logistic(xt, torch.from_numpy(y).expand(len(cs), -1), l2, classes, tol=1e-10)
        proba = torch.softmax(logits_of(xt, weight, bias), -1).numpy()
        for layer in range(2):
            xl = xt[layer].double().numpy()
            for g, c in enumerate(cs):
                clf = LogisticRegression(C=c, tol=1e-10, max_iter=100000).fit(xl, y)
                coef, intercept = as_sklearn(weight[layer, g], bias[layer, g], classes)
                ours = sklearn_objective(xl, y, coef, intercept, c)
                theirs = sklearn_objective(xl, y, clf.coef_, clf.intercept_, c)
                assert ours <= theirs + 1e-6 * abs(theirs) and ours == pytest.approx(theirs, rel=1e-5)
                np.testing.assert_allclose(coef, clf.coef_, atol=2e-3 * np.abs(clf.coef_).max())
                np.testing.assert_allclose(proba[layer, g], clf.predict_proba(xl), atol=2e-3)
                np.testing.assert_array_equal(proba[layer, g].argmax(-1), clf.predict(xl))


def test_fit_reaches_sklearns_optimum_when_items_share_features():
    """Real layers can repeat items (sentence pairs sharing a sentence at the embedding layer): a kernel of rank
    well below n, with nearly-null directions beside it, where the solver must stay finite and exact."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=(25, 300))
    x = np.repeat(base, 3, axis=0)[None]  # 75 items, rank 25
    x[0, :5] += 1e-3 * rng.normal(size=(5, 300))  # a few tiny extra directions
    y = (base @ rng.normal(size=300) > 0).repeat(3).astype(np.int64)
    xt = torch.from_numpy(x).float()
    weight, bias = fit_logistic(xt, torch.from_numpy(y)[None], torch.tensor([[1 / (0.01 * 75)]]), 2, tol=1e-10)
    clf = LogisticRegression(C=0.01, tol=1e-10, max_iter=100000).fit(xt[0].double().numpy(), y)
    coef, intercept = as_sklearn(weight[0, 0], bias[0, 0], 2)
    assert np.isfinite(coef).all()
    xd = xt[0].double().numpy()
    assert sklearn_objective(xd, y, coef, intercept, 0.01) == pytest.approx(
        sklearn_objective(xd, y, clf.coef_, clf.intercept_, 0.01), rel=1e-5)
    np.testing.assert_allclose(coef, clf.coef_, atol=5e-3 * np.abs(clf.coef_).max())
    np.testing.assert_array_equal((xd @ coef.T + intercept)[:, 0] > 0, clf.predict(xd) == 1)


def test_fit_stays_at_the_optimum_on_separable_data_with_weak_penalty():
    """Separable classes and C = 1e4: the optimum has large weights; the fit must still be stationary."""
    rng = np.random.default_rng(3)
    for classes in (2, 3):
        n, d = 60, 200
        y = np.arange(n) % classes
        x = torch.from_numpy(rng.normal(size=(1, n, d)) + 3.0 * np.eye(classes)[y] @ rng.normal(size=(classes, d))
                             ).float()
        l2 = torch.tensor([[1 / (1e4 * n)]])
        weight, bias = fit_logistic(x, torch.from_numpy(y)[None], l2, classes, tol=1e-10)
        w = weight[0, 0].double().requires_grad_()
        b = bias[0, 0].double().requires_grad_()
        if classes == 2:  # scikit-learn's binary parametrisation: the class-0 logit is fixed at zero
            logits = torch.stack([torch.zeros(n, dtype=torch.float64), x[0].double() @ w[:, 1] + b[1]], 1)
            penalty = w[:, 1].pow(2).sum()
        else:
            logits, penalty = x[0].double() @ w + b, w.pow(2).sum()
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)) + 0.5 * l2[0, 0] * penalty
        loss.backward()
        scale = w.detach().abs().max().item()
        assert scale > 0.05  # far from the strongly penalised regime
        assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5
        assert (logits.argmax(-1).numpy() == y).all()
        clf = LogisticRegression(C=1e4, tol=1e-10, max_iter=100000).fit(x[0].double().numpy(), y)
        coef, intercept = as_sklearn(weight[0, 0], bias[0, 0], classes)
        assert sklearn_objective(x[0].double().numpy(), y, coef, intercept, 1e4) <= \
            sklearn_objective(x[0].double().numpy(), y, clf.coef_, clf.intercept_, 1e4) * (1 + 1e-6)


def test_task_and_control_probes_equal_a_sklearn_loop_at_the_chosen_c():
    """probe_classification shares one kernel between the task fit (every C) and the control fits (at each layer's
    chosen C): both must predict as scikit-learn's fits at those C values do."""
    x, y, split = planted(n=200, d=40)
    xs = standardise(x, split.train)
    keys = [f"item{i}" for i in range(len(y))]
    controls = np.stack([control_labels(keys, y, seed) for seed in (0, 1)])
    scores = probe_classification(xs, y, controls, split, 2)
    for layer in range(3):
        xl = xs[layer].double().numpy()
        c = scores.chosen_c[layer]
        clf = LogisticRegression(C=c, tol=1e-10, max_iter=100000).fit(xl[split.train], y[split.train])
        np.testing.assert_array_equal(scores.test_pred[layer], clf.predict(xl[split.test]))
        for s, labels in enumerate(controls):
            ref = LogisticRegression(C=c, tol=1e-10, max_iter=100000).fit(xl[split.train], labels[split.train])
            assert scores.control["macro_f1"][s, layer] == pytest.approx(
                f1_score(labels[split.test], ref.predict(xl[split.test]), average="macro"))


def test_line_search_finds_the_minimiser_along_the_step_also_beyond_one():
    """The step size minimises Σ CE(logits + t d) + t cross + t²/2 square, scipy's bounded minimiser agreeing."""
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.normal(size=(4, 30, 3)))
    hot = torch.nn.functional.one_hot(torch.from_numpy(rng.integers(0, 3, size=(4, 30))), 3).double()
    direction = (hot - torch.softmax(logits, -1)) * torch.tensor([0.3, 1.0, 3.0, 8.0])[:, None, None]
    cross, square = torch.tensor([-0.5, 0.0, 0.2, -1.0], dtype=torch.float64), torch.tensor([1.0, 0.5, 2.0, 0.01],
                                                                                           dtype=torch.float64)
    sizes = _line_search(logits, direction, hot, cross, square)

    def phi(t, b):
        z = logits[b] + t * direction[b]
        return float((torch.logsumexp(z, -1) - (z * hot[b]).sum(-1)).sum() + t * cross[b] + t * t / 2 * square[b])

    for b in range(4):
        best = minimize_scalar(lambda t: phi(t, b), bounds=(0, 16), method="bounded", options={"xatol": 1e-10})
        assert sizes[b].item() == pytest.approx(best.x, rel=1e-4, abs=1e-6)
    assert sizes.max() > 1  # the exact size also lengthens steps


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
    np.testing.assert_allclose(scores.test_pred[1], ridge.predict(xs[1, split.test].numpy()), atol=1e-3)


def test_mdl_compresses_planted_labels_better_than_control():
    x, y, split = planted()
    xs = standardise(x, split.train)
    task_bits = online_codelength(xs, y, split.train, 2, seed=0)
    control_bits = online_codelength(xs, control_labels([str(i) for i in range(len(y))], y, 0), split.train, 2, 0)
    uniform = split.train.sum()
    assert task_bits[2] < 0.5 * uniform < control_bits[2]
    assert task_bits[2] < task_bits[0]
