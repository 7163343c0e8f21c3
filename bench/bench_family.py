"""Cold vs warm build of the embedded family, and one merge per method on it (time, peak RSS).

    python bench/bench_family.py [--methods linear ties ...]

Cold builds into a fresh temporary cache (GGUF -> safetensors, then the three LoRA children); warm repeats the
same call on that cache, which should only hash inputs. Prints the ratio cold/warm.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from merging.family import build_family
from merging.merge import MergeLineage, PeakRss, merge
from merging.methods import METHODS

SETTINGS = {"linear": {"weight": 0.5}, "slerp": {"t": 0.5}, "task_arithmetic": {"weight": 1.0},
            "ties": {"weight": 1.0, "density": 0.5}, "dare_ties": {"weight": 1.0, "density": 0.5},
            "dare_linear": {"weight": 1.0, "density": 0.5}, "breadcrumbs": {"weight": 1.0, "density": 0.9},
            "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, "model_stock": {}}


def timed(call):
    started = time.perf_counter()
    with PeakRss() as memory:
        result = call()
    return result, time.perf_counter() - started, memory.peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-family-") as scratch:
        root = Path(scratch)
        family, cold, cold_rss = timed(lambda: build_family(root=root))
        _, warm, _ = timed(lambda: build_family(root=root))
        print(f"family build: cold {cold:.1f} s (peak RSS {cold_rss:.0f} MB), warm {warm:.2f} s, "
              f"cold/warm = {cold / warm:.0f}x")
        print(f"{'method':<16}{'seconds':>9}{'peak RSS MB':>13}")
        for method in args.methods:
            lineage = MergeLineage(f"instruct+math/{method}", method, ("instruct", "math"), "base",
                                   SETTINGS[method])
            manifest = merge(lineage, family, root / "merges" / method)
            print(f"{method:<16}{manifest['wall_seconds']:>9.1f}{manifest['peak_rss_mb']:>13.0f}")


if __name__ == "__main__":
    main()
