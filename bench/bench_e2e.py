"""End-to-end runs of the embedded config (opt-in: tens of minutes): cold (a fresh run folder and cache; the
family itself, shared setup, excluded), warm (the same run again: everything cached) and incremental (the same
run folder with one more merge method in the config's first merge group: one more merge), each `merge-eval run`
in its own process, measured by bench/measure.py (wall time; peak anonymous memory of its process tree).

The cold run is also read against `merge-eval plan` of the same config, planned just before it: time, peak
memory and disk written, plan / measured.

The incremental run is read against the cache ledger's seconds (runstore.cache): ratio = its wall time / the new
models' own stage seconds (merge, behaviour, captures, probes, and their weight-feature and functional pairs),
target <= 1.3; the rest is broken down by stage (every other computed stage's ledger seconds) plus what no stage
records (process and Prefect start, table writes, artifacts).

    nice -n 10 python bench/bench_e2e.py [--config configs/smollm2.yaml] [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import polars as pl
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from measure import measured_run  # noqa: E402

from flows.plan import bytes_under  # noqa: E402
from runstore.cache import read_ledger  # noqa: E402

ADDED = {"method": "task_arithmetic", "label": "ta07", "parameters": {"weight": 0.7}}


def run(config: dict, folder: Path, label: str) -> tuple[dict, pl.DataFrame]:
    """(bench/measure.py's measurement, this run's ledger lines) of one `merge-eval run` in its own process."""
    path = folder / f"{config['name']}-{label}.yaml"
    path.write_text(yaml.safe_dump(config))
    measured = measured_run([str(Path(sys.executable).with_name("merge-eval")), "run", str(path), "--run-dir",
                             str(folder / "run")], folder / f"{label}.log")
    if measured["returncode"]:
        raise SystemExit(f"{label} run failed: see {folder / f'{label}.log'}")
    ledger = read_ledger(folder / "run" / "cache")
    return measured, ledger.filter(pl.col("run") == ledger["run"][-1])


def with_added_merge(config: dict) -> dict:
    """The config with one more method (ADDED) in its first merge group: one merge more."""
    grown = yaml.safe_load(yaml.safe_dump(config))
    groups = grown["merges"] if isinstance(grown["merges"], list) else [grown["merges"]]
    parents = groups[0]["parents"]
    if len(parents) != 1:
        raise SystemExit(f"the first merge group has {len(parents)} parent groups: adding a method adds that many")
    groups[0]["methods"].append(ADDED)
    return grown


def planned_total(path: Path):
    """`merge-eval plan`'s total for the config at `path`, calibrated now at the thread count a run uses (torch's
    default, all cores: run_all.py pins its own process to one thread)."""
    import os

    import torch

    from flows.config import load_config
    from flows.plan import plan

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return plan(load_config(path))["total"]
    finally:
        torch.set_num_threads(threads)


def plan_rows(planned, folder: Path, cold: dict, workload: str) -> list[dict]:
    """The plan of the cold run against what the run measured: time, peak anonymous memory, disk written."""
    disk = bytes_under(folder / "run")
    pairs = {"time (s)": (planned.seconds, cold["seconds"]), "peak anonymous memory (GB)":
             (planned.memory / 1e9, cold["memory"] / 1e9), "disk written (GB)": (planned.disk / 1e9, disk / 1e9)}
    return [{"section": "e2e", "workload": workload, "ours": f"plan: {what}", "ours_s": plan_value,
             "baseline": "cold run, measured", "baseline_s": value, "ratio": plan_value / value,
             "quality": "target: within 30% (ratio 0.7-1.3)" + (f"; peak RSS {cold['rss'] / 1e9:.1f} GB with mapped "
                                                              "checkpoint pages" if "memory" in what else "")}
            for what, (plan_value, value) in pairs.items()]


def own_stages(ledger: pl.DataFrame, models: set[str]) -> pl.Series:
    """Whether each ledger line is one of `models`' own stages: the model itself or a pair it is in ("a|b")."""
    return ledger["model"].map_elements(lambda name: bool(set(name.split("|")) & models), return_dtype=pl.Boolean)


def incremental_breakdown(wall: float, ledger: pl.DataFrame) -> dict:
    """The incremental run against its new models' own stage seconds (the models merged in this run)."""
    new = set(ledger.filter((pl.col("stage") == "merge") & ~pl.col("hit"))["model"])
    own = ledger.filter(own_stages(ledger, new))
    other = ledger.filter(~own_stages(ledger, new) & ~pl.col("hit"))
    by_stage = lambda frame: dict(  # noqa: E731
        frame.group_by("stage").agg(pl.col("seconds").sum()).sort("stage").iter_rows())
    own_s, other_s = own["seconds"].sum(), other["seconds"].sum()
    return {"new_models": sorted(new), "own_s": own_s, "own_by_stage": by_stage(own), "ratio": wall / own_s,
            "overhead_by_stage": by_stage(other), "unaccounted_s": wall - own_s - other_s}


def describe(breakdown: dict, warm: float) -> str:
    stages = ", ".join(f"{stage} {s:.1f}" for stage, s in breakdown["overhead_by_stage"].items())
    own = ", ".join(f"{stage} {s:.1f}" for stage, s in breakdown["own_by_stage"].items())
    return (f"new {', '.join(breakdown['new_models'])}: own stages {own} s; overhead: {stages or 'none'} s, "
            f"unaccounted {breakdown['unaccounted_s']:.1f} s (process + Prefect start, table writes, artifacts; "
            f"stages that overlap in time make it smaller); a warm run's whole cost {warm:.1f} s")


def e2e_rows(quick: bool = False, config_path: Path = ROOT / "configs" / "smollm2.yaml",
             keep: Path | None = None) -> list[dict]:
    """Cold, warm and incremental runs in a scratch folder (or `keep`, left in place for a look at the run)."""
    config = yaml.safe_load(config_path.read_text())
    if quick:  # a seconds-scale stand-in: few items, one minimal-pair paradigm, one probe seed
        config["behavior"]["limit"] = 2
        config["minimal_pairs"] = [{"source": "bundled", "paradigms": ["subject_verb_agreement"], "pairs": 40}]
        config["probing"].update(seeds=[0])
    workload = f"{config_path.name}{' (quick subset)' if quick else ''}: merge-eval run, own process"
    with tempfile.TemporaryDirectory() as scratch:
        folder = keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "planned.yaml").write_text(yaml.safe_dump(config))
        planned = planned_total(folder / "planned.yaml")
        cold_measured, cold_ledger = run(config, folder, "cold")
        plans = plan_rows(planned, folder, cold_measured, workload)
        warm_measured, _ = run(config, folder, "warm")
        incremental_measured, ledger = run(with_added_merge(config), folder, "incremental")
    cold, warm, incremental = (m["seconds"] for m in (cold_measured, warm_measured, incremental_measured))
    breakdown = incremental_breakdown(incremental, ledger)
    cold_by_stage = {stage: [count, seconds] for stage, count, seconds in cold_ledger.group_by("stage").agg(
        pl.len(), pl.col("seconds").sum()).iter_rows()}
    return [{"section": "e2e", "workload": workload, "ours": "warm run (all cached)", "ours_s": warm,
             "baseline": "cold run", "baseline_s": cold, "ratio": cold / warm, "quality": "same tables",
             "cold_by_stage": cold_by_stage},
            {"section": "e2e", "workload": workload, "ours": "incremental run (+1 method: one merge per parent group)",
             "ours_s": incremental, "baseline": "cold run", "baseline_s": cold, "ratio": cold / incremental,
             "quality": "same tables plus the new merges"},
            {"section": "e2e", "workload": workload,
             "ours": "the new merges' own stage seconds (cache ledger; target: incremental <= 1.3x these)",
             "ours_s": breakdown["own_s"], "baseline": "incremental run", "baseline_s": incremental,
             "ratio": breakdown["ratio"], "quality": describe(breakdown, warm), "breakdown": breakdown},
            *plans]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2.yaml")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", type=Path, help="run here and keep the run folder (default: a scratch folder)")
    args = parser.parse_args()
    for row in e2e_rows(args.quick, args.config, args.keep):
        print(f"{row['ours']}: {row['ours_s']:.1f} s vs {row['baseline']}: {row['baseline_s']:.1f} s "
              f"(ratio {row['ratio']:.2f}): {row['quality']}")


if __name__ == "__main__":
    main()
