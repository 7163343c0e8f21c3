"""Linear probes for every layer of a task at once, with Hewitt & Liang control tasks and optional MDL.

The probe is L2-regularised logistic regression (binary, or multinomial for more classes; ridge regression for
regression tasks) on features standardised per layer with train statistics. It is convex, so instead of Holmes's
Adam + early stopping we solve it to its optimum, scikit-learn's LogisticRegression at the same C (tests check
this), for all layers x C values x label sets in one batched Newton solve in the kernel (logit) space
(fit_logistic), and choose the L2 strength per layer on dev loss. Being convex, the task probe does not depend on
a seed; seeds redraw the control task, whose random-but-consistent labels are what selectivity is measured against."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Kernel:
    """What every fit on the same training rows shares, computed once per task: the rows' mean, the centred rows
    x_c (float32 like the features: the gram from them is exact to ~1e-7 of its scale and 2x faster than in
    float64; every bundled task's test metrics stay scikit-learn's), and the eigendecomposition of the kernel
    K = x_c x_cᵀ per layer. In that basis the penalty Ω, K⁺ and ridge's (K + alpha I)⁻¹ are diagonal."""

    mean: torch.Tensor  # [L, 1, d]
    centred: torch.Tensor  # [L, n, d]
    basis: torch.Tensor  # [L, n, n] eigenvectors of K (columns); the last one is the constant 1/√n
    spectrum: torch.Tensor  # [L, n] K's eigenvalues, 0 for the constant
    omega: torch.Tensor  # [L, n] the penalty Ω's eigenvalues: 1/s, 0 for the constant, stiff outside span(K)
    inverse: torch.Tensor  # [L, n] K⁺'s eigenvalues: 1/s, 0 for the constant and outside span(K)

    @classmethod
    def of(cls, x: torch.Tensor) -> "Kernel":
        """Adding t·J (J = 11ᵀ/n, t above K's spectrum) makes the constant K's top eigenvector, apart from the
        others. Where x spans fewer than n - 1 directions, logits outside span(K) + constant are impossible: a
        stiff penalty (1e10 / K's mean eigenvalue) there instead of an infinite one."""
        x = x.float()
        mean = x.mean(1, keepdim=True)
        centred = x - mean
        gram = (centred @ centred.transpose(1, 2)).double()
        n = gram.shape[-1]
        trace = gram.diagonal(dim1=1, dim2=2).sum(-1)[:, None]  # >= K's top eigenvalue
        eig, basis = torch.linalg.eigh(gram + ((2 * trace + 1) / n)[..., None] * torch.ones(n, n, dtype=gram.dtype))
        eig = eig[:, :-1]
        keep = eig > eig[:, -1:] * 1e-10
        inverse = torch.where(keep, 1 / eig.clamp_min(1e-300), torch.zeros_like(eig))
        omega = torch.where(keep, inverse, 1e10 * n / trace.clamp_min(1e-300))
        zero = torch.zeros(len(eig), 1, dtype=eig.dtype)
        return cls(mean, centred, basis, torch.cat([eig, zero], 1), torch.cat([omega, zero], 1),
                   torch.cat([inverse, zero], 1))

    def cross(self, x: torch.Tensor) -> torch.Tensor:
        """[L, m, n]: other rows x [L, m, d] times the centred training rows, so a dual fit's outputs on x are
        cross @ α (+ intercept) without forming the weights."""
        return ((x.float() - self.mean) @ self.centred.transpose(1, 2)).double()


def fit_logistic(x: torch.Tensor | Kernel, y: torch.Tensor, l2: torch.Tensor, classes: int,
                 max_iter: int = 100, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise, for every layer l and group g at once, mean CE(x[l] W + b, y[g]) + l2[l,g]/2 |W|², exactly
    scikit-learn's LogisticRegression at C = 1 / (l2 * n): binary as one sigmoid weight vector, more classes as a
    full multinomial (softmax) with every class's weights penalised, the intercept never.

    x: [L, n, d] (or its Kernel, to share it between fits); y: [G, n] class indices; l2: [L, G]. Returns
    W [L, G, d, C], b [L, G, C] (for two classes the class-0 column is zero, so softmax of the logits is the
    sigmoid). tol: stop a problem when its Newton decrement falls below tol x (1 + objective), the objective
    being the summed (not mean) loss.

    Hand-written rather than a scikit-learn loop (or scipy's solvers, one problem at a time): one batched solve
    that shares each layer's kernel between all its C values and label sets is an order of magnitude faster on
    the stage's shapes (bench/bench_probes.py, docs/PERFORMANCE.md).
    By the representer theorem W = x_cᵀ α (x_c: x centred over items, which moves only the intercept), so each
    problem is one over the n training logits f = x_c W + b alone: minimise Σ CE(f) + λ/2 fᵀ K⁺ f with the
    kernel K = x_c x_cᵀ (n ~ 120 unknowns against d = 576-3584; K⁺ ignores the constant, i.e. the intercept).
    In K's eigenbasis (one eigendecomposition per layer) the penalty is diagonal, and Newton-CG runs on all
    L x G problems at once (_newton), ~5-10 steps to machine precision.
    """
    kernel = x if isinstance(x, Kernel) else Kernel.of(x)
    q = _logit_basis(classes)
    f = _newton(kernel, y, (l2 * kernel.centred.shape[1]).double(), q, max_iter, tol)  # [L, G, n, C-1]
    basis = kernel.basis[:, None]
    alpha = basis @ (kernel.inverse[:, None, :, None] * (basis.transpose(2, 3) @ f))  # α = K⁺ f
    weight = torch.einsum("lnd,lgnc->lgdc", kernel.centred, (alpha @ q).float())  # W = x_cᵀ α
    bias = f.mean(2) @ q - torch.einsum("ld,lgdc->lgc", kernel.mean[:, 0], weight)
    return weight, bias.float()


def _logit_basis(classes: int) -> torch.Tensor:
    """Q [C-1, C]: logits = f Q. Binary: Q = [0, 1], scikit-learn's sigmoid. Multinomial: an orthonormal basis of
    the zero-sum logit vectors; scikit-learn's optimum lies there (summing its stationarity condition over classes
    gives Σ_c W_c = 0), |W Q| = |W| keeps the penalty, and dropping the softmax's shift direction makes every
    Newton Hessian positive definite."""
    if classes == 2:
        return torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    centred = torch.eye(classes, dtype=torch.float64) - 1.0 / classes
    return torch.linalg.svd(centred)[2][:classes - 1]  # the top C-1 right singular vectors span the zero-sum space


def _newton(kernel: Kernel, y: torch.Tensor, lam: torch.Tensor, q: torch.Tensor, max_iter: int,
            tol: float) -> torch.Tensor:
    """Damped Newton on F(f) = Σ_i CE(f_i Q, y_i) + lam/2 tr(fᵀ Ω f) over logits f [n, K] (K = C-1), batched over
    layers (the kernel's L) and groups (y [G, n], lam [L, G]). Returns f [L, G, n, K].

    Each Newton system (nK x nK) is solved by conjugate gradients in K's eigenbasis, where the penalty is diagonal,
    preconditioned by the Hessian with every item's curvature replaced by its mean (also diagonal there): no
    factorisation, only products with the layer's n x n basis, shared by all its groups. At f = 0 every item has
    the same curvature, so there the preconditioner is the Hessian and the first step is exact at once. An exact
    line search sizes each step (_line_search). Problems leave the batch as they converge."""
    basis = kernel.basis
    layers, n, _ = basis.shape
    groups, k = y.shape[0], q.shape[0]
    onehot = torch.nn.functional.one_hot(y, q.shape[1]).double()  # [G, n, C]
    f = torch.zeros(layers, groups, n, k, dtype=torch.float64)
    omega_f = torch.zeros_like(f)  # Ω f, kept up to date step by step
    active = torch.ones(layers, groups, dtype=torch.bool)
    coordinate_curvature = q ** 2  # [K, C]: diag of Q (diag p - p pᵀ) Qᵀ is p @ (Q²)ᵀ - (p @ Qᵀ)²
    basis32 = basis.float()

    def cross_entropy(ff: torch.Tensor, hot: torch.Tensor) -> torch.Tensor:
        logits = ff @ q
        return (torch.logsumexp(logits, -1) - (logits * hot).sum(-1)).sum(-1)

    for _ in range(max_iter):
        li, gi = active.nonzero(as_tuple=True)
        if len(li) == 0:
            break
        everyone = len(li) == layers * groups

        def layer_times(matrix: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """matrix [L, n, n] @ v [B, n, K] for the active problems, one product per layer for all its groups,
            as rows times matrixᵀ: torch's CPU bmm is ~2x slower with the few columns on the right."""
            width = v.shape[2]
            if everyone:  # the active problems are all of them, in order: no scatter and gather
                out = v.transpose(1, 2).reshape(layers, groups * width, n) @ matrix.transpose(1, 2)
                return out.reshape(layers * groups, width, n).transpose(1, 2)
            rows = torch.zeros(layers, groups, width, n, dtype=v.dtype)
            rows[li, gi] = v.transpose(1, 2)
            out = rows.reshape(layers, groups * width, n) @ matrix.transpose(1, 2)
            return out.reshape(layers, groups, width, n)[li, gi].transpose(1, 2)

        ff, hot, lm = f[li, gi], onehot[gi], lam[li, gi, None, None]
        prob = torch.softmax((ff @ q).transpose(1, 2), 1).transpose(1, 2)  # [B, n, C] (see _line_search)
        grad = (prob - hot) @ q.T + lm * omega_f[li, gi]  # [B, n, K]
        curvature = prob @ coordinate_curvature.T - (prob @ q.T) ** 2  # [B, n, K]: the Hessian's diagonal
        penalty = lm * kernel.omega[li, :, None]  # [B, n, 1]: lam Ω in the eigenbasis

        def hess_times(c: torch.Tensor) -> torch.Tensor:  # the Hessian in the eigenbasis (c [B, n, K] coordinates)
            # basis products in float32 (2x faster): they only shape the step, float64 gradients fix the optimum
            vq = layer_times(basis32, c.float()).double() @ q
            data = (prob * vq - prob * (prob * vq).sum(-1, keepdim=True)) @ q.T
            return layer_times(basis32.transpose(1, 2), data.float()).double() + penalty * c

        scale = 1 / (curvature.mean(1, keepdim=True) + penalty)
        # Inexact Newton: relative residual min(0.1, sqrt|g|) keeps the steps superlinear at a few CG iterations;
        # capped at 8 (truncated Newton): the worst problem sets the batch's count, and a cheap extra Newton step
        # serves it better than many CG iterations for all (bench: ~30% fewer basis products)
        forcing = grad.flatten(1).norm(dim=1).sqrt().clamp(max=0.1)
        coords = _preconditioned_cg(hess_times, lambda r: scale * r, -layer_times(basis.transpose(1, 2), grad),
                                    forcing, max_iter=8)
        step, omega_step = layer_times(basis, torch.cat([coords, kernel.omega[li, :, None] * coords], 2)).split(k, 2)
        decrement = -(grad * step).sum((1, 2))
        lm = lm[:, 0, 0]
        size = _line_search(ff @ q, step @ q, hot, lm * (ff * omega_step).sum((1, 2)),
                            lm * (step * omega_step).sum((1, 2)))
        objective = cross_entropy(ff, hot) + lm / 2 * (ff * omega_f[li, gi]).sum((1, 2))
        f[li, gi] = ff + size[:, None, None] * step
        omega_f[li, gi] += size[:, None, None] * omega_step
        active[li, gi] = decrement > tol * (1 + objective.abs())
    return f


def _line_search(logits: torch.Tensor, direction: torch.Tensor, hot: torch.Tensor, cross: torch.Tensor,
                 square: torch.Tensor, iterations: int = 8, longest: float = 16.0) -> torch.Tensor:
    """The step size t minimising φ(t) = Σ CE(logits + t direction) + t cross + t²/2 square per problem (logits,
    direction [B, n, C]; the penalty's terms cross, square [B]), by safeguarded 1-D Newton in a bracket. Unlike
    backtracking from t = 1 it also lengthens steps: where items are far out on the loss's exponential tail,
    Newton moves their margins by only ~1 per step, and the exact size takes several of those at once.
    φ is convex and φ'(0) < 0 (a descent direction), so its minimiser is > 0; sizes stay <= longest, where
    rounding noise in φ' of a converged problem (a tiny step) could otherwise send one far out."""
    size = torch.ones_like(cross)
    low, high = torch.zeros_like(cross), torch.full_like(cross, longest)
    low_slope, high_slope = torch.full_like(cross, -math.inf), torch.full_like(cross, math.inf)
    # classes before items: softmax and sums over a short last axis are ~10x slower on CPU
    logits, direction, hot = (t.transpose(1, 2).contiguous() for t in (logits, direction, hot))
    for _ in range(iterations):
        prob = torch.softmax(logits + size[:, None, None] * direction, 1)
        along = (prob * direction).sum(1)  # [B, n]
        slope = ((prob - hot) * direction).sum((1, 2)) + cross + size * square
        curvature = ((prob * direction ** 2).sum(1) - along ** 2).sum(-1) + square
        left = slope < 0
        low, high = torch.where(left, size, low), torch.where(left, high, size)
        low_slope, high_slope = torch.where(left, slope, low_slope), torch.where(left, high_slope, slope)
        newton = size - slope / curvature.clamp_min(1e-300)
        # outside the bracket: the secant of φ' across it (kept off its ends), or `longest` while no φ' > 0 is known
        width = high - low
        secant = (low - low_slope * width / (high_slope - low_slope)).clamp(low + width / 8, high - width / 8)
        fallback = torch.where(high_slope.isinf(), high, secant)
        size = torch.where((newton >= low) & (newton <= high), newton, fallback)
    return size


def _preconditioned_cg(matvec, precondition, rhs: torch.Tensor, rtol: torch.Tensor,
                       max_iter: int = 50) -> torch.Tensor:
    """Batched preconditioned conjugate gradients for H s = rhs ([B, ...] per problem, H positive definite) down
    to |residual| <= rtol [B] x |rhs|. Hand-written: scipy's cg runs one system at a time."""
    def dot(a, b):
        return (a * b).flatten(1).sum(-1).reshape(-1, *[1] * (rhs.dim() - 1))

    solution = precondition(rhs)
    residual = rhs - matvec(solution)
    z = precondition(residual)
    direction, rz = z, dot(residual, z)
    limit = rtol.reshape(-1, *[1] * (rhs.dim() - 1)) ** 2 * dot(rhs, rhs)
    for _ in range(max_iter):
        if (dot(residual, residual) <= limit).all():
            break
        product = matvec(direction)
        alpha = rz / dot(direction, product).clamp_min(1e-300)
        solution, residual = solution + alpha * direction, residual - alpha * product
        z = precondition(residual)
        rz, previous = dot(residual, z), rz
        direction = z + rz / previous.clamp_min(1e-300) * direction
    return solution


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
    """Per-layer results: metric name -> [L] task scores, [S, L] control scores, [L] bootstrap stderr, [L] the task
    probe's scores on dev (what a best layer is chosen on, so that the test score it reports is not selected on
    itself); and the task probe's test predictions per layer, [L, n_test] (class indices, or values for
    regression), in item order."""

    task: dict[str, np.ndarray]
    control: dict[str, np.ndarray]
    stderr: dict[str, np.ndarray]
    chosen_c: np.ndarray
    test_pred: np.ndarray
    dev: dict[str, np.ndarray] = field(default_factory=dict)


def probe_classification(x: torch.Tensor, y: np.ndarray, controls: np.ndarray, split: Split, classes: int,
                         c_grid: tuple[float, ...] = C_GRID, seed: int = 0) -> LayerScores:
    """x: [L, n, d] standardised; y: [n]; controls: [S, n] control labels. Scores on the test split."""
    tr, dv, te = (torch.from_numpy(m) for m in (split.train, split.dev, split.test))
    n_train = int(tr.sum())
    yt = torch.from_numpy(y)
    l2 = torch.tensor([1.0 / (c * n_train) for c in c_grid]).expand(x.shape[0], -1)
    kernel = Kernel.of(x[:, tr])  # shared by the task and control fits
    weight, bias = fit_logistic(kernel, yt[tr].expand(len(c_grid), -1), l2, classes)
    dev_logits = logits_of(x[:, dv], weight, bias)
    dev_loss = torch.nn.functional.cross_entropy(dev_logits.permute(0, 3, 1, 2),
                                                 yt[dv].expand(x.shape[0], len(c_grid), -1), reduction="none")
    best = dev_loss.mean(-1).argmin(1)  # [L]
    layers = torch.arange(x.shape[0])
    test_pred = logits_of(x[:, te], weight[layers, best][:, None], bias[layers, best][:, None])[:, 0].argmax(-1)
    true = yt[te]
    counts = _bootstrap_counts(int(te.sum()), seed)
    task = {"macro_f1": macro_f1(test_pred, true, classes), "accuracy": (test_pred == true).double().mean(-1)}
    dev_pred = dev_logits[layers, best].argmax(-1)  # [L, n_dev] at each layer's chosen C
    dev = {"macro_f1": macro_f1(dev_pred, yt[dv], classes), "accuracy": (dev_pred == yt[dv]).double().mean(-1)}
    boot = {"macro_f1": macro_f1(test_pred, true, classes, counts),
            "accuracy": counts @ (test_pred == true).double().T / counts.sum(-1, keepdim=True)}
    control = {k: np.zeros((len(controls), x.shape[0])) for k in task}
    if len(controls):
        yc = torch.from_numpy(controls)
        cw, cb = fit_logistic(kernel, yc[:, tr], l2[layers, best][:, None].expand(-1, len(controls)).contiguous(),
                              classes)
        cpred = logits_of(x[:, te], cw, cb).argmax(-1)  # [L, S, n_test]
        control = {"macro_f1": macro_f1(cpred, yc[:, te], classes).T.numpy(),
                   "accuracy": (cpred == yc[:, te]).double().mean(-1).T.numpy()}
    return LayerScores(task={k: v.numpy() for k, v in task.items()}, control=control,
                       stderr={k: v.std(0).numpy() for k, v in boot.items()},
                       chosen_c=np.array(c_grid)[best.numpy()], test_pred=test_pred.numpy(),
                       dev={k: v.numpy() for k, v in dev.items()})


def fit_ridge(kernel: Kernel, y: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Ridge with an unpenalised intercept (scikit-learn's Ridge at alpha = l2 * n) for all layers and groups, in
    dual form: y [G, n], l2 [L, G] -> α [L, G, n] with W = x_cᵀ α and intercept mean(y) - mean W. In the kernel's
    eigenbasis (K + alpha I)⁻¹ is diagonal, so every alpha and label set costs two products with the basis."""
    n = y.shape[1]
    coords = (y - y.mean(-1, keepdim=True)).double() @ kernel.basis  # [L, G, n]; 0 on the constant
    return (coords / (kernel.spectrum[:, None] + (l2 * n)[..., None])) @ kernel.basis.transpose(1, 2)


def probe_regression(x: torch.Tensor, y: np.ndarray, controls: np.ndarray, split: Split,
                     c_grid: tuple[float, ...] = C_GRID, seed: int = 0) -> LayerScores:
    tr, dv, te = (torch.from_numpy(m) for m in (split.train, split.dev, split.test))
    yt = torch.from_numpy(y).double()
    n_train = int(tr.sum())
    l2 = torch.tensor([1.0 / (c * n_train) for c in c_grid], dtype=torch.float64).expand(x.shape[0], -1)
    kernel = Kernel.of(x[:, tr])
    dev_cross, test_cross = kernel.cross(x[:, dv]), kernel.cross(x[:, te])  # [L, m, n]
    alpha = fit_ridge(kernel, yt[tr].expand(len(c_grid), -1), l2)
    offset = yt[tr].mean()
    dev_err = (alpha @ dev_cross.transpose(1, 2) + offset - yt[dv]).pow(2).mean(-1)
    best = dev_err.argmin(1)
    layers = torch.arange(x.shape[0])
    pred = (test_cross @ alpha[layers, best][..., None])[..., 0] + offset
    dev_pred = (dev_cross @ alpha[layers, best][..., None])[..., 0] + offset
    counts = _bootstrap_counts(int(te.sum()), seed)
    boot = weighted_pearson(pred, yt[te], counts)
    control = np.zeros((len(controls), x.shape[0]))
    if len(controls):
        yc = torch.from_numpy(controls).double()
        calpha = fit_ridge(kernel, yc[:, tr], l2[layers, best][:, None].expand(-1, len(controls)))
        cpred = calpha @ test_cross.transpose(1, 2) + yc[:, tr].mean(-1)[None, :, None]
        control = pearson(cpred, yc[:, te][None]).T.numpy()
    return LayerScores(task={"pearson": pearson(pred, yt[te]).numpy()}, control={"pearson": control},
                       stderr={"pearson": boot.std(0).numpy()}, chosen_c=np.array(c_grid)[best.numpy()],
                       test_pred=pred.numpy(), dev={"pearson": pearson(dev_pred, yt[dv]).numpy()})


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
