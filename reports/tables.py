"""The run's tidy tables: their contract columns and atomic reading/writing.

Every stage hands its rows to `write_table`, which checks the contract columns (DESIGN.md) and writes through a
temp file + rename, so a table on disk is always whole: an interrupted run leaves the previous version or none.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl

CONTRACT_COLUMNS: dict[str, tuple[str, ...]] = {
    "behavior": ("model", "task", "group", "metric", "value", "stderr", "n"),
    "probes": ("model", "task", "phenomenon", "probe_type", "layer", "metric", "value", "control_value",
               "selectivity", "seed", "n_train", "n_test"),
    "similarity": ("model_a", "model_b", "feature", "layer", "value"),
    "outcomes": ("model", "method", "parent_a", "parent_b", "task", "kind", "relation", "gap_closed", "normalized"),
    "correlations": ("x", "y", "method", "n", "r", "ci_low", "ci_high", "p", "q", "family", "view", "layer", "x_kind",
                     "y_kind", "reason"),
    "behavior_items": ("model", "task", "doc_id", "metric", "value"),
    "probe_items": ("model", "task", "layer", "item_id", "label", "prediction"),
}


class TableError(ValueError):
    """A table that breaks its contract (missing columns)."""


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_path(target) as temp:
        temp.write_text(text)


def check_contract(name: str, frame: pl.DataFrame) -> None:
    missing = [c for c in CONTRACT_COLUMNS.get(name, ()) if c not in frame.columns]
    if missing:
        raise TableError(f"table {name!r} lacks contract column(s) {missing}")


def write_parquet(frame: pl.DataFrame, target: Path) -> Path:
    with atomic_path(target) as temp:
        frame.write_parquet(temp)
    return target


def write_table(tables_dir: Path, name: str, frame: pl.DataFrame) -> Path:
    """Write `tables_dir/<name>.parquet` atomically after checking its contract columns."""
    check_contract(name, frame)
    return write_parquet(frame, Path(tables_dir) / f"{name}.parquet")


def replace_rows(tables_dir: Path, name: str, frame: pl.DataFrame, column: str, value: str) -> Path:
    """Write `frame` as the rows of table `name` whose `column` equals `value`, keeping every other row: tables
    that several stages fill (outcomes by kind, similarity by source) are updated one stage at a time."""
    existing = read_table(tables_dir, name)
    if existing is not None and column in existing.columns:
        frame = pl.concat([existing.filter(pl.col(column) != value), frame], how="diagonal_relaxed")
    return write_table(tables_dir, name, frame)


def read_table(tables_dir: Path, name: str) -> pl.DataFrame | None:
    path = Path(tables_dir) / f"{name}.parquet"
    return pl.read_parquet(path) if path.is_file() else None
