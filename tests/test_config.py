"""`merge-eval validate`: the shipped configs pass; each kind of mistake gives exit 2 and a line naming it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / "configs" / "smollm2.yaml"
# The variants below edit the demo's first merge block (the dose-response sweep); a group appended to it gets index GROUPS.
GROUPS = len(yaml.safe_load(SMOLLM2.read_text())["merges"][0]["parents"])


def first_block(data: dict) -> dict:
    return data["merges"] if isinstance(data["merges"], dict) else data["merges"][0]


def write_variant(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(SMOLLM2.read_text())
    edit(data)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def validate(path: Path, capsys) -> tuple[int, list[str]]:
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_shipped_default_config_validates(capsys):
    assert main(["validate", str(SMOLLM2)]) == 0
    assert "ok" in capsys.readouterr().out


def test_qwen_config_needs_the_models_and_the_flashholmes_download(tmp_path, capsys, monkeypatch):
    """Offline, with an empty Hugging Face cache, the four hub models are named (one line each, saying how to get
    them), and so is the FlashHolmes folder the user has not downloaded yet."""
    monkeypatch.chdir(tmp_path)
    qwen = ROOT / "configs" / "qwen.yaml"
    missing = [f"error: {qwen}: models[{i}].source: hub model '{repo}' (revision main): not in the Hugging Face "
               for i, repo in enumerate(["Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-Math-7B",
                                         "Qwen/Qwen2.5-Coder-7B"])]
    code, lines = validate(qwen, capsys)
    assert code == 2 and len(lines) == 5 and all(line.startswith(m) for line, m in zip(lines, missing)), lines
    assert lines[4] == f"error: {qwen}: probing.data='data/flash-holmes': data/flash-holmes: probing data folder " \
                       f"not found"
    for task in ("pos", "next-sentence-prediction"):  # two real-format Holmes datasets stand in for the download
        shutil.copytree(ROOT / "tests" / "fixtures" / "holmes" / task, tmp_path / "data" / "flash-holmes" / task)
    code, lines = validate(qwen, capsys)
    assert code == 2 and len(lines) == 4 and all(line.startswith(m) for line, m in zip(lines, missing)), lines


def test_qwen_config_is_the_paper_setup():
    from flows.config import load_config

    config = load_config(ROOT / "configs" / "qwen.yaml")
    sources = {m.name: m.source for m in config.models}
    assert sources["base"] == "Qwen/Qwen2.5-7B"
    assert {sources["instruct"], sources["math"], sources["code"]} == {
        "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-Math-7B", "Qwen/Qwen2.5-Coder-7B"}
    assert [m.method for m in config.merges[0].methods] == ["linear", "slerp", "task_arithmetic", "ties", "dare_ties"]
    assert "instruct+math/slerp" in config.merge_names and "instruct+code/dare_ties" in config.merge_names


def _set_method(data, method, **params):
    first_block(data)["methods"] = [{"method": method, "parameters": params}]


CASES = {
    "unknown method": (lambda d: _set_method(d, "frankenmerge"), ["merges[0].methods[0].method", "frankenmerge"]),
    "density out of range": (lambda d: _set_method(d, "ties", density=1.5), ["density=1.5", "[0.0, 1.0]"]),
    "negative weight": (lambda d: _set_method(d, "task_arithmetic", weight=-3), ["weight=-3", "[0.0, 2.0]"]),
    "unknown parameter": (lambda d: _set_method(d, "linear", gamma=0.1), ["gamma", "unknown parameter"]),
    "missing parent": (lambda d: first_block(d)["parents"].append(["instruct", "poetry"]),
                       [f"merges[0].parents[{GROUPS}]", "'poetry'"]),
    "missing base": (lambda d: d.update(base="foundation"), ["base", "'foundation'"]),
    "duplicate model names": (lambda d: d["models"].append({"name": "math", "source": "embedded:math"}),
                              ["duplicate model name 'math'"]),
    "duplicate merge names": (lambda d: first_block(d)["methods"].extend([{"method": "linear"}] * 2),
                              ["duplicate model names */linear"]),
    "one merge in two blocks": (lambda d: d["merges"].append(d["merges"][1]),
                                ["the merge 'instruct+math/linear' is configured in two blocks"]),
    "a single block needs no list": (lambda d: (d.update(merges=d["merges"][1]), _set_method(d, "franken")),
                                     ["merges.methods[0].method: unknown merge method 'franken'"]),
    "known effect of an unknown model": (lambda d: d["known_effects"][0].update(model="ghost"),
                                         ["known_effects[0].model: 'ghost' is not one of the models or merges"]),
    "slerp with three parents": (lambda d: (first_block(d)["parents"].append(["instruct", "math", "code"]),
                                            _set_method(d, "slerp", t=0.5)),
                                 ["slerp", "exactly 2 parents", f"merges[0].parents[{GROUPS}] has 3"]),
    "unknown top-level key": (lambda d: d.update(modles=[]), ["modles", "unknown key"]),
    "a renamed key": (lambda d: d["probing"].update(batch_size=32),
                      ["probing.batch_size: unknown key (renamed: use probing.batch_tokens"]),
    "wrong type": (lambda d: d.update(seed="many"), ["seed", "'many'"]),
    "bad precision": (lambda d: d.update(precision="int4"), ["precision", "'int4'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_names_field_and_value(case, tmp_path, capsys):
    edit, expected = CASES[case]
    code, lines = validate(write_variant(tmp_path, edit), capsys)
    assert code == 2
    assert lines, "an error must be printed"
    joined = "\n".join(lines)
    for fragment in expected:
        assert fragment in joined, f"{fragment!r} missing from: {joined}"
    assert "Traceback" not in joined


def test_several_problems_give_one_line_each(tmp_path, capsys):
    def edit(data):
        data["base"] = "nowhere"
        first_block(data)["methods"] = [{"method": "ties", "parameters": {"density": 1.5}}]
        data["extra_key"] = 1

    code, lines = validate(write_variant(tmp_path, edit), capsys)
    assert code == 2
    assert len(lines) == 3, lines
    assert all(line.startswith("error: ") and str(tmp_path) in line for line in lines)


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodels: [\n  - {name: base\n")
    code, lines = validate(path, capsys)
    assert code == 2 and len(lines) == 1
    assert "YAML error" in lines[0] and "line" in lines[0]


def test_duplicate_yaml_key_is_an_error(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(SMOLLM2.read_text() + "\nseed: 3\n")
    code, lines = validate(path, capsys)
    assert code == 2 and "duplicate key 'seed'" in lines[0]


def test_missing_file(tmp_path, capsys):
    code, lines = validate(tmp_path / "nope.yaml", capsys)
    assert code == 2 and lines == [f"error: {tmp_path / 'nope.yaml'}: no such config file"]


def test_console_script_exit_code(tmp_path):
    """The installed entry point returns 2 to the shell, and prints no traceback."""
    bad = write_variant(tmp_path, lambda d: _set_method(d, "ties", density=1.5))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "density=1.5" in done.stderr and "Traceback" not in done.stderr
