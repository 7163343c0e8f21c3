"""The probing stage for one model: capture every task (cached), probe all layers, return probes.parquet rows.

Also turns probes.parquet into the per-(model, task) and per-(model, phenomenon) scores that the merge-outcome
logic (evaluation.outcomes) compares against the parents. The internals score of a task is the macro-F1 (Pearson
for regression) averaged over all layers: it uses every layer without selecting one on the test split. Its stderr
is the mean of the per-layer bootstrap stderrs, an upper bound on the stderr of the layer mean (layers share the
test items, so their errors correlate positively); a phenomenon's score is the mean of its tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch

from merging.checkpoints import LoadOptions, content_digest, load_model
from probing.build_suite import SUITE_DIR
from probing.capture import LayerRunner, cached_capture, capture, capture_key, task_features, task_requests
from probing.holmes import PHENOMENA_FILE, UNKNOWN, ProbingTask, Span, find_tasks, unknown_datasets
from probing.probes import Split, control_labels, online_codelength, probe_classification, probe_regression, standardise
from reports.tables import write_parquet

PROBE_VERSION = "1"


def load_tasks(data: str, names: list[str] | None = None,
               warn: Callable[[str], None] = logging.getLogger(__name__).warning) -> list[ProbingTask]:
    """The config's `probing.data`: "bundled" (probing/suite) or a folder of Holmes/FlashHolmes datasets.
    Datasets with no known phenomenon are reported once, in one `warn` line (the flow passes its run logger)."""
    tasks = find_tasks(SUITE_DIR if data == "bundled" else Path(data).expanduser(), names)
    unknown = unknown_datasets(tasks)
    if unknown:
        warn(f"{len(unknown)} probing dataset(s) with no known phenomenon (not in {PHENOMENA_FILE.name}; scored "
             f"as the group {UNKNOWN!r}): {', '.join(unknown)}")
    return tasks


def control_keys(task: ProbingTask) -> list[str]:
    """Hewitt & Liang units: the word types of span inputs, the whole item for sentence inputs."""
    return ["\x1f".join(e.text.lower() if isinstance(e, Span) else e for e in inputs) for inputs in task.inputs]


def probe_task(features: torch.Tensor, task: ProbingTask, seeds: list[int], controls: bool,
               mdl: bool) -> pl.DataFrame:
    """Rows (layer, metric, seed, value, control_value, selectivity, stderr, ...) for one task's features."""
    split = Split(task.split_mask("train"), task.split_mask("dev"), task.split_mask("test"))
    x = standardise(features, split.train)
    keys = control_keys(task)
    control = np.stack([control_labels(keys, task.labels, seed) for seed in seeds]) if controls else \
        np.zeros((0, len(task.labels)), dtype=task.labels.dtype)
    if task.regression:
        scores = probe_regression(x, task.labels, control, split, seed=seeds[0])
    else:
        scores = probe_classification(x, task.labels, control, split, task.num_labels, seed=seeds[0])
    task_values, control_values, stderr = dict(scores.task), dict(scores.control), dict(scores.stderr)
    if mdl and not task.regression:
        uniform = split.train.sum() * np.log2(task.num_labels)
        task_values["compression"] = uniform / online_codelength(x, task.labels, split.train, task.num_labels,
                                                                 seeds[0])
        stderr["compression"] = np.full(x.shape[0], np.nan)
        control_values["compression"] = np.stack([
            uniform / online_codelength(x, control[i], split.train, task.num_labels, seed)
            for i, seed in enumerate(seeds)]) if controls else np.zeros((0, x.shape[0]))
    frames = []
    layers = np.arange(x.shape[0])
    for metric, values in task_values.items():
        for i, seed in enumerate(seeds):
            ctrl = control_values[metric][i] if controls else np.full(len(layers), np.nan)
            frames.append(pl.DataFrame({
                "layer": layers, "metric": metric, "value": values, "control_value": ctrl,
                "selectivity": values - ctrl, "stderr": stderr[metric], "seed": seed,
                "chosen_c": scores.chosen_c}))
    return pl.concat(frames).with_columns(
        pl.lit(task.name).alias("task"), pl.lit(task.phenomenon).alias("phenomenon"),
        pl.lit(task.probe_type).alias("probe_type"), pl.lit(int(split.train.sum())).alias("n_train"),
        pl.lit(int(split.test.sum())).alias("n_test"), pl.lit(x.shape[0]).alias("n_layers"),
        pl.col("control_value").fill_nan(None), pl.col("selectivity").fill_nan(None),
        pl.col("stderr").fill_nan(None))


def probe_model(model_name: str, model_dir: Path, tasks: list[ProbingTask], options: LoadOptions, cache_dir: Path,
                seeds: list[int], batch_size: int = 32, max_length: int = 128, pooling: str = "mean",
                controls: bool = True, mdl: bool = False, log=print) -> pl.DataFrame:
    """probes.parquet rows for one model. Captures and probe results are cached by content + settings, and the
    model is loaded only when some task's capture is missing."""
    digest = content_digest(model_dir)
    runner = None
    frames = []
    for task in tasks:
        key = capture_key(digest, task, pooling, max_length, options.precision)
        settings = json.dumps([PROBE_VERSION, key, seeds, controls, mdl])
        probe_path = Path(cache_dir) / "probes" / f"{hashlib.sha256(settings.encode()).hexdigest()[:24]}.parquet"
        if probe_path.is_file():
            frames.append(pl.read_parquet(probe_path).with_columns(pl.lit(model_name).alias("model")))
            continue
        requests, item_index = task_requests(task, pooling)

        def compute(requests=requests, task=task):
            nonlocal runner
            if runner is None:
                runner = LayerRunner(*load_model(model_dir, options))
                log(f"{model_name}: capturing through {runner.backend}")
            return capture(runner, requests, batch_size, max_length, progress=f"{model_name} {task.name}")

        pooled = cached_capture(Path(cache_dir) / "captures", key, compute,
                                {"model": model_name, "model_digest": digest, "task": task.name,
                                 "pooling": pooling, "max_length": max_length, "precision": options.precision})
        rows = probe_task(task_features(pooled, item_index), task, seeds, controls, mdl)
        write_parquet(rows, probe_path)
        frames.append(rows.with_columns(pl.lit(model_name).alias("model")))
        log(f"{model_name}: probed {task.name} ({rows['layer'].n_unique()} layers)")
    return pl.concat(frames, how="diagonal_relaxed")


def headline_metric(probes: pl.DataFrame) -> pl.DataFrame:
    """One metric per task: macro-F1 for classification, Pearson for regression."""
    return probes.filter(pl.col("metric").is_in(["macro_f1", "pearson"]))


def internals_scores(probes: pl.DataFrame) -> pl.DataFrame:
    """Scores for evaluation.outcomes: per (model, task) level=task and per (model, phenomenon) level=group."""
    per_layer = headline_metric(probes).group_by("model", "task", "phenomenon", "layer").agg(
        pl.col("value").mean(), pl.col("stderr").mean())
    tasks = per_layer.group_by("model", "task", "phenomenon").agg(pl.col("value").mean(), pl.col("stderr").mean())
    groups = tasks.group_by("model", "phenomenon").agg(
        pl.col("value").mean(), (pl.col("stderr").pow(2).sum().sqrt() / pl.len()).alias("stderr"))
    common = [pl.lit(True).alias("higher_is_better")]
    return pl.concat([
        tasks.select("model", "task", "value", "stderr", *common, pl.lit("task").alias("level")),
        groups.select("model", pl.col("phenomenon").alias("task"), "value", "stderr", *common,
                      pl.lit("group").alias("level")),
    ]).sort("level", "task", "model")
