"""The `merge-eval` Prefect flow: config -> parents -> per model: merge, load step, probing -> cross-model tables.

Stage functions live in the stage packages and know nothing of Prefect; this module only composes them into
tasks, so each stage stays testable on its own. Per-model tasks are submitted to the config's task runner, and a
model that fails is left out of the later stages (flows.orchestration; docs/ORCHESTRATION.md). Expensive stage
results are cached by content inside the run directory, which is what makes an interrupted or extended run resume
instead of recompute.

The per-model step (`model_task`) is the only place a model is loaded: once, and only when its behaviour score or
some capture is missing; it runs every capture the run needs (probe inputs, the unlabeled similarity set) into the
capture store, then scores behaviour, taking the minimal-pair log-likelihoods from the capture pass. Probing and
functional similarity read only that store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from flows import console
from flows.artifacts import artifacts_task
from flows.config import ExperimentConfig, load_config, merge_name
from flows.orchestration import Failure, ModelsFailed, failures_frame, gather, gpu_claim, retry_options, task_runner
from merging import checkpoints
from merging.checkpoints import LoadOptions, resolve_source
from merging.merge import MergeLineage, merge
from merging.preflight import cached_preflight
from probing.similarity.weights import cached_weight_features
from probing.store import CaptureJob, CaptureStore, ModelRef, model_ref
from runstore.atomic import atomic_write_text
from runstore.cache import record
from runstore.run_dir import RunDir
from runstore.tables import read_table, replace_rows, write_table


def merge_lineages(config: ExperimentConfig) -> list[MergeLineage]:
    return [MergeLineage(model=merge_name(group, spec.suffix), method=spec.method, parents=tuple(group),
                         base=config.base, parameters=dict(spec.parameters))
            for group, spec in config.merge_specs()]


def load_options(config: ExperimentConfig) -> LoadOptions:
    return LoadOptions(precision=config.precision, device=config.device,
                       trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)


@task(name="resolve-parents", cache_policy=NO_CACHE)
def resolve_parents(config: ExperimentConfig, run: RunDir) -> dict[str, Path]:
    logger = get_run_logger()
    paths = {}
    for spec in config.models:
        paths[spec.name] = resolve_source(spec.source, spec.revision, config.allow_pickle)
        run.link_parent(spec.name, paths[spec.name])
        logger.info("parent %s -> %s", spec.name, paths[spec.name])
    return paths


@task(name="merge", cache_policy=NO_CACHE, task_run_name="merge {lineage.model}")
def merge_task(lineage: MergeLineage, parents: dict[str, Path], run: RunDir, config: ExperimentConfig) -> Path:
    out = run.model_dir(lineage.model)
    manifest = merge(lineage, parents, out, seed=config.seed, dtype=config.precision,
                     trust_remote_code=config.trust_remote_code, cache_dir=run.cache)
    get_run_logger().info("merged %s in %.1f s (peak RSS %.0f MB)", lineage.model, manifest["wall_seconds"],
                          manifest["peak_rss_mb"])
    return out


@task(name="preflight", cache_policy=NO_CACHE)
def preflight_task(parents: dict[str, Path], run: RunDir, config: ExperimentConfig) -> list[str]:
    """Fail before any merge is written when the merges' parents cannot be merged meaningfully (a passing check of
    the same parents is remembered in the run's cache)."""
    warnings = cached_preflight(parents, base=config.base, merge_dtype=config.precision, cache_dir=run.cache)
    for line in warnings:
        get_run_logger().warning("preflight: %s", line)
    return warnings


@task(name="weight-features", cache_policy=NO_CACHE)
def weight_features_task(model_dirs: dict[str, Path], run: RunDir, config: ExperimentConfig) -> Path:
    """Streamed weight features of every pair of models into similarity.parquet (rows of other sources kept)."""
    groups = {lineage.model: lineage.parents for lineage in merge_lineages(config) if lineage.model in model_dirs}
    rows, cached = cached_weight_features(model_dirs, config.base, run.cache, groups)
    get_run_logger().info("weight features: %d rows for %d models%s", rows.height, len(model_dirs),
                          " (cached)" if cached else "")
    return replace_rows(run.tables, "similarity", rows, "source", "weights")


def capture_store(run: RunDir) -> CaptureStore:
    return CaptureStore(run.cache / "captures")


def similarity_set(config: ExperimentConfig):
    from probing.similarity.unlabeled import TokenWindows

    return TokenWindows(config.similarity.tokens, config.similarity.window)


def probing_tasks(config: ExperimentConfig, warn=lambda _: None) -> list:
    """Every probing task of the run: the minimal-pair paradigms, then any Holmes datasets (tasks with no known
    phenomenon go to `warn`, once per run: probe_tables_task passes its logger)."""
    from probing.stage import load_tasks

    return load_tasks(config.probing.data, config.probing.tasks, config.pair_selections(), warn=warn)


def capture_jobs(model: ModelRef, config: ExperimentConfig) -> list[CaptureJob]:
    """Everything the run's later stages read from the store for this model."""
    from probing.stage import probe_jobs

    spec = config.probing
    tasks = probing_tasks(config)
    jobs = probe_jobs(tasks, model.n_blocks, spec.pooling, spec.max_length, spec.batch_tokens)
    if config.similarity.functional:
        from probing.similarity.functional import functional_jobs

        jobs += functional_jobs(similarity_set(config), model.n_blocks, config.similarity.top_k)
    return jobs


@task(name="model", cache_policy=NO_CACHE, task_run_name="model {name}")
def model_task(name: str, folder: Path, run: RunDir,
               config: ExperimentConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Captures + behaviour of one model from a single load (none when all are cached): its behavior and
    behavior_items rows; its raw lm-eval JSON, less the per-item samples, kept beside the tables.

    Captures run first: their pass over the minimal-pair sentences also scores them, so lm-eval reads those
    answers (`probing.stage.scored_sentences`) and runs the model only for the other suites' requests."""
    from evaluation.behavior import cached_score, sample_items, score_model, tidy, without_samples
    from probing.hooks import HookRunner
    from probing.stage import scored_sentences
    from probing.store import capture_model

    console.install()  # this task may run in another process (a Dask worker)
    logger = get_run_logger()
    settings, options = behavior_settings(config), load_options(config)
    model, store = model_ref(name, folder, run.cache), capture_store(run)
    jobs = capture_jobs(model, config)
    missing = store.missing(jobs, model, config.precision)
    raw = cached_score(folder, settings, run.cache, name=name)
    if raw is None or missing:
        started = time.perf_counter()  # the one load counts to the first stage that needs it
        loaded = checkpoints.load_model(folder, options)
        if missing:
            capture_model(HookRunner(*loaded), model, missing, store, config.precision, logger.debug)
            logger.info("captures %s: %d input set(s) in %.1f s", name, len(missing), time.perf_counter() - started)
            record(run.cache, "captures", name, False, time.perf_counter() - started)
            started = time.perf_counter()
        if raw is None:
            answers = scored_sentences(jobs, store, model.digest, config.precision)
            raw = score_model(folder, settings, options, run.cache, loaded=loaded, answers=answers)
            logger.info("behaviour %s: scored in %.1f s (%d log-likelihood requests answered by the capture pass)",
                        name, raw["merge_eval"]["wall_seconds"], raw["merge_eval"]["answered"])
            record(run.cache, "behavior", name, False, time.perf_counter() - started)
    atomic_write_text(run.tables.joinpath("behavior_raw", *name.split("/")).with_suffix(".json"),
                      json.dumps(without_samples(raw), indent=1))
    return tidy(raw, name), sample_items(raw, name)


@task(name="probing", cache_policy=NO_CACHE, task_run_name="probing {name}")
def probing_task(name: str, folder: Path, run: RunDir, config: ExperimentConfig):
    """Layerwise probes of one model from the capture store: its probes and probe_items rows (probing.stage
    caches probe results beside the captures, so only new or changed models are probed again)."""
    from probing.stage import probe_model

    spec = config.probing
    tasks = probing_tasks(config)
    get_run_logger().info("probing %s (%d tasks)", name, len(tasks))
    return probe_model(model_ref(name, folder, run.cache), tasks, capture_store(run), config.precision, spec.seeds,
                       spec.max_length, spec.pooling, spec.controls, spec.mdl, log=get_run_logger().debug)


@task(name="probe-tables", cache_policy=NO_CACHE)
def probe_tables_task(results: list, run: RunDir, config: ExperimentConfig) -> Path:
    """probes.parquet and probe_items.parquet from every probed model's rows."""
    probing_tasks(config, warn=get_run_logger().warning)
    write_table(run.tables, "probe_items", pl.concat([r.items for r in results]))
    return write_table(run.tables, "probes", pl.concat([r.rows for r in results], how="diagonal_relaxed"))


@task(name="functional-similarity", cache_policy=NO_CACHE)
def functional_similarity_task(model_dirs: dict[str, Path], run: RunDir, config: ExperimentConfig) -> Path:
    """Activation cosine, CKA, attention cosine and KL of every pair from the store into similarity.parquet."""
    from probing.similarity.functional import cached_functional_features

    models = [model_ref(name, folder, run.cache) for name, folder in model_dirs.items()]
    rows = cached_functional_features(models, similarity_set(config), capture_store(run), config.precision,
                                      config.similarity.top_k)
    get_run_logger().info("functional similarity: %d rows for %d models", rows.height, len(models))
    return replace_rows(run.tables, "similarity", rows, "source", "functional")


@task(name="internals-outcomes", cache_policy=NO_CACHE)
def internals_outcomes_task(lineages: list[MergeLineage], run: RunDir, config: ExperimentConfig) -> Path:
    """Merge vs parents on probe scores (kind=internals) into outcomes.parquet, keeping the rows of other kinds;
    relations decided by paired tests on the probes' test items."""
    import probing.paired
    import probing.stage
    from evaluation.outcomes import cached_outcomes, compute_outcomes
    from probing.paired import probe_paired_tests
    from probing.stage import internals_scores

    def compute() -> pl.DataFrame:
        probes = read_table(run.tables, "probes")
        paired = probe_paired_tests(read_table(run.tables, "probe_items"), probes, lineages, seed=config.seed)
        return compute_outcomes(internals_scores(probes), lineages, kind="internals", paired=paired)

    inputs = [run.tables / "probes.parquet", run.tables / "probe_items.parquet"]
    rows = cached_outcomes(run.cache, "internals", inputs, lineages, config.seed, compute,
                           [probing.stage.__file__, probing.paired.__file__])
    return replace_rows(run.tables, "outcomes", rows, "kind", "internals")


@task(name="correlations", cache_policy=NO_CACHE)
def correlations_task(run: RunDir, config: ExperimentConfig) -> Path:
    """correlations.parquet from the run's tables (reports.correlations)."""
    from reports.correlations import correlate_run

    return correlate_run(run.tables, seed=config.seed, cache_dir=run.cache)


@task(name="changes", cache_policy=NO_CACHE)
def changes_task(run: RunDir, config: ExperimentConfig) -> Path:
    """changes.parquet: where every model differs from base, and every merge from its parents (reports.changes)."""
    from reports.changes import changes_run

    return changes_run(run.tables, config.base, seed=config.seed, cache_dir=run.cache)


def behavior_settings(config: ExperimentConfig):
    from evaluation.behavior import BehaviorSettings

    return BehaviorSettings(suites=tuple(config.behavior.suites), batch_size=config.behavior.batch_size,
                            precision=config.precision, device=load_options(config).torch_device,
                            limit=config.behavior.limit, seed=config.seed,
                            minimal_pairs=config.pair_selections())


@task(name="behavior-tables", cache_policy=NO_CACHE)
def behavior_tables_task(frames: list[tuple[pl.DataFrame, pl.DataFrame]], lineages: list[MergeLineage],
                         run: RunDir, config: ExperimentConfig) -> Path:
    """behavior.parquet and behavior_items.parquet for every model, and merge-vs-parents outcomes
    (kind=behavior) per task and group, decided by paired tests on the items."""
    import evaluation.behavior
    from evaluation.behavior import outcome_items, outcome_scores
    from evaluation.outcomes import cached_outcomes, compute_outcomes
    from evaluation.paired import behavior_paired_tests

    behavior, items = (pl.concat(parts) for parts in zip(*frames))
    inputs = [write_table(run.tables, "behavior", behavior), write_table(run.tables, "behavior_items", items)]
    def compute() -> pl.DataFrame:
        paired = behavior_paired_tests(outcome_items(behavior, items), lineages, seed=config.seed)
        return compute_outcomes(outcome_scores(behavior), lineages, "behavior", paired=paired)

    rows = cached_outcomes(run.cache, "behavior", inputs, lineages, config.seed, compute,
                           [evaluation.behavior.__file__])
    return replace_rows(run.tables, "outcomes", rows, "kind", "behavior")


@task(name="report", cache_policy=NO_CACHE)
def report_task(run: RunDir) -> Path:
    """RUN_DIR/report/index.html from the tables (`merge-eval report RUN_DIR` rewrites it the same way)."""
    from reports.report import write_report

    return write_report(run.root, cache_dir=run.cache)


def comparable(lineages: list[MergeLineage], scored: set[str], view: str,
               failures: list[Failure]) -> list[MergeLineage]:
    """The merges that `view`'s outcomes can compare: the merge and every parent scored; each other merge that
    got this far is recorded as skipped, naming the parent that failed."""
    kept = []
    for lineage in lineages:
        missing = [m for m in lineage.parents if m not in scored]
        if lineage.model in scored and not missing:
            kept.append(lineage)
        elif lineage.model in scored:
            failures.append(Failure(lineage.model, f"{view} outcomes",
                                    f"skipped: parent {', '.join(missing)} failed"))
    return kept


@task(name="failures", cache_policy=NO_CACHE)
def failures_task(failures: list[Failure], run: RunDir) -> Path:
    """failures.parquet: every model stage that failed or was skipped this run, with its reason (empty: none)."""
    for failure in failures:
        get_run_logger().error("failed: %s", failure.line())
    return write_table(run.tables, "failures", failures_frame(failures))


@flow(name="merge-eval")
def merge_eval(config_path: str, run_dir: str | None = None) -> str:
    """Run the whole pipeline for one experiment config; returns the run directory. Its per-model tasks run on the
    config's `orchestration.task_runner`; when some model failed, the run completes for the others and ends
    Failed with `ModelsFailed` (failures.parquet says which and why)."""
    console.install()
    config = load_config(config_path)
    run = RunDir(Path(run_dir or Path("runs") / config.name))
    with run.lock():  # one run at a time per run directory (the CLI took it already: reentrant)
        return _run_pipeline(config, run, config_path)


def _run_pipeline(config: ExperimentConfig, run: RunDir, config_path: str) -> str:
    run.write_config(config, Path(config_path), seeds={"global": config.seed, "probing": config.probing.seeds})
    study = run_study.with_options(task_runner=task_runner(config.orchestration))
    failures = study(config, run)
    if failures:  # a Failed state, not a raise: the failures are the message, no traceback is logged
        failed = ModelsFailed(failures, str(run.root))
        return Failed(message=str(failed), data=failed)
    return str(run.root)


@flow(name="merge-eval-study", validate_parameters=False)
def run_study(config: ExperimentConfig, run: RunDir) -> list[Failure]:
    """Every stage of one run: a task per model for merge, load (behaviour + captures) and probing, submitted so
    that a concurrent task runner overlaps models; then the tables over the models that got through, the report
    and the run's Prefect artifacts. Returns the failures."""
    spec, failures = config.orchestration, []
    retrying = retry_options(spec)
    parents = dict(resolve_parents(config, run))
    lineages = merge_lineages(config)
    merged_from = {name for lineage in lineages for name in (*lineage.parents, lineage.base)}
    if lineages:  # a model that no merge reads (the untied number_erased child) need not be mergeable with the rest
        preflight_task({name: folder for name, folder in parents.items() if name in merged_from}, run, config)
    merged = {lineage.model: merge_task.with_options(**retrying).submit(lineage, parents, run, config)
              for lineage in lineages}
    folders = {**parents, **merged}  # a merge's later tasks take its folder from its merge future
    model_step, probe_step = model_task.with_options(**retrying), probing_task.with_options(**retrying)
    loaded, probed = {}, {}
    for name, folder in folders.items():
        with gpu_claim(spec):
            loaded[name] = model_step.submit(name, folder, run, config)
        probed[name] = probe_step.submit(name, folder, run, config, wait_for=[loaded[name]])
    model_dirs = {**parents, **gather(merged, "merge", failures)}
    if config.similarity.weights:
        weight_features_task(model_dirs, run, config)
    behavior = gather(loaded, "model", failures)
    if behavior:
        behavior_tables_task(list(behavior.values()), comparable(lineages, set(behavior), "behavior", failures),
                             run, config)
    probes = gather(probed, "probing", failures)
    if probes:
        probe_tables_task(list(probes.values()), run, config)
        internals_outcomes_task(comparable(lineages, set(probes), "internals", failures), run, config)
    if config.similarity.functional and behavior:
        functional_similarity_task({name: model_dirs[name] for name in behavior}, run, config)
    failures_task(failures, run)
    correlations_task(run, config)
    changes_task(run, config)
    report_task(run)
    artifacts_task(config, run, failures)
    return failures
