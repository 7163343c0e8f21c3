"""End-to-end runs of the embedded config (opt-in: tens of minutes): cold (a fresh run folder and cache; the
family itself, shared setup, excluded), warm (the same run again: everything cached) and incremental (the same
run folder with one more merge in the config), each `merge-eval run` in its own process.

    nice -n 10 python bench/bench_e2e.py [--config configs/smollm2.yaml] [--add "instruct+code/linear"]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def run(config: dict, folder: Path) -> float:
    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("merge-eval")), "run", str(path), "--run-dir",
                    str(folder / "run")], check=True)
    return time.perf_counter() - started


def e2e_rows(quick: bool = False, config_path: Path = ROOT / "configs" / "smollm2.yaml") -> list[dict]:
    config = yaml.safe_load(config_path.read_text())
    if quick:  # a seconds-scale stand-in: few items, two probing tasks, no similarity set
        config["behavior"]["limit"] = 2
        config["probing"].update(tasks=["noun_number"], seeds=[0])
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        cold = run(config, folder)
        warm = run(config, folder)
        grown = yaml.safe_load(yaml.safe_dump(config))
        grown["merges"]["methods"].append({"method": "task_arithmetic", "label": "ta07",
                                           "parameters": {"weight": 0.7}})
        incremental = run(grown, folder)
    workload = f"{config_path.name}{' (quick subset)' if quick else ''}: merge-eval run, own process"
    return [{"section": "e2e", "workload": workload, "ours": "warm run (all cached)", "ours_s": warm,
             "baseline": "cold run", "baseline_s": cold, "ratio": cold / warm, "quality": "same tables"},
            {"section": "e2e", "workload": workload, "ours": "incremental run (+1 method: one merge per parent group)",
             "ours_s": incremental, "baseline": "cold run", "baseline_s": cold, "ratio": cold / incremental,
             "quality": "same tables plus the new merges"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2.yaml")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in e2e_rows(args.quick, args.config):
        print(f"{row['ours']}: {row['ours_s']:.0f} s vs {row['baseline']}: {row['baseline_s']:.0f} s")


if __name__ == "__main__":
    main()
