"""The run's tidy tables: their contract columns (DESIGN.md) and their atomic reading and writing.

Every stage hands its rows to `write_table`, which checks the contract columns and writes through a temp file +
rename (runstore.atomic), so a table on disk is always whole.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from runstore.atomic import atomic_path, read_cached
from runstore.errors import UserError, describe

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
    "failures": ("model", "stage", "reason"),
    "changes": ("model", "reference", "comparison", "side", "band", "level", "task", "diff", "ci_low", "ci_high",
                "p", "q", "n_items"),
}


class TableError(UserError):
    """A table that breaks its contract (missing columns)."""


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
    existing = read_cached(Path(tables_dir) / f"{name}.parquet", pl.read_parquet)  # the run rebuilds every part
    if existing is not None and column in existing.columns:
        frame = pl.concat([existing.filter(pl.col(column) != value), frame], how="diagonal_relaxed")
    return write_table(tables_dir, name, frame)


def read_table(tables_dir: Path, name: str) -> pl.DataFrame | None:
    """Table `name` of a run, None when it was not written; a file that cannot be read is a `TableError`."""
    path = Path(tables_dir) / f"{name}.parquet"
    if not path.is_file():
        return None
    try:
        return pl.read_parquet(path)
    except Exception as error:  # noqa: BLE001 - polars/pyarrow/OS errors alike: name the file, not the library
        raise TableError(f"{path}: cannot read this table ({describe(error)}); run the pipeline again to rewrite "
                         f"it") from None
