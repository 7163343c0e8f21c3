"""Behaviour suites by name: what `behavior.suites` in a config may list, and where lm-eval finds their tasks.

A suite is a tuple of lm-eval task/group names plus the folder of task YAMLs that defines them: ours for the
bundled offline suite, lm-eval's own `tasks/leaderboard` for the leaderboard. Indexing only those folders
(`include_defaults=False`) takes milliseconds where lm-eval's whole registry takes tens of seconds on 2 cores.
`digest` covers every file of a suite's folder (YAML, data, loader code), so a behaviour cache entry goes stale
exactly when the suite's content changes.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from runstore.cache import cache_key
from runstore.cache import content_digest as files_digest
from runstore.errors import UserError

OFFLINE_DIR = Path(__file__).parent / "offline"


def lm_eval_tasks_dir() -> Path:
    """lm-eval's bundled task folder, found without importing lm-eval (which takes seconds)."""
    spec = importlib.util.find_spec("lm_eval")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


class SuiteError(UserError):
    """An unknown suite name in a config."""


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[str, ...]  # lm-eval task or group names
    folder: str  # "offline" (ours) or "lm_eval:<subfolder of lm-eval's tasks>"

    @property
    def include_path(self) -> Path:
        if self.folder.startswith("lm_eval:"):
            return lm_eval_tasks_dir() / self.folder.removeprefix("lm_eval:")
        return Path(__file__).parent / self.folder

    def digest(self) -> str:
        """Digest of the suite's task names, lm-eval's version and every file in its folder."""
        root = self.include_path
        files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        return cache_key("suite", self.name, self.tasks, version("lm_eval"), files_digest(files, root))


SUITES: dict[str, Suite] = {
    # Bundled with merge-eval: the children's domains (math, instruct, code) + general English; runs offline.
    "offline": Suite("offline", ("merge_eval_offline",), "offline"),
    # Open LLM Leaderboard v2 as lm-eval registers it (BBH, MATH-hard, MUSR, GPQA, MMLU-Pro, IFEval): needs the
    # dataset hub (and GPQA access) at run time.
    "leaderboard": Suite("leaderboard", ("leaderboard",), "lm_eval:leaderboard"),
}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise SuiteError(f"unknown behaviour suite {name!r}; known: {', '.join(SUITES)}") from None


def task_manager(suites: list[Suite], extra: list[str] = ()):
    """An lm-eval TaskManager indexing exactly the suites' folders (and `extra` folders of generated tasks)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(s.include_path) for s in suites] + list(extra), include_defaults=False)
