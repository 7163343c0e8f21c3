"""`merge-eval probes RUN_DIR [--task T] [--model M]`: per-layer probe curves in the terminal (rich tables)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from rich.console import Console
from rich.table import Table

from runstore.errors import UserError
from runstore.tables import read_table

BARS = " ▁▂▃▄▅▆▇█"


class ProbesError(UserError):
    """RUN_DIR has no probes table, or the task/model asked for is not in it."""


def sparkline(values: list[float], low: float = 0.0, high: float = 1.0) -> str:
    span = (high - low) or 1.0
    return "".join(BARS[max(0, min(len(BARS) - 1, round((v - low) / span * (len(BARS) - 1))))] for v in values)


def curves(probes: pl.DataFrame) -> pl.DataFrame:
    """Per (model, task, layer): headline metric mean over seeds, control mean, selectivity mean, and the dev score
    mean (`dev`, null where probes recorded none)."""
    headline = probes.filter(pl.col("metric").is_in(["macro_f1", "pearson"]))
    dev = pl.col("dev_value") if "dev_value" in headline.columns else pl.lit(None, pl.Float64)
    return headline.with_columns(dev.alias("dev")).group_by("model", "task", "metric", "layer").agg(
        pl.col("value").mean(), pl.col("control_value").mean(), pl.col("selectivity").mean(),
        pl.col("stderr").mean(), pl.col("dev").mean()).sort("model", "task", "layer")


def best_layer() -> pl.Expr:
    """Within one curve's layers: the index of the best layer, chosen on dev where the probes recorded dev scores
    (so its test score is not selected on itself), else on test (optimistic: older runs)."""
    return pl.when(pl.col("dev").is_not_null().any()).then(pl.col("dev").fill_null(-float("inf")).arg_max()) \
        .otherwise(pl.col("value").arg_max())


def summary(curve: pl.DataFrame) -> pl.DataFrame:
    """Per (model, task): best layer (chosen on dev) and its test score, last-layer score, selectivity at both, the
    curve itself."""
    return curve.group_by("model", "task", "metric", maintain_order=True).agg(
        pl.col("layer").get(best_layer()).alias("best_layer"),
        pl.col("value").get(best_layer()).alias("best"),
        pl.col("selectivity").get(best_layer()).alias("best_selectivity"),
        pl.col("value").last().alias("last"), pl.col("selectivity").last().alias("last_selectivity"),
        pl.col("value").alias("curve"))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _summary_table(rows: pl.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for column in ("model", "task", "metric", "best layer", "best", "sel@best", "last", "sel@last", "curve"):
        table.add_column(column, justify="left" if column in ("model", "task", "metric", "curve") else "right")
    for r in rows.iter_rows(named=True):
        table.add_row(r["model"], r["task"], r["metric"], str(r["best_layer"]), _fmt(r["best"]),
                      _fmt(r["best_selectivity"]), _fmt(r["last"]), _fmt(r["last_selectivity"]), sparkline(r["curve"]))
    return table


def _layer_table(curve: pl.DataFrame, model: str, task: str) -> Table:
    table = Table(title=f"{task} on {model}: per layer (0 = embeddings; mean over seeds)")
    for column in ("layer", "value", "± stderr", "control", "selectivity", ""):
        table.add_column(column, justify="right" if column else "left")
    for r in curve.iter_rows(named=True):
        table.add_row(str(r["layer"]), _fmt(r["value"]), _fmt(r["stderr"]), _fmt(r["control_value"]),
                      _fmt(r["selectivity"]), "█" * round(20 * max(0.0, r["value"])))
    return table


def show_probes(run_dir: Path, task: str | None = None, model: str | None = None,
                console: Console | None = None) -> None:
    console = console or Console()
    probes = read_table(Path(run_dir) / "tables", "probes")
    if probes is None:
        raise ProbesError(f"{run_dir}: no tables/probes.parquet (run `merge-eval run` first)")
    for name, value in (("task", task), ("model", model)):
        if value is not None and value not in probes[name].unique().to_list():
            known = ", ".join(sorted(probes[name].unique().to_list()))
            raise ProbesError(f"--{name} {value!r} is not in {run_dir}/tables/probes.parquet; known: {known}")
    if task is None and model is None:
        tasks = probes.group_by("task", "phenomenon", "probe_type").agg(
            pl.col("n_train").first(), pl.col("n_test").first(), pl.col("layer").n_unique().alias("layers"),
            pl.col("model").n_unique().alias("models")).sort("phenomenon", "task")
        table = Table(title=f"probing tasks in {run_dir}")
        for column in tasks.columns:  # task names whole (they are what --task takes), the others may wrap
            table.add_column(column, no_wrap=column == "task",
                             min_width=tasks["task"].str.len_chars().max() if column == "task" else None)
        for row in tasks.iter_rows():
            table.add_row(*map(str, row))
        console.print(table)
        console.print("models: " + ", ".join(sorted(probes["model"].unique().to_list())))
        console.print("inspect one: merge-eval probes RUN_DIR --task T [--model M]")
        return
    if task is not None:
        probes = probes.filter(pl.col("task") == task)
    if model is not None:
        probes = probes.filter(pl.col("model") == model)
    curve = curves(probes)
    if task is not None and model is not None:
        console.print(_layer_table(curve, model, task))
    console.print(_summary_table(summary(curve), "best layer, last layer and selectivity (task − control)"))
