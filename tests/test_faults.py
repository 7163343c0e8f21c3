"""Faults and bad input, tried the way a user or a disk hurts a run (docs/FAULTS.md lists each with what is kept).

Every test uses real files: checkpoints cut short, configs for another architecture, corrupt parquet and JSON in
the caches, a writer that meets a full disk (injected where a real one cannot be had, and a real tmpfs where this
machine lets us mount one), a process killed with SIGKILL mid-write. Each checks the message, the exit code, and
that the previous good output is intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
import safetensors.torch
import torch
import yaml
from polars.testing import assert_frame_equal

from flows.cli import main
from merging.checkpoints import CheckpointError, LoadOptions, load_model
from merging.merge import MANIFEST, MergeLineage, merge
from merging.preflight import PreflightError, preflight
from runstore.atomic import atomic_dir, atomic_write_text, read_cached
from runstore.errors import NoSpaceError, UserError
from runstore.tables import TableError, read_table, replace_rows, write_table

ROOT = Path(__file__).resolve().parent.parent
# What a full disk makes polars and safetensors raise (measured on a full tmpfs): their own types, errno in the text.
POLARS_FULL = "parquet: File out of specification: underlying IO error: No space left on device (os error 28)"
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def _digests(folder: Path) -> dict[str, str]:
    """Content of every file under `folder` (what "intact" means below)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _cut(path: Path, keep: float = 0.5) -> None:
    """Cut a file short, as a full disk or a killed copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _write_config(path: Path, models: dict[str, str], **extra) -> Path:
    config = {"name": "faults", "device": "cpu", "base": next(iter(models)),
              "models": [{"name": n, "source": s} for n, s in models.items()], **extra}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()


@pytest.fixture(scope="module")
def damaged(tiny_family, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny base, each damaged one way a real download, copy or mix-up damages a model folder."""
    root = tmp_path_factory.mktemp("damaged")
    base = tiny_family["base"]
    out = {name: Path(shutil.copytree(base, root / name)) for name in
           ("truncated", "no_tokenizer", "vit", "classifier", "missing_shard")}
    _cut(out["truncated"] / "model.safetensors")
    for path in out["no_tokenizer"].glob("tokenizer*"):
        path.unlink()
    _edit_json(out["vit"] / "config.json", model_type="vit", architectures=["ViTModel"])
    _edit_json(out["classifier"] / "config.json", architectures=["LlamaForSequenceClassification"])
    (out["missing_shard"] / "model.safetensors").rename(out["missing_shard"] / "model-00001-of-00002.safetensors")
    (out["missing_shard"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    return out


DAMAGE = {  # damaged folder -> what the one line about it says
    "truncated": r"truncated/model.safetensors: truncated or corrupt safetensors file \(.*incomplete metadata",
    "no_tokenizer": r"no_tokenizer: no tokenizer \(none of tokenizer.json",
    "vit": r"vit/config.json: model_type='vit' is not a causal language model",
    "classifier": r"classifier/config.json: architectures=\['LlamaForSequenceClassification'\] has no causal-LM head",
    "missing_shard": r"missing_shard/model-00002-of-00002.safetensors: missing \(named by model.safetensors.index",
}


# --- 1. validation before any work ------------------------------------------------------------------------------

def test_validate_names_every_bad_source_field_and_value(tiny_family, damaged, tmp_path, capsys):
    import re

    models = {"base": str(tiny_family["base"]), "nothing": "embedded:nothing", "gone": str(tmp_path / "gone"),
              "hub": "not a hub id!"} | {name: str(folder) for name, folder in damaged.items()}
    config = _write_config(tmp_path / "bad.yaml", models, device="cuda",
                           probing={"data": str(tmp_path / "no-probing-data")})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["validate", str(config), "--run-dir", str(blocker / "run")]) == 2
    lines = _errors(capsys)
    expected = [r"models\[1\].source: 'embedded:nothing' is not an embedded model; the family is embedded:base",
                rf"models\[2\].source: folder '{tmp_path}/gone' does not exist",
                r"models\[3\].source: 'not a hub id!' is neither an existing folder nor a hub id"]
    expected += [rf"models\[{4 + i}\].source: .*{DAMAGE[name]}" for i, name in enumerate(damaged)]
    expected.append(rf"probing.data='{tmp_path}/no-probing-data': .* probing data folder not found")
    if not torch.cuda.is_available():
        expected.append(r"device: 'cuda' but no CUDA GPU is available")
    expected.append(rf"run directory '{blocker}/run': {blocker} is not a folder")
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected):
        assert line.startswith(f"error: {config}: ") and re.search(pattern, line), (pattern, line)


def test_run_with_bad_sources_stops_before_prefect_and_writes_nothing(tiny_family, tmp_path):
    """The symptom of the issue: `run` started a Prefect server, printed its traceback, left a run directory."""
    config = _write_config(tmp_path / "bad.yaml", {"base": str(tiny_family["base"]), "x": "embedded:nothing"})
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config), "--run-dir", str(run)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {config}: models[1].source: 'embedded:nothing' is not an embedded model; the family is "
        f"embedded:base, embedded:instruct, embedded:math, embedded:code, embedded:agreement, "
        f"embedded:number_erased"]
    assert "temporary server" not in done.stdout + done.stderr and not run.exists()


def _append(path: Path, text: str) -> None:
    with path.open("a") as handle:
        handle.write(text)


def _holmes_copy(tmp_path: Path, damage=lambda folder: None) -> Path:
    data = tmp_path / "holmes"
    shutil.copytree(Path(__file__).parent / "fixtures" / "holmes" / "pos", data / "pos")  # real Holmes format
    damage(data / "pos")
    return data


@pytest.mark.parametrize("damage, expected", [
    (lambda f: _append(f / "samples.csv", "\"__import__('os')\",\"['x']\",,a,train,a,0,999\n"),
     "pos/samples.csv: row 18: inputs is not a Python literal"),
    (lambda f: (f / "config-none.yaml").write_text("probe_task_type: [unclosed\n"), "config-none.yaml: YAML error"),
    (lambda f: (f / "samples.csv").write_text("inputs,context\n"), "samples.csv: missing column(s)"),
    (lambda f: (f / "samples.csv").unlink(), "no Holmes datasets (folders with samples.csv) found"),
], ids=["csv-row", "yaml", "csv-header", "no-samples"])
def test_malformed_probing_data_found_by_validate(tiny_family, tmp_path, capsys, damage, expected):
    data = _holmes_copy(tmp_path, damage)
    config = _write_config(tmp_path / "c.yaml", {"base": str(tiny_family["base"])}, probing={"data": str(data)})
    assert main(["validate", str(config)]) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and f"probing.data='{data}': " in lines[0] and expected in lines[0], lines


def test_unknown_bundled_paradigm_and_a_good_local_config(tiny_family, tmp_path, capsys):
    models = {name: str(path) for name, path in tiny_family.items()}
    bad = _write_config(tmp_path / "bad.yaml", models,
                        minimal_pairs=[{"source": "bundled", "paradigms": ["subject_verb_agreement", "sarcasm"]}])
    assert main(["validate", str(bad)]) == 2
    assert "minimal_pairs[0].source='bundled': " in (line := _errors(capsys)[0])
    assert "unknown paradigm(s) ['sarcasm']; known: " in line
    good = _write_config(tmp_path / "good.yaml", models, probing={"data": str(_holmes_copy(tmp_path))})
    assert main(["validate", str(good), "--run-dir", str(tmp_path / "run")]) == 0
    assert not (tmp_path / "run").exists(), "validate creates nothing"


# --- 2. bad artifacts: one line naming file and reason, before any weight is read ----------------------------------

@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_preflight_names_damaged_folder_and_changes_nothing(tiny_family, damaged, name):
    import re

    models = {"base": tiny_family["base"], name: damaged[name]}
    before = {n: _digests(f) for n, f in models.items()}
    with pytest.raises(PreflightError) as caught:
        preflight(models, base="base")
    assert len(caught.value.problems) == 1 and re.search(rf"checkpoint: '{name}': .*{DAMAGE[name]}",
                                                         caught.value.problems[0]), caught.value.problems
    assert {n: _digests(f) for n, f in models.items()} == before


def test_loading_a_truncated_checkpoint_is_a_checkpoint_error(damaged):
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated or corrupt safetensors file"):
        load_model(damaged["truncated"], LoadOptions())


def test_run_failing_in_preflight_exits_2_with_one_line_and_no_run_dir(tiny_family, tmp_path):
    """NaN weights pass validate (finding them reads every weight) and stop the flow in preflight: the user sees
    the problem once, without Prefect's traceback, and no run directory is left. The temporary Prefect server
    listens on the loopback interface."""
    from safetensors.torch import load_file, save_file

    nan = Path(shutil.copytree(tiny_family["b"], tmp_path / "nan"))
    tensors = load_file(nan / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, :3] = float("nan")
    save_file(tensors, str(nan / "model.safetensors"), metadata={"format": "pt"})
    config = _write_config(tmp_path / "nan.yaml", {"base": str(tiny_family["base"]), "a": str(tiny_family["a"]),
                                                   "nan": str(nan)},
                           merges={"parents": [["a", "nan"]], "methods": [{"method": "linear"}]})
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config), "--run-dir", str(run)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env=env | {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect")})
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: values: 'nan' has 3 NaN/inf weight(s) in 1 tensor(s): model.layers.1.mlp.up_proj.weight"]
    assert "Traceback" not in output
    assert "Starting temporary server on http://127.0.0.1:" in output
    assert not run.exists()


# --- 3. cache entries cut short or corrupt: a miss, recomputed, never trusted -----------------------------------

def test_weight_features_cache_cut_short_is_recomputed(tiny_family, tmp_path, caplog):
    from probing.similarity.weights import cached_weight_features

    models = dict(tiny_family)
    rows, cached = cached_weight_features(models, "base", tmp_path)
    entries = sorted((tmp_path / "weight_features").glob("*.parquet"))
    assert len(entries) == 6, "one entry per model and per pair of the three"
    whole = pl.read_parquet(entries[0])
    _cut(entries[0])
    with caplog.at_level(logging.WARNING, logger="merge_eval.cache"):
        again, cached = cached_weight_features(models, "base", tmp_path)
    assert not cached
    assert_frame_equal(again, rows, check_exact=False, rel_tol=1e-12, abs_tol=1e-12)
    assert f"cache entry {entries[0]} is unreadable" in caplog.text and "recomputing it" in caplog.text
    assert_frame_equal(pl.read_parquet(entries[0]), whole, check_exact=False, rel_tol=1e-12)  # the entry is whole again


def test_behavior_cache_cut_short_is_rescored(tiny_family, tmp_path, monkeypatch, caplog):
    """A half-written lm-eval result (a killed copy of the cache) is scored again, not parsed into a crash. The
    scorer is stubbed (lm-eval itself is tested in test_behavior.py); what is tested is the cache's handling."""
    import evaluation.behavior as behavior

    settings = behavior.BehaviorSettings(limit=1)
    key = settings.cache_key(behavior.content_digest(tiny_family["base"]))
    entry = tmp_path / behavior.CACHE_SUBDIR / f"{key}.json"
    entry.parent.mkdir()
    entry.write_text(json.dumps({"results": {"t": {"acc,none": 0.5}}, "merge_eval": {}})[:20])
    calls = []
    monkeypatch.setattr(behavior, "evaluate", lambda model, tokenizer, s, answers=None: calls.append(s) or {
        "results": {}, "merge_eval_answered": 0})
    with caplog.at_level(logging.WARNING, logger="merge_eval.cache"):
        raw = behavior.score_model(tiny_family["base"], settings, LoadOptions(), tmp_path)
    assert len(calls) == 1 and f"cache entry {entry} is unreadable (JSONDecodeError" in caplog.text
    assert json.loads(entry.read_text()) == raw and raw["merge_eval"]["cache_key"] == key


def _write_capture(path: Path) -> None:
    safetensors.torch.save_file({"pooled": torch.ones(4, 3, 2)}, str(path))


def _write_probes(path: Path) -> None:
    pl.DataFrame({"layer": range(500), "value": [0.5] * 500}).write_parquet(path)


@pytest.mark.parametrize("write, load", [
    (_write_capture, lambda path: safetensors.torch.load_file(path)["pooled"]),
    (_write_probes, pl.read_parquet),
], ids=["capture-safetensors", "probe-parquet"])
def test_probing_cache_entries_cut_short_are_misses(tmp_path, caplog, write, load):
    """The loaders of cache/captures/*.safetensors and cache/probes/*.parquet, on entries cut short as in the
    issue (`SafetensorError: incomplete metadata`, `polars ComputeError: File out of specification`)."""
    entry = tmp_path / "entry"
    write(entry)
    assert read_cached(entry, load) is not None
    _cut(entry)
    with caplog.at_level(logging.WARNING, logger="merge_eval.cache"):
        assert read_cached(entry, load) is None
    assert f"cache entry {entry} is unreadable" in caplog.text and not entry.exists()


def _linear(weight: float = 0.5) -> MergeLineage:
    return MergeLineage(model="a+b/linear", method="linear", parents=("a", "b"), base=None,
                        parameters={"weight": weight})


@pytest.mark.parametrize("damage", ["manifest", "weights"])
def test_merge_with_damaged_manifest_or_weights_is_merged_again(tiny_family, tmp_path, caplog, damage):
    out = tmp_path / "a+b" / "linear"
    first = merge(_linear(), tiny_family, out)
    good = _digests(out)
    if damage == "manifest":
        _cut(out / MANIFEST)
    else:
        _cut(out / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="merge_eval.cache"):
        again = merge(_linear(), tiny_family, out)
    assert str(out / ("manifest.json" if damage == "manifest" else "model.safetensors")) in caplog.text
    assert again["input_key"] == first["input_key"] == json.loads((out / MANIFEST).read_text())["input_key"]
    assert {k: v for k, v in _digests(out).items() if k != MANIFEST} == \
        {k: v for k, v in good.items() if k != MANIFEST}, "the same merge, whole again"


def test_corrupt_table_is_named_to_readers_and_rebuilt_by_writers(tmp_path, capsys, caplog):
    tables = tmp_path / "run" / "tables"
    rows = pl.DataFrame({"model": ["m"], "task": ["t"], "group": [None], "metric": ["acc"], "value": [0.5],
                         "stderr": [0.1], "n": [3], "kind": ["behavior"]})
    write_table(tables, "behavior", rows)
    _cut(tables / "behavior.parquet")
    with pytest.raises(TableError, match=rf"{tables}/behavior.parquet: cannot read this table \(ComputeError"):
        read_table(tables, "behavior")
    (tables / "probes.parquet").write_bytes(b"PAR1 not really")
    assert main(["probes", str(tmp_path / "run")]) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"error: {tables}/probes.parquet: cannot read this table (")
    assert lines[0].endswith("); run the pipeline again to rewrite it")
    with caplog.at_level(logging.WARNING, logger="merge_eval.cache"):
        replace_rows(tables, "behavior", rows, "kind", "behavior")
    assert read_table(tables, "behavior").equals(rows) and "behavior.parquet is unreadable" in caplog.text


def test_sigkill_during_a_write_keeps_the_previous_file(tmp_path):
    """A process killed in the middle of writing a table leaves the previous table, whole and readable."""
    tables = tmp_path / "tables"
    good = pl.DataFrame({"x": [1, 2, 3]})
    write_table(tables, "scratch", good)
    writer = textwrap.dedent(f"""
        import time
        from runstore.atomic import atomic_path
        with atomic_path({str(tables / "scratch.parquet")!r}) as temp:
            with open(temp, "wb") as handle:
                handle.write(b"PAR1" + b"half a table" * 1000)
                handle.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True,
                               env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert read_table(tables, "scratch").equals(good)


# --- 4. a full disk: the error says so, no partial file replaces a good one -------------------------------------

def test_disk_full_writing_a_table_keeps_the_previous_one(tiny_family, tmp_path, monkeypatch, capsys):
    """Through `merge-eval run`: the flow's table writer meets a full disk (polars' real error text)."""
    import flows.pipeline
    from runstore.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    previous = pl.DataFrame({"model": ["m"], "task": ["t"], "group": [None], "metric": ["acc"], "value": [0.5],
                             "stderr": [0.1], "n": [3]})
    write_table(run.tables, "behavior", previous)
    kept = _digests(run.root)

    def full_disk(frame, target, *args, **kwargs):
        Path(target).write_bytes(b"PAR1" + b"\0" * 100)  # a partial file, then the error
        raise pl.exceptions.ComputeError(POLARS_FULL)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full_disk)
    monkeypatch.setattr(flows.pipeline, "merge_eval", lambda config_path, run_dir: write_table(
        RunDir(Path(run_dir)).tables, "behavior", pl.concat([previous, previous])))
    config = _write_config(tmp_path / "c.yaml", {"base": str(tiny_family["base"])})
    assert main(["run", str(config), "--run-dir", str(run.root)]) == 2
    assert _errors(capsys) == [f"error: {run.tables}/behavior.parquet: no space left on device while writing it "
                               f"(ComputeError); the previous version is kept; free some space and run again"]
    made = {name: digest for name, digest in _digests(run.root).items() if run.root / name not in run.bookkeeping()}
    assert made == kept, "previous table intact, no temp file left"


def test_disk_full_during_a_merge_keeps_the_previous_merge(tiny_family, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "models" / "a+b" / "linear"
    merge(_linear(0.5), tiny_family, out)
    kept = _digests(tmp_path / "models")

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)
        raise SafetensorError(SAFETENSORS_FULL)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(NoSpaceError) as caught:
        merge(_linear(0.3), tiny_family, out)  # new parameters: a new merge, written where the old one is
    assert str(caught.value) == (f"{out}: no space left on device while writing it (SafetensorError); the previous "
                                 f"version is kept; free some space and run again")
    assert _digests(tmp_path / "models") == kept, "previous merge intact, no half-built folder left"


@pytest.fixture()
def tiny_tmpfs(tmp_path):
    """A real 256 KiB tmpfs, where this machine allows mounting one (root in a container usually does)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the injected-ENOSPC tests cover "
                    f"the same paths")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("kind", ["table", "text"])
def test_really_full_disk(tiny_tmpfs, kind):
    target = tiny_tmpfs / ("t.parquet" if kind == "table" else "raw.json")
    small = pl.DataFrame({"x": [1]})
    big = pl.DataFrame({"x": list(range(400_000)), "y": [f"row {i}" for i in range(400_000)]})
    if kind == "table":
        write_table(tiny_tmpfs, "t", small)
    else:
        atomic_write_text(target, "{}")
    kept = target.read_bytes()
    with pytest.raises(NoSpaceError, match=rf"{target}: no space left on device while writing it .*previous version"):
        if kind == "table":
            write_table(tiny_tmpfs, "t", big)
        else:
            atomic_write_text(target, big.write_csv())
    assert target.read_bytes() == kept and [p.name for p in tiny_tmpfs.iterdir()] == [target.name]


# --- 5. outputs follow the user's umask (a teammate can read a finished run) -------------------------------------

@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_follow_the_umask(tiny_family, tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        table = write_table(tmp_path / "tables", "t", pl.DataFrame({"x": [1]}))
        text = tmp_path / "raw.json"
        atomic_write_text(text, "{}")
        with atomic_dir(tmp_path / "built") as build:
            (build / "inside").write_text("x")
        build = tmp_path / "built"
        out = tmp_path / "models" / "a+b" / "linear"
        merge(_linear(), tiny_family, out)
    finally:
        os.umask(old)
    modes = {p: p.stat().st_mode & 0o777 for p in [table, text, build, *build.iterdir(), out, *out.iterdir()]}
    assert modes == {p: dir_mode if p.is_dir() else file_mode for p in modes}


# --- 6. safe by default -----------------------------------------------------------------------------------------

def test_remote_code_is_never_run_by_default(tiny_family, tmp_path, capsys):
    from flows.config import parse_config

    folder = Path(shutil.copytree(tiny_family["base"], tmp_path / "custom"))
    (folder / "custom_model.py").write_text(textwrap.dedent("""
        from pathlib import Path
        Path(__file__).with_name("REMOTE_CODE_RAN").write_text("yes")
        from transformers import LlamaConfig, LlamaForCausalLM
        class CustomConfig(LlamaConfig):
            model_type = "custom"
        class CustomModel(LlamaForCausalLM):
            config_class = CustomConfig
    """))
    _edit_json(folder / "config.json", model_type="custom", architectures=["CustomModel"],
               auto_map={"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomModel"})
    assert LoadOptions().trust_remote_code is False
    assert parse_config({"name": "x", "base": "b", "models": [{"name": "b", "source": "x"}]}).trust_remote_code is False
    with pytest.raises(CheckpointError, match="model_type='custom' is not a causal language model"):
        load_model(folder, LoadOptions())
    assert main(["validate", str(_write_config(tmp_path / "c.yaml", {"custom": str(folder)}))]) == 2
    assert "model_type='custom'" in _errors(capsys)[0]
    assert not (folder / "REMOTE_CODE_RAN").exists()


class _Payload:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_weights_are_never_loaded_by_default(tiny_family, tmp_path, capsys):
    from flows.config import parse_config

    marker = tmp_path / "PICKLE_RAN"
    only_pickle = tmp_path / "only-pickle"
    only_pickle.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_family["base"] / name, only_pickle / name)
    (only_pickle / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    assert parse_config({"name": "x", "base": "b", "models": [{"name": "b", "source": "x"}]}).allow_pickle is False
    with pytest.raises(CheckpointError, match="only pickle .* set allow_pickle: true"):
        load_model(only_pickle, LoadOptions())
    assert main(["validate", str(_write_config(tmp_path / "c.yaml", {"b": str(only_pickle)}))]) == 2
    assert "only pickle (.bin) weights found" in _errors(capsys)[0]
    both = Path(shutil.copytree(tiny_family["base"], tmp_path / "both"))
    shutil.copy(only_pickle / "pytorch_model.bin", both / "pytorch_model.bin")
    model, _ = load_model(both, LoadOptions())  # safetensors only, the .bin beside it never opened
    assert model.config.num_hidden_layers == 3
    assert not marker.exists()


def test_config_yaml_is_data_not_code(tmp_path, capsys):
    """YAML tags that construct Python objects are refused (SafeLoader); Holmes cells are never eval()'d either:
    tests/test_holmes.py::test_hostile_inputs_rejected_without_execution."""
    marker = tmp_path / "YAML_RAN"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: !!python/object/apply:builtins.open [{str(marker)!r}, w]\n")
    assert main(["validate", str(config)]) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and "YAML error" in lines[0] and "python/object/apply" in lines[0]
    assert not marker.exists()


def test_servers_listen_on_loopback_only():
    """What `merge-eval` sets before Prefect reads its settings: the API server (`prefect server start`, the
    temporary one) and the runner's webserver (`merge-eval serve`) bind 127.0.0.1 unless the user says otherwise."""
    probe = ("from flows.cli import _offline_defaults; _offline_defaults()\n"
             "from prefect.settings import get_current_settings\n"
             "s = get_current_settings(); print(s.server.api.host, s.runner.server.host)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == ["127.0.0.1", "127.0.0.1"], done.stderr


def test_every_stage_error_is_a_user_error():
    """One base class the CLI maps to exit 2: a stage's error class that stops subclassing it would crash the CLI
    with a traceback instead."""
    from evaluation.suites import SuiteError
    from flows.config import ConfigError
    from merging.family import FamilyError
    from merging.merge import MergeError
    from probing.capture import CaptureError
    from probing.holmes import HolmesError
    from probing.inspect import ProbesError

    for error in (ConfigError, CheckpointError, FamilyError, MergeError, PreflightError, HolmesError, CaptureError,
                  ProbesError, SuiteError, TableError, NoSpaceError):
        assert issubclass(error, UserError), error


def test_capture_store_entry_cut_short_counts_as_missing(tmp_path, caplog):
    """The per-model step asks the store what is missing before deciding to load a model: an entry cut short must
    be missing (and removed), or probing would later fail on it."""
    from probing.store import CaptureKey, CaptureStore

    store = CaptureStore(tmp_path / "captures")
    key = CaptureKey("m" * 64, "i" * 64, "blocks.0.hook_resid_post", "pool", "float32", 128)
    store.save(key, {"value": torch.randn(8, 16)}, {"model": "m"})
    assert store.has(key)
    _cut(store.path(key))
    with caplog.at_level(logging.WARNING, logger="merge_eval.cache"):
        assert not store.has(key)
    assert f"cache entry {store.path(key)} is unreadable" in caplog.text and not store.path(key).exists()
