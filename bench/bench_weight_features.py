"""Benchmark: streamed weight features vs loading every checkpoint whole (the Model Kinship reference's way).

Each approach runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. The baseline loads all state
dicts in fp32 at once and, per pair, concatenates float64 task vectors (as the kinship reference does, but in
float64 so both compute the same numbers: the script checks they agree). It computes global features only; the
streamed pass also produces every per-layer and per-module scope.

    MERGE_EVAL_CACHE=/tmp/me-cache python bench/bench_weight_features.py [--models base instruct math code]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def streamed(paths: dict) -> dict:
    from probing.similarity.weights import accumulate, derive

    totals = accumulate(paths, "base")
    pairs, _ = derive(totals[("global", None, None)], list(paths).index("base"))
    names = list(paths)
    return {f"{a}|{b}": [pairs[f][i, j] for f in ("cosine", "l2_distance", "kinship_pearson", "kinship_cosine")]
            for (i, a), (j, b) in itertools.combinations(enumerate(names), 2) if "base" not in (a, b)}


def whole(paths: dict) -> dict:
    from merging.family import load_state_dict

    states = {name: load_state_dict(path) for name, path in paths.items()}  # every checkpoint, whole, fp32
    keys = list(states["base"])
    flat = {name: torch.cat([state[k].reshape(-1).double() for k in keys]) for name, state in states.items()}
    out = {}
    for a, b in itertools.combinations(paths, 2):
        if "base" in (a, b):
            continue
        da, db = flat[a] - flat["base"], flat[b] - flat["base"]
        cosine = torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0).item()
        kin_cos = torch.nn.functional.cosine_similarity(da, db, dim=0).item()
        out[f"{a}|{b}"] = [cosine, torch.dist(flat[a], flat[b]).item(), torch.corrcoef(torch.stack([da, db]))[0, 1].item(),
                           kin_cos]
    return out


def child(mode: str, items: list[str]) -> None:
    paths = {name: Path(path) for name, path in (item.split("=", 1) for item in items)}
    started = time.perf_counter()
    values = (streamed if mode == "streamed" else whole)(paths)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "values": values}))


def compare(family: dict) -> dict:
    """Both approaches, each in a fresh subprocess (1 torch thread), as a bench/run_all.py row."""
    items = [f"{name}={path}" for name, path in family.items()]
    results = {}
    for mode in ("whole", "streamed"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--paths", *items], capture_output=True,
                             text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    diff = max(abs(x - y) for key in results["whole"]["values"]
               for x, y in zip(results["whole"]["values"][key], results["streamed"]["values"][key]))
    w, s = results["whole"], results["streamed"]
    if not np.isfinite(diff) or diff > 1e-6:
        sys.exit(f"streamed and whole-model features disagree by {diff}")
    return {"section": "weights", "workload": f"global weight features of {len(family)} checkpoints "
            f"({', '.join(family)}), pairwise", "ours": f"streamed (peak RSS {s['peak_rss_mb']:.0f} MB)",
            "ours_s": s["seconds"], "baseline": f"whole state dicts (peak RSS {w['peak_rss_mb']:.0f} MB)",
            "baseline_s": w["seconds"], "ratio": w["seconds"] / s["seconds"],
            "quality": f"max |feature diff| {diff:.1e}; peak RSS ratio {s['peak_rss_mb'] / w['peak_rss_mb']:.2f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["base", "instruct", "math", "code"])
    parser.add_argument("--child", choices=["streamed", "whole"])
    parser.add_argument("--paths", nargs="+", help="name=DIR (children only)")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.paths)
    from merging.family import build_family

    row = compare(build_family(tuple(args.models)))
    print(f"{row['workload']}\n  {row['ours']}: {row['ours_s']:.1f} s\n  {row['baseline']}: {row['baseline_s']:.1f} s"
          f"\n  ratio {row['ratio']:.2f}; {row['quality']}")


if __name__ == "__main__":
    main()
