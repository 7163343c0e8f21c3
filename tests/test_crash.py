"""Crash safety and cache accounting of `merge-eval run` on the tiny family: what a second run and a run with one
more merge method recompute (read from the cache ledger, not timed), kill -9 mid-run then resume, the run-directory
lock, and the model content digest that a re-made merge keeps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import polars as pl
import pytest
from conftest import write_tiny_config
from polars.testing import assert_frame_equal

from flows.cli import main
from merging.checkpoints import content_digest, safetensors_problem
from merging.merge import MANIFEST, MergeLineage, merge
from runstore.atomic import atomic_dir, is_temp_name
from runstore.cache import ALL_MODELS, LEDGER, cache_key, read_ledger, record, start_run
from runstore.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
PARENTS = ["base", "a", "b"]
METHODS = [{"method": "linear", "parameters": {"weight": 0.5}},
           {"method": "dare_ties", "parameters": {"weight": 1.0, "density": 0.5}}]
TABLES = ["behavior", "behavior_items", "probes", "probe_items", "similarity", "outcomes", "correlations"]
# Stages over the whole run, one ledger line each (model "*"); every other stage reports per model or pair.
WHOLE_RUN = ["preflight", "behavior_outcomes", "internals_outcomes", "correlations", "changes", "report"]


def write_config(folder: Path, family: dict[str, Path], methods: list[dict]) -> Path:
    return write_tiny_config(folder / f"tiny-{len(methods)}.yaml", {n: family[n] for n in PARENTS},
                             merges={"parents": [["a", "b"]], "methods": methods})


def decisions(models: list[str], merges: list[str]) -> set[tuple[str, str]]:
    """Every (stage, model) cache decision a run of these models makes."""
    per_model = {(stage, m) for stage in ("behavior", "captures", "probes", "weight_features") for m in models}
    pairs = {(stage, f"{a}|{b}") for a, b in combinations(models, 2)
             for stage in ("functional_similarity", "weight_features")}
    return per_model | pairs | {("merge", m) for m in merges} | {(stage, ALL_MODELS) for stage in WHOLE_RUN}


def last_run(run: RunDir) -> pl.DataFrame:
    ledger = read_ledger(run.cache)
    return ledger.filter(pl.col("run") == ledger["run"][-1])


def decided(ledger: pl.DataFrame, hit: bool) -> set[tuple[str, str]]:
    return set(ledger.filter(pl.col("hit") == hit).select("stage", "model").iter_rows())


def tables(run: RunDir) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(run.tables / f"{name}.parquet") for name in TABLES}


@pytest.fixture(scope="module")
def finished(prefect_harness, tiny_family, tmp_path_factory) -> tuple[RunDir, dict[str, pl.DataFrame], Path]:
    """An uninterrupted run of the tiny config, its tables as that run left them, and its config file."""
    from flows.pipeline import merge_eval

    folder = tmp_path_factory.mktemp("finished")
    run, config = RunDir(folder / "run"), write_config(folder, tiny_family, METHODS)
    merge_eval(config_path=str(config), run_dir=str(run.root))
    return run, tables(run), config


MODELS = PARENTS + ["a+b/linear", "a+b/dare_ties"]


def test_first_run_misses_everything_and_a_second_run_hits_everything(finished, load_counter):
    from flows.pipeline import merge_eval

    run, first_tables, config = finished
    expected = decisions(MODELS, MODELS[3:])
    first = read_ledger(run.cache)
    assert first["run"].n_unique() == 1 and decided(first, hit=True) == set()
    assert decided(first, hit=False) == expected and first.height == len(expected), "one decision each"
    assert (first["seconds"] > 0).all(), "every computed stage says what it cost"

    merge_eval(config_path=str(config), run_dir=str(run.root))  # the same file: config.yaml records its path
    second = last_run(run)
    assert decided(second, hit=False) == set()
    assert decided(second, hit=True) == expected and second.height == len(expected)
    assert not load_counter, "a second run loads no model"
    for name, frame in tables(run).items():
        assert frame.equals(first_tables[name]), f"{name} changed on a run that recomputed nothing"


def test_adding_a_method_computes_only_the_new_merges_stages(finished, tiny_family, tmp_path, load_counter,
                                                           monkeypatch):
    from flows.pipeline import merge_eval

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from bench_e2e import incremental_breakdown

    run = RunDir(tmp_path / "run")
    shutil.copytree(finished[0].root, run.root, symlinks=True)
    methods = METHODS + [{"method": "task_arithmetic", "parameters": {"weight": 0.5}}]
    merge_eval(config_path=str(write_config(tmp_path, tiny_family, methods)), run_dir=str(run.root))

    new = "a+b/task_arithmetic"
    ledger = last_run(run)
    assert decided(ledger, hit=False) == {(stage, new) for stage in ("merge", "behavior", "captures", "probes",
                                                                      "weight_features")} | {
        (stage, f"{a}|{new}") for a in MODELS for stage in ("functional_similarity", "weight_features")} | {
        (stage, ALL_MODELS) for stage in WHOLE_RUN if stage != "preflight"}  # the parents are the same
    misses = ledger.filter(~pl.col("hit"))
    assert (misses["seconds"] > 0).all(), "every computed stage says what it cost"
    assert (ledger.filter(pl.col("hit"))["seconds"] == 0).all()
    breakdown = incremental_breakdown(100.0, ledger)  # what bench/bench_e2e.py reports of this run
    assert breakdown["new_models"] == [new]
    assert set(breakdown["own_by_stage"]) == {"merge", "behavior", "captures", "probes", "weight_features",
                                              "functional_similarity"}
    assert set(breakdown["overhead_by_stage"]) == set(WHOLE_RUN) - {"preflight"}
    assert breakdown["own_s"] + sum(breakdown["overhead_by_stage"].values()) == pytest.approx(misses["seconds"].sum())
    assert breakdown["unaccounted_s"] == pytest.approx(100.0 - misses["seconds"].sum())
    assert decided(ledger, hit=True) == decisions(MODELS, MODELS[3:]) - {
        (s, ALL_MODELS) for s in WHOLE_RUN if s != "preflight"}
    assert set(load_counter) == {run.model_dir(new).resolve()}, "only the new merge is loaded"
    assert set(pl.read_parquet(run.tables / "outcomes.parquet")["model"]) == {*MODELS[3:], new}


def _run_dir_files(root: Path) -> list[Path]:
    """Every file and folder in the run directory, not following the links to the parents."""
    found = []
    for folder, dirs, files in os.walk(root):
        found += [Path(folder) / name for name in dirs + files]
    return found


def test_kill_9_mid_run_then_run_again_gives_the_uninterrupted_tables(finished, tiny_family, tmp_path):
    """`merge-eval run` killed with SIGKILL once the first model's captures are stored, then run again: its
    tables equal an uninterrupted run's, frame for frame (no table has a timing column: wall times live only in
    manifest.json and behavior_raw/*.json, outside the comparison), and no temp or partial file is left.

    One exception, to float64 rounding: weight features run beside the model steps, so the kill can land after
    some of their pair entries were cached. The rerun computes the other pairs in a smaller Gram product, whose
    blocking rounds a dot product differently in the last bits (seen: 2 of 1,354 values, equal to 6 digits;
    values near zero need the absolute bound)."""
    from prefect.settings import PREFECT_API_URL

    run = RunDir(tmp_path / "run")
    config = write_config(tmp_path, tiny_family, METHODS)
    env = os.environ | {"PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value()}  # the test server
    # Own session: the kill reaches the run and anything it started, as a kill of the user's terminal job would.
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config), "--run-dir", str(run.root)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list((run.cache / "captures").rglob("*.safetensors")):
            assert process.poll() is None, "the run ended before any capture was stored"
            assert time.monotonic() < deadline, "no capture stored within 10 minutes"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (run.tables / "correlations.parquet").exists(), "killed mid-run, not after it"

    assert main(["run", str(config), "--run-dir", str(run.root)]) == 0  # the dead holder's lock is taken over
    for name, frame in tables(run).items():
        if name == "similarity":
            assert_frame_equal(frame, finished[1][name], check_exact=False, rtol=1e-12, atol=1e-12)
        else:
            assert frame.equals(finished[1][name]), f"{name} differs from the uninterrupted run's"
    leftovers = [p for p in _run_dir_files(run.root) if is_temp_name(p.name)]
    assert leftovers == [], "temp files of the killed run are gone"
    weights = [p for p in _run_dir_files(run.root) if p.suffix == ".safetensors"]
    assert len(weights) > 10 and [problem for problem in map(safetensors_problem, weights) if problem] == []


HOLD = "import sys, time; from pathlib import Path; from runstore.run_dir import RunDir\n" \
       "with RunDir(Path(sys.argv[1])).lock():\n" \
       "    print('held', flush=True); time.sleep(600)"


def test_a_second_run_on_a_locked_run_directory_is_refused_and_a_dead_holders_lock_taken_over(
        tiny_family, tmp_path, capsys, monkeypatch):
    import flows.pipeline

    flows_started = []
    monkeypatch.setattr(flows.pipeline, "merge_eval", lambda **kwargs: flows_started.append(kwargs))
    run = RunDir(tmp_path / "run")
    config = write_config(tmp_path, tiny_family, METHODS)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.root)], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", str(config), "--run-dir", str(run.root)]) == 2
        assert flows_started == [], "refused before the flow (and Prefect) starts"
        assert capsys.readouterr().err.splitlines() == [
            f"error: {run.root}: another merge-eval run (pid {holder.pid}) is using this run directory; wait for it "
            f"to finish or stop it"]
        assert not run.models.exists() and not (run.root / "config.yaml").exists(), "the refused run wrote nothing"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    (run.root / ".model.safetensors.x1.tmp").write_bytes(b"partial")  # what a killed writer leaves
    with run.lock():
        assert run.lock_file.read_text().strip() == str(os.getpid())
        assert not (run.root / ".model.safetensors.x1.tmp").exists()


def test_a_re_made_merge_has_the_same_content_digest(tiny_family, tmp_path):
    """The digest covers weights, config and tokenizer: a merge made again into a fresh folder (whose manifest
    records another wall time) keeps every downstream cache; a different merge does not."""
    lineage = MergeLineage("a+b/linear", "linear", ("a", "b"), None, {"weight": 0.5})
    first, again = tmp_path / "first", tmp_path / "again"
    merge(lineage, tiny_family, first)
    merge(lineage, tiny_family, again)
    assert content_digest(first) == content_digest(again)
    manifest = json.loads((again / MANIFEST).read_text())
    (again / MANIFEST).write_text(json.dumps(manifest | {"wall_seconds": manifest["wall_seconds"] + 60}))
    assert content_digest(again) == content_digest(first), "the manifest's wall time is not content"
    other = tmp_path / "other"
    merge(MergeLineage("a+b/linear", "linear", ("a", "b"), None, {"weight": 0.3}), tiny_family, other)
    assert content_digest(other) != content_digest(first)
    (again / "config.json").write_text((again / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert content_digest(again) != content_digest(first), "the config is part of the content"


def test_cache_key_is_canonical_and_of_one_length():
    assert cache_key("s", {"a": 1, "b": [1, 2]}) == cache_key("s", {"b": [1, 2], "a": 1})
    assert cache_key("s", {"a": 1}) != cache_key("s", {"a": 2}) != cache_key("t", {"a": 2})
    assert cache_key("s", Path("/x")) == cache_key("s", "/x")
    assert {len(cache_key(part)) for part in ("x", 1, None, [1.5])} == {32}


def test_atomic_dir_shows_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(target) as build:
        (build / "half").write_text("x")
        raise RuntimeError("killed mid-build")
    assert list(tmp_path.iterdir()) == [], "a failed build leaves nothing"
    with atomic_dir(target) as build:
        (build / "v").write_text("1")
    with atomic_dir(target, replace=False) as build:  # another process finished the same content first
        (build / "v").write_text("2")
    assert (target / "v").read_text() == "1"
    with atomic_dir(target) as build:
        (build / "v").write_text("3")
    assert (target / "v").read_text() == "3" and list(tmp_path.iterdir()) == [target]


def test_ledger_lines_belong_to_the_run_that_opened_them(tmp_path):
    start_run(tmp_path, "first")
    record(tmp_path, "probes", "a", hit=False, seconds=1.25)
    with (tmp_path / LEDGER).open("a") as ledger:
        ledger.write('\n{"stage": "probes", "mod')  # a line cut short by a full disk
        ledger.write('\n{"stage": "merge", "model": "b", "hit": false}')  # written before seconds were recorded
    start_run(tmp_path, "second")
    record(tmp_path, "probes", "a", hit=True)
    record(tmp_path, "report", ALL_MODELS, hit=True)
    assert read_ledger(tmp_path).rows() == [("first", "probes", "a", False, 1.25), ("first", "merge", "b", False, 0.0),
                                            ("second", "probes", "a", True, 0.0), ("second", "report", "*", True, 0.0)]
