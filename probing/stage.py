"""The probing stage for one model: probe all layers of every task from the capture store, return probes.parquet rows.

`probe_jobs` says what the per-model capture step must store for probing (every probing layer of every task,
pooled, float32); `probe_model` reads only the store, so probing never loads a model.

Also turns probes.parquet into the per-(model, task) and per-(model, phenomenon) scores that the merge-outcome
logic (evaluation.outcomes) compares against the parents. The internals score of a task is the macro-F1 (Pearson
for regression) averaged over all layers: it uses every layer without selecting one on the test split. Its stderr
is the mean of the per-layer bootstrap stderrs, an upper bound on the stderr of the layer mean (layers share the
test items, so their errors correlate positively); a phenomenon's score is the mean of its tasks.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import torch

from evaluation.minimal_pairs import PairSelection
from probing.capture import DEFAULT_BATCH_TOKENS, HookRequest, Pool, TextLogLik, probe_inputs, task_features
from probing.holmes import PHENOMENA_FILE, UNKNOWN, HolmesError, ProbingTask, Span, find_tasks, unknown_datasets
from probing.hooks import LOGITS_HOOK, layer_hooks
from probing.minimal_pair_tasks import minimal_pair_tasks
from probing.probes import Split, control_labels, online_codelength, probe_classification, probe_regression, standardise
from probing.store import CaptureJob, CaptureKey, CaptureStore, ModelRef
from runstore.atomic import read_cached
from runstore.cache import cache_key, record
from runstore.tables import write_parquet

PROBE_VERSION = "3"  # 2: per-item test predictions (probe_items) cached beside the rows; 3: dev_value


class ProbeTables(NamedTuple):
    """A probing result: `rows` for probes.parquet, `items` (per layer and test item: label, prediction) for
    probe_items.parquet, which the paired merge-vs-parent tests resample."""

    rows: pl.DataFrame
    items: pl.DataFrame


def load_tasks(data: str | None, names: list[str] | None = None, minimal_pairs: tuple[PairSelection, ...] = (),
               warn: Callable[[str], None] = logging.getLogger(__name__).warning) -> list[ProbingTask]:
    """Every probing task of a run: the minimal-pair paradigms (`minimal_pairs`), then the datasets of `data`, a
    folder of Holmes/FlashHolmes datasets (`names`: some of them). Tasks with no known phenomenon are reported
    once, in one `warn` line (the flow passes its run logger)."""
    tasks = minimal_pair_tasks(minimal_pairs) + (find_tasks(Path(data).expanduser(), names) if data else [])
    clashes = [name for name, count in Counter(t.name for t in tasks).items() if count > 1]
    if clashes:
        raise HolmesError(f"{data}: dataset {clashes[0]!r} has the name of a minimal-pair paradigm's task; rename "
                          "the dataset folder or give the minimal-pair source another name")
    unknown = unknown_datasets(tasks)
    if unknown:
        warn(f"{len(unknown)} probing dataset(s) with no known phenomenon (not in {PHENOMENA_FILE.name}; scored "
             f"as the group {UNKNOWN!r}): {', '.join(unknown)}")
    return tasks


def control_keys(task: ProbingTask) -> list[str]:
    """Hewitt & Liang units: the word types of span inputs, the whole item for sentence inputs."""
    return ["\x1f".join(e.text.lower() if isinstance(e, Span) else e for e in inputs) for inputs in task.inputs]


def test_items(task: ProbingTask, split: Split, test_pred: np.ndarray) -> pl.DataFrame:
    """The task probe's prediction for every (layer, test item), with the item's id and gold label."""
    test = np.flatnonzero(split.test)
    layers = test_pred.shape[0]
    return pl.DataFrame({
        "task": task.name, "layer": np.repeat(np.arange(layers), len(test)),
        "item_id": np.tile(np.asarray(task.ids, dtype=object)[test], layers).astype(str),
        "label": np.tile(task.labels[test].astype(np.float64), layers),
        "prediction": np.asarray(test_pred, dtype=np.float64).reshape(-1)})


def probe_task(features: torch.Tensor, task: ProbingTask, seeds: list[int], controls: bool,
               mdl: bool) -> ProbeTables:
    """Rows (layer, metric, seed, value, control_value, selectivity, stderr, ...) for one task's features, and
    the task probe's per-item test predictions."""
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
    nan = np.full(x.shape[0], np.nan)
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
                "chosen_c": scores.chosen_c, "dev_value": scores.dev.get(metric, nan)}))
    rows = pl.concat(frames).with_columns(
        pl.lit(task.name).alias("task"), pl.lit(task.phenomenon).alias("phenomenon"),
        pl.lit(task.probe_type).alias("probe_type"), pl.lit(int(split.train.sum())).alias("n_train"),
        pl.lit(int(split.test.sum())).alias("n_test"), pl.lit(x.shape[0]).alias("n_layers"),
        pl.col("control_value").fill_nan(None), pl.col("selectivity").fill_nan(None),
        pl.col("stderr").fill_nan(None), pl.col("dev_value").fill_nan(None))
    return ProbeTables(rows, test_items(task, split, scores.test_pred))


LOGLIK_REQUEST = HookRequest(LOGITS_HOOK, TextLogLik())


def probe_jobs(tasks: list[ProbingTask], n_blocks: int, pooling: str = "mean", max_length: int = 128,
               batch_tokens: int = DEFAULT_BATCH_TOKENS) -> list[CaptureJob]:
    """Per task: every probing layer (embeddings + each block's residual), pooled per request, float32; for a task
    whose sentences lm-eval also scores (minimal pairs), their log-likelihoods from the same forward pass."""
    layers = tuple(HookRequest(hook, Pool()) for hook in layer_hooks(n_blocks))
    return [CaptureJob(probe_inputs(task, pooling, max_length)[0], layers + ((LOGLIK_REQUEST,) if task.scored else ()),
                       batch_tokens) for task in tasks]


def layer_keys(job: CaptureJob, model_digest: str, precision: str) -> list[CaptureKey]:
    """The store keys of a probe job's pooled layers, in layer order (not its sentence log-likelihoods)."""
    return [job.key(request, model_digest, precision) for request in job.requests if request != LOGLIK_REQUEST]


def scored_sentences(jobs: list[CaptureJob], store: CaptureStore, model_digest: str, precision: str
                     ) -> dict[str, tuple[float, bool]]:
    """Sentence -> (log-likelihood, is_greedy) from the stored passes, as lm-eval's `loglikelihood` answers an
    empty-context request for it (what `evaluation.answered_lm` serves); sentences cut by max_length are left out,
    and so are jobs not yet captured."""
    answers: dict[str, tuple[float, bool]] = {}
    for job in jobs:
        key = job.key(LOGLIK_REQUEST, model_digest, precision)
        if LOGLIK_REQUEST not in job.requests or not store.has(key):
            continue
        values = store.load(key)["value"].double().numpy()
        for request, (loglik, greedy) in zip(job.inputs.requests, values):
            if not np.isnan(loglik):
                answers[request.text] = (float(loglik), bool(greedy))
    return answers


def probe_model(model: ModelRef, tasks: list[ProbingTask], store: CaptureStore, precision: str, seeds: list[int],
                max_length: int = 128, pooling: str = "mean", controls: bool = True, mdl: bool = False,
                log=print) -> ProbeTables:
    """probes.parquet and probe_items.parquet rows for one model from its stored captures; probe results are
    cached beside them by capture keys + probe settings."""
    frames, items, hits = [], [], []
    started = time.perf_counter()
    named = pl.lit(model.name).alias("model")
    for task, job in zip(tasks, probe_jobs(tasks, model.n_blocks, pooling, max_length)):
        keys = layer_keys(job, model.digest, precision)
        stem = store.root.parent / "probes" / cache_key("probes", PROBE_VERSION, [key.digest for key in keys], seeds,
                                                       controls, mdl)
        rows_path, items_path = stem.with_suffix(".parquet"), stem.with_suffix(".items.parquet")
        cached = ProbeTables(read_cached(rows_path, pl.read_parquet), read_cached(items_path, pl.read_parquet))
        hits.append(cached.rows is not None and cached.items is not None)
        if not hits[-1]:
            pooled = torch.stack([store.load(key)["value"].float() for key in keys])
            _, item_index = probe_inputs(task, pooling, max_length)
            cached = probe_task(task_features(pooled, item_index), task, seeds, controls, mdl)
            write_parquet(cached.items, items_path)
            write_parquet(cached.rows, rows_path)
            log(f"{model.name}: probed {task.name} ({cached.rows['layer'].n_unique()} layers)")
        frames.append(cached.rows.with_columns(named))
        items.append(cached.items.with_columns(named))
    record(store.root.parent, "probes", model.name, all(hits), 0.0 if all(hits) else time.perf_counter() - started)
    return ProbeTables(pl.concat(frames, how="diagonal_relaxed"), pl.concat(items))


def headline_metric(probes: pl.DataFrame) -> pl.DataFrame:
    """One metric per task: macro-F1 for classification, Pearson for regression."""
    return probes.filter(pl.col("metric").is_in(["macro_f1", "pearson"]))


def internals_scores(probes: pl.DataFrame) -> pl.DataFrame:
    """Scores for evaluation.outcomes: per (model, task) level=task and per (model, phenomenon) level=group.

    Every mean sums its rows in one fixed order (rows sorted, groups kept in that order): a float sum in another
    order differs in the last bits, and a group_by's output order varies from call to call, so without it the same
    probes table gave outcomes that differed at 1e-16 between runs."""
    ordered = headline_metric(probes).sort("model", "task", "layer", "seed")
    per_layer = ordered.group_by("model", "task", "phenomenon", "layer", maintain_order=True).agg(
        pl.col("value").mean(), pl.col("stderr").mean())
    tasks = per_layer.group_by("model", "task", "phenomenon", maintain_order=True).agg(
        pl.col("value").mean(), pl.col("stderr").mean())
    groups = tasks.group_by("model", "phenomenon", maintain_order=True).agg(
        pl.col("value").mean(), (pl.col("stderr").pow(2).sum().sqrt() / pl.len()).alias("stderr"))
    common = [pl.lit(True).alias("higher_is_better")]
    return pl.concat([
        tasks.select("model", "task", "value", "stderr", *common, pl.lit("task").alias("level")),
        groups.select("model", pl.col("phenomenon").alias("task"), "value", "stderr", *common,
                      pl.lit("group").alias("level")),
    ]).sort("level", "task", "model")
