"""Linear probes for every layer of a task at once, with Hewitt & Liang control tasks and optional MDL.

The probe is L2-regularised multinomial logistic regression (ridge regression for regression tasks) on features
standardised per layer with train statistics. It is convex, so instead of Holmes's Adam + early stopping we solve
it to convergence with one L-BFGS run over a [layers, groups, d, classes] weight tensor (the summed objective is
separable, so its optimum is every group's own optimum) and choose the L2 strength per layer on dev loss. That
makes it reproducible and equal to scikit-learn's LogisticRegression at the same C (tests check this), in one
batched torch solve instead of a Python loop over layers. Being convex, the task probe does not depend on a seed;
seeds redraw the control task, whose random-but-consistent labels are what selectivity is measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Inverse L2 strengths (scikit-learn's C), chosen per layer on dev. C=10 was dropped: on separable tasks its
# solve dominated the probing time (L-BFGS converges slowly as the penalty vanishes).
C_GRID = (0.01, 0.1, 1.0)
MDL_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
BOOTSTRAP = 200


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # boolean masks over items
    dev: np.ndarray
    test: np.ndarray


def standardise(features: torch.Tensor, train: np.ndarray) -> torch.Tensor:
    """Per-layer z-scores with train mean/std: puts every layer's (very differently scaled) residual on one scale."""
    rows = features[:, torch.from_numpy(train)]
    mean, std = rows.mean(1, keepdim=True), rows.std(1, keepdim=True).clamp_min(1e-6)
    return (features - mean) / std


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: torch.Tensor, classes: int,
                 max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise, for every layer l and group g at once, mean CE(x[l] W[l,g] + b[l,g], y[g]) + l2[l,g]/2 |W[l,g]|².

    x: [L, n, d]; y: [G, n] class indices; l2: [L, G]. Returns W [L, G, d, C], b [L, G, C].
    """
    # Representer theorem: with an L2 penalty the optimal W lies in the row space of x, so solve in the basis of
    # x's right singular vectors (rank <= n, e.g. 120 instead of 576-1152 dims) and map back: the same optimum,
    # several times cheaper per L-BFGS step.
    _, _, vh = torch.linalg.svd(x.float(), full_matrices=False)  # vh: [L, r, d]
    weight_r, bias = _fit_logistic_full(x.float() @ vh.transpose(1, 2), y, l2, classes, max_iter)
    return torch.einsum("lrd,lgrc->lgdc", vh, weight_r), bias


def _fit_logistic_full(x: torch.Tensor, y: torch.Tensor, l2: torch.Tensor, classes: int,
                       max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers, n, d = x.shape
    groups = y.shape[0]
    if classes == 2:  # softmax over 2 classes splits the logistic weight in halves (w, -w): double the penalty
        l2 = 2 * l2  # so that C means scikit-learn's C for its binary logistic regression too
    weight = torch.zeros(layers, d, groups * classes, requires_grad=True)  # bmm layout: [L, d, G*C]
    bias = torch.zeros(layers, 1, groups * classes, requires_grad=True)
    x = x.float().contiguous()
    targets = y.T.reshape(1, n, groups, 1).expand(layers, -1, -1, -1)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-5,
                                  tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = torch.baddbmm(bias, x, weight).reshape(layers, n, groups, classes)
        nll = -torch.log_softmax(logits, -1).gather(-1, targets).squeeze(-1).mean(1)  # [L, G]
        penalty = weight.reshape(layers, d, groups, classes).pow(2).sum((1, 3))
        loss = (nll + 0.5 * l2 * penalty).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return (weight.detach().reshape(layers, d, groups, classes).permute(0, 2, 1, 3),
            bias.detach().reshape(layers, groups, classes))


def logits_of(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[L, G, n, C] from x [L, n, d] and a fit's W [L, G, d, C], b [L, G, C]."""
    layers, groups, d, classes = weight.shape
    flat = weight.permute(0, 2, 1, 3).reshape(layers, d, groups * classes)
    out = torch.bmm(x.float(), flat).reshape(layers, x.shape[1], groups, classes).transpose(1, 2)
    return out + bias[:, :, None]


def macro_f1(pred: torch.Tensor, true: torch.Tensor, classes: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Macro-F1 over the last axis (items), scikit-learn's definition (classes absent from both count 0 -> skipped).

    `counts` [B, n] reweights items (bootstrap multiplicities); the result then gains a leading B axis.
    """
    p1 = torch.nn.functional.one_hot(pred, classes).double()
    t1 = torch.nn.functional.one_hot(true, classes).double().expand_as(p1)
    if counts is None:
        tp, pc, tc = (p1 * t1).sum(-2), p1.sum(-2), t1.sum(-2)
    else:
        tp, pc, tc = (torch.einsum("bn,...nc->b...c", counts, m) for m in (p1 * t1, p1, t1))
    present = (pc + tc) > 0
    f1 = torch.where(present, 2 * tp / (pc + tc).clamp_min(1e-12), torch.zeros_like(tp))
    return f1.sum(-1) / present.sum(-1).clamp_min(1)


def pearson(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    pc, tc = pred - pred.mean(-1, keepdim=True), true - true.mean(-1, keepdim=True)
    return (pc * tc).sum(-1) / (pc.pow(2).sum(-1).sqrt() * tc.pow(2).sum(-1).sqrt()).clamp_min(1e-12)


def weighted_pearson(pred: torch.Tensor, true: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Pearson of pred [L, n] vs true [n] under item weights counts [B, n] (bootstrap multiplicities) -> [B, L]."""
    w = counts / counts.sum(-1, keepdim=True)
    pc = pred[None] - torch.einsum("bn,ln->bl", w, pred)[..., None]
    tc = (true - w @ true[:, None])[:, None]  # [B, 1, n]
    cov = (w[:, None] * pc * tc).sum(-1)
    return cov / ((w[:, None] * pc.pow(2)).sum(-1) * (w[:, None] * tc.pow(2)).sum(-1)).sqrt().clamp_min(1e-12)


def control_labels(keys: list[str], labels: np.ndarray, seed: int) -> np.ndarray:
    """Hewitt & Liang control task: each distinct key (word type / item text) gets a random label drawn from the
    task's empirical label distribution, consistently for every item sharing that key."""
    unique = sorted(set(keys))
    rng = np.random.default_rng(seed)
    drawn = rng.choice(labels, size=len(unique), replace=True)
    lookup = dict(zip(unique, drawn))
    return np.array([lookup[k] for k in keys], dtype=labels.dtype)


def _bootstrap_counts(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(BOOTSTRAP, n))
    return torch.from_numpy(np.stack([np.bincount(d, minlength=n) for d in draws])).double()


@dataclass(frozen=True)
class LayerScores:
    """Per-layer results: metric name -> [L] task scores, [S, L] control scores, [L] bootstrap stderr."""

    task: dict[str, np.ndarray]
    control: dict[str, np.ndarray]
    stderr: dict[str, np.ndarray]
    chosen_c: np.ndarray


def probe_classification(x: torch.Tensor, y: np.ndarray, controls: np.ndarray, split: Split, classes: int,
                         c_grid: tuple[float, ...] = C_GRID, seed: int = 0) -> LayerScores:
    """x: [L, n, d] standardised; y: [n]; controls: [S, n] control labels. Scores on the test split."""
    tr, dv, te = (torch.from_numpy(m) for m in (split.train, split.dev, split.test))
    n_train = int(tr.sum())
    yt = torch.from_numpy(y)
    l2 = torch.tensor([1.0 / (c * n_train) for c in c_grid]).expand(x.shape[0], -1)
    weight, bias = fit_logistic(x[:, tr], yt[tr].expand(len(c_grid), -1), l2, classes)
    dev_logits = logits_of(x[:, dv], weight, bias)
    dev_loss = torch.nn.functional.cross_entropy(dev_logits.permute(0, 3, 1, 2),
                                                 yt[dv].expand(x.shape[0], len(c_grid), -1), reduction="none")
    best = dev_loss.mean(-1).argmin(1)  # [L]
    layers = torch.arange(x.shape[0])
    test_pred = logits_of(x[:, te], weight[layers, best][:, None], bias[layers, best][:, None])[:, 0].argmax(-1)
    true = yt[te]
    counts = _bootstrap_counts(int(te.sum()), seed)
    task = {"macro_f1": macro_f1(test_pred, true, classes), "accuracy": (test_pred == true).double().mean(-1)}
    boot = {"macro_f1": macro_f1(test_pred, true, classes, counts),
            "accuracy": counts @ (test_pred == true).double().T / counts.sum(-1, keepdim=True)}
    control = {k: np.zeros((len(controls), x.shape[0])) for k in task}
    if len(controls):
        yc = torch.from_numpy(controls)
        cw, cb = fit_logistic(x[:, tr], yc[:, tr], l2[layers, best][:, None].expand(-1, len(controls)).contiguous(),
                              classes)
        cpred = logits_of(x[:, te], cw, cb).argmax(-1)  # [L, S, n_test]
        control = {"macro_f1": macro_f1(cpred, yc[:, te], classes).T.numpy(),
                   "accuracy": (cpred == yc[:, te]).double().mean(-1).T.numpy()}
    return LayerScores(task={k: v.numpy() for k, v in task.items()}, control=control,
                       stderr={k: v.std(0).numpy() for k, v in boot.items()},
                       chosen_c=np.array(c_grid)[best.numpy()])


def fit_ridge(x: torch.Tensor, y: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Closed-form ridge in dual form for all layers and groups: x [L, n, d], y [G, n], l2 [L, G] -> W [L, G, d]."""
    x64 = x.double()
    gram = x64 @ x64.transpose(1, 2)  # [L, n, n]; n < d here, so the dual solve is the small one
    n = x.shape[1]
    system = gram[:, None] + (l2 * n)[..., None, None] * torch.eye(n, dtype=torch.float64)
    centred = (y - y.mean(-1, keepdim=True)).double()
    alpha = torch.linalg.solve(system, centred[None, :, :, None].expand(x.shape[0], -1, -1, -1))
    return torch.einsum("lnd,lgn->lgd", x64, alpha[..., 0])


def probe_regression(x: torch.Tensor, y: np.ndarray, controls: np.ndarray, split: Split,
                     c_grid: tuple[float, ...] = C_GRID, seed: int = 0) -> LayerScores:
    tr, dv, te = (torch.from_numpy(m) for m in (split.train, split.dev, split.test))
    yt = torch.from_numpy(y).double()
    n_train = int(tr.sum())
    l2 = torch.tensor([1.0 / (c * n_train) for c in c_grid]).expand(x.shape[0], -1)
    weight = fit_ridge(x[:, tr], yt[tr].expand(len(c_grid), -1), l2)
    offset = yt[tr].mean()
    dev_err = (torch.einsum("lnd,lgd->lgn", x[:, dv].double(), weight) + offset - yt[dv]).pow(2).mean(-1)
    best = dev_err.argmin(1)
    layers = torch.arange(x.shape[0])
    pred = torch.einsum("lnd,ld->ln", x[:, te].double(), weight[layers, best]) + offset
    counts = _bootstrap_counts(int(te.sum()), seed)
    boot = weighted_pearson(pred, yt[te], counts)
    control = np.zeros((len(controls), x.shape[0]))
    if len(controls):
        yc = torch.from_numpy(controls).double()
        cw = fit_ridge(x[:, tr], yc[:, tr], l2[layers, best][:, None].expand(-1, len(controls)))
        cpred = torch.einsum("lnd,lgd->lgn", x[:, te].double(), cw) + yc[:, tr].mean(-1)[None, :, None]
        control = pearson(cpred, yc[:, te][None]).T.numpy()
    return LayerScores(task={"pearson": pearson(pred, yt[te]).numpy()}, control={"pearson": control},
                       stderr={"pearson": boot.std(0).numpy()}, chosen_c=np.array(c_grid)[best.numpy()])


def online_codelength(x: torch.Tensor, y: np.ndarray, train: np.ndarray, classes: int, seed: int,
                      fractions: tuple[float, ...] = MDL_FRACTIONS, c: float = 1.0) -> np.ndarray:
    """Online (prequential) MDL in bits per layer (Voita & Titov): the first block is sent with a uniform code,
    each later block with a probe fitted on everything before it. Returns [L] codelengths."""
    order = np.random.default_rng(seed).permutation(np.flatnonzero(train))
    ends = sorted({max(classes, int(round(f * len(order)))) for f in fractions})
    bits = torch.full((x.shape[0],), ends[0] * math.log2(classes), dtype=torch.float64)
    yt = torch.from_numpy(y)
    for start, end in zip(ends[:-1], ends[1:]):
        seen, block = torch.from_numpy(order[:start]), torch.from_numpy(order[start:end])
        l2 = torch.full((x.shape[0], 1), 1.0 / (c * start))
        weight, bias = fit_logistic(x[:, seen], yt[seen][None], l2, classes)
        logp = torch.log_softmax(logits_of(x[:, block], weight, bias)[:, 0], -1)
        bits -= logp.gather(-1, yt[block].reshape(1, -1, 1).expand(x.shape[0], -1, -1)).sum((1, 2)) / math.log(2)
    return bits.numpy()
