"""The run directory (DESIGN.md contract): resolved config, merged checkpoints, tables, report, caches."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from flows.config import ExperimentConfig
from reports.tables import atomic_write_text

RECORDED_PACKAGES = ("merge-eval", "torch", "transformers", "tokenizers", "safetensors", "peft", "mergekit",
                     "lm_eval", "transformer-lens", "scikit-learn", "numpy", "scipy", "polars", "prefect")


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

    def model_dir(self, name: str) -> Path:
        return self.models.joinpath(*name.split("/"))

    def link_parent(self, name: str, source: Path) -> Path:
        """models/<parent> as a symlink to where the parent lives: referenced, never copied."""
        link = self.model_dir(name)
        link.parent.mkdir(parents=True, exist_ok=True)
        temp = link.with_name(f".{link.name}.link")
        temp.unlink(missing_ok=True)
        temp.symlink_to(Path(source).resolve(), target_is_directory=True)
        os.replace(temp, link)
        return link

    def write_config(self, config: ExperimentConfig, source: Path) -> Path:
        """config.yaml: the validated config with defaults filled in, plus versions and provenance."""
        resolved = config.model_dump(mode="json")
        resolved["_provenance"] = {"config_file": str(source), "versions": package_versions(),
                                   "code_revision": code_revision(), "seeds": {"global": config.seed,
                                                                               "probing": config.probing.seeds}}
        target = self.root / "config.yaml"
        atomic_write_text(target, yaml.safe_dump(resolved, sort_keys=False))
        return target
