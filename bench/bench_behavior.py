"""Behaviour-stage timing on the embedded base model, in one run: the offline suite at the configured batch size
against batch size 1 (the baseline), a content-cache hit against a fresh scoring, and where a fresh scoring's
time goes (the model's forward passes, timed by hooks, vs lm-eval's request building, tokenisation, dataset
loading and metrics: the rest).

    nice -n 10 python bench/bench_behavior.py [--limit N] [--batch-size 16]
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
from merging.checkpoints import LoadOptions, load_model  # noqa: E402
from merging.family import build_family  # noqa: E402


class ForwardClock:
    """Seconds spent inside the model's forward calls (a pre/post hook pair on the top module)."""

    def __init__(self, model):
        self.seconds, self.calls, self._start = 0.0, 0, 0.0
        model.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter()))
        model.register_forward_hook(lambda *_: self._stop())

    def _stop(self) -> None:
        self.seconds += time.perf_counter() - self._start
        self.calls += 1


def behaviour_rows(folder: Path, limit: int | None = 10, batch_size: int = 16, log=print) -> list[dict]:
    options = LoadOptions()
    model, tokenizer = load_model(folder, options)
    clock = ForwardClock(model)
    with tempfile.TemporaryDirectory() as cache:
        cache = Path(cache)

        def timed(settings: BehaviorSettings) -> float:
            started = time.perf_counter()
            score_model(folder, settings, options, cache, loaded=(model, tokenizer))
            return time.perf_counter() - started

        one = timed(BehaviorSettings(batch_size=1, limit=limit))
        before = clock.seconds
        batched = timed(BehaviorSettings(batch_size=batch_size, limit=limit))
        forward, calls = clock.seconds - before, clock.calls
        hit = timed(BehaviorSettings(batch_size=batch_size, limit=limit))
    workload = f"offline suite, limit {limit} items/task, base model; 1 thread"
    log(f"behaviour: batch 1 {one:.1f} s, batch {batch_size} {batched:.1f} s (model forward {forward:.1f} s = "
        f"{forward / batched:.0%}), cache hit {hit:.2f} s")
    return [{"section": "behaviour", "workload": workload, "ours": f"lm-eval, batch {batch_size}", "ours_s": batched,
             "baseline": "lm-eval, batch 1", "baseline_s": one, "ratio": one / batched,
             "quality": f"same scores up to padding rounding; model forward {forward / batched:.0%} of ours",
             "forward_s": forward, "forward_calls": calls},
            {"section": "behaviour", "workload": workload, "ours": "content-cache hit", "ours_s": hit,
             "baseline": f"fresh scoring, batch {batch_size}", "baseline_s": batched, "ratio": batched / hit,
             "quality": "identical result (the stored one)"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=10, help="items per task (None = whole suite is slow)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    behaviour_rows(build_family(("base",))["base"], args.limit, args.batch_size)


if __name__ == "__main__":
    main()
