"""Every benchmark in one run: writes bench/results.json and regenerates the tables section of
docs/PERFORMANCE.md (between its `bench:tables` markers). Each row: workload, ours, baseline, both timed in this
run (interleaved where the bench repeats), ratio = baseline seconds / ours seconds, quality difference.

    nice -n 10 python bench/run_all.py            # every default bench (minutes)
    nice -n 10 python bench/run_all.py --e2e      # + cold / warm / incremental end-to-end runs (long)
    python bench/run_all.py --quick               # seconds-long smoke on tiny workloads (tests/test_bench.py)

`--family name=DIR ...` replaces the embedded family (base, instruct, math) with other checkpoints of one base;
`--no-docs` leaves docs/PERFORMANCE.md alone; `--out FILE` writes the JSON elsewhere; `--cache DIR` keeps the
probe features captured once (default bench/.cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from runstore.atomic import atomic_path  # noqa: E402

DOC = ROOT / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- bench:tables:begin -->", "<!-- bench:tables:end -->"
SECTIONS = ("probes", "capture", "similarity", "weights", "merges", "behaviour", "one_pass", "store", "e2e")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_at_start": round(os.getloadavg()[0], 1), "python": platform.python_version()}


def probes(family: dict[str, Path], quick: bool, cache: Path) -> list[dict]:
    import numpy as np
    from bench_probes import measure_tasks, task_feature_sets

    sets = task_feature_sets(["subject_verb_agreement"] if quick else None, family["base"], cache)  # default: every bundled task
    if quick:  # 3 layers keep the smoke in seconds
        sets = [(task, x[:3]) for task, x in sets]
    rows = measure_tasks(sets, [0] if quick else [0, 1, 2])
    total = {k: sum(r[k] for r in rows) for k in ("ours_s", "sklearn_s", "holmes_s")}
    workload = (f"{len(rows)} bundled task(s), each: {rows[0]['layers']} layers x C grid + controls, n_train "
                f"~{rows[0]['n_train']}, d {rows[0]['d']}; 1 thread")
    diff = lambda key: f"max |test metric diff| over layers {100 * max(r[key] for r in rows):.2f} points"  # noqa: E731
    return [{"section": "probes", "workload": workload, "ours": "batched Newton (probe_classification/regression)",
             "ours_s": total["ours_s"], "baseline": "scikit-learn loop (lbfgs / Ridge)",
             "baseline_s": total["sklearn_s"], "ratio": total["sklearn_s"] / total["ours_s"],
             "quality": diff("max_diff_vs_sklearn"), "per_task": rows},
            {"section": "probes", "workload": workload, "ours": "batched Newton", "ours_s": total["ours_s"],
             "baseline": "Holmes-style probe (Dropout+Linear, Adam, <=20 epochs)", "baseline_s": total["holmes_s"],
             "ratio": total["holmes_s"] / total["ours_s"],
             "quality": f"{diff('max_diff_vs_holmes')}; mean ours {np.mean([r['mean_ours'] for r in rows]):.3f} "
                        f"vs Holmes {np.mean([r['mean_holmes'] for r in rows]):.3f}"}]


def capture(family: dict[str, Path], quick: bool, cache: Path) -> list[dict]:
    from bench_capture import bf16_row, forward_rows, similarity_row

    from probing.similarity.unlabeled import TokenWindows

    rows = forward_rows(family["base"], ["subject_verb_agreement"], reps=1 if quick else 4,
                        budgets=(256,) if quick else (256, 512, 1024))
    return rows + [bf16_row(family["base"], ["subject_verb_agreement"], reps=1 if quick else 3),
                   similarity_row(family["base"], TokenWindows(128 if quick else 1024, 64 if quick else 128), reps=1)]


def similarity(family: dict[str, Path], quick: bool, cache: Path) -> list[dict]:
    from bench_functional import functional_row

    from probing.similarity.unlabeled import TokenWindows
    from probing.store import CaptureStore

    return [functional_row(family, TokenWindows(128 if quick else 2048, 64 if quick else 128),
                           CaptureStore(cache / "functional"), reps=1 if quick else 2)]


def weights(family: dict[str, Path], quick: bool, cache: Path) -> list[dict]:
    from bench_weight_features import compare

    return [compare(family)]


def merges(family: dict[str, Path], quick: bool, cache: Path) -> list[dict]:
    from bench_merge import merge_rows

    return merge_rows(family, ["linear", "ties", "dare_ties"])


def behaviour(family: dict[str, Path], quick: bool, cache: Path) -> list[dict]:
    from bench_behavior import behaviour_rows

    return behaviour_rows(family["base"], limit=2 if quick else 10)


def one_pass(family: dict[str, Path], quick: bool, cache: Path) -> list[dict]:
    from bench_one_pass import one_pass_rows

    quick_paradigms = ("subject_verb_agreement", "determiner_noun_agreement")
    return one_pass_rows(family["base"], pairs=10 if quick else 200, paradigms=quick_paradigms if quick else None)


def store(family: dict[str, Path], quick: bool, cache: Path) -> list[dict]:
    from bench_store import store_rows

    quick_paradigms = ("subject_verb_agreement", "determiner_noun_agreement")
    return store_rows(family["base"], pairs=10 if quick else 200, tokens=128 if quick else 2048,
                      paradigms=quick_paradigms if quick else None)


def e2e(family: dict[str, Path], quick: bool, cache: Path, keep: Path | None = None) -> list[dict]:
    from bench_e2e import e2e_rows

    return e2e_rows(quick, keep=keep)


def markdown(results: dict) -> str:
    m = results["machine"]
    flags = (" --quick" if results["quick"] else "") + (" --e2e" if "e2e" in results["sections"] else "")
    command = f"`python bench/run_all.py{flags}` on {results['date']}"
    if "runs" in results:
        command = " and ".join(f"`--only {' '.join(r['sections'])}` ({r['date']}, load {r['machine']['load_average_at_start']})"
                               for r in results["runs"]) + " run side by side, joined by `--combine`"
    lines = [BEGIN, "", f"Generated by {command}. Machine: {m['cpu']}, {m['cores']} cores (load average {m['load_average_at_start']} "
             f"at start), torch {m['torch']}, Python {m['python']}. Ratio = baseline s / ours s (> 1: ours "
             "faster).", "", "| section | workload | ours | s | baseline | s | ratio | quality |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        cell = {k: str(r[k]).replace("|", "\\|") for k in ("section", "workload", "ours", "baseline", "quality")}
        lines.append(f"| {cell['section']} | {cell['workload']} | {cell['ours']} | {r['ours_s']:.2f} | "
                     f"{cell['baseline']} | {r['baseline_s']:.2f} | {r['ratio']:.2f}x | {cell['quality']} |")
    return "\n".join(lines + per_task_probes(results["rows"]) + cold_stages(results["rows"]) + ["", END])


def per_task_probes(rows: list[dict]) -> list[str]:
    """The probes row's tasks one by one: the target (>= 20x the scikit-learn loop) is per task."""
    tasks = next((r["per_task"] for r in rows if "per_task" in r), [])
    if not tasks:
        return []
    lines = ["", "Probes per task (same run): seconds for every layer x C value x (task + controls).", "",
             "| task | classes | ours (s) | scikit-learn loop (s) | ratio | Holmes-style (s) | ratio | "
             "max abs diff vs sklearn (points) |", "|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        lines.append(f"| {t['task']} | {t['classes'] if t['classes'] > 1 else 'regression'} | {t['ours_s']:.2f} | "
                     f"{t['sklearn_s']:.2f} | {t['sklearn_ratio']:.1f}x | {t['holmes_s']:.2f} | "
                     f"{t['holmes_ratio']:.1f}x | {100 * t['max_diff_vs_sklearn']:.2f} |")
    return lines


def cold_stages(rows: list[dict]) -> list[str]:
    """Where the cold end-to-end run spent its time: ledger seconds per stage, summed over models and pairs."""
    stages = next((r["cold_by_stage"] for r in rows if "cold_by_stage" in r), {})
    if not stages:
        return []
    lines = ["", "Cold run by stage (cache ledger seconds, summed over models and pairs; weight features run beside "
             "the model stages, so the sum can exceed the wall time):", "", "| stage | entries | seconds |", "|---|---|---|"]
    for stage, (count, seconds) in sorted(stages.items(), key=lambda item: -item[1][1]):
        lines.append(f"| {stage} | {count} | {seconds:.1f} |")
    return lines


def write_doc(table: str) -> None:
    text = DOC.read_text()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Tables (bench/run_all.py)\n\n" + table + "\n"
    with atomic_path(DOC) as temp:
        Path(temp).write_text(text)


def parse_family(items: list[str] | None) -> dict[str, Path]:
    if not items:
        from merging.family import build_family

        return build_family(("base", "instruct", "math"))
    family = dict(item.split("=", 1) for item in items)
    if "base" not in family or len(family) < 3:
        sys.exit("--family needs base=DIR and two children (name=DIR)")
    return {name: Path(path) for name, path in family.items()}


def run_sections(sections: list[str], args) -> dict:
    family = parse_family(args.family)
    torch.set_num_threads(1)  # the machine is shared: one thread for ours and every baseline alike
    host = machine()
    rows = []
    for name in sections:
        started = time.perf_counter()
        extra = {"keep": args.e2e_dir} if name == "e2e" else {}
        rows += globals()[name](family, args.quick, args.cache, **extra)
        print(f"[bench] {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick, "machine": host,
            "sections": sections, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke on tiny workloads")
    parser.add_argument("--e2e", action="store_true", help="also cold / warm / incremental end-to-end runs (long)")
    parser.add_argument("--e2e-dir", type=Path, help="keep the end-to-end runs' folder here (default: scratch)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--family", nargs="+", metavar="NAME=DIR", help="checkpoints instead of the embedded family")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                        help="no benchmarks: join the rows of earlier --only runs into one results file and table")
    args = parser.parse_args()
    if args.combine:
        parts = [json.loads(path.read_text()) for path in args.combine]
        results = {**parts[0], "sections": [s for p in parts for s in p["sections"]],
                   "rows": [r for p in parts for r in p["rows"]],
                   "runs": [{k: p[k] for k in ("date", "sections", "machine")} for p in parts]}
    else:
        results = run_sections(args.only or [s for s in SECTIONS if s != "e2e" or args.e2e], args)
    rows = results["rows"]
    bad = [r for r in rows if not (math.isfinite(r["ratio"]) and r["ratio"] > 0)]
    with atomic_path(args.out) as temp:
        Path(temp).write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results)
    print(table)
    if not args.no_docs:
        write_doc(table)
    if bad:
        sys.exit(f"rows without a finite ratio: {[r['ours'] for r in bad]}")


if __name__ == "__main__":
    main()
