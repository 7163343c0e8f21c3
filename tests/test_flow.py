"""The `merge-eval` Prefect flow end to end on the tiny family: run directory contract, one model load per model
per run (none on a resumed run), functional similarity for every pair, resumption."""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations, permutations

import polars as pl
import pytest
import yaml
from conftest import write_tiny_config

from flows.cli import main
from runstore.run_dir import RunDir


@pytest.fixture()
def tiny_config(tiny_family, tmp_path):
    return write_tiny_config(
        tmp_path / "tiny.yaml", tiny_family,
        merges={"parents": [["a", "b"]],
                "methods": [{"method": "linear", "parameters": {"weight": 0.5}},
                            {"method": "dare_ties", "parameters": {"weight": 1.0, "density": 0.5}}]},
        probing={"seeds": [0], "batch_tokens": 256})


def test_flow_writes_run_directory_and_resumes(prefect_harness, tiny_config, tiny_family, tmp_path, load_counter):
    from flows.pipeline import merge_eval

    run = RunDir(tmp_path / "run")
    assert merge_eval(config_path=str(tiny_config), run_dir=str(run.root)) == str(run.root)
    folders = {name: path.resolve() for name, path in tiny_family.items()}
    folders |= {name: run.model_dir(name).resolve() for name in ["a+b/linear", "a+b/dare_ties"]}
    assert load_counter == Counter(folders.values()), "each model is loaded exactly once per run"
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
    paradigms = {"tiny-subject_verb_agreement", "tiny-determiner_noun_agreement"}  # conftest.write_minimal_pairs
    assert set(tables["probes"]["task"]) == paradigms, "every paradigm is probed inside"
    behavior = tables["behavior"].filter(pl.col("level") == "task")
    assert paradigms <= set(behavior["task"]), "and scored outside, under the same name"
    assert dict(behavior.filter(pl.col("task").is_in(paradigms)).select("task", "group").unique().iter_rows()) == {
        name: f"tiny:{name.removeprefix('tiny-')}" for name in paradigms}  # group = source:linguistics_term
    assert tables["probes"]["layer"].n_unique() == 4  # embeddings + 3 blocks of the tiny model
    assert set(tables["outcomes"]["kind"]) == {"behavior", "internals"}
    assert set(tables["outcomes"]["model"]) == {"a+b/linear", "a+b/dare_ties"}
    similarity = tables["similarity"]
    assert {"cosine", "kinship_pearson"} <= set(similarity.filter(pl.col("source") == "weights")["feature"])
    functional = similarity.filter(pl.col("source") == "functional")
    order = list(folders)
    pairs = set(combinations(sorted(models, key=order.index), 2))
    for feature, scope, per_pair in [("activation_cosine", "layer", 4), ("cka", "layer", 4),
                                     ("attention_cosine", "head", 3 * 4)]:
        rows = functional.filter((pl.col("feature") == feature) & (pl.col("scope") == scope))
        assert set(rows.select("model_a", "model_b").iter_rows()) == pairs
        assert rows.group_by("model_a", "model_b").len()["len"].to_list() == [per_pair] * len(pairs)
        assert rows["value"].is_between(-1.0 - 1e-9, 1.0 + 1e-9).all()
    kl = functional.filter(pl.col("feature") == "kl")
    assert set(kl.select("model_a", "model_b").iter_rows()) == set(permutations(models, 2))  # ordered pairs
    assert set(kl["stat"]) == {"mean", "median", "q25", "q75", "q90"} and (kl["value"] >= 0).all()
    assert functional.filter(pl.col("scope") == "global").group_by("model_a", "model_b", "feature").len()[
        "len"].unique().to_list() == [5]

    # per-item tables feed the paired merge-vs-parent tests; correlations and the report close the run
    items = {name: pl.read_parquet(run.tables / f"{name}.parquet") for name in ["behavior_items", "probe_items"]}
    assert set(items["behavior_items"]["model"]) == models == set(items["probe_items"]["model"])
    probe_items = items["probe_items"].filter((pl.col("model") == "a")
                                              & (pl.col("task") == "tiny-subject_verb_agreement"))
    assert probe_items.height == 4 * 6  # every layer x every test item (3 of the 12 pairs, both sentences)
    assert set(items["behavior_items"]["task"]) >= paradigms
    assert set(tables["outcomes"]["relation_test"].drop_nulls()) == {"paired_bootstrap"}
    correlations = pl.read_parquet(run.tables / "correlations.parquet")
    assert {"competence~behavior", "selector~outcome"} <= {f.split("|")[0] for f in correlations["family"]}
    changes = pl.read_parquet(run.tables / "changes.parquet")  # every model vs base, every merge vs its parents
    assert set(changes.filter(pl.col("comparison") == "base")["model"]) == models - {"base"}
    assert set(changes["side"]) == {"inside", "outside"}
    assert (run.root / "report" / "index.html").is_file()

    load_counter.clear()
    merge_eval(config_path=str(tiny_config), run_dir=str(run.root))
    assert not load_counter, "a resumed run loads no model"
    for name, manifest in manifests.items():
        again = json.loads((run.model_dir(name) / "manifest.json").read_text())
        assert again == manifest, f"{name} was merged again instead of reused"


def test_run_with_bad_config_exits_2_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: []\nbase: x\n")
    assert main(["run", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    assert "models" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
