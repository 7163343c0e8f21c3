"""Benchmark merges on the embedded family: our in-process merge (merging.merge: mergekit's run_merge in this
process) vs a `mergekit-yaml` subprocess per merge (the same mergekit configuration and options), interleaved,
for linear, TIES and DARE-TIES over the same parents. Quality: max |difference| of the two merged checkpoints.

    nice -n 10 python bench/bench_merge.py [--methods linear ties dare_ties] [--reps 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from merging.family import build_family
from merging.merge import MergeLineage, merge
from merging.methods import METHODS, mergekit_config

PARAMETERS = {"linear": {"weight": 0.5}, "ties": {"weight": 1.0, "density": 0.5},
              "dare_ties": {"weight": 1.0, "density": 0.5}, "task_arithmetic": {"weight": 1.0}}


def mergekit_yaml(lineage: MergeLineage, family: dict[str, Path], out: Path, seed: int = 0) -> None:
    """The baseline: the mergekit CLI in a fresh process, with the options merging.merge passes in-process."""
    method = METHODS[lineage.method]
    config = mergekit_config(method, lineage.parameters, [str(family[p]) for p in lineage.parents],
                             str(family[lineage.base]) if method.uses_base else None, "float32")
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    cli = Path(sys.executable).with_name("mergekit-yaml")
    subprocess.run([str(cli), str(path), str(out), "--copy-tokenizer", "--lazy-unpickle", "--random-seed", str(seed),
                    "--num-threads", str(torch.get_num_threads()), "--no-write-model-card", "--quiet"], check=True, capture_output=True)


def max_difference(a: Path, b: Path) -> float:
    first, second = (load_file(p) for p in (sorted(a.glob("*.safetensors"))[0], sorted(b.glob("*.safetensors"))[0]))
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first)


def merge_rows(family: dict[str, Path], methods: list[str], reps: int = 1, log=print) -> list[dict]:
    parents = tuple(name for name in family if name != "base")[:2]
    rows = []
    for method in methods:
        lineage = MergeLineage(f"{'+'.join(parents)}/{method}", method, parents, "base", PARAMETERS[method])
        best = {"ours": float("inf"), "cli": float("inf")}
        with tempfile.TemporaryDirectory() as scratch:
            for rep in range(reps):
                for name, fn in (("ours", lambda out: merge(lineage, family, out)),
                                 ("cli", lambda out: mergekit_yaml(lineage, family, out))):
                    out = Path(scratch) / f"{name}{rep}"
                    started = time.perf_counter()
                    fn(out)
                    best[name] = min(best[name], time.perf_counter() - started)
            difference = max_difference(Path(scratch) / "ours0", Path(scratch) / "cli0")
        log(f"merge {method}: in-process {best['ours']:.1f} s, mergekit-yaml {best['cli']:.1f} s, "
            f"max |diff| {difference:.1e}")
        rows.append({"section": "merges", "workload": f"{method} of {' + '.join(parents)} over base, float32, "
                     f"{torch.get_num_threads()} torch thread(s)", "ours": "in-process run_merge",
                     "ours_s": best["ours"], "baseline": "mergekit-yaml subprocess", "baseline_s": best["cli"],
                     "ratio": best["cli"] / best["ours"], "quality": f"max |weight diff| {difference:.1e}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["linear", "ties", "dare_ties"], choices=list(PARAMETERS))
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    merge_rows(build_family(("base", "instruct", "math")), args.methods, args.reps)


if __name__ == "__main__":
    main()
