"""The one bench command's smoke: `bench/run_all.py --quick` on the tiny family writes a row per benchmark, each
with timings of ours and its baseline and a finite ratio."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {"probes", "capture", "similarity", "weights", "merges", "behaviour", "one_pass", "store"}


def test_run_all_quick_writes_every_row(tiny_family, tmp_path):
    family = [f"{name}={path}" for name, path in (("base", tiny_family["base"]), ("instruct", tiny_family["a"]),
                                                  ("math", tiny_family["b"]))]
    out = tmp_path / "results.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--no-docs", "--out", str(out),
                    "--cache", str(tmp_path / "cache"), "--family", *family], check=True, cwd=ROOT)
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert {r["section"] for r in rows} == SECTIONS
    baselines = {(r["section"], r["baseline"].split(" (")[0]) for r in rows}
    for needed in [("probes", "scikit-learn loop"), ("probes", "Holmes-style probe"),
                   ("capture", "plain forward"), ("capture", "output_hidden_states=True"),
                   ("capture", "capture, model at float32"), ("similarity", "per-pair loop"),
                   ("weights", "whole state dicts"), ("merges", "mergekit-yaml subprocess"),
                   ("behaviour", "lm-eval, batch 1"), ("one_pass", "capture pass + lm-eval's own pass"),
                   ("store", "plain safetensors entries"), ("store", "pools at float32")]:
        assert needed in baselines, needed
    assert len([r for r in rows if r["section"] == "merges"]) == 3  # linear, TIES, DARE-TIES
    packed = next(r for r in rows if r["section"] == "store" and "bytes" in r)["bytes"]
    assert sum(packed["packed"].values()) < sum(packed["plain"].values())  # tiny random states still compress
    for r in rows:
        assert r["ours_s"] > 0 and r["baseline_s"] > 0 and math.isfinite(r["ratio"]), r
        assert math.isclose(r["ratio"], r["baseline_s"] / r["ours_s"])
    assert results["machine"]["cores"] >= 1 and results["machine"]["torch"]
