"""What `merge-eval run` prints: one progress line per stage and model, no library chatter, no progress bars
(the console is not a terminal here), and a user mistake found while the flow runs as `error:` lines, exit 2."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import write_tiny_config
from flows import console

ROOT = Path(__file__).resolve().parent.parent
HOLMES = Path(__file__).parent / "fixtures" / "holmes"
TIMESTAMP = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ")  # Prefect's console format
TQDM_BAR = re.compile(r"\d+(it|s)/(s|it)\]|\|\s*\d+/\d+ \[")


@pytest.fixture(scope="module")
def api_url(request) -> str:
    """A started Prefect server: PREFECT_API_URL when the environment names one, else the session's harness."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    request.getfixturevalue("prefect_harness")
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


CLI = ["-m", "flows.cli"]
# The CLI with `validate`'s probing-data check switched off, as if the folder changed after it was checked.
# validate reads the probing data twice: its own checks, and the disk plan that sizes the run's captures
SKIP_PROBING_VALIDATION = ["-c", "import sys, flows.plan as p, flows.validate as v; "
                                 "v.probing_problems = lambda config: []; p.disk_problems = lambda config, root: []; "
                                 "from flows.cli import main; sys.exit(main(sys.argv[1:]))"]


def run_cli(args: list[str], cwd: Path, api_url: str, verbose: bool = False,
            program: list[str] = CLI) -> subprocess.CompletedProcess:
    """`merge-eval ARGS` in a fresh interpreter (its own logging and environment, as a user's shell starts it),
    talking to a started Prefect server rather than starting a temporary one."""
    environ = {key: value for key, value in os.environ.items()
               if key not in (console.VERBOSE, *console.QUIET_BARS)}  # as a user's shell has them: unset
    environ |= {"PYTHONPATH": str(ROOT), "PREFECT_API_URL": api_url}
    environ |= {console.VERBOSE: "1"} if verbose else {}
    return subprocess.run([sys.executable, *program, *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=900)


def quiet_environment(monkeypatch) -> None:
    """The variables `console.install` sets in this process, restored after the test."""
    for variable, value in console.QUIET_BARS.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.delenv(console.VERBOSE, raising=False)


def write_config(path: Path, family: dict[str, Path], **changes) -> Path:
    return write_tiny_config(path, family, **({"name": "console", "behavior": {"limit": 1, "batch_size": 4},
                                               "similarity": {"tokens": 128, "window": 32, "top_k": 16}} | changes))


def test_run_console_has_one_line_per_stage_and_model(api_url, tiny_family, tmp_path):
    config = write_config(tmp_path / "console.yaml", tiny_family)
    done = run_cli(["run", str(config), "--run-dir", str(tmp_path / "run")], cwd=tmp_path, api_url=api_url)
    output = done.stdout + done.stderr
    (tmp_path / "console.txt").write_text(output)  # what a reader of this test can look at
    assert done.returncode == 0, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert not [line for line in lines if TQDM_BAR.search(line)], "no progress bar when not on a terminal"
    for noise in ["Custom kwargs", "already-initialized model", "`torch_dtype` is deprecated", "fatal: not a git"]:
        assert noise not in output
    models = ["base", "a", "b", "a+b/linear"]
    for model in models:  # each stage of each model says it ran
        assert any(f"behaviour {model}: scored" in line for line in lines), model
        assert any(f"captures {model}:" in line for line in lines), model
        assert any(re.search(rf"probing {re.escape(model)} \(", line) for line in lines), model
    # a line that names no model is said once per run, not once per model, task or batch
    names_a_model = re.compile("|".join(rf"(?<![\w+/]){re.escape(m)}(?![\w+/])" for m in models))
    messages = Counter(TIMESTAMP.sub("", line) for line in lines if not names_a_model.search(line))
    assert max(messages.values()) <= 2, (messages.most_common(3), output)
    assert len(lines) < 100, output


def test_verbose_run_shows_the_detail_again(api_url, tiny_family, tmp_path):
    """MERGE_EVAL_VERBOSE=1 brings back lm-eval's own warnings and the stages' per-task lines."""
    config = write_config(tmp_path / "console.yaml", tiny_family, probing={"seeds": [0]},
                          similarity={"functional": False, "weights": False})
    done = run_cli(["run", str(config), "--run-dir", str(tmp_path / "run")], cwd=tmp_path, api_url=api_url,
                   verbose=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Custom kwargs can be passed to `--metadata`" in output
    assert "Running loglikelihood requests" in output
    assert "base: probed tiny-subject_verb_agreement" in output and "a: captured" in output


def test_user_error_inside_the_flow_is_one_line_and_exit_2(api_url, tiny_family, tmp_path):
    """Parents that cannot be merged pass `validate` (it reads each folder alone) and fail in the flow's
    preflight task: the run still ends in the `error:` lines and exit 2, with no stack anywhere."""
    odd = shutil.copytree(tiny_family["b"], tmp_path / "odd")
    settings = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(settings | {"architectures": ["MistralForCausalLM"]}))
    config = write_config(tmp_path / "odd.yaml", {**tiny_family, "b": odd})
    assert run_cli(["validate", str(config)], cwd=tmp_path, api_url=api_url).returncode == 0

    done = run_cli(["run", str(config), "--run-dir", str(tmp_path / "run")], cwd=tmp_path, api_url=api_url)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: config: 'b' has architectures=['MistralForCausalLM']")
    assert not (tmp_path / "run").exists(), "a run that made nothing leaves no folder behind"


def test_probing_folder_gone_bad_mid_run_is_an_error_line(api_url, tiny_family, tmp_path):
    """A Holmes folder read whole by `validate` can change before the run reads it (here validation is told
    nothing is wrong): the HolmesError raised inside the per-model task ends the run as `error:` and exit 2, with
    no stack in Prefect's record of the failed task."""
    data = shutil.copytree(HOLMES, tmp_path / "holmes")
    samples = data / "pos" / "samples.csv"
    samples.write_text(samples.read_text().replace("animals,NOUN,train,NOUN,0,0", "animals,NOUN,train,NOUN,x,0"))
    config = write_config(tmp_path / "holmes.yaml", tiny_family, similarity={"weights": False},
                          probing={"data": str(data), "tasks": ["pos"], "seeds": [0]})
    done = run_cli(["run", str(config), "--run-dir", str(tmp_path / "run")], cwd=tmp_path, api_url=api_url,
                   program=SKIP_PROBING_VALIDATION)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Task run 'model base' - Finished in state Failed" in done.stderr, "raised inside the first model task"
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {samples}: row 2: label 'x' is not a number"], done.stderr


def test_noise_filter_drops_only_the_known_records(caplog, monkeypatch):
    """lm-eval's metadata advice is dropped at its logger; another warning of the same logger still shows."""
    quiet_environment(monkeypatch)
    console.install()
    task_logger = logging.getLogger("lm_eval.api.task")
    with caplog.at_level(logging.WARNING):
        task_logger.warning("offline_math_greedy: Custom kwargs can be passed to `--metadata` in console ...")
        task_logger.warning("offline_math_greedy: dataset has no test split; using validation")
    assert [r.getMessage() for r in caplog.records] == [
        "offline_math_greedy: dataset has no test split; using validation"]
