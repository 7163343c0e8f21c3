"""Benchmark the flow's task runners, baseline in the same run: the whole `merge-eval` flow on a fresh run directory
with `orchestration.task_runner: default` (one task at a time) vs `dask` (a LocalCluster of N worker processes):
wall time, ratio, and the peak resident memory of this process plus its children (the Dask workers).

    python bench/bench_task_runners.py [--family tiny|embedded] [--workers 2]

`tiny` is the random 3-block family of the tests (what concurrency costs: cluster start, worker imports);
`embedded` is SmolLM2-135M base + two children and one merge (what it gains on real forward passes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent


def tiny_family(folder: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_family

    return build_tiny_family(folder)


def embedded_family() -> dict[str, Path]:
    from merging.family import build_family

    return build_family()


def experiment(family: dict[str, Path], runner: dict) -> dict:
    parents = list(family)[:3]
    return {"name": "bench", "seed": 0, "device": "cpu", "base": parents[0],
            "models": [{"name": n, "source": str(family[n])} for n in parents],
            "merges": {"parents": [parents[1:3]], "methods": [{"method": "linear"}]},
            "behavior": {"limit": 8, "batch_size": 8},
            "minimal_pairs": [{"source": "bundled", "paradigms": ["subject_verb_agreement", "tense_adverb_agreement"],
                               "pairs": 100}],
            "probing": {"seeds": [0]},
            "similarity": {"tokens": 512, "window": 64, "top_k": 64},
            "orchestration": runner}


class PeakRss:
    """The peak of this process's RSS plus its descendants' (Dask's nannies and workers), sampled every 0.2 s."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total / 2**20)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-runners-"))
    os.environ.setdefault("PREFECT_HOME", str(scratch / "prefect"))
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import merge_eval

    family = tiny_family(scratch / "family") if args.family == "tiny" else embedded_family()
    runners = {"default": {}, f"dask x{args.workers}": {"task_runner": "dask", "n_workers": args.workers}}
    measured = {}
    with prefect_test_harness(server_startup_timeout=180):
        for label, runner in runners.items():
            config = scratch / f"{len(measured)}.yaml"
            config.write_text(yaml.safe_dump(experiment(family, runner)))
            with PeakRss() as rss:
                start = time.perf_counter()
                merge_eval(config_path=str(config), run_dir=str(scratch / f"run{len(measured)}"))
                measured[label] = (time.perf_counter() - start, rss.peak)
    base_wall = measured["default"][0]
    print(f"\n{args.family} family, fresh run directory each ({os.cpu_count()} CPUs):")
    for label, (wall, peak) in measured.items():
        print(f"  {label:<10} wall {wall:7.1f} s  ({wall / base_wall:4.2f}x default)  peak RSS incl. workers "
              f"{peak:7.0f} MB")


if __name__ == "__main__":
    main()
