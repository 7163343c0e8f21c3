"""The `merge-eval` Prefect flow end to end on the tiny family: run directory contract, resumption."""

from __future__ import annotations

import json

import polars as pl
import pytest
import yaml

from flows.cli import main
from flows.run_store import RunDir


@pytest.fixture()
def tiny_config(tiny_family, tmp_path):
    config = {
        "name": "tiny",
        "seed": 1,
        "precision": "float32",
        "device": "cpu",
        "models": [{"name": n, "source": str(p)} for n, p in tiny_family.items()],
        "base": "base",
        "merges": {"parents": [["a", "b"]],
                   "methods": [{"method": "linear", "parameters": {"weight": 0.5}},
                               {"method": "dare_ties", "parameters": {"weight": 1.0, "density": 0.5}}]},
        "behavior": {"limit": 4, "batch_size": 4},
        "probing": {"seeds": [0], "batch_size": 16, "tasks": ["noun_number", "tense"]},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_flow_writes_run_directory_and_resumes(prefect_harness, tiny_config, tiny_family, tmp_path):
    from flows.pipeline import merge_eval

    run = RunDir(tmp_path / "run")
    assert merge_eval(config_path=str(tiny_config), run_dir=str(run.root)) == str(run.root)
    resolved = yaml.safe_load((run.root / "config.yaml").read_text())
    assert resolved["name"] == "tiny" and resolved["_provenance"]["versions"]["mergekit"]
    assert resolved["_provenance"]["seeds"]["global"] == 1
    manifests = {}
    for name in ["a+b/linear", "a+b/dare_ties"]:
        manifests[name] = json.loads((run.model_dir(name) / "manifest.json").read_text())
        assert manifests[name]["parents"] == ["a", "b"] and manifests[name]["seed"] == 1
    assert manifests["a+b/dare_ties"]["base"] == "base" and manifests["a+b/linear"]["base"] is None
    assert (run.models / "a").is_symlink(), "parents are referenced, not copied"
    assert (run.models / "a").resolve() == tiny_family["a"].resolve()

    models = {"base", "a", "b", "a+b/linear", "a+b/dare_ties"}
    tables = {name: pl.read_parquet(run.tables / f"{name}.parquet")
              for name in ["behavior", "probes", "similarity", "outcomes"]}
    assert set(tables["behavior"]["model"]) == models == set(tables["probes"]["model"])
    assert set(tables["probes"]["task"]) == {"noun_number", "tense"}
    assert tables["probes"]["layer"].n_unique() == 4  # embeddings + 3 blocks of the tiny model
    assert set(tables["outcomes"]["kind"]) == {"behavior", "internals"}
    assert set(tables["outcomes"]["model"]) == {"a+b/linear", "a+b/dare_ties"}
    assert {"cosine", "kinship_pearson"} <= set(tables["similarity"]["feature"])

    merge_eval(config_path=str(tiny_config), run_dir=str(run.root))
    for name, manifest in manifests.items():
        again = json.loads((run.model_dir(name) / "manifest.json").read_text())
        assert again == manifest, f"{name} was merged again instead of reused"


def test_run_with_bad_config_exits_2_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: []\nbase: x\n")
    assert main(["run", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    assert "models" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
