"""The `merge-eval` Prefect flow: config -> parents -> merges -> per-model stages -> tables.

Stage functions live in the stage packages and know nothing of Prefect; this module only composes them into
tasks, so each stage stays testable on its own. Expensive stage results are cached by content inside the run
directory, which is what makes an interrupted or extended run resume instead of recompute.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config import ExperimentConfig, load_config, merge_name
from flows.run_store import RunDir
from merging.checkpoints import LoadOptions, resolve_source
from merging.merge import MergeLineage, merge


def merge_lineages(config: ExperimentConfig) -> list[MergeLineage]:
    return [MergeLineage(model=merge_name(group, spec.suffix), method=spec.method, parents=tuple(group),
                         base=config.base, parameters=dict(spec.parameters))
            for group in config.merges.parents for spec in config.merges.methods]


def load_options(config: ExperimentConfig) -> LoadOptions:
    return LoadOptions(precision=config.precision, device=config.device,
                       trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)


@task(name="resolve-parents", cache_policy=NO_CACHE)
def resolve_parents(config: ExperimentConfig) -> dict[str, Path]:
    logger = get_run_logger()
    paths = {}
    for spec in config.models:
        paths[spec.name] = resolve_source(spec.source, spec.revision, config.allow_pickle)
        logger.info("parent %s -> %s", spec.name, paths[spec.name])
    return paths


@task(name="merge", cache_policy=NO_CACHE, task_run_name="merge {lineage.model}")
def merge_task(lineage: MergeLineage, parents: dict[str, Path], run: RunDir, config: ExperimentConfig) -> Path:
    out = run.model_dir(lineage.model)
    manifest = merge(lineage, parents, out, seed=config.seed, dtype=config.precision,
                     trust_remote_code=config.trust_remote_code)
    get_run_logger().info("merged %s in %.1f s (peak RSS %.0f MB)", lineage.model, manifest["wall_seconds"],
                          manifest["peak_rss_mb"])
    return out


@flow(name="merge-eval", log_prints=True)
def merge_eval(config_path: str, run_dir: str | None = None) -> str:
    """Run the whole pipeline for one experiment config; returns the run directory."""
    config = load_config(config_path)
    run = RunDir(Path(run_dir or Path("runs") / config.name))
    run.write_config(config, Path(config_path))
    logger = get_run_logger()
    model_dirs = dict(resolve_parents(config))
    lineages = merge_lineages(config)
    for i, lineage in enumerate(lineages, 1):
        logger.info("merge %d/%d: %s", i, len(lineages), lineage.model)
        model_dirs[lineage.model] = merge_task(lineage, model_dirs, run, config)
    return str(run.root)
