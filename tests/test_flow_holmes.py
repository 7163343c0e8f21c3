"""`merge-eval` end to end on real-format Holmes folders (tests/fixtures/holmes): every probe type is captured and
probed, tasks keep their folder name from config to tables to `merge-eval probes`, and phenomena come from Holmes's
labels, so the internals outcomes are grouped by phenomenon."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from conftest import write_tiny_config

from probing.inspect import show_probes
from runstore.run_dir import RunDir

FIXTURES = Path(__file__).parent / "fixtures" / "holmes"
TASKS = ["blimp-determiner_noun_agreement_1", "pos", "protoroles-volition", "next-sentence-prediction"]


def test_flow_probes_real_format_holmes_folders(prefect_harness, tiny_family, tmp_path, capsys):
    from flows.pipeline import merge_eval

    path = write_tiny_config(tmp_path / "tiny-holmes.yaml", tiny_family, name="tiny-holmes",
                             behavior={"limit": 1, "batch_size": 4}, similarity={"weights": False}, minimal_pairs=[],
                             probing={"data": str(FIXTURES), "tasks": TASKS, "seeds": [0], "batch_tokens": 512})
    run = RunDir(tmp_path / "run")
    merge_eval(config_path=str(path), run_dir=str(run.root))

    probes = pl.read_parquet(run.tables / "probes.parquet")
    tasks = probes.select("task", "phenomenon", "probe_type").unique().sort("task").rows()
    assert tasks == [("blimp-determiner_noun_agreement_1", "morphology", "sentence"),
                     ("next-sentence-prediction", "discourse", "sentence_pair"),
                     ("pos", "syntax", "span"),
                     ("protoroles-volition", "semantics", "token_pair")]
    assert set(probes["model"]) == {"base", "a", "b", "a+b/linear"} and probes["layer"].n_unique() == 4
    assert probes.filter(pl.col("metric") == "macro_f1")["value"].is_between(0, 1).all()
    assert set(probes["n_test"]) == {4}
    internals = pl.read_parquet(run.tables / "outcomes.parquet").filter(pl.col("kind") == "internals")
    assert {"morphology", "syntax", "semantics", "discourse"} <= set(internals["task"])

    capsys.readouterr()
    show_probes(run.root, task="protoroles-volition", model="a+b/linear")
    assert "protoroles-volition on a+b/linear" in capsys.readouterr().out
