"""Paired merge-vs-parent tests on probes' test items: the internals side of evaluation.paired.

Per task, the score is the macro-F1 of the probe's test predictions (Pearson for regression) at every layer,
averaged over layers (probing.stage.internals_scores); per phenomenon, the mean over its tasks, resampled within
each task (stratified). The bootstrap itself is evaluation.paired's, shared with behaviour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import polars as pl
import torch

from evaluation.paired import RESAMPLES, Difference, comparisons, paired_bootstrap, paired_frame
from probing.probes import macro_f1, weighted_pearson

if TYPE_CHECKING:
    from merging.merge import MergeLineage


def probe_score(items: pl.DataFrame, regression: bool) -> Callable[[np.ndarray], np.ndarray]:
    """counts [B, n] -> [B] layer-mean headline score of one model's test predictions on one task (over the layers
    the frame holds), with items in item_id order (probing.probes computes the same score without counts)."""
    wide = items.pivot(on="layer", index="item_id", values="prediction", sort_columns=True).sort("item_id")
    labels = items.group_by("item_id").agg(pl.col("label").first()).sort("item_id")["label"].to_numpy()
    pred = wide.drop("item_id").to_numpy().T  # [L, n]
    if regression:
        true, prediction = torch.from_numpy(labels.astype(np.float64)), torch.from_numpy(pred.astype(np.float64))
        return lambda counts: weighted_pearson(prediction, true, torch.from_numpy(counts)).mean(-1).numpy()
    true, prediction = torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(pred.astype(np.int64))
    classes = int(max(true.max(), prediction.max())) + 1
    return lambda counts: macro_f1(prediction, true, classes, torch.from_numpy(counts)).mean(-1).numpy()


def probe_paired_tests(probe_items: pl.DataFrame, probes: pl.DataFrame, lineages: Sequence[MergeLineage],
                       seed: int = 0, resamples: int = RESAMPLES) -> pl.DataFrame:
    """Paired tests on probes' test items, per task (level task) and per phenomenon (level group), in
    probing.stage.internals_scores' keys.

    `probe_items`: model, task, layer, item_id (str), label, prediction (f64). `probes` gives each task's
    phenomenon and whether it is a regression (its headline metric is Pearson).
    """
    info = probes.filter(pl.col("metric").is_in(["macro_f1", "pearson"])).group_by("task").agg(
        pl.col("phenomenon").first(), (pl.col("metric").first() == "pearson").alias("regression"))
    tasks = {r["task"]: r for r in info.iter_rows(named=True)}
    by_model_task = probe_items.partition_by("model", "task", as_dict=True)
    rows = []
    for merge, parent in comparisons(lineages):
        per_task: dict[str, tuple[Difference, int]] = {}
        for task in sorted(tasks):
            if (merge, task) not in by_model_task or (parent, task) not in by_model_task:
                continue
            ours, theirs = by_model_task[(merge, task)], by_model_task[(parent, task)]
            common = ours.join(theirs, on=["layer", "item_id"], how="semi").select("item_id").unique()
            ours, theirs = (f.join(common, on="item_id", how="semi") for f in (ours, theirs))
            if common.height == 0:
                continue
            score_m, score_p = (probe_score(f, tasks[task]["regression"]) for f in (ours, theirs))
            per_task[task] = (lambda c, m=score_m, p=score_p: m(c) - p(c)), common.height
            rows.append({"model": merge, "parent": parent, "task": task, "level": "task",
                         **paired_bootstrap([per_task[task][0]], [common.height], seed, resamples)})
        phenomena = sorted({tasks[t]["phenomenon"] for t in tasks})
        for phenomenon in phenomena:
            members = [t for t in sorted(tasks) if tasks[t]["phenomenon"] == phenomenon]
            if members and all(t in per_task for t in members):
                rows.append({"model": merge, "parent": parent, "task": phenomenon, "level": "group",
                             **paired_bootstrap([per_task[t][0] for t in members], [per_task[t][1] for t in members],
                                                seed, resamples)})
    return paired_frame(rows, {"task": pl.String, "level": pl.String})
