"""Benchmark the layerwise probes on real features of the embedded base model, baselines in the same run.

For every bundled task (features of all layers of SmolLM2-135M, captured once and cached under bench/.cache):
  ours      probe_classification / probe_regression: every layer x C value x (task + control seeds) at once,
            dev-selected C per layer, as the probing stage runs it;
  sklearn   the same work as a scikit-learn loop: LogisticRegression (lbfgs, tol 1e-6) or Ridge per layer,
            C value and label set, the same dev selection;
  holmes    a Holmes-style probe per layer: Dropout(0.2) + Linear, Adam lr 1e-3, batch 16, <= 20 epochs, early
            stopping on dev loss (task labels only: Holmes trains one probe per layer and seed).
Prints a table and writes JSON (workload, ours, baseline, ratio, max quality difference over layers and tasks,
machine) to bench/.cache/bench_probes.json or --out.

    nice -n 10 python bench/bench_probes.py [--tasks subject_verb_agreement filler_gap] [--seeds 0 1 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import f1_score, log_loss
from threadpoolctl import threadpool_limits

from merging.checkpoints import LoadOptions, load_model
from merging.family import build_family
from probing.capture import probe_inputs, task_features
from probing.hooks import HookRunner
from probing.probes import C_GRID, Split, control_labels, probe_classification, probe_regression, standardise
from probing.minimal_pair_tasks import bundled_tasks
from probing.stage import control_keys, layer_keys, probe_jobs
from probing.store import CaptureStore, capture_model, model_ref
from runstore.atomic import atomic_path

CACHE = Path(__file__).resolve().parent / ".cache"
# Both sides at the optimum: at its default tol=1e-4 scikit-learn stops short often enough to flip a test item
# (e.g. always_never layer 30 at C=0.01: macro-F1 0.371 at tol 1e-4, 0.394 at 1e-6 and beyond, where ours is).
SKLEARN_TOL = 1e-6  # and float64 input: on float32 lbfgs stays in float32, and items at |logit| ~ 1e-4 flip


def task_feature_sets(names: list[str] | None, folder: Path | None = None,
                      cache: Path = CACHE) -> list[tuple[object, torch.Tensor]]:
    """(task, [L, n_items, d] features) of the base model, captured once into `cache`/captures."""
    folder = folder or build_family(("base",))["base"]
    model, options = model_ref("base", folder), LoadOptions()
    store = CaptureStore(cache / "captures")
    tasks = bundled_tasks(names)
    jobs = probe_jobs(tasks, model.n_blocks)
    missing = store.missing(jobs, model, options.precision)
    if missing:
        capture_model(HookRunner(*load_model(folder, options)), model, missing, store, options.precision)
    out = []
    for task, job in zip(tasks, jobs):
        pooled = torch.stack([store.load(key)["value"] for key in layer_keys(job, model.digest, options.precision)])
        out.append((task, task_features(pooled, probe_inputs(task, "mean", 128)[1])))
    return out


def sklearn_probes(x: np.ndarray, y: np.ndarray, controls: np.ndarray, split: Split, classes: int,
                   c_grid: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: probe_classification's work as a scikit-learn loop. Returns test macro-F1 [L] and test
    predictions [L, n_test] of the task probe (C chosen per layer on dev log-loss, controls fitted at it)."""
    tr, dv, te = split.train, split.dev, split.test
    f1, preds = [], []
    for layer in x:
        fits = [LogisticRegression(C=c, tol=SKLEARN_TOL, max_iter=1000).fit(layer[tr], y[tr]) for c in c_grid]
        best = min(fits, key=lambda clf: log_loss(y[dv], clf.predict_proba(layer[dv]), labels=range(classes)))
        preds.append(best.predict(layer[te]))
        f1.append(f1_score(y[te], preds[-1], average="macro"))
        for labels in controls:
            LogisticRegression(C=best.C, tol=SKLEARN_TOL, max_iter=1000).fit(layer[tr], labels[tr]).predict(layer[te])
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


def holmes_probes(x: torch.Tensor, label_sets: np.ndarray, split: Split, classes: int, epochs: int = 20,
                  patience: int = 3) -> np.ndarray:
    """Holmes's probe per layer and label set: Dropout(0.2) + Linear, Adam lr 1e-3, batch 16, <= 20 epochs, early
    stopping on dev loss (best dev epoch kept). Returns the task labels' (label_sets[0]) test macro-F1 [L]."""
    tr, dv, te = (torch.from_numpy(m) for m in (split.train, split.dev, split.test))
    regression = classes == 1
    loss_fn = torch.nn.MSELoss() if regression else torch.nn.CrossEntropyLoss()
    scores = []
    for layer in x:
        for s, labels in enumerate(torch.from_numpy(label_sets)):
            target = labels.float() if regression else labels
            probe = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(layer.shape[1], classes))
            optimiser = torch.optim.Adam(probe.parameters(), lr=1e-3)
            best, best_state, waited = float("inf"), None, 0
            train_idx = torch.nonzero(tr)[:, 0]
            for _ in range(epochs):
                probe.train()
                for batch in train_idx[torch.randperm(len(train_idx))].split(16):
                    optimiser.zero_grad()
                    out = probe(layer[batch])
                    loss_fn(out[:, 0] if regression else out, target[batch]).backward()
                    optimiser.step()
                probe.eval()
                with torch.no_grad():
                    out = probe(layer[dv])
                    dev_loss = loss_fn(out[:, 0] if regression else out, target[dv]).item()
                if dev_loss < best:
                    best, best_state, waited = dev_loss, {k: v.clone() for k, v in probe.state_dict().items()}, 0
                else:
                    waited += 1
                    if waited >= patience:
                        break
            if s == 0:
                probe.load_state_dict(best_state)
                with torch.no_grad():
                    pred = probe.eval()(layer[te])
                truth = labels[te].numpy()
                scores.append(np.corrcoef(pred[:, 0].numpy(), truth)[0, 1] if regression else
                              f1_score(truth, pred.argmax(-1).numpy(), average="macro"))
    return np.array(scores)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return (f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; torch "
            f"{torch.__version__}, scikit-learn {sklearn.__version__}; 1 thread for every method")


def markdown(rows: list[dict], summary: dict) -> str:
    """The table for docs/PERFORMANCE.md."""
    lines = ["| task | classes | ours (s) | scikit-learn loop (s) | ratio | Holmes-style (s) | ratio | "
             "max abs diff vs sklearn (points) | mean ours / Holmes |", "|" + "---|" * 9]
    for r in rows + [dict(summary, task="**all**", classes="", mean_ours=float("nan"), mean_holmes=float("nan"))]:
        lines.append(f"| {r['task']} | {r['classes']} | {r['ours_s']:.2f} | {r['sklearn_s']:.2f} | "
                     f"{r['sklearn_ratio']:.1f}x | {r['holmes_s']:.2f} | {r['holmes_ratio']:.1f}x | "
                     f"{r['max_diff_vs_sklearn'] * 100:.2f} | {r['mean_ours']:.3f} / {r['mean_holmes']:.3f} |")
    return "\n".join(lines)


def measure_tasks(feature_sets: list[tuple[object, torch.Tensor]], seeds: list[int]) -> list[dict]:
    """Per task: ours, the scikit-learn loop and the Holmes-style probe, one after the other, 1 thread each."""
    torch.set_num_threads(1)  # the machine is shared: one thread for ours and both baselines alike
    rows = []
    with threadpool_limits(1):
        for task, features in feature_sets:
            torch.manual_seed(0)
            split = Split(task.split_mask("train"), task.split_mask("dev"), task.split_mask("test"))
            x = standardise(features, split.train)
            controls = np.stack([control_labels(control_keys(task), task.labels, s) for s in seeds])
            if task.regression:
                ours, ours_s = timed(lambda: probe_regression(x, task.labels, controls, split))
                (ref, _), ref_s = timed(lambda: sklearn_ridge(x.double().numpy(), task.labels, controls, split, C_GRID))
                ours_q, metric = ours.task["pearson"], "pearson"
            else:
                ours, ours_s = timed(lambda: probe_classification(x, task.labels, controls, split, task.num_labels))
                (ref, _), ref_s = timed(lambda: sklearn_probes(x.double().numpy(), task.labels, controls, split,
                                                                task.num_labels, C_GRID))
                ours_q, metric = ours.task["macro_f1"], "macro_f1"
            holmes, holmes_s = timed(lambda: holmes_probes(x, np.concatenate([task.labels[None], controls]), split,
                                                           task.num_labels))
            rows.append({"task": task.name, "classes": task.num_labels, "layers": x.shape[0], "d": x.shape[2],
                         "n_train": int(split.train.sum()), "metric": metric, "ours_s": ours_s,
                         "sklearn_s": ref_s, "holmes_s": holmes_s, "sklearn_ratio": ref_s / ours_s,
                         "holmes_ratio": holmes_s / ours_s,
                         "max_diff_vs_sklearn": float(np.abs(ours_q - ref).max()),
                         "max_diff_vs_holmes": float(np.abs(ours_q - holmes).max()),
                         "mean_ours": float(ours_q.mean()), "mean_holmes": float(holmes.mean())})
            print(f"{task.name:26s} ours {ours_s:6.2f} s  sklearn {ref_s:6.2f} s ({ref_s / ours_s:5.1f}x)  "
                  f"holmes {holmes_s:6.2f} s ({holmes_s / ours_s:5.1f}x)  max |diff| vs sklearn "
                  f"{rows[-1]['max_diff_vs_sklearn'] * 100:.2f} points, vs holmes "
                  f"{rows[-1]['max_diff_vs_holmes'] * 100:.1f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=None, help="bundled paradigm UIDs (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="control-task seeds")
    parser.add_argument("--out", type=Path, default=CACHE / "bench_probes.json")
    args = parser.parse_args()
    feature_sets = task_feature_sets(args.tasks)  # capture (or load) first: not part of any timing
    host = machine()
    rows = measure_tasks(feature_sets, args.seeds)
    total = {k: sum(r[k] for r in rows) for k in ("ours_s", "sklearn_s", "holmes_s")}
    summary = {
        "workload": f"{len(rows)} bundled tasks of the embedded base model: every layer x C grid {list(C_GRID)} "
                    f"(dev-selected) + {len(args.seeds)} control seeds at the chosen C",
        "machine": host, "sklearn": f"LogisticRegression(lbfgs, tol={SKLEARN_TOL}) / Ridge per layer, C, label set",
        "ours_s": total["ours_s"], "sklearn_s": total["sklearn_s"], "holmes_s": total["holmes_s"],
        "sklearn_ratio": total["sklearn_s"] / total["ours_s"], "holmes_ratio": total["holmes_s"] / total["ours_s"],
        "min_task_sklearn_ratio": min(r["sklearn_ratio"] for r in rows),
        "max_diff_vs_sklearn": max(r["max_diff_vs_sklearn"] for r in rows),
        "max_diff_vs_holmes": max(r["max_diff_vs_holmes"] for r in rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as temp:
        Path(temp).write_text(json.dumps({"summary": summary, "tasks": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    print(markdown(rows, summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
