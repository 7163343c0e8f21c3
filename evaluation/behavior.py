"""The behaviour stage: lm-eval scores for one model, cached by content, turned into tidy rows.

lm-eval runs in-process on the model `merging.checkpoints.load_model` loads, so behaviour sees the config's one
precision (the seed paper scored behaviour in 4-bit but probed internals in full precision). Batch size and
seeds are fixed by the config because lm-eval's scores depend on them. Metric names and `higher_is_better` come
from lm-eval's result, never from a list here: every metric lm-eval reports becomes a row (IFEval has no `acc`).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Sequence

import polars as pl

from evaluation.minimal_pairs import TEMPLATE_DIR, PairSelection, write_task_folder
from evaluation.outcomes import metric_key
from evaluation.suites import get_suite, task_manager
from merging.checkpoints import LoadOptions, content_digest, load_model
from runstore.atomic import atomic_write_text, read_cached
from runstore.cache import cache_key, content_digest as files_digest, record

CACHE_SUBDIR = "behavior"
BEHAVIOR_VERSION = "2"  # 2: results carry lm-eval's per-item samples (older entries, without them, are misses)
BEHAVIOR_SCHEMA = {"model": pl.String, "suite": pl.String, "task": pl.String, "group": pl.String,
                   "level": pl.String, "metric": pl.String, "filter": pl.String, "value": pl.Float64,
                   "stderr": pl.Float64, "n": pl.Int64, "higher_is_better": pl.Boolean}
ITEMS_SCHEMA = {"model": pl.String, "task": pl.String, "doc_id": pl.Int64, "filter": pl.String, "metric": pl.String,
                "value": pl.Float64}


@dataclass(frozen=True)
class BehaviorSettings:
    """Everything besides the weights that a behaviour score depends on (the cache key's other half)."""

    suites: tuple[str, ...] = ("offline",)
    batch_size: int = 16
    precision: str = "float32"
    device: str = "cpu"
    limit: int | None = None
    seed: int = 0
    minimal_pairs: tuple[PairSelection, ...] = ()  # minimal-pair sources, each scored as an lm-eval group

    def cache_key(self, model_digest: str) -> str:
        # minimal pairs enter by content (every selected paradigm's digest, the task template), not by folder path
        settings = asdict(self) | {"minimal_pairs": [
            (s.source, [p.digest for p in s.read()]) for s in self.minimal_pairs]}
        return cache_key("behavior", BEHAVIOR_VERSION, model_digest, settings, version("lm_eval"),
                         {name: get_suite(name).digest() for name in self.suites},
                         files_digest(sorted(TEMPLATE_DIR.glob("*.*")), TEMPLATE_DIR) if self.minimal_pairs else None)


def env_report_once() -> None:
    """lm-eval's simple_evaluate adds torch's environment report to every result, and torch builds it by running
    pip, conda and GPU probes in subprocesses (~3 s per model on the shared 2-core machine, bench/bench_behavior.py);
    within one process it cannot change, so the first one is kept for the process's other models."""
    import torch.utils.collect_env as collect_env

    if not hasattr(collect_env.get_pretty_env_info, "cache_info"):
        collect_env.get_pretty_env_info = functools.cache(collect_env.get_pretty_env_info)


def evaluate(model, tokenizer, settings: BehaviorSettings, tasks: Sequence[str] | None = None,
             answers: Mapping[str, tuple[float, bool]] | None = None) -> dict:
    """lm-eval's `simple_evaluate` on an in-memory model; returns its result made JSON-serialisable.

    `tasks` picks tasks or groups inside the settings' suites and minimal-pair sources (default: each whole; a
    source's group is named by the source, its paradigms' task YAMLs are generated into a temporary folder). The
    result keeps lm-eval's logged samples (`samples`: task -> per-item records, as its CLI's --log_samples writes
    them), the per-item scores that paired merge-vs-parent tests need (`sample_items`). `answers`: sentence ->
    lm-eval's log-likelihood answer, already computed by the capture pass (`evaluation.answered_lm`); the result
    records how many requests they answered (`merge_eval_answered`).
    """
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from evaluation.answered_lm import AnsweredHFLM

    env_report_once()
    lm = AnsweredHFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, answers=answers or {})
    _follow_tqdm_switch(lm)
    _git_hash_without_git()
    with lm_eval_tasks(settings) as (names, manager):
        # The seeds lm-eval's CLI uses by default (0, 1234, 1234, 1234), shifted by the config's seed.
        result = simple_evaluate(
            model=lm, tasks=list(tasks or names), task_manager=manager, limit=settings.limit,
            log_samples=True, random_seed=settings.seed, numpy_random_seed=1234 + settings.seed,
            torch_random_seed=1234 + settings.seed, fewshot_random_seed=1234 + settings.seed)
    result["merge_eval_answered"] = lm.answered
    return json.loads(json.dumps(result, default=handle_non_serializable))


@contextmanager
def lm_eval_tasks(settings: BehaviorSettings) -> Iterator[tuple[list[str], object]]:
    """(task and group names, lm-eval TaskManager) of the settings' suites and minimal-pair sources, whose task
    YAMLs live in a temporary folder while the block runs (scoring, and flows.plan sizing the requests)."""
    suites = [get_suite(name) for name in settings.suites]
    with tempfile.TemporaryDirectory(prefix="merge-eval-pairs-") as pair_dir:
        paradigms = [p for selection in settings.minimal_pairs for p in selection.read()]
        groups = write_task_folder(paradigms, {s.source: s.pairs for s in settings.minimal_pairs}, Path(pair_dir))
        yield [t for s in suites for t in s.tasks] + groups, task_manager(suites, [pair_dir] if groups else [])


# lm-eval's request types; each HFLM method takes lm-eval's own `disable_tqdm`.
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def _follow_tqdm_switch(lm) -> None:
    """lm-eval calls its request loops with `disable_tqdm=False`, which overrides tqdm's own off switch
    (TQDM_DISABLE, set by a quiet `merge-eval run`: flows.console); hand the switch to lm-eval's parameter."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes"):
        for name in REQUEST_TYPES:
            setattr(lm, name, partial(getattr(lm, name), disable_tqdm=True))


def _git_hash_without_git() -> None:
    """lm-eval records `git describe` of the working directory (not this project's revision: config.yaml's
    provenance has that) by running git, which prints "fatal: not a git repository" once per scored model outside
    a checkout, with no switch to stop it. lm-eval's own fallback records the folder's commit from its .git
    files instead, silently."""
    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    lm_eval.evaluator.get_git_commit_hash = lambda: get_commit_from_path(os.getcwd())


def _cache_entry(folder: Path, settings: BehaviorSettings, cache_dir: Path) -> Path:
    return Path(cache_dir) / CACHE_SUBDIR / f"{settings.cache_key(content_digest(folder, cache_dir))}.json"


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def cached_score(folder: Path, settings: BehaviorSettings, cache_dir: Path, name: str | None = None) -> dict | None:
    """The stored result for this checkpoint's content and settings, or None: deciding never loads the model.
    With the model's `name`, a hit is reported to the run's ledger in `cache_dir` (a miss is reported by the caller
    once scored, with the seconds scoring took)."""
    raw = read_cached(_cache_entry(folder, settings, cache_dir), _load_json)
    if name is not None and raw is not None:
        record(cache_dir, "behavior", name, True)
    return raw


def score_model(folder: Path, settings: BehaviorSettings, options: LoadOptions, cache_dir: Path,
                loaded: tuple | None = None, answers: Mapping[str, tuple[float, bool]] | None = None) -> dict:
    """lm-eval's raw result for the checkpoint in `folder`, from `cache_dir` when its content was scored before.

    `loaded` = (model, tokenizer) already loaded from `folder` (the per-model pipeline step loads once for
    behaviour and captures); without it the model is loaded here. `answers`: see `evaluate`. The result carries
    `merge_eval` = {cache_key, wall_seconds, answered} (the wall time of the scoring that made it, and how many
    log-likelihood requests the capture pass answered).
    """
    entry = _cache_entry(folder, settings, cache_dir)
    hit = read_cached(entry, _load_json)
    if hit is not None:
        return hit
    started = time.perf_counter()
    model, tokenizer = loaded if loaded is not None else load_model(folder, options)
    raw = evaluate(model, tokenizer, settings, answers=answers)
    raw["merge_eval"] = {"cache_key": entry.stem, "wall_seconds": round(time.perf_counter() - started, 2),
                         "settings": asdict(settings), "answered": raw.pop("merge_eval_answered")}
    text = json.dumps(raw, indent=1)
    atomic_write_text(entry, text)
    return json.loads(text)  # what a cache hit returns, to the type (tuples become lists)


def without_samples(raw: dict) -> dict:
    """The raw result without its per-item samples: what is kept as JSON beside the tables (the samples, large,
    live in the behavior_items table)."""
    return {key: value for key, value in raw.items() if key != "samples"}


def _item_value(value: object) -> float | None:
    """A per-sample metric value as a number: bools (lm-eval's is_greedy) count 0/1; other types (bleu's
    (reference, prediction) pairs) are not per-item scores whose mean is the metric, so they give None."""
    return float(value) if isinstance(value, (bool, int, float)) else None


def sample_items(raw: dict, model: str) -> pl.DataFrame:
    """behavior_items rows: one per (task, doc_id, filter, metric) in lm-eval's logged samples, numeric values."""
    rows = [{"model": model, "task": task, "doc_id": sample["doc_id"], "filter": sample["filter"], "metric": metric,
             "value": _item_value(sample.get(metric))}
            for task, samples in raw.get("samples", {}).items() for sample in samples for metric in sample["metrics"]]
    return pl.DataFrame(rows, schema=ITEMS_SCHEMA).filter(pl.col("value").is_not_null())


def outcome_items(behavior: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Per-item scores in evaluation.paired.behavior_paired_tests' shape (model, task, level, metric, item,
    value, higher_is_better), for every behaviour row whose value is the mean of its items: a task's metric over
    its docs, and a group's over all its tasks' docs (lm-eval's weight_by_size mean). A row whose value is not
    that mean (another aggregation) gets no items, and its outcome falls back to stderr bands."""
    keyed = items.with_columns(metric_key().alias("metric")).select(
        "model", "task", "metric", pl.col("doc_id").cast(pl.String).alias("doc"), "value")
    rows = outcome_scores(behavior)
    parent = dict(behavior.select("task", "group").unique().drop_nulls().iter_rows())
    ancestry = [(task, ancestor) for task in keyed["task"].unique() for ancestor in _ancestors(task, parent)]
    leaves = pl.DataFrame(ancestry, schema={"task": pl.String, "group_name": pl.String}, orient="row")
    per_level = pl.concat([
        keyed.select("model", "task", "metric", pl.lit("task").alias("level"), pl.col("doc").alias("item"),
                     "value"),
        keyed.join(leaves, on="task").select("model", pl.col("group_name").alias("task"), "metric",
                                             pl.lit("group").alias("level"),
                                             pl.concat_str("task", "doc", separator="/").alias("item"), "value"),
    ])
    means = per_level.group_by("model", "task", "level", "metric").agg(pl.col("value").mean().alias("item_mean"))
    exact = rows.join(means, on=["model", "task", "level", "metric"]).filter(
        (pl.col("value") - pl.col("item_mean")).abs() <= 1e-9).select("model", "task", "level", "metric",
                                                                      "higher_is_better")
    return per_level.join(exact, on=["model", "task", "level", "metric"])


def _ancestors(task: str, parent: dict[str, str]) -> list[str]:
    chain = []
    while task in parent:
        task = parent[task]
        chain.append(task)
    return chain


def _number(value: object) -> float | None:
    """lm-eval writes 'N/A' for a stderr it could not compute: that is a missing number, not a string."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _leaves(name: str, children: dict[str, list[str]]) -> list[str]:
    return [leaf for c in children[name] for leaf in _leaves(c, children)] if name in children else [name]


def tidy(raw: dict, model: str) -> pl.DataFrame:
    """One row per (task or group, metric, filter) in lm-eval's result: the `behavior` table's rows.

    `group` is the task's parent group (null at the top); `level` says whether the row is a task or a group
    aggregate; `n` is the number of scored items (summed over leaf tasks for a group).
    """
    children = raw.get("group_subtasks", {})
    parent = {child: group for group, subs in children.items() for child in subs}
    suite_of = {}
    settings = raw.get("merge_eval", {}).get("settings", {})
    for suite in settings.get("suites", ()):
        for top in get_suite(suite).tasks:
            suite_of |= {name: suite for name in _family(top, children)}
    for selection in settings.get("minimal_pairs", ()):  # a minimal-pair source's suite is its name
        suite_of |= {name: selection["source"] for name in _family(selection["source"], children)}
    samples = raw.get("n-samples", {})
    rows = []
    for name, metrics in raw["results"].items():
        hib = _higher_is_better(name, raw.get("higher_is_better", {}), children)
        n = sum(samples.get(leaf, {}).get("effective", 0) for leaf in _leaves(name, children))
        for key, value in metrics.items():
            if "," not in key or key.split(",")[0].endswith("_stderr"):
                continue  # alias/name/sample_len/sample_count bookkeeping, or the stderr of another row
            metric, filter_ = key.split(",", 1)
            rows.append({"model": model, "suite": suite_of.get(name), "task": name, "group": parent.get(name),
                         "level": "group" if name in children else "task", "metric": metric, "filter": filter_,
                         "value": _number(value), "stderr": _number(metrics.get(f"{metric}_stderr,{filter_}")),
                         "n": n, "higher_is_better": hib.get(metric)})
    return pl.DataFrame(rows, schema=BEHAVIOR_SCHEMA)


def _family(name: str, children: dict[str, list[str]]) -> list[str]:
    return [name, *(d for c in children.get(name, ()) for d in _family(c, children))]


def _higher_is_better(name: str, table: dict[str, dict], children: dict[str, list[str]]) -> dict[str, bool]:
    """lm-eval's direction per metric; a group missing one inherits it from its tasks (they agree by design)."""
    found = dict(table.get(name, {}))
    for leaf in _leaves(name, children):
        for metric, direction in table.get(leaf, {}).items():
            found.setdefault(metric, direction)
    return found


def outcome_scores(behavior: pl.DataFrame) -> pl.DataFrame:
    """The behaviour table in `evaluation.outcomes.compute_outcomes`'s input shape (one row per key)."""
    return behavior.select("model", "task", "level", metric_key().alias("metric"), "value", "stderr",
                           "higher_is_better")
