"""The run directory (DESIGN.md contract): resolved config, merged checkpoints, tables, report, caches, and the
lock that lets one run at a time write there."""

from __future__ import annotations

import os
import platform
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml
from filelock import FileLock, Timeout
from pydantic import BaseModel

from runstore.atomic import atomic_symlink, atomic_write_text, remove_temps
from runstore.cache import DIGEST_MEMOS, LEDGER, start_run
from runstore.errors import UserError

RECORDED_PACKAGES = ("merge-eval", "torch", "transformers", "tokenizers", "safetensors", "peft", "mergekit",
                     "lm_eval", "transformer-lens", "scikit-learn", "numpy", "scipy", "polars", "prefect")


LOCK_FILE = ".merge-eval.lock"


class RunLockedError(UserError):
    """Another live process is running on this run directory."""


def package_versions() -> dict[str, str]:
    found = {}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


def code_revision() -> str | None:
    """The git commit of the merge-eval checkout, when it is one (with '+dirty' for local edits)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def cache(self) -> Path:
        """Per-model stage results keyed by content (behaviour, captures): what makes re-runs incremental."""
        return self.root / "cache"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    def bookkeeping(self) -> set[Path]:
        """Files a run writes before it makes anything (its config, lock, ledger and the digests of its parents'
        folders): a run that failed having written only these made nothing worth keeping."""
        return {self.root / "config.yaml", self.lock_file, self.cache / LEDGER,
                *(self.cache / DIGEST_MEMOS).glob("*.json")}

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for this process, or fail at once with `RunLockedError` naming the holder's pid.

        An flock (through `filelock`) belongs to the open file, so the kernel drops it when the holder exits, however
        it exits: a run killed with -9 leaves no stale lock to clean up, and the next run takes over. Reentrant
        within a process (the CLI takes it before Prefect starts, the flow again for deployments). The first
        acquisition removes temp files a killed run left (no other writer can be active) and opens this run's
        section of the cache ledger.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.lock_file, timeout=0, is_singleton=True, thread_local=False)
        first = not lock.is_locked
        try:
            lock.acquire()
        except Timeout:
            holder = _read_pid(self.lock_file)
            raise RunLockedError(f"{self.root}: another merge-eval run (pid {holder or 'unknown'}) is using this run "
                                 f"directory; wait for it to finish or stop it") from None
        try:
            if first:
                self.lock_file.write_text(f"{os.getpid()}\n")
                remove_temps(self.root)
                start_run(self.cache, uuid.uuid4().hex)
            yield
        finally:
            lock.release()

    def model_dir(self, name: str) -> Path:
        return self.models.joinpath(*name.split("/"))

    def link_parent(self, name: str, source: Path) -> Path:
        """models/<parent> as a symlink to where the parent lives: referenced, never copied."""
        return atomic_symlink(self.model_dir(name), source)

    def write_config(self, config: BaseModel, source: Path, seeds: dict[str, object]) -> Path:
        """config.yaml: the validated config (any pydantic model: the run store knows no stage's fields) with
        defaults filled in, plus versions, seeds and provenance."""
        resolved = config.model_dump(mode="json")
        resolved["_provenance"] = {"config_file": str(source), "versions": package_versions(),
                                   "code_revision": code_revision(), "seeds": seeds}
        target = self.root / "config.yaml"
        atomic_write_text(target, yaml.safe_dump(resolved, sort_keys=False))
        return target


def _read_pid(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
