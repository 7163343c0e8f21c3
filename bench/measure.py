"""One command run and measured as `merge-eval plan` counts it: wall seconds, peak anonymous memory and peak RSS.

Anonymous memory is RSS less file-backed and shared pages (psutil's `rss - shared`): what must fit in RAM. The
checkpoint pages that safetensors maps also count in RSS, but they are page cache the kernel can drop. It is summed
over the command's whole process tree (the Prefect server, any worker), sampled every `interval` seconds: the
kernel keeps a peak of RSS (getrusage) but not of anonymous memory, so a peak shorter than the interval can slip
through.
"""

from __future__ import annotations

import resource
import subprocess
import time
from pathlib import Path

import psutil


def tree_anonymous(process: psutil.Process) -> int:
    """Anonymous bytes of `process` and all its descendants now (processes that exit meanwhile count as 0)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            info = member.memory_info()
        except psutil.Error:
            continue
        total += info.rss - info.shared
    return total


def measured_run(command: list[str], log: Path, env: dict[str, str] | None = None, interval: float = 0.2) -> dict:
    """Run `command` (stdout and stderr to `log`); {"seconds", "memory" (peak anonymous bytes of its tree),
    "rss" (peak RSS of its largest process, getrusage), "returncode"}."""
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        process, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            try:
                peak = max(peak, tree_anonymous(process))
            except psutil.Error:
                break
            time.sleep(interval)
        returncode = child.wait()
    return {"seconds": time.perf_counter() - started, "memory": peak, "returncode": returncode,
            "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
