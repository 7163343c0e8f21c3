"""Correlation-stage timing: the vectorised block (r, p and bootstrap CI of all three methods for many tests at
once) against the baseline of one scipy.stats call per test and method (pearsonr / spearmanr / kendalltau, and
scipy.stats.bootstrap with a vectorised statistic for the CI). Prints the ratio measured in this one run.

    python bench/bench_correlations.py [--tests 200] [--n 14] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy import stats

from reports.correlations import METHODS, correlate_block

SCIPY = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}


def baseline(x: np.ndarray, y: np.ndarray, resamples: int, seed: int) -> None:
    for xi, yi in zip(x, y):
        for method in METHODS:
            SCIPY[method](xi, yi)
            statistic = lambda a, b, axis=-1, m=method: np.array(  # noqa: E731 - per resample: scipy's own r
                [SCIPY[m](ra, rb).statistic for ra, rb in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, a.shape[-1]))]
            ).reshape(a.shape[:-1])
            stats.bootstrap((xi, yi), statistic, paired=True, vectorized=True, method="percentile",
                            n_resamples=resamples, rng=np.random.default_rng(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=200, help="tests in the block (x rows reused across 20 y rows)")
    parser.add_argument("--baseline-tests", type=int, default=4, help="tests timed with the per-test baseline")
    parser.add_argument("--n", type=int, default=14, help="units per test (models of a run)")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=(args.tests // 20 + 1, args.n)), rng.normal(size=(20, args.n))
    x = np.repeat(xs, 20, axis=0)[:args.tests]
    y = np.tile(ys, (len(xs), 1))[:args.tests]
    started = time.perf_counter()
    correlate_block(x, y, "models", 0, args.resamples)
    block = (time.perf_counter() - started) / args.tests
    started = time.perf_counter()
    baseline(x[:args.baseline_tests], y[:args.baseline_tests], args.resamples, 0)
    per_test = (time.perf_counter() - started) / args.baseline_tests
    print(f"{args.tests} tests x 3 methods, n={args.n}, {args.resamples} resamples, {os.cpu_count()} CPUs")
    print(f"scipy per test (baseline): {per_test * 1e3:.1f} ms/test   block: {block * 1e3:.2f} ms/test   "
          f"speed-up x{per_test / block:.0f}")


if __name__ == "__main__":
    main()
