"""The floors of the house (docs/ARCHITECTURE.md): a package imports only packages on floors below its own.

Every import counts, those inside functions and under TYPE_CHECKING included: a lazy upward import is still an
upward dependency, only a slower one to notice.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. The run store is everyone's ground floor; each stage may use the stages below it (probing reads
# the behaviour suite's texts and evaluation's paired bootstrap; evaluation scores merges); reports read every
# stage's tables; flows compose them all.
FLOORS = ("runstore", "merging", "evaluation", "probing", "reports", "flows")


def imported_packages(path: Path) -> list[str]:
    """Top-level names of every absolute import in one source file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".")[0])
    return names


def import_counts(root: Path, floors: tuple[str, ...] = FLOORS) -> Counter:
    """(importing package, imported package) -> number of import statements, across packages of `floors`."""
    counts: Counter = Counter()
    for package in floors:
        for path in sorted((root / package).rglob("*.py")):
            counts.update((package, name) for name in imported_packages(path) if name in floors and name != package)
    return counts


def upward_imports(root: Path, floors: tuple[str, ...] = FLOORS) -> list[str]:
    """`file: package -> higher package` for every import that points up the house."""
    level = {name: i for i, name in enumerate(floors)}
    found = []
    for package in floors:
        for path in sorted((root / package).rglob("*.py")):
            for name in imported_packages(path):
                if name in level and level[name] > level[package]:
                    found.append(f"{path.relative_to(root)}: {package} -> {name}")
    return found


def test_every_package_has_a_floor():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - {"tests", "bench"} == set(FLOORS)


def test_no_package_imports_a_floor_above_it():
    assert upward_imports(ROOT) == []


def test_the_run_store_imports_no_stage():
    counts = import_counts(ROOT)
    assert [pair for pair in counts if pair[0] == "runstore"] == []
    assert all(counts[(stage, "runstore")] > 0 for stage in FLOORS[1:])  # and every floor above stands on it


@pytest.mark.parametrize(("package", "target"), [("runstore", "reports"), ("merging", "probing"),
                                                 ("evaluation", "probing"), ("probing", "flows")])
def test_an_upward_import_is_caught(tmp_path, package, target):
    """The check is not vacuous: a copy of the real tree with one upward import added (inside a function, the
    easiest kind to miss) fails it, naming the file and the direction."""
    for floor in FLOORS:
        for path in (ROOT / floor).rglob("*.py"):
            copy = tmp_path / path.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text())
    assert upward_imports(tmp_path) == []
    offender = tmp_path / package / "__init__.py"
    offender.write_text(offender.read_text() + f"\n\ndef late():\n    import {target}.x  # noqa\n")
    assert upward_imports(tmp_path) == [f"{package}/__init__.py: {package} -> {target}"]
