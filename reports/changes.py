"""What changed, for every model: where it differs from `base` (and each merge from its parents), inside and out.

Every model is compared with the same code, so a defect nobody declared is found exactly as a declared one:
- inside, per layer band (the first, middle and last third of the probed layers) and per task and phenomenon: the
  difference of the probes' headline score (macro-F1 of the test predictions, Pearson for regression) averaged
  over the band's layers, paired over the test items both models' probes predicted (probing.paired.probe_score);
- outside, per task and phenomenon: the difference of the mean per-item behaviour score (for a minimal-pair task,
  whether the good sentence is the likelier one), paired over the items both models answered (behavior_items).
A phenomenon's difference is the mean of its tasks' differences, resampled within each task (stratified); its
tasks are the probing tasks of that phenomenon (probes.parquet), found by name among behaviour tasks outside.
Each difference gets evaluation.paired's bootstrap CI and p; q is Benjamini–Hochberg over all of one model's
tests (every reference, side, band and level), so a model with many tests pays for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
from scipy import stats

from evaluation.paired import RESAMPLES, Difference, mean_difference, paired_bootstrap
from runstore.cache import cache_key, cached_outputs, code_version, content_digest
from runstore.tables import read_table, write_table

BANDS = ("early", "middle", "late")
SIGNIFICANT = 0.05
SCHEMA = {"model": pl.String, "reference": pl.String, "comparison": pl.String, "side": pl.String,
          "band": pl.String, "layers": pl.String, "level": pl.String, "task": pl.String, "diff": pl.Float64,
          "ci_low": pl.Float64, "ci_high": pl.Float64, "p": pl.Float64, "n_items": pl.Int64, "q": pl.Float64,
          "significant": pl.Boolean}
INPUT_TABLES = ("probes", "probe_items", "behavior_items", "outcomes")


def layer_bands(layers: Sequence[int]) -> dict[str, list[int]]:
    """The probed layers (sorted) cut into thirds: early, middle, late (a band may be empty with < 3 layers)."""
    return {name: [int(v) for v in part] for name, part in zip(BANDS, np.array_split(np.sort(np.unique(layers)), 3))
            if len(part)}


def reference_pairs(models: Sequence[str], base: str | None, outcomes: pl.DataFrame | None) -> list[tuple]:
    """(model, reference, comparison): every model but `base` against base, every merge against each parent."""
    pairs = [(m, base, "base") for m in models if base is not None and m != base and base in models]
    if outcomes is not None:
        for merge, *parents in outcomes.select("model", "parent_a", "parent_b").unique().sort("model").iter_rows():
            pairs += [(merge, p, "parent") for p in dict.fromkeys(parents) if p is not None and p in models]
    return pairs


def _phenomena(probes: pl.DataFrame) -> dict[str, list[str]]:
    info = probes.select("task", "phenomenon").unique().sort("task")
    return {p: info.filter(pl.col("phenomenon") == p)["task"].to_list() for p in sorted(set(info["phenomenon"]))}


def _rows(pair: tuple, side: str, band: str | None, layers: str | None, per_task: dict[str, tuple[Difference, int]],
          phenomena: dict[str, list[str]], seed: int, resamples: int) -> list[dict]:
    """The tests of one (model, reference, side, band): each task, then each phenomenon whose tasks all have one."""
    model, reference, comparison = pair
    common = {"model": model, "reference": reference, "comparison": comparison, "side": side, "band": band,
              "layers": layers}
    rows = [{**common, "level": "task", "task": task, **paired_bootstrap([f], [n], seed, resamples)}
            for task, (f, n) in per_task.items()]
    for phenomenon, tasks in phenomena.items():
        members = [t for t in tasks if t in per_task]
        if members:
            rows.append({**common, "level": "phenomenon", "task": phenomenon, **paired_bootstrap(
                [per_task[t][0] for t in members], [per_task[t][1] for t in members], seed, resamples)})
    return rows


def inside_changes(probe_items: pl.DataFrame, probes: pl.DataFrame, pairs: Sequence[tuple], seed: int = 0,
                   resamples: int = RESAMPLES) -> list[dict]:
    """Per pair, band, task and phenomenon: the probe score difference over the band's layers, paired over items."""
    from probing.paired import probe_score  # torch: only when there are probe items to score

    regression = dict(probes.filter(pl.col("metric").is_in(["macro_f1", "pearson"])).group_by("task").agg(
        (pl.col("metric").first() == "pearson")).iter_rows())
    bands = layer_bands(probe_items["layer"].unique().to_list())
    phenomena = _phenomena(probes)
    by_model_task = probe_items.partition_by("model", "task", as_dict=True)
    rows = []
    for pair in pairs:
        for band, layers in bands.items():
            per_task = {}
            for task in sorted(regression):
                ours, theirs = by_model_task.get((pair[0], task)), by_model_task.get((pair[1], task))
                if ours is None or theirs is None:
                    continue
                ours, theirs = (f.filter(pl.col("layer").is_in(layers)) for f in (ours, theirs))
                common = ours.join(theirs, on=["layer", "item_id"], how="semi").select("item_id").unique()
                if common.height == 0:
                    continue
                score_m, score_r = (probe_score(f.join(common, on="item_id", how="semi"), regression[task])
                                    for f in (ours, theirs))
                per_task[task] = (lambda c, m=score_m, r=score_r: m(c) - r(c)), common.height
            rows += _rows(pair, "inside", band, f"{layers[0]}–{layers[-1]}", per_task, phenomena, seed, resamples)
    return rows


def outside_changes(behavior_items: pl.DataFrame, probes: pl.DataFrame | None, pairs: Sequence[tuple],
                    seed: int = 0, resamples: int = RESAMPLES) -> list[dict]:
    """Per pair, task (and phenomenon, for tasks that probes name): the mean item score difference, paired over
    the items (docs) both models answered; one metric per task (`acc` where the task has it)."""
    metric = behavior_items.group_by("task").agg(
        pl.when((pl.col("metric") == "acc").any()).then(pl.lit("acc")).otherwise(pl.col("metric").min())
        .alias("chosen"))
    items = behavior_items.join(metric, on="task").filter(pl.col("metric") == pl.col("chosen")).select(
        "model", "task", pl.col("doc_id").cast(pl.String), pl.col("value").cast(pl.Float64))
    by_model = items.partition_by("model", as_dict=True)
    phenomena = _phenomena(probes) if probes is not None else {}
    rows = []
    for pair in pairs:
        if (pair[0],) not in by_model or (pair[1],) not in by_model:
            continue
        both = by_model[(pair[0],)].join(by_model[(pair[1],)], on=["task", "doc_id"], suffix="_ref").filter(
            pl.col("value").is_not_null() & pl.col("value_ref").is_not_null()).sort("task", "doc_id")
        per_task = {task: (mean_difference(block["value"].to_numpy(), block["value_ref"].to_numpy()), block.height)
                    for (task,), block in sorted(both.partition_by("task", as_dict=True).items())}
        rows += _rows(pair, "outside", None, None, per_task, phenomena, seed, resamples)
    return rows


def with_model_q(frame: pl.DataFrame) -> pl.DataFrame:
    """Benjamini–Hochberg q over each model's tests, and whether q < SIGNIFICANT."""
    parts = []
    for block in frame.partition_by("model", maintain_order=True):
        q = stats.false_discovery_control(block["p"].to_numpy(), method="bh")
        parts.append(block.with_columns(pl.Series("q", q), pl.Series("significant", q < SIGNIFICANT)))
    return pl.concat(parts) if parts else frame.with_columns(pl.lit(None, pl.Float64).alias("q"),
                                                             pl.lit(None, pl.Boolean).alias("significant"))


def changes(tables: dict[str, pl.DataFrame | None], base: str | None, seed: int = 0,
            resamples: int = RESAMPLES) -> pl.DataFrame:
    """changes.parquet rows from the run's tables (a side whose item table is missing has no rows)."""
    probes, probe_items, behavior_items, outcomes = (tables.get(n) for n in INPUT_TABLES)
    models = sorted(set().union(*[set(t["model"]) for t in (probe_items, behavior_items) if t is not None]))
    pairs = reference_pairs(models, base, outcomes)
    rows = []
    if probe_items is not None and probes is not None:
        rows += inside_changes(probe_items, probes, pairs, seed, resamples)
    if behavior_items is not None:
        rows += outside_changes(behavior_items, probes, pairs, seed, resamples)
    frame = pl.DataFrame(rows, schema={k: v for k, v in SCHEMA.items() if k not in ("q", "significant")})
    return with_model_q(frame).select(*SCHEMA).sort("model", "comparison", "reference", "side", "band", "level",
                                                    "task", nulls_last=True)


def changes_run(tables_dir: Path, base: str | None, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Read the run's tables from `tables_dir`, write changes.parquet beside them (cached on their content)."""
    from evaluation import paired
    from probing import paired as probe_paired

    inputs = [p for p in (Path(tables_dir) / f"{name}.parquet" for name in INPUT_TABLES) if p.is_file()]
    key = cache_key("changes", code_version(__file__, paired.__file__, probe_paired.__file__),
                    content_digest(inputs), base, seed)
    target = Path(tables_dir) / "changes.parquet"

    def make() -> None:
        write_table(tables_dir, "changes", changes({n: read_table(tables_dir, n) for n in INPUT_TABLES}, base, seed))

    cached_outputs(cache_dir, "changes", key, [target], make)
    return target
