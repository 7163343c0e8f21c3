"""What changed, for every model: where it differs from `base` (and each merge from its parents), inside and out.

Every model is compared with the same code, so a defect nobody declared is found exactly as a declared one:
- inside, per layer band (the first, middle and last third of the probed layers) and per task and phenomenon: the
  difference of the probes' headline score (macro-F1 of the test predictions, Pearson for regression) averaged
  over the band's layers, paired over the test items both models' probes predicted (probing.paired.probe_score);
- outside, per task and phenomenon: the difference of the mean per-item behaviour score (for a minimal-pair task,
  whether the good sentence is the likelier one), paired over the items every model answered (behavior_items).
A phenomenon's difference is the mean of its tasks' differences, resampled within each task (stratified); its
tasks are the probing tasks of that phenomenon (probes.parquet), found by name among behaviour tasks outside.
Each difference gets evaluation.paired's percentile CI and add-one p over resamples of the items; q is Benjamini–Hochberg over all of one model's
tests (every reference, side, band and level), so a model with many tests pays for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
from scipy import stats

from evaluation.paired import RESAMPLES, bootstrap_counts, bootstrap_summary
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


# Per task: each model's score on all of the task's common items and on each bootstrap resample of them ([B]).
# The resamples of a task are drawn once and shared by every model, so a pair's paired difference on a resample is
# the difference of the two models' resampled scores: each model is scored once per task, not once per pair
# (33 pairs of the demo would otherwise score each model ~5x over).
Scores = dict[str, dict[str, tuple[float, np.ndarray]]]  # task -> model -> (score, resampled scores)


def _task_counts(tasks: Sequence[str], sizes: dict[str, int], seed: int, resamples: int) -> dict[str, np.ndarray]:
    """Per task, [resamples, n] item multiplicities from its own stream (strata of a phenomenon are independent)."""
    return {task: bootstrap_counts(sizes[task], resamples, np.random.default_rng([seed, i]))
            for i, task in enumerate(tasks) if task in sizes}


def _rows(pair: tuple, side: str, band: str | None, layers: str | None, scores: Scores,
          phenomena: dict[str, list[str]], sizes: dict[str, int]) -> list[dict]:
    """The tests of one (model, reference, side, band): each task both models have, then each phenomenon whose
    tasks all have one (the mean of the task differences, each resampled within its task)."""
    model, reference, comparison = pair
    common = {"model": model, "reference": reference, "comparison": comparison, "side": side, "band": band,
              "layers": layers}
    diffs = {task: (by_model[model][0] - by_model[reference][0], by_model[model][1] - by_model[reference][1])
             for task, by_model in scores.items() if model in by_model and reference in by_model}
    rows = [{**common, "level": "task", "task": task, **bootstrap_summary(observed, boot, sizes[task])}
            for task, (observed, boot) in diffs.items()]
    for phenomenon, tasks in phenomena.items():
        members = [t for t in tasks if t in diffs]
        if members:
            rows.append({**common, "level": "phenomenon", "task": phenomenon, **bootstrap_summary(
                float(np.mean([diffs[t][0] for t in members])), np.mean([diffs[t][1] for t in members], axis=0),
                sum(sizes[t] for t in members))})
    return rows


def _common_items(frames: dict[str, pl.DataFrame], key: str) -> pl.DataFrame:
    """The item keys every model's frame holds (models are scored on the same items)."""
    common = None
    for frame in frames.values():
        keys = frame.select(key).unique()
        common = keys if common is None else common.join(keys, on=key, how="semi")
    return common.sort(key)


def inside_changes(probe_items: pl.DataFrame, probes: pl.DataFrame, pairs: Sequence[tuple], seed: int = 0,
                   resamples: int = RESAMPLES) -> list[dict]:
    """Per pair, band, task and phenomenon: the probe score difference over the band's layers, paired over items."""
    from probing.paired import probe_score  # torch: only when there are probe items to score

    regression = dict(probes.filter(pl.col("metric").is_in(["macro_f1", "pearson"])).group_by("task").agg(
        (pl.col("metric").first() == "pearson")).iter_rows())
    bands = layer_bands(probe_items["layer"].unique().to_list())
    phenomena = _phenomena(probes)
    compared = {m for pair in pairs for m in pair[:2]}
    tasks = sorted(regression)
    frames = {task: {model: f for (model,), f in block.partition_by("model", as_dict=True).items()
                     if model in compared}
              for (task,), block in probe_items.filter(pl.col("task").is_in(tasks)).partition_by(
                  "task", as_dict=True).items()}
    common = {task: _common_items(by_model, "item_id") for task, by_model in frames.items() if by_model}
    sizes = {task: items.height for task, items in common.items() if items.height}
    counts = _task_counts(tasks, sizes, seed, resamples)
    rows = []
    for band, layers in bands.items():
        scores: Scores = {}
        for task in counts:
            scores[task] = {}
            for model, frame in frames[task].items():
                score = probe_score(frame.filter(pl.col("layer").is_in(layers)).join(common[task], on="item_id",
                                                                                     how="semi"), regression[task])
                scores[task][model] = float(score(np.ones((1, sizes[task])))[0]), score(counts[task])
        for pair in pairs:
            rows += _rows(pair, "inside", band, f"{layers[0]}–{layers[-1]}", scores, phenomena, sizes)
    return rows


def outside_changes(behavior_items: pl.DataFrame, probes: pl.DataFrame | None, pairs: Sequence[tuple],
                    seed: int = 0, resamples: int = RESAMPLES) -> list[dict]:
    """Per pair, task (and phenomenon, for tasks that probes name): the mean item score difference, paired over
    the items (docs) every model answered; one metric per task (`acc` where the task has it)."""
    metric = behavior_items.group_by("task").agg(
        pl.when((pl.col("metric") == "acc").any()).then(pl.lit("acc")).otherwise(pl.col("metric").min())
        .alias("chosen"))
    compared = {m for pair in pairs for m in pair[:2]}
    items = behavior_items.join(metric, on="task").filter(
        (pl.col("metric") == pl.col("chosen")) & pl.col("model").is_in(compared) & pl.col("value").is_not_null()
    ).select("model", "task", pl.col("doc_id").cast(pl.String), pl.col("value").cast(pl.Float64))
    frames = {task: {model: f for (model,), f in block.partition_by("model", as_dict=True).items()}
              for (task,), block in items.partition_by("task", as_dict=True).items()}
    tasks = sorted(frames)
    common = {task: _common_items(frames[task], "doc_id") for task in tasks}
    sizes = {task: found.height for task, found in common.items() if found.height}
    counts = _task_counts(tasks, sizes, seed, resamples)
    scores: Scores = {}
    for task in counts:
        scores[task] = {}
        for model, frame in frames[task].items():
            values = frame.join(common[task], on="doc_id", how="semi").sort("doc_id")["value"].to_numpy()
            scores[task][model] = float(values.mean()), counts[task] @ values / counts[task].sum(-1)
    phenomena = _phenomena(probes) if probes is not None else {}
    return [row for pair in pairs for row in _rows(pair, "outside", None, None, scores, phenomena, sizes)]


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
