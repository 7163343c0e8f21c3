"""Does bfloat16 change any conclusion? The same study run at float32 and at bfloat16, compared item by item.

    python bench/bench_precision.py --device cuda --out bench/precision.json   # where bfloat16 has fast kernels

On a CPU without native bfloat16 (this project's 2-core AVX2 machine) bfloat16 runs 7.5x slower than float32, so the
bfloat16 half takes hours there; run it on a GPU or a CPU with AVX-512 BF16 / AMX (docs/PERFORMANCE.md).

The study: `configs/smollm2.yaml`'s base, instruct and planted `agreement` child (no merges), all 16 bundled
minimal-pair paradigms inside (probes, every layer) and outside (minimal-pair log-likelihood), its offline domain
suite and probe seeds; no similarity (a selector feature, not a conclusion this measures). Each
precision is one `merge-eval run` in its own process and run folder. Compared on the same items:
- probes: per (model, paradigm, layer), the test items each precision's probe gets right, McNemar's exact test
  (scipy's binomial test on the discordant items), Benjamini-Hochberg over all of them; and |Δ macro-F1|;
- minimal pairs: per (model, paradigm), the pairs each precision decides for the good sentence, McNemar again;
- conclusions: the run's own `changes.parquet` (every model against `base`, inside per layer band and outside):
  the same significant differences, in the same direction, at both precisions?
Also the captures' and behaviour's seconds from each run's cache ledger: the speed bfloat16 buys.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import yaml
from scipy.stats import binomtest, false_discovery_control

from runstore.cache import read_ledger

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("float32", "bfloat16")


def study_config(precision: str, folder: Path, device: str) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "smollm2.yaml").read_text())
    config |= {"name": f"precision-{precision}", "precision": precision, "device": device,
               "models": [m for m in config["models"] if m["name"] in ("base", "instruct", "agreement")],
               "similarity": {"weights": False, "functional": False}}
    config.pop("merges", None)
    path = folder / f"{precision}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(precision: str, folder: Path, device: str) -> dict:
    run_dir = folder / precision
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "run", str(study_config(precision, folder, device)), "--run-dir",
                    str(run_dir)], check=True, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    ledger = read_ledger(run_dir / "cache")
    stages = dict(ledger.group_by("stage").agg(pl.col("seconds").sum()).iter_rows())
    return {"wall_seconds": time.perf_counter() - started, "stage_seconds": stages, "tables": run_dir / "tables"}


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact McNemar p-value of two paired 0/1 vectors (1.0 when no item is discordant)."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b).pvalue


def compare_probes(tables: dict[str, Path]) -> dict:
    items = {p: pl.read_parquet(t / "probe_items.parquet").with_columns(
        (pl.col("label") == pl.col("prediction")).alias("right")) for p, t in tables.items()}
    joined = items["float32"].join(items["bfloat16"], on=["model", "task", "layer", "item_id"], suffix="_bf16")
    tests = joined.group_by("model", "task", "layer").agg(pl.col("right"), pl.col("right_bf16"))
    p = np.array([mcnemar(np.array(a), np.array(b)) for a, b in zip(tests["right"], tests["right_bf16"])])
    q = false_discovery_control(p)
    probes = {p: pl.read_parquet(t / "probes.parquet").filter(metric="macro_f1").group_by(
        "model", "task", "layer").agg(pl.col("value").mean()) for p, t in tables.items()}
    delta = probes["float32"].join(probes["bfloat16"], on=["model", "task", "layer"], suffix="_bf16").select(
        (pl.col("value") - pl.col("value_bf16")).abs().alias("d"))["d"]
    discordant = (joined["right"] != joined["right_bf16"]).mean()
    return {"tests": len(p), "items": joined.height, "p_below_0.05": int((p < 0.05).sum()),
            "q_below_0.05": int((q < 0.05).sum()), "discordant_item_share": float(discordant),
            "macro_f1_abs_diff_mean": float(delta.mean()), "macro_f1_abs_diff_max": float(delta.max())}


def compare_pairs(tables: dict[str, Path]) -> dict:
    items = {p: pl.read_parquet(t / "behavior_items.parquet").filter(metric="acc") for p, t in tables.items()}
    joined = items["float32"].join(items["bfloat16"], on=["model", "task", "doc_id", "filter", "metric"],
                                   suffix="_bf16")
    tests = joined.group_by("model", "task").agg(pl.col("value"), pl.col("value_bf16"))
    p = np.array([mcnemar(np.array(a) > 0.5, np.array(b) > 0.5) for a, b in zip(tests["value"], tests["value_bf16"])])
    acc = joined.group_by("model", "task").agg((pl.col("value") - pl.col("value_bf16")).mean().abs().alias("d"))
    return {"tests": len(p), "pairs": joined.height, "p_below_0.05": int((p < 0.05).sum()),
            "q_below_0.05": int((false_discovery_control(p) < 0.05).sum()),
            "flipped_pair_share": float((joined["value"] != joined["value_bf16"]).mean()),
            "accuracy_abs_diff_mean": float(acc["d"].mean()), "accuracy_abs_diff_max": float(acc["d"].max())}


def compare_conclusions(tables: dict[str, Path]) -> dict:
    """The significant differences from `base` that each precision's changes.parquet reports."""
    found = {}
    for precision, folder in tables.items():
        changes = pl.read_parquet(folder / "changes.parquet")
        significant = changes.filter(pl.col("significant"))
        found[precision] = {tuple(str(v) for v in row) for row in significant.select(
            "model", "reference", "side", "band", "level", "task", pl.col("diff").sign()).iter_rows()}
    both = found["float32"] & found["bfloat16"]
    return {"significant_float32": len(found["float32"]), "significant_bfloat16": len(found["bfloat16"]),
            "in_both": len(both), "only_float32": sorted(found["float32"] - both),
            "only_bfloat16": sorted(found["bfloat16"] - both)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "precision.json")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/merge-eval-precision"))
    parser.add_argument("--device", default="cpu", help="the config's device: cpu, cuda, auto")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    runs = {precision: run(precision, args.folder, args.device) for precision in PRECISIONS}
    tables = {precision: r.pop("tables") for precision, r in runs.items()}
    result = {"runs": runs, "probes": compare_probes(tables), "minimal_pairs": compare_pairs(tables),
              "conclusions": compare_conclusions(tables)}
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
