"""`merge-eval serve` against a real local Prefect server: both deployments register, the qwen one on its weekly
cron, and a run triggered through the server (`prefect deployment run`) is executed by the serve process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from flows.deployments import QWEN_CRON

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (a background `serve` ignores SIGINT), then kill if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture()
def prefect_server(tmp_path):
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false")
    server = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 120, "the Prefect server")
        yield env
    finally:
        stop(server)


def test_serve_registers_and_runs_deployments(prefect_server, tiny_family, tmp_path):
    env = prefect_server
    api = env["PREFECT_API_URL"]
    serve = subprocess.Popen([BIN / "merge-eval", "serve"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def deployments():
            found = httpx.post(f"{api}/deployments/filter", json={}, timeout=5).json()
            return {d["name"]: d for d in found} if {"qwen", "smollm2"} <= {d["name"] for d in found} else None

        registered = wait_for(deployments, 180, "both deployments")
        schedules = [s["schedule"].get("cron") for s in registered["qwen"]["schedules"]]
        assert schedules == [QWEN_CRON]
        assert registered["qwen"]["parameters"]["config_path"].endswith("configs/qwen.yaml")

        config = {"name": "served", "device": "cpu",
                  "models": [{"name": n, "source": str(p)} for n, p in tiny_family.items()], "base": "base",
                  "merges": {"parents": [["a", "b"]], "methods": [{"method": "linear"}]},
                  "behavior": {"limit": 2, "batch_size": 4},
                  "minimal_pairs": [{"source": "bundled", "paradigms": ["subject_verb_agreement"], "pairs": 20}],
                  "probing": {"seeds": [0]}}
        config_path = tmp_path / "served.yaml"
        config_path.write_text(yaml.safe_dump(config))
        run_dir = tmp_path / "served-run"
        triggered = subprocess.run(
            [BIN / "prefect", "deployment", "run", "merge-eval/smollm2", "--param", f"config_path={config_path}",
             "--param", f"run_dir={run_dir}", "--watch", "--watch-timeout", "420"],
            env=env, capture_output=True, text=True, timeout=480)
        assert triggered.returncode == 0, triggered.stdout[-2000:] + triggered.stderr[-2000:]
        assert json.loads((run_dir / "models" / "a+b" / "linear" / "manifest.json").read_text())["method"] == "linear"
    finally:
        stop(serve)
