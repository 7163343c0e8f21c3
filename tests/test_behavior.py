"""Behaviour stage: our lm-eval wrapper against lm-eval's own CLI, tidy rows, the content cache, suite names."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import polars as pl
import pytest

from evaluation.behavior import (BehaviorSettings, outcome_items, outcome_scores, sample_items, score_model, tidy,
                                 without_samples)
from evaluation.suites import SuiteError, get_suite, task_manager
from merging.checkpoints import LoadOptions

LIMIT = 3  # items per task: the tiny model is random, only agreement with the CLI matters


@pytest.fixture(scope="module")
def tiny_scores(tiny_family, tmp_path_factory):
    cache = tmp_path_factory.mktemp("behavior-cache")
    settings = BehaviorSettings(suites=("offline",), batch_size=4, limit=LIMIT)
    return score_model(tiny_family["base"], settings, LoadOptions(), cache), settings, cache


def test_wrapper_equals_lm_eval_cli(tiny_family, tiny_scores, tmp_path):
    raw, _, _ = tiny_scores
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={tiny_family['base']},dtype=float32", "--tasks", "merge_eval_offline",
               "--include_path", str(get_suite("offline").include_path), "--batch_size", "4",
               "--limit", str(LIMIT), "--device", "cpu", "--output_path", str(out), "--log_samples"]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    cli = json.loads(next(out.rglob("results_*.json")).read_text())
    assert set(cli["results"]) == set(raw["results"]) and len(raw["results"]) == 10  # 6 tasks + 4 groups
    for task, metrics in cli["results"].items():
        numeric = {k: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
        assert numeric, task
        for key, value in numeric.items():
            assert raw["results"][task][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (task, key)
    assert cli["higher_is_better"] == raw["higher_is_better"]
    # per-item scores: our items table against the CLI's samples_<task>_<date>.jsonl, line by line
    expected = []
    for path in out.rglob("samples_*.jsonl"):
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
            expected += [(task, sample["doc_id"], sample["filter"], m, float(sample[m])) for m in sample["metrics"]]
    items = sample_items(raw, "base")
    assert len(expected) == items.height == 6 * LIMIT + 3 * LIMIT  # acc everywhere, acc_norm on the 3 choice tasks
    assert sorted(items.select("task", "doc_id", "filter", "metric", "value").iter_rows()) == sorted(expected)
    assert set(items["model"]) == {"base"}


def test_tidy_keeps_every_metric_with_direction_stderr_and_n(tiny_scores):
    raw, _, _ = tiny_scores
    rows = tidy(raw, "base")
    expected = sum(1 for m in raw["results"].values() for k in m if "," in k and "_stderr," not in k)
    assert rows.height == expected
    assert rows["higher_is_better"].null_count() == 0 and rows["value"].null_count() == 0
    choice = rows.filter((pl.col("task") == "offline_math_choice"))
    assert sorted(choice["metric"]) == ["acc", "acc_norm"]  # names read from lm-eval's result
    greedy = rows.filter(pl.col("task") == "offline_math_greedy").row(0, named=True)
    assert greedy["group"] == "offline_math" and greedy["level"] == "task" and greedy["n"] == LIMIT
    assert greedy["stderr"] == pytest.approx(raw["results"]["offline_math_greedy"]["acc_stderr,none"])
    top = rows.filter(pl.col("task") == "merge_eval_offline").row(0, named=True)
    assert top["level"] == "group" and top["group"] is None and top["n"] == 6 * LIMIT
    assert set(rows["suite"]) == {"offline"}
    scores = outcome_scores(rows)
    assert scores.select("model", "task", "level", "metric").is_unique().all()


def test_items_mean_to_the_scores_and_raw_json_drops_them(tiny_scores):
    raw, _, _ = tiny_scores
    assert "samples" in raw and "samples" not in without_samples(raw) and without_samples(raw)["results"]
    behavior = tidy(raw, "base")
    items = outcome_items(behavior, sample_items(raw, "base"))
    # every task row and the weight_by_size acc groups are item means; acc_norm groups are not aggregated
    keys = items.select("task", "level", "metric").unique()
    assert keys.filter(pl.col("level") == "task").height == 9  # 3 greedy tasks x acc, 3 choice tasks x acc, acc_norm
    assert sorted(keys.filter(pl.col("level") == "group")["task"]) == sorted(
        behavior.filter(pl.col("level") == "group")["task"].unique())
    top = items.filter(pl.col("task") == "merge_eval_offline")
    assert top.height == 6 * LIMIT and top["item"].str.contains("/").all()
    assert top["value"].mean() == pytest.approx(raw["results"]["merge_eval_offline"]["acc,none"], abs=1e-12)


def test_outcome_items_skip_rows_that_are_not_item_means():
    behavior = pl.DataFrame({"model": ["m"] * 3, "task": ["t1", "t2", "g"], "group": ["g", "g", None],
                             "level": ["task", "task", "group"], "metric": ["acc"] * 3, "filter": ["none"] * 3,
                             "value": [0.5, 1.0, 0.75], "stderr": [None] * 3, "higher_is_better": [True] * 3})
    items = pl.DataFrame({"model": ["m"] * 4, "task": ["t1", "t1", "t2", "t2"], "doc_id": [0, 1, 0, 1],
                          "filter": ["none"] * 4, "metric": ["acc"] * 4, "value": [1.0, 0.0, 1.0, 1.0]})
    found = outcome_items(behavior, items)
    assert sorted(found.filter(pl.col("task") == "g")["item"]) == ["t1/0", "t1/1", "t2/0", "t2/1"]
    unweighted = behavior.with_columns(pl.when(pl.col("task") == "g").then(0.7).otherwise(pl.col("value"))
                                       .alias("value"))  # not the items' mean: no items, stderr fallback
    assert set(outcome_items(unweighted, items)["task"]) == {"t1", "t2"}


def test_cache_hits_by_content_and_misses_on_new_settings(tiny_family, tiny_scores, monkeypatch):
    raw, settings, cache = tiny_scores
    import evaluation.behavior as behavior

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached model was loaded again")

    with monkeypatch.context() as patch:
        patch.setattr(behavior, "load_model", no_loading)
        again = score_model(tiny_family["base"], settings, LoadOptions(), cache)
        assert again == raw
        with pytest.raises(AssertionError, match="loaded again"):  # another model's content is not a hit
            score_model(tiny_family["a"], settings, LoadOptions(), cache)
        with pytest.raises(AssertionError, match="loaded again"):  # nor are other settings
            score_model(tiny_family["base"], BehaviorSettings(batch_size=2, limit=LIMIT), LoadOptions(), cache)
    assert settings.cache_key("x") != BehaviorSettings(suites=("offline",), batch_size=4, limit=LIMIT,
                                                       precision="bfloat16").cache_key("x")


def test_leaderboard_resolves_to_lm_evals_group_without_downloading():
    suite = get_suite("leaderboard")
    manager = task_manager([suite])
    assert suite.tasks == ("leaderboard",) and "leaderboard" in manager.all_groups
    subtasks = set(manager._entry("leaderboard").cfg["task"])
    assert subtasks == {"leaderboard_mmlu_pro", "leaderboard_bbh", "leaderboard_gpqa", "leaderboard_math_hard",
                        "leaderboard_ifeval", "leaderboard_musr"}
    assert subtasks <= set(manager.all_tasks) | set(manager.all_groups)
    with pytest.raises(SuiteError, match="unknown behaviour suite 'nope'"):
        get_suite("nope")


def test_unknown_suite_in_config_is_a_one_line_cli_error(tmp_path, capsys):
    from flows.cli import main

    config = tmp_path / "bad.yaml"
    config.write_text("name: bad\nmodels: [{name: base, source: embedded:base}]\nbase: base\n"
                      "behavior: {suites: [offline, leaderbord]}\n")
    assert main(["validate", str(config)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {config}: behavior.suites: unknown suite(s) 'leaderbord'; known: offline, leaderboard"]


def test_outcome_scores_name_metrics_with_their_filter():
    rows = pl.DataFrame({"model": ["m", "m"], "task": ["t", "t"], "level": ["task", "task"],
                         "metric": ["exact_match", "exact_match"], "filter": ["none", "strict-match"],
                         "value": [0.5, 0.25], "stderr": [0.1, None], "higher_is_better": [True, True]})
    scores = outcome_scores(rows)
    assert scores["metric"].to_list() == ["exact_match", "exact_match,strict-match"]
    assert math.isclose(scores["value"][1], 0.25)


def test_environment_report_is_built_once_per_process(monkeypatch):
    """lm-eval adds torch's environment report to each result; its subprocess probes run for the first only."""
    import torch.utils.collect_env as collect_env
    from lm_eval.loggers.utils import add_env_info

    from evaluation.behavior import env_report_once

    calls = []
    real_run = collect_env.run
    monkeypatch.setattr(collect_env, "run", lambda command: calls.append(command) or real_run(command))
    uncached = getattr(collect_env.get_pretty_env_info, "__wrapped__", collect_env.get_pretty_env_info)
    monkeypatch.setattr(collect_env, "get_pretty_env_info", uncached)  # as lm-eval finds it; undone after
    env_report_once()
    first, second = {}, {}
    add_env_info(first)
    probes = len(calls)
    add_env_info(second)
    assert probes > 0 and len(calls) == probes
    assert first["pretty_env_info"] == second["pretty_env_info"] and "PyTorch version" in first["pretty_env_info"]
