"""Orchestration on the tiny family: the Dask runner's tables equal the default runner's, a failing model leaves
the others' results and a reason (exit 1), retries skip user mistakes, and every run posts its Prefect artifacts."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal
from prefect import flow, task
from test_flow import tiny_config  # noqa: F401 - the tiny family's config fixture

from flows.cli import main
from flows.config import ConfigError, parse_config
from flows.orchestration import Failure, gather, retry_unless_user_error
from flows.pipeline import comparable, merge_lineages
from runstore.errors import UserError
from runstore.run_dir import RunDir

TABLES = ("behavior", "behavior_items", "probes", "probe_items", "similarity", "outcomes", "correlations", "failures")


def with_orchestration(config_path: Path, target: Path, **options) -> Path:
    data = yaml.safe_load(config_path.read_text())
    data["orchestration"] = options
    target.write_text(yaml.safe_dump(data))
    return target


def read_artifacts(keys: list[str]) -> dict[str, object]:
    """The newest artifact of each key, read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    newest = {}
    for artifact in sorted(found, key=lambda a: a.created):
        newest[artifact.key] = artifact
    return newest


def test_dask_runner_gives_the_default_runners_tables_and_artifacts(prefect_harness, tiny_config, tmp_path):
    from flows.pipeline import merge_eval

    default, dask = RunDir(tmp_path / "default"), RunDir(tmp_path / "dask")
    merge_eval(config_path=str(tiny_config), run_dir=str(default.root))
    dask_config = with_orchestration(tiny_config, tmp_path / "dask.yaml", task_runner="dask", n_workers=2)
    merge_eval(config_path=str(dask_config), run_dir=str(dask.root))
    for name in TABLES:
        expected, got = (pl.read_parquet(run.tables / f"{name}.parquet") for run in (default, dask))
        assert expected.height > 0 or name == "failures", name
        assert_frame_equal(got, expected, check_exact=False, rel_tol=1e-5, abs_tol=1e-6)
    assert pl.read_parquet(dask.tables / "failures.parquet").is_empty()

    keys = ["merge-eval-tiny-summary", "merge-eval-tiny-outcomes", "merge-eval-tiny-report"]
    artifacts = read_artifacts(keys)
    assert set(artifacts) == set(keys)
    summary = artifacts["merge-eval-tiny-summary"].data
    assert "## Best merge per view" in summary and "## Failed" not in summary
    ranked = pl.read_parquet(dask.tables / "outcomes.parquet").filter(pl.col("level") == "task")
    assert {"a+b/linear", "a+b/dare_ties"} & set(summary.split("`")), "the best merge per view is named"
    table = artifacts["merge-eval-tiny-outcomes"].data
    rows = json.loads(table) if isinstance(table, str) else table  # the API returns the table as JSON text
    assert {(r["kind"], r["model"]) for r in rows} == set(ranked.select("kind", "model").unique().iter_rows())
    uri = (dask.report / "index.html").resolve().as_uri()
    assert artifacts["merge-eval-tiny-report"].data == f"[report of tiny]({uri})"  # the API stores it as markdown


@pytest.fixture()
def failing_load(monkeypatch):
    """`load_model` raising a RuntimeError for one folder (as a CUDA OOM or a broken file system would), wherever
    a module bound it; returns the calls per resolved folder and the folder to fail, set by the test."""
    import merging.checkpoints

    original, calls, failing = merging.checkpoints.load_model, Counter(), []

    def load(folder, *args, **kwargs):
        calls[Path(folder).resolve()] += 1
        if Path(folder).resolve() in failing:
            raise RuntimeError("CUDA out of memory (injected)")
        return original(folder, *args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "load_model", None) is original:
            monkeypatch.setattr(module, "load_model", load)
    return calls, failing


def test_failing_model_leaves_the_others_results_and_a_reason(prefect_harness, tiny_config, tmp_path, capsys,
                                                             failing_load):
    calls, failing = failing_load
    run = RunDir(tmp_path / "run")
    broken = run.model_dir("a+b/dare_ties").resolve()
    failing.append(broken)
    config = with_orchestration(tiny_config, tmp_path / "retrying.yaml", retries=1, retry_delay_seconds=0)

    assert main(["run", str(config), "--run-dir", str(run.root)]) == 1
    err = capsys.readouterr().err
    assert "a+b/dare_ties (model): RuntimeError: CUDA out of memory (injected)" in err
    assert calls[broken] == 2, "a transient-looking failure is retried once (orchestration.retries: 1)"

    failures = pl.read_parquet(run.tables / "failures.parquet")
    assert failures.rows() == [("a+b/dare_ties", "model", "RuntimeError: CUDA out of memory (injected)")]
    survivors = {"base", "a", "b", "a+b/linear"}
    for name in ("behavior", "probes", "probe_items"):
        assert set(pl.read_parquet(run.tables / f"{name}.parquet")["model"]) == survivors, name
    outcomes = pl.read_parquet(run.tables / "outcomes.parquet")
    assert set(outcomes["model"]) == {"a+b/linear"} and set(outcomes["kind"]) == {"behavior", "internals"}
    functional = pl.read_parquet(run.tables / "similarity.parquet").filter(pl.col("source") == "functional")
    assert set(functional["model_a"]) | set(functional["model_b"]) == survivors
    assert (run.tables / "correlations.parquet").is_file()
    report = (run.report / "index.html").read_text()
    assert 'id="failed-models"' in report and "a+b/dare_ties (model: RuntimeError" in report


def test_retries_skip_user_errors(prefect_harness):
    attempts = Counter()

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_user_error)
    def step(kind: str) -> str:
        attempts[kind] += 1
        if kind == "mistake":
            raise UserError("no such checkpoint")
        if attempts[kind] < 3:
            raise OSError("stale file handle")
        return kind

    @flow
    def steps() -> tuple[dict, list[Failure]]:
        failures = []
        return gather({kind: step.submit(kind) for kind in ("mistake", "flaky")}, "merge", failures), failures

    results, failures = steps()
    assert attempts == {"mistake": 1, "flaky": 3}
    assert results == {"flaky": "flaky"}
    assert failures == [Failure("mistake", "merge", "UserError: no such checkpoint")]


def test_user_error_of_every_model_is_the_users_mistake(prefect_harness):
    @task
    def step(name: str):
        raise UserError(f"{name}: bad file")

    @flow
    def steps():
        return gather({name: step.submit(name) for name in ("a", "b")}, "merge", [])

    with pytest.raises(UserError, match="a: bad file"):
        steps()


def test_merge_with_a_failed_parent_is_skipped_with_a_reason(tiny_config):
    from flows.config import load_config

    lineages = merge_lineages(load_config(tiny_config))
    failures = [Failure("b", "model", "RuntimeError: boom")]
    kept = comparable(lineages, {"base", "a", "a+b/linear"}, "behavior", failures)
    assert kept == []
    assert failures[1:] == [Failure("a+b/linear", "behavior outcomes", "skipped: parent b failed")]
    assert comparable(lineages, {"base", "a", "b", "a+b/linear"}, "internals", []) == lineages[:1]


@pytest.mark.parametrize(("options", "problem"), [
    ({"address": "tcp://10.0.0.5:8786"}, "orchestration: address is used only with task_runner: dask"),
    ({"task_runner": "dask", "address": "tcp://h:8786", "n_workers": 4}, "n_workers sizes a LocalCluster"),
    ({"task_runner": "ray"}, "orchestration.task_runner: Input should be 'default' or 'dask' (got 'ray')"),
    ({"retries": -1}, "orchestration.retries: Input should be greater than or equal to 0 (got -1)"),
])
def test_orchestration_config_mistakes_are_one_line(options, problem):
    config = {"name": "x", "models": [{"name": "a", "source": "/nowhere"}], "base": "a", "orchestration": options}
    with pytest.raises(ConfigError) as raised:
        parse_config(config)
    assert len(raised.value.problems) == 1 and problem in raised.value.problems[0]


def test_artifacts_without_tables_do_not_fail(prefect_harness, tiny_config, tmp_path):
    from flows.artifacts import artifacts_task
    from flows.config import load_config

    @flow
    def only_artifacts():
        return artifacts_task(load_config(tiny_config), RunDir(tmp_path / "empty"), [Failure("a", "merge", "x")])

    assert only_artifacts() == ["merge-eval-tiny-summary"]
    summary = read_artifacts(["merge-eval-tiny-summary"])["merge-eval-tiny-summary"].data
    assert "| a | merge | x |" in summary and "No merge outcomes in this run." in summary
