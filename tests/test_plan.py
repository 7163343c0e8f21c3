"""`merge-eval plan` against what the stages really do: parameter counts against a published architecture, capture
tokens and store bytes against a real capture of the tiny model, the disk refusal against a real tmpfs, and (slow)
the whole estimate against a measured run of the embedded model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_tiny_config

from flows.cli import main
from flows.config import load_config
from flows.plan import FREE_MARGIN, Shape, disk_estimate, job_work, plan, study_jobs

ROOT = Path(__file__).resolve().parent.parent
# Qwen2.5-7B's config.json as published with the model (architecture numbers; Qwen reports 7.61B parameters,
# 6.53B of them outside the embeddings).
QWEN_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
           "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "max_position_embeddings": 131072, "max_window_layers": 28, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False,
           "vocab_size": 152064, "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
           "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True}


def test_shape_counts_the_published_qwen_architecture():
    shape = Shape.from_config(QWEN_7B)
    assert abs(shape.params - 7.61e9) / 7.61e9 < 1e-3
    assert abs(shape.matmul - 6.53e9) / 6.53e9 < 1e-3  # weights multiplied per token, embeddings and head aside
    assert shape.head == 152064 * 3584 and shape.layers == 28 and shape.head_dim == 128


def test_a_model_shape_is_built_once_per_config(tmp_path, monkeypatch):
    """Every run's validation sizes the base for its disk estimate: a config sized before is read back, equal;
    another config, or a cache that cannot be written, is built."""
    from types import SimpleNamespace

    import flows.plan as plan_module

    built, build = [], Shape.from_config
    monkeypatch.setattr(Shape, "from_config", lambda config, trust=False: built.append(config) or build(config, trust))
    monkeypatch.setenv("MERGE_EVAL_CACHE", str(tmp_path / "cache"))
    config, path = SimpleNamespace(trust_remote_code=False), tmp_path / "config.json"  # what model_shape reads
    path.write_text(json.dumps(QWEN_7B))
    first = plan_module.model_shape(config, path)
    assert plan_module.model_shape(config, tmp_path) == first == build(QWEN_7B) and len(built) == 1
    path.write_text(json.dumps(QWEN_7B | {"num_hidden_layers": 2}))
    assert plan_module.model_shape(config, path).layers == 2 and len(built) == 2
    monkeypatch.setenv("MERGE_EVAL_CACHE", str(path / "not-a-folder"))
    assert plan_module.model_shape(config, path).layers == 2 and len(built) == 3


def test_a_parent_with_more_tensors_is_sized_as_itself_and_another_shape_is_refused(tiny_family, tmp_path):
    """The demo's number_erased child stores an untied output head and biases: the plan counts its own bytes for
    reading it; a parent with another width would make every forward-pass figure wrong, so it is refused."""
    from flows.plan import BYTES, PlanError, Rates

    def variant(name: str, **changes) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_family["a"], folder)
        data = json.loads((folder / "config.json").read_text()) | changes
        (folder / "config.json").write_text(json.dumps(data))
        return folder

    rates = Rates(flops=1e10, io=1e8, source="stated")
    family = dict(tiny_family)
    tied = plan(load_config(write_tiny_config(tmp_path / "tied.yaml", family)), rates=rates)
    family["a"] = variant("untied", tie_word_embeddings=False)
    untied = plan(load_config(write_tiny_config(tmp_path / "untied.yaml", family)), rates=rates)
    head = Shape.from_config(json.loads((tiny_family["a"] / "config.json").read_text())).head
    extra = untied["stages"]["parents + preflight"].seconds - tied["stages"]["parents + preflight"].seconds
    assert extra * rates.io == pytest.approx(head * BYTES["float32"])
    family["a"] = variant("wider", hidden_size=64)
    with pytest.raises(PlanError, match="'a' differs from the base in hidden \\(64 vs 32\\)"):
        plan(load_config(write_tiny_config(tmp_path / "wider.yaml", family)), rates=rates)


def test_capture_tokens_and_store_bytes_equal_a_real_capture(tiny_family, tmp_path):
    """The plan's padded tokens per job are the tokens the capture code feeds the model, and its store bytes are
    the values the store holds: the files, packed, take no more than that plus their headers."""
    from merging.checkpoints import LoadOptions, load_model
    from probing.hooks import HookRunner
    from probing.store import CaptureStore, capture_model, model_ref

    config = load_config(write_tiny_config(tmp_path / "tiny.yaml", tiny_family))
    folder = tiny_family["a"]
    shape = Shape.from_config(json.loads((folder / "config.json").read_text()))
    model, tokenizer = load_model(folder, LoadOptions())
    jobs = study_jobs(config, shape)
    planned = [job_work(job, shape, tokenizer) for job in jobs]
    fed = []  # the decoder runs once per forward pass, with or without the output head
    model.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].numel()),
                                          with_kwargs=True)
    store = CaptureStore(tmp_path / "cache" / "captures")
    for job, work in zip(jobs, planned):
        fed.clear()
        capture_model(HookRunner(model, tokenizer), model_ref("a", folder), [job], store, "float32", log=lambda _: None)
        assert sum(fed) == work["tokens"] > 0, job.inputs.name
    keys = [job.key(request, model_ref("a", folder).digest, "float32") for job in jobs for request in job.requests]
    held = sum(value.nbytes for key in keys for value in store.load(key).values())
    on_disk = sum(store.path(key).stat().st_size for key in keys)
    planned_bytes = sum(work["stored"] for work in planned)
    assert held == planned_bytes and on_disk <= planned_bytes + 64 * 1024 * len(keys)  # headers: names and keys


def test_plan_prints_every_stage_and_the_total(tiny_family, tmp_path, capsys):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_family)
    assert main(["plan", str(config), "--device-rate", "1e12"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "time at stated 1e+12 FLOP/s" in out[0]
    stages = [line.split()[0] for line in out[2:]]
    assert stages[:8] == ["parents", "merges", "behaviour", "captures", "probes", "similarity", "tables", "total"]


def test_validate_refuses_a_run_whose_plan_outgrows_the_disk(tiny_family, tmp_path, capsys):
    """A real 1 MiB tmpfs as the run directory's filesystem: the tiny run's merge and captures do not fit; a run
    directory that already holds them (a re-run) is not refused."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        config = write_tiny_config(tmp_path / "tiny.yaml", tiny_family)
        planned = disk_estimate(load_config(config))
        assert planned * FREE_MARGIN > 1 << 20
        assert main(["validate", str(config), "--run-dir", str(mount / "run")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"run directory '{mount}/run': the run writes about" in lines[0], lines
        assert f"free on {mount} allows with a 20% margin" in lines[0]
        (mount / "run").mkdir()  # a finished run's folder holds what the plan counts: a re-run writes nothing new
        with open(mount / "run" / "held.bin", "wb") as held:
            held.truncate(int(planned))  # sparse: its length is counted, the tmpfs stays empty
        assert main(["validate", str(config), "--run-dir", str(mount / "run")]) == 0
        assert main(["validate", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _hub_cache_with(cache: Path, repo_ids: list[str], config: dict, tokenizer_from: Path) -> None:
    """Snapshots holding only config.json and a tokenizer (what the plan reads), laid out as the hub does."""
    from test_hub import hub_cache

    source = cache / "source"
    source.mkdir(parents=True)
    (source / "config.json").write_text(json.dumps(config))
    for path in tokenizer_from.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, source)
    for repo in repo_ids:
        hub_cache(cache, repo, source)


def test_qwen_plan_one_model_resident_merges_and_captures_on_disk(real_family, tmp_path, monkeypatch):
    """configs/qwen.yaml sized offline: Qwen2.5-7B's published config.json in a hub-cache layout, SmolLM2's
    tokenizer standing in for Qwen's, the real-format Holmes fixtures for FlashHolmes; behaviour (the leaderboard)
    needs the dataset hub and is reported unsized. Printed for docs/SCALE.md (pytest -s)."""
    cache = tmp_path / "hf"
    qwen = load_config(ROOT / "configs" / "qwen.yaml")
    _hub_cache_with(cache, [m.source for m in qwen.models], QWEN_7B, real_family["base"])
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    shutil.copytree(ROOT / "tests" / "fixtures" / "holmes", tmp_path / "data" / "flash-holmes")
    monkeypatch.chdir(tmp_path)
    from flows.plan import format_plan

    result = plan(qwen, device_rate=400e12)
    print(format_plan(result))
    weights = 7.6e9 * 2
    stages, total = result["stages"], result["total"]
    assert abs(stages["merges"].disk - 10 * weights) / (10 * weights) < 0.01
    assert weights < stages["captures"].memory < 1.5 * weights, "one model resident, captures streamed"
    assert total.memory < 2 * weights
    assert stages["captures"].tokens > 0 and stages["behaviour"].tokens == 0
    assert any("behaviour not sized" in note for note in total.notes)


# --- the estimate against a measured run -----------------------------------------------------------------------------

def _measured_run(config: Path, run: Path) -> dict:
    """Wall time, peak anonymous memory of the run's process tree (the plan's measure), peak RSS (mapped checkpoint
    pages included) and the bytes the run left under its run directory (bench/measure.py)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from measure import measured_run

    from flows.plan import bytes_under

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    measured = measured_run([sys.executable, "-m", "flows.cli", "run", str(config), "--run-dir", str(run)],
                            run.parent / "run.log",
                            env | {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(run.parent / "prefect")})
    assert measured["returncode"] == 0, (run.parent / "run.log").read_text()[-3000:]
    return measured | {"disk": bytes_under(run)}


@pytest.mark.slow
def test_plan_disk_within_30_percent_and_memory_not_understated_against_a_measured_run(real_family, tmp_path, capsys):
    """base + instruct + their linear merge, the bundled suite's first two paradigms (100 pairs each), 5 behaviour
    items per task, a 1,024-token similarity set: the plan (calibrated here, just before) against the run."""
    from probing.minimal_pair_tasks import BUNDLED_DIR

    paradigms = sorted(path.stem for path in (BUNDLED_DIR / "data").glob("*.jsonl"))[:2]
    data = {"name": "measured", "seed": 0, "precision": "float32", "device": "cpu", "base": "base",
            "models": [{"name": "base", "source": "embedded:base"}, {"name": "instruct", "source": "embedded:instruct"}],
            "merges": {"parents": [["base", "instruct"]], "methods": [{"method": "linear"}]},
            "behavior": {"limit": 5}, "probing": {"seeds": [0]},
            "minimal_pairs": [{"source": "bundled", "paradigms": paradigms, "pairs": 100}],
            "similarity": {"tokens": 1024, "window": 128, "top_k": 256}}
    config = tmp_path / "measured.yaml"
    config.write_text(yaml.safe_dump(data))
    from flows.plan import format_plan

    planned = plan(load_config(config))
    measured = _measured_run(config, tmp_path / "run")
    total = planned["total"]
    ratios = {"seconds": total.seconds / measured["seconds"], "memory": total.memory / measured["memory"],
              "disk": total.disk / measured["disk"]}
    from flows.plan import format_comparison, measured_seconds

    with capsys.disabled():
        print(format_plan(planned), format_comparison(planned, measured_seconds(tmp_path / "run")),
              f"measured: {measured}", f"plan/measured: {ratios}", sep="\n")
    # Time is printed, not asserted: a test is no timer (docs/PERFORMANCE.md), and the calibration's forward rate
    # moved 14-166 GFLOP/s within minutes on the shared machine. Memory is printed and must not be understated:
    # the plan has come out 1.08-2.17x the sampled anonymous peak of this same config (docs/SCALE.md), an open gap.
    assert 0.7 <= ratios["disk"] <= 1.3 and ratios["memory"] >= 0.7, ratios
