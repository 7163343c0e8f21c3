"""What Prefect's temporary server costs a `merge-eval run`: a one-task flow in a fresh interpreter, timed from
the flow call to its return, with no PREFECT_API_URL (Prefect starts its temporary server, then runs the flow)
against the baseline of the same flow on an already-started `prefect server start`. Prints the medians and the
ratio measured in this one run. Every Prefect file lives in a temporary PREFECT_HOME.

    python bench/bench_prefect_start.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

FLOW = """
import time
from prefect import flow, task

@task
def one():
    return 1

@flow
def trivial():
    return one()

started = time.perf_counter()
trivial()
print(time.perf_counter() - started)
"""


def flow_seconds(environ: dict[str, str]) -> float:
    done = subprocess.run([sys.executable, "-c", FLOW], env=environ, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def wait_healthy(url: str, process: subprocess.Popen, limit: float = 600) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"prefect server not healthy after {limit} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=4297)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-prefect-"))
    base = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    base |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
    flow_seconds(base)  # creates the database once, so both sides find it migrated

    temporary = [flow_seconds(base) for _ in range(args.repeats)]
    url = f"http://127.0.0.1:{args.port}/api"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(args.port)], env=base, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        server_start = wait_healthy(url, server)
        started = [flow_seconds(base | {"PREFECT_API_URL": url}) for _ in range(args.repeats)]
    finally:
        os.killpg(server.pid, 15)  # the CLI and the uvicorn process it started
        server.wait()
    low, high = statistics.median(started), statistics.median(temporary)
    print(f"one-task flow, median of {args.repeats}:")
    print(f"  temporary server (no PREFECT_API_URL): {high:6.1f} s  {[round(t, 1) for t in temporary]}")
    print(f"  already-started server (baseline):     {low:6.1f} s  {[round(t, 1) for t in started]}")
    print(f"  ratio temporary / started: {high / low:.1f}x; `prefect server start` itself took {server_start:.1f} s")


if __name__ == "__main__":
    main()
