"""Benchmark functional similarity (every pair of models from their stored similarity-set captures): ours, every
feature for all pairs of a layer at once (`functional_features`), vs the per-pair loop the stage ran before (each
pair through `activation_cosine`, `linear_cka` on float32 sides computed once per model and layer,
`pattern_cosine`, `topk_kl`), interleaved in the same run on the same captures. The baseline's KL already uses
the lookup table (the binary search it replaced cost ~0.5 s more per ordered pair on 10k tokens).

Captures: the embedded family's models on the first `--tokens` tokens of the similarity set, written once into
`--store` (kept, so a second run skips them).

    python bench/bench_functional.py [--models base instruct math code] [--tokens 2048] [--store /tmp/fs/captures]
"""

from __future__ import annotations

import argparse
import time
from itertools import combinations
from pathlib import Path

import torch

from merging.checkpoints import LoadOptions, load_model
from merging.family import build_family
from probing.capture import PackedPattern, Tokens, TopK
from probing.hooks import HookRunner
from probing.similarity.functional import (activation_cosine, cka_side, functional_features, functional_jobs,
                                           linear_cka, pattern_cosine, topk_kl)
from probing.similarity.unlabeled import TokenWindows
from probing.store import CaptureStore, ModelRef, capture_model, model_ref


def per_pair(models: list[ModelRef], windows: TokenWindows, store: CaptureStore, top_k: int) -> dict:
    """The previous stage's loop: each layer's captures read once, then every feature pair by pair."""
    job = functional_jobs(windows, models[0].n_blocks, top_k)[0]
    pairs = list(combinations(models, 2))
    out: dict[tuple, float] = {}

    def load(model, request):
        return store.load(job.key(request, model.digest, "float32"))

    for layer, request in enumerate(r for r in job.requests if isinstance(r.reducer, Tokens)):
        states = {m.name: load(m, request)["value"].float().flatten(0, 1) for m in models}
        sides = {name: cka_side(x, torch.float32) for name, x in states.items()}
        for a, b in pairs:
            out[(a.name, b.name, "activation_cosine", layer)] = activation_cosine(states[a.name], states[b.name])
            out[(a.name, b.name, "cka", layer)] = linear_cka(sides[a.name], sides[b.name])
    for block, request in enumerate(r for r in job.requests if isinstance(r.reducer, PackedPattern)):
        patterns = {m.name: load(m, request)["value"] for m in models}
        for a, b in pairs:
            for head, value in enumerate(pattern_cosine(patterns[a.name], patterns[b.name]).tolist()):
                out[(a.name, b.name, "attention_cosine", (block + 1, head))] = value
    (logits,) = [r for r in job.requests if isinstance(r.reducer, TopK)]
    top = {m.name: load(m, logits) for m in models}
    for a, b in [ordered for pair in pairs for ordered in (pair, pair[::-1])]:
        out[(a.name, b.name, "kl", None)] = topk_kl(top[a.name], top[b.name], b.vocab_size).mean().item()
    return out


def float64_cka(models: list[ModelRef], windows: TokenWindows, store: CaptureStore, top_k: int) -> dict:
    """Every pair's CKA per layer in float64 (the reference both float32 paths are held to)."""
    job = functional_jobs(windows, models[0].n_blocks, top_k)[0]
    out = {}
    for layer, request in enumerate(r for r in job.requests if isinstance(r.reducer, Tokens)):
        sides = {m.name: cka_side(store.load(job.key(request, m.digest, "float32"))["value"].flatten(0, 1))
                 for m in models}
        for a, b in combinations(models, 2):
            out[(a.name, b.name, "cka", layer)] = linear_cka(sides[a.name], sides[b.name])
    return out


def ours(models: list[ModelRef], windows: TokenWindows, store: CaptureStore, top_k: int) -> dict:
    rows = functional_features(models, windows, store, "float32", top_k)
    out = {}
    for a, b, feature, scope, layer, head, stat, value in rows.select(
            "model_a", "model_b", "feature", "scope", "layer", "head", "stat", "value").iter_rows():
        if scope == "layer":
            out[(a, b, feature, layer)] = value
        elif scope == "head":
            out[(a, b, feature, (layer, head))] = value
        elif feature == "kl" and stat == "mean":
            out[(a, b, feature, None)] = value
    return out


def functional_row(family: dict[str, Path], windows: TokenWindows, store: CaptureStore, top_k: int = 1024,
                   reps: int = 2, log=print) -> dict:
    """A bench/run_all.py row: best of `reps` interleaved runs each; fails if any value differs by > 1e-5."""
    models = [model_ref(name, folder) for name, folder in family.items()]
    for model in models:
        jobs = store.missing(functional_jobs(windows, model.n_blocks, top_k), model, "float32")
        if jobs:
            capture_model(HookRunner(*load_model(model.folder, LoadOptions())), model, jobs, store, "float32", log)
    methods = {"per_pair": per_pair, "ours": ours}
    best, values = dict.fromkeys(methods, float("inf")), {}
    for rep in range(reps):
        for name, fn in (list(methods.items()) if rep % 2 == 0 else list(methods.items())[::-1]):
            started = time.perf_counter()
            values[name] = fn(models, windows, store, top_k)
            best[name] = min(best[name], time.perf_counter() - started)
    assert values["ours"].keys() == values["per_pair"].keys()
    worst = {}
    for key, value in values["ours"].items():
        worst[key[2]] = max(worst.get(key[2], 0.0), abs(value - values["per_pair"][key]))
    # CKA: both float32 products; each against the float64 measure instead of against each other
    truth = float64_cka(models, windows, store, top_k)
    cka_error = {name: max(abs(values[name][key] - value) for key, value in truth.items()) for name in methods}
    if max(worst[f] for f in worst if f != "cka") > 1e-6 or cka_error["ours"] > 1e-5:
        raise SystemExit(f"functional features disagree: {worst}, CKA vs float64 {cka_error}")
    n_pairs = len(models) * (len(models) - 1) // 2
    return {"section": "similarity", "workload": f"functional similarity of {len(models)} models ({n_pairs} pairs), "
            f"{windows.n_rows * windows.window} tokens, {torch.get_num_threads()} threads",
            "ours": "all pairs of a layer at once", "ours_s": best["ours"],
            "baseline": "per-pair loop (previous stage)", "baseline_s": best["per_pair"],
            "ratio": best["per_pair"] / best["ours"],
            "quality": f"CKA max |error| vs float64: ours {cka_error['ours']:.1e}, per-pair loop "
                       f"{cka_error['per_pair']:.1e}; other features max |diff| "
                       + ", ".join(f"{f} {d:.1e}" for f, d in worst.items() if f != "cka"),
            "per_pair_s": {"ours": best["ours"] / n_pairs, "baseline": best["per_pair"] / n_pairs}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["base", "instruct", "math", "code"])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=1024)
    parser.add_argument("--store", type=Path, default=Path("/tmp/merge-eval-bench-functional/captures"))
    args = parser.parse_args()
    row = functional_row(build_family(tuple(args.models)), TokenWindows(args.tokens), CaptureStore(args.store),
                         args.top_k)
    print(f"{row['workload']}\n  {row['ours']}: {row['ours_s']:.1f} s ({row['per_pair_s']['ours']:.2f} s per pair)"
          f"\n  {row['baseline']}: {row['baseline_s']:.1f} s ({row['per_pair_s']['baseline']:.2f} s per pair)"
          f"\n  ratio {row['ratio']:.2f}; {row['quality']}")


if __name__ == "__main__":
    main()
