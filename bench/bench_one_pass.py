"""One forward pass per minimal-pair sentence against two: the per-model work for the bundled paradigms, in one run.

    nice -n 10 python bench/bench_one_pass.py [--pairs 200]

Ours: the probes' capture pass also scores each sentence (`TextLogLik`), and lm-eval reads those answers
(`evaluation.answered_lm`). Baseline (the path before issue 23): the capture pass keeps hidden states only and
lm-eval runs the model over the same sentences again. Both score the same paradigms on the same loaded model; the
quality column gives the largest per-token log-likelihood difference and whether every pair's decision agrees.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from evaluation.behavior import BehaviorSettings, evaluate, sample_items  # noqa: E402
from evaluation.minimal_pairs import PairSelection  # noqa: E402
from merging.checkpoints import LoadOptions, load_model  # noqa: E402
from probing.hooks import HookRunner  # noqa: E402
from probing.minimal_pair_tasks import BUNDLED_DIR, minimal_pair_tasks  # noqa: E402
from probing.stage import LOGLIK_REQUEST, probe_jobs, scored_sentences  # noqa: E402
from probing.store import CaptureJob, CaptureStore, capture_model, model_ref  # noqa: E402


def _loglikelihoods(raw: dict) -> dict[tuple[str, int], list[float]]:
    return {(task, s["doc_id"]): [float(r[0][0]) for r in s["resps"]]
            for task, samples in raw["samples"].items() for s in samples}


def one_pass_rows(folder: Path, pairs: int = 200, paradigms: tuple[str, ...] | None = None, log=print) -> list[dict]:
    model, tokenizer = load_model(folder, LoadOptions())
    selection = PairSelection("suite", str(BUNDLED_DIR), paradigms, pairs)
    tasks = minimal_pair_tasks([selection])
    jobs = probe_jobs(tasks, model.config.num_hidden_layers)
    hidden_only = [CaptureJob(job.inputs, tuple(r for r in job.requests if r != LOGLIK_REQUEST), job.batch_tokens)
                   for job in jobs]
    settings = BehaviorSettings(suites=(), batch_size=16, minimal_pairs=(selection,))
    with tempfile.TemporaryDirectory() as cache:
        ref = model_ref("base", folder, Path(cache))

        def timed(capture_jobs, answered: bool) -> tuple[float, dict]:
            store = CaptureStore(Path(cache) / f"captures-{answered}")
            started = time.perf_counter()
            capture_model(HookRunner(model, tokenizer), ref, capture_jobs, store, "float32", log=lambda _: None)
            answers = scored_sentences(capture_jobs, store, ref.digest, "float32") if answered else None
            raw = evaluate(model, tokenizer, settings, answers=answers)
            return time.perf_counter() - started, raw

        evaluate(model, tokenizer, replace(settings, limit=1))  # untimed: lm-eval's task index, built once a process
        two, computed = timed(hidden_only, answered=False)
        one, served = timed(jobs, answered=True)
    served_ll, computed_ll = _loglikelihoods(served), _loglikelihoods(computed)
    gap = max(abs(a - b) for key in served_ll for a, b in zip(served_ll[key], computed_ll[key]))
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for job in jobs for t in job.inputs.texts())
    same = sample_items(served, "m").equals(sample_items(computed, "m"))
    workload = (f"{len(tasks)} bundled paradigm(s) x {pairs} pairs ({tokens:,} sentence tokens): probe capture "
                "(every layer) + minimal-pair behaviour, base model")
    log(f"one pass: {one:.1f} s; capture then lm-eval again: {two:.1f} s ({served['merge_eval_answered']} requests "
        f"answered); max |d sentence loglik| {gap:.1e}; same decisions: {same}")
    return [{"section": "one_pass", "workload": workload, "ours": "one pass (capture scores the sentences)",
             "ours_s": one, "baseline": "capture pass + lm-eval's own pass", "baseline_s": two, "ratio": two / one,
             "quality": f"every pair's decision {'the same' if same else 'NOT the same'}; sentence log-likelihoods "
                        f"within {gap:.1e} of lm-eval's"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    from merging.family import build_family

    one_pass_rows(build_family(("base",))["base"], args.pairs)


if __name__ == "__main__":
    main()
