"""The merge stage: mergekit's `run_merge`, in-process, one merged checkpoint per (parents, method).

Each checkpoint folder gets `manifest.json` (method, parameters, parents, base, mergekit version, seed, wall time,
peak RSS). A folder whose manifest carries the same input key, and whose weight files are whole, is reused, so
re-running a config merges only what changed; a merge is built in a temp folder and renamed into place, so a
half-written merge never exists (a full disk leaves the previous merge as it was).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import psutil

from merging import sparsify
from merging.checkpoints import content_digest, safetensors_problem
from merging.methods import METHODS, mergekit_config
from runstore.atomic import CACHE_LOG, atomic_dir, read_cached
from runstore.cache import cache_key, record
from runstore.errors import UserError, is_disk_full

MANIFEST = "manifest.json"
MERGE_VERSION = "1"  # bumped when merge code changes what a merge with the same inputs writes


class MergeError(UserError):
    """mergekit refused or failed a merge; the message names the merge."""


@dataclass(frozen=True)
class MergeLineage:
    """What a merged model is made of: the tables join merges to their parents through this."""

    model: str
    method: str
    parents: tuple[str, ...]
    base: str | None
    parameters: dict[str, float] = field(default_factory=dict)


class PeakRss:
    """Peak resident memory of this process while the block runs, sampled every 20 ms."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def input_key(lineage: MergeLineage, parent_dirs: dict[str, Path], seed: int, dtype: str,
              memo_dir: Path | None = None) -> str:
    """Hash of everything a merge's result depends on: parent contents, method, parameters, seed, dtype."""
    sparsified = sparsify.KEY if METHODS[lineage.method].mergekit_name in sparsify.MAGNITUDE_METHODS else None
    return cache_key("merge", MERGE_VERSION, asdict(lineage), seed, dtype, version("mergekit"),
                     {name: content_digest(path, memo_dir) for name, path in parent_dirs.items()}, sparsified)


def read_manifest(folder: Path) -> dict | None:
    """The merge's manifest, or None when absent or unreadable (an unreadable one is removed: the merge is redone)."""
    manifest = read_cached(Path(folder) / MANIFEST, lambda path: json.loads(path.read_text()))
    return manifest if isinstance(manifest, dict) else None


def _damaged(folder: Path) -> list[str]:
    """Weight files of a finished merge that are no longer whole (cut short or corrupted since)."""
    return [p for p in map(safetensors_problem, sorted(Path(folder).glob("*.safetensors"))) if p]


def merge(lineage: MergeLineage, model_dirs: dict[str, Path], out: Path, seed: int = 0,
          dtype: str = "float32", trust_remote_code: bool = False, cache_dir: Path | None = None) -> dict:
    """Merge `lineage.parents` (over `lineage.base`) into `out`; returns the manifest. Reuses a matching result
    (reported to the ledger in `cache_dir`, when given)."""
    method = METHODS[lineage.method]
    needed = list(lineage.parents) + ([lineage.base] if method.uses_base and lineage.base else [])
    parent_dirs = {name: Path(model_dirs[name]) for name in needed}
    key = input_key(lineage, parent_dirs, seed, dtype, cache_dir)
    existing = read_manifest(out)
    if existing and existing.get("input_key") == key:
        damaged = _damaged(out)
        if not damaged:
            record(cache_dir, "merge", lineage.model, hit=True)
            return existing
        CACHE_LOG.warning("merge %s: %s; merging again", lineage.model, "; ".join(damaged))

    started = time.perf_counter()
    from mergekit.config import MergeConfiguration  # seconds to import: only when merging (not on a hit)
    from mergekit.merge import MergeOptions, run_merge

    config = mergekit_config(method, lineage.parameters, [str(parent_dirs[p]) for p in lineage.parents],
                             str(parent_dirs[lineage.base]) if method.uses_base else None, dtype)
    options = MergeOptions(copy_tokenizer=True, lazy_unpickle=True, low_cpu_memory=False, random_seed=seed,
                           trust_remote_code=trust_remote_code, safe_serialization=True, quiet=True,
                           write_model_card=False)
    sparsify.install()
    merge_started = time.perf_counter()  # the manifest's wall time: mergekit's work, not its import
    with atomic_dir(out) as build:
        with PeakRss() as memory:
            try:
                run_merge(MergeConfiguration.model_validate(config), str(build), options=options)
            except Exception as error:  # mergekit raises many types; name the merge and keep the cause
                if is_disk_full(error):
                    raise
                raise MergeError(f"merge {lineage.model!r} ({lineage.method}) failed: {error}") from error
        manifest = {
            "model": lineage.model, "method": lineage.method, "parameters": config.get("parameters", {}),
            "model_parameters": {m["model"]: m.get("parameters", {}) for m in config["models"]},
            "requested_parameters": lineage.parameters, "parents": list(lineage.parents),
            "base": lineage.base if method.uses_base else None, "mergekit_version": version("mergekit"),
            "mergekit_config": config, "seed": seed, "dtype": dtype,
            "wall_seconds": round(time.perf_counter() - merge_started, 3),
            "peak_rss_mb": round(memory.peak / 2**20, 1), "input_key": key,
        }
        (build / MANIFEST).write_text(json.dumps(manifest, indent=2))
    record(cache_dir, "merge", lineage.model, hit=False, seconds=time.perf_counter() - started)
    return manifest
