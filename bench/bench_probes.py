"""Benchmark the layerwise probes on real features of the embedded base model, baselines in the same run.

For every bundled task (features of all layers of SmolLM2-135M, captured once and cached under bench/.cache):
  ours      probe_classification / probe_regression: every layer x C value x (task + control seeds) at once,
            dev-selected C per layer, as the probing stage runs it;
  sklearn   the same work as a scikit-learn loop: LogisticRegression (lbfgs, multinomial) or Ridge per layer,
            C value and label set, the same dev selection;
  holmes    a Holmes-style probe per layer: Dropout(0.2) + Linear, Adam lr 1e-3, batch 16, <= 20 epochs, early
            stopping on dev loss (task labels only: Holmes trains one probe per layer and seed).
Prints a table and writes JSON (workload, ours, baseline, ratio, max quality difference over layers and tasks,
machine) to bench/.cache/bench_probes.json or --out.

    nice -n 10 python bench/bench_probes.py [--tasks noun_number tense] [--seeds 0 1 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import f1_score, log_loss

from merging.checkpoints import LoadOptions, content_digest, load_model
from merging.family import build_family
from probing.capture import LayerRunner, cached_capture, capture, capture_key, task_features, task_requests
from probing.probes import C_GRID, Split, control_labels, probe_classification, probe_regression, standardise
from probing.stage import control_keys, load_tasks

CACHE = Path(__file__).resolve().parent / ".cache"


def task_feature_sets(names: list[str] | None) -> list[tuple[object, torch.Tensor]]:
    """(task, [L, n_items, d] features) of the base model, captured once into bench/.cache/captures."""
    folder = build_family(("base",))["base"]
    digest, options, runner = content_digest(folder), LoadOptions(), None
    out = []
    for task in load_tasks("bundled", names):
        requests, index = task_requests(task)

        def compute(requests=requests):
            nonlocal runner
            runner = runner or LayerRunner(*load_model(folder, options))
            return capture(runner, requests, progress=task.name)

        key = capture_key(digest, task, "mean", 128, options.precision)
        pooled = cached_capture(CACHE / "captures", key, compute, {"task": task.name, "model_digest": digest})
        out.append((task, task_features(pooled, index)))
    return out


def sklearn_probes(x: np.ndarray, y: np.ndarray, controls: np.ndarray, split: Split, classes: int,
                   c_grid: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: probe_classification's work as a scikit-learn loop. Returns test macro-F1 [L] and test
    predictions [L, n_test] of the task probe (C chosen per layer on dev log-loss, controls fitted at it)."""
    tr, dv, te = split.train, split.dev, split.test
    f1, preds = [], []
    for layer in x:
        fits = [LogisticRegression(C=c, max_iter=1000).fit(layer[tr], y[tr]) for c in c_grid]
        best = min(fits, key=lambda clf: log_loss(y[dv], clf.predict_proba(layer[dv]), labels=range(classes)))
        preds.append(best.predict(layer[te]))
        f1.append(f1_score(y[te], preds[-1], average="macro"))
        for labels in controls:
            LogisticRegression(C=best.C, max_iter=1000).fit(layer[tr], labels[tr]).predict(layer[te])
    return np.array(f1), np.array(preds)


def sklearn_ridge(x: np.ndarray, y: np.ndarray, controls: np.ndarray, split: Split,
                  c_grid: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The baseline for regression tasks: Ridge(alpha = 1/C) per layer, C and label set; test Pearson [L]."""
    tr, dv, te = split.train, split.dev, split.test
    r, preds = [], []
    for layer in x:
        fits = [Ridge(alpha=1 / c).fit(layer[tr], y[tr]) for c in c_grid]
        best = min(fits, key=lambda m: np.mean((m.predict(layer[dv]) - y[dv]) ** 2))
        preds.append(best.predict(layer[te]))
        r.append(np.corrcoef(preds[-1], y[te])[0, 1])
        for labels in controls:
            Ridge(alpha=best.alpha).fit(layer[tr], labels[tr]).predict(layer[te])
    return np.array(r), np.array(preds)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=None, help="bundled task names (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="control-task seeds")
    parser.add_argument("--out", type=Path, default=CACHE / "bench_probes.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for task, features in task_feature_sets(args.tasks):
        split = Split(task.split_mask("train"), task.split_mask("dev"), task.split_mask("test"))
        x = standardise(features, split.train)
        controls = np.stack([control_labels(control_keys(task), task.labels, s) for s in args.seeds])
        regression = task.regression
        if regression:
            ours, ours_s = timed(lambda: probe_regression(x, task.labels, controls, split))
            (ref, _), ref_s = timed(lambda: sklearn_ridge(x.numpy(), task.labels, controls, split, C_GRID))
            quality = np.abs(ours.task["pearson"] - ref)
        else:
            ours, ours_s = timed(lambda: probe_classification(x, task.labels, controls, split, task.num_labels))
            (ref, _), ref_s = timed(lambda: sklearn_probes(x.numpy(), task.labels, controls, split,
                                                            task.num_labels, C_GRID))
            quality = np.abs(ours.task["macro_f1"] - ref)
        rows.append({"task": task.name, "ours_s": ours_s, "sklearn_s": ref_s, "ratio": ref_s / ours_s,
                     "max_diff": float(quality.max())})
        print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
