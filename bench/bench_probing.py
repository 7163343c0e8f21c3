"""Benchmark the probing stage on the real embedded base model (SmolLM2-135M, 31 layers), baselines in the same run:

1. capture: our hooked pass that pools every layer (transformer-lens bridge) vs a plain HF forward pass of the
   same batches (no hidden states kept): time ratio and peak RSS growth of each.
2. probes: all layers of one task fitted at once (batched L-BFGS, dev-selected C) vs a scikit-learn
   LogisticRegression loop over layers at the same C: time ratio and max |macro-F1 difference|.

    python bench/bench_probing.py [--task noun_number] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import psutil
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from merging.checkpoints import LoadOptions, load_model
from merging.family import build_family
from probing.capture import capture, task_features, task_requests
from probing.hooks import HookRunner
from probing.probes import Split, probe_classification, standardise
from probing.stage import load_tasks


def rss_mb() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def timed(fn):
    start_rss, start = rss_mb(), time.perf_counter()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = fn()
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result, time.perf_counter() - start, max(peak_after - peak_before, rss_mb() - start_rss, 0.0)


def plain_forward(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> None:
    texts = sorted(texts, key=lambda t: len(tokenizer(t).input_ids))
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            model.base_model(**enc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="noun_number")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = build_family(("base",))["base"]
    task = load_tasks("bundled", [args.task])[0]
    requests, index = task_requests(task)
    texts = sorted({r.text for r in requests})

    plain_model, tokenizer = load_model(folder, LoadOptions())
    plain_forward(plain_model, tokenizer, texts[:8], args.batch_size, args.max_length)  # warm-up
    _, plain_s, plain_mb = timed(lambda: plain_forward(plain_model, tokenizer, texts, args.batch_size,
                                                       args.max_length))
    runner = HookRunner(*load_model(folder, LoadOptions()))
    capture(runner, requests[:8], args.batch_size, args.max_length)  # warm-up
    pooled, capture_s, capture_mb = timed(lambda: capture(runner, requests, args.batch_size, args.max_length))
    hooks_runner = HookRunner(*load_model(folder, LoadOptions()), backend="torch-hooks")  # HF module map, eager
    _, hooks_s, hooks_mb = timed(lambda: capture(hooks_runner, requests, args.batch_size, args.max_length))
    print(f"capture [{runner.backend}] {task.name}: {len(texts)} texts, {pooled.shape[0]} layers pooled")
    print(f"  plain forward   {plain_s:7.2f} s   peak RSS +{plain_mb:6.1f} MB")
    print(f"  capture pass    {capture_s:7.2f} s   peak RSS +{capture_mb:6.1f} MB   "
          f"time ratio {capture_s / plain_s:.2f}x   stored pooled: {pooled.numel() * 4 / 2**20:.1f} MB (fp32)")
    print(f"  capture, torch  {hooks_s:7.2f} s   peak RSS +{hooks_mb:6.1f} MB   time ratio {hooks_s / plain_s:.2f}x "
          "(fallback backend: HF module map, eager attention)")

    split = Split(task.split_mask("train"), task.split_mask("dev"), task.split_mask("test"))
    x = standardise(task_features(pooled.half().float(), index), split.train)
    no_controls = np.zeros((0, len(task.labels)), np.int64)
    scores, batched_s, _ = timed(lambda: probe_classification(x, task.labels, no_controls, split, task.num_labels))

    def sklearn_loop() -> np.ndarray:
        out = []
        for layer in range(x.shape[0]):
            clf = LogisticRegression(C=scores.chosen_c[layer], max_iter=5000).fit(
                x[layer, split.train].numpy(), task.labels[split.train])
            out.append(f1_score(task.labels[split.test], clf.predict(x[layer, split.test].numpy()), average="macro"))
        return np.array(out)

    def sklearn_grid() -> None:  # what the batched fit actually does: every C of the grid, for every layer
        for layer in range(x.shape[0]):
            for c in (0.01, 0.1, 1.0, 10.0):
                LogisticRegression(C=c, max_iter=5000).fit(x[layer, split.train].numpy(), task.labels[split.train])

    reference, loop_s, _ = timed(sklearn_loop)
    _, grid_s, _ = timed(sklearn_grid)
    diff = np.abs(scores.task["macro_f1"] - reference)
    print(f"probes {task.name}: {x.shape[0]} layers, d={x.shape[2]}, n_train={int(split.train.sum())}")
    print(f"  batched (4 C values x all layers + dev selection) {batched_s:6.2f} s")
    print(f"  sklearn loop, 4 C values x layers                 {grid_s:6.2f} s   ratio {batched_s / grid_s:.2f}x")
    print(f"  sklearn loop, chosen C only                       {loop_s:6.2f} s   ratio {batched_s / loop_s:.2f}x")
    print(f"  macro-F1 |batched - sklearn|: max {diff.max() * 100:.2f} points, mean {diff.mean() * 100:.2f} points; "
          f"best layer {int(scores.task['macro_f1'].argmax())} ({scores.task['macro_f1'].max():.3f}), "
          f"last layer {scores.task['macro_f1'][-1]:.3f}")


if __name__ == "__main__":
    main()
