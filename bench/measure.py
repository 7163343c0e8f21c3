"""What the benchmarks measure of one call: wall time and the growth of the process's resident memory."""

from __future__ import annotations

import os
import resource
import time

import psutil


def rss_mb() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def timed(fn):
    """(fn(), seconds, MB of memory growth): the larger of peak-RSS growth and RSS still held afterwards."""
    start_rss, start = rss_mb(), time.perf_counter()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = fn()
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result, time.perf_counter() - start, max(peak_after - peak_before, rss_mb() - start_rss, 0.0)
