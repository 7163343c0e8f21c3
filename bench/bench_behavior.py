"""Behaviour-stage timing on the embedded base model: the batched offline suite against batch size 1 (the
baseline), and a content-cache hit against a fresh scoring. Prints ratios measured in this one run.

    python bench/bench_behavior.py [--limit N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from evaluation.behavior import BehaviorSettings, score_model  # noqa: E402
from merging.checkpoints import LoadOptions  # noqa: E402
from merging.family import build_family  # noqa: E402


def timed(folder: Path, settings: BehaviorSettings, cache: Path) -> float:
    started = time.perf_counter()
    score_model(folder, settings, LoadOptions(), cache)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=10, help="items per task (None = whole suite is slow)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    base = build_family(("base",))["base"]
    with tempfile.TemporaryDirectory() as cache:
        cache = Path(cache)
        one = timed(base, BehaviorSettings(batch_size=1, limit=args.limit), cache)
        batched = timed(base, BehaviorSettings(batch_size=args.batch_size, limit=args.limit), cache)
        hit = timed(base, BehaviorSettings(batch_size=args.batch_size, limit=args.limit), cache)
    print(f"offline suite, limit {args.limit}/task, base model, {os.cpu_count()} CPUs")
    print(f"batch 1 (baseline): {one:.1f} s   batch {args.batch_size}: {batched:.1f} s   "
          f"speed-up x{one / batched:.2f}")
    print(f"cache hit: {hit:.2f} s   speed-up over fresh x{batched / hit:.0f}")


if __name__ == "__main__":
    main()
