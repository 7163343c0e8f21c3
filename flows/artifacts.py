"""The run's Prefect artifacts, so that the UI shows results without opening the run directory: a markdown summary
(models, failures, best merge per view, headline correlations), a table of merge outcomes, a link to the report.

Built from the tables alone (reports.findings), like the report. Artifacts are a convenience: a missing or
unreadable table gives a shorter summary, and no failure here fails the run.
"""

from __future__ import annotations

import math

import polars as pl
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.config import ExperimentConfig
from flows.orchestration import Failure, artifact_key
from reports import findings
from runstore.errors import describe
from runstore.run_dir import RunDir
from runstore.tables import read_table

HEADLINE_CORRELATIONS = 5
RANKING_COLUMNS = ("kind", "model", "method", "normalized", "gap_closed", "merge_gain", "better", "between", "worse",
                   "unresolved", "comparisons")


def _cell(value):
    """A JSON-safe table cell: floats rounded, NaN/inf as empty."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    return value


def _number(value, digits: int = 3) -> str:
    return "–" if _cell(value) is None else f"{value:.{digits}f}"


def ranking_rows(outcomes: pl.DataFrame | None) -> list[dict]:
    """Every merge per view (behaviour, internals), best first: mean normalized score, relation counts."""
    if outcomes is None or outcomes.is_empty():
        return []
    return [{column: _cell(row.get(column)) for column in RANKING_COLUMNS}
            for rows in findings.merge_ranking(outcomes).values() for row in rows]


def summary_markdown(config: ExperimentConfig, run: RunDir, failures: list[Failure], ranking: list[dict],
                     correlations: pl.DataFrame | None) -> str:
    failed = {f.model for f in failures}
    lines = [f"# merge-eval run `{config.name}`", "",
             f"Run directory: `{run.root}`", "",
             f"**Models:** {len(config.model_names)} ({len(config.models)} parents, {len(config.merge_names)} merges); "
             f"{len(config.model_names) - len([m for m in config.model_names if m in failed])} got through every "
             f"stage.", ""]
    if failures:
        lines += ["## Failed", "", "| model | stage | reason |", "|---|---|---|"]
        lines += [f"| {f.model} | {f.stage} | {f.reason.replace('|', '/')} |" for f in failures]
        lines.append("")
    lines += ["## Best merge per view", ""]
    best = {row["kind"]: row for row in reversed(ranking)}  # ranking is best first within each kind
    if best:
        lines += [f"- **{findings.KIND_LABELS.get(kind, kind)}:** `{row['model']}` (normalized "
                  f"{_number(row['normalized'])}, better than both parents on {row['better']} of "
                  f"{row['comparisons']} comparisons)" for kind, row in sorted(best.items())]
    else:
        lines.append("No merge outcomes in this run.")
    lines += ["", f"## Headline correlations (primary analyses, q < {findings.SIGNIFICANT}, unflagged)", ""]
    significant = findings.headline_correlations(correlations, HEADLINE_CORRELATIONS) \
        if correlations is not None and not correlations.is_empty() else []
    if significant:
        lines += ["| x | y | method | n | r | q |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['x']} | {r['y']} | {r['method']} | {r['n']} | {_number(r['r'])} | {_number(r['q'], 4)} |"
                  for r in significant]
    else:
        lines.append("No primary test survives the Benjamini–Hochberg correction unflagged (or the correlation table "
                     "is missing).")
    return "\n".join(lines) + "\n"


@task(name="artifacts", cache_policy=NO_CACHE)
def artifacts_task(config: ExperimentConfig, run: RunDir, failures: list[Failure]) -> list[str]:
    """The run's summary, outcomes table and report link as Prefect artifacts (keyed by config name, so the UI
    keeps one history per study); returns the keys created."""
    logger = get_run_logger()
    try:
        outcomes, correlations = read_table(run.tables, "outcomes"), read_table(run.tables, "correlations")
    except Exception as error:  # noqa: BLE001 - an unreadable table shortens the summary, never fails the run
        logger.warning("artifacts: %s", describe(error))
        outcomes = correlations = None
    ranking, report = ranking_rows(outcomes), run.report / "index.html"
    wanted = {"summary": lambda key: create_markdown_artifact(
        summary_markdown(config, run, failures, ranking, correlations), key=key,
        description=f"merge-eval {config.name}: models, failures, best merges, correlations")}
    if ranking:
        wanted["outcomes"] = lambda key: create_table_artifact(
            ranking, key=key, description="merges ranked per view (mean over their task comparisons)")
    if report.is_file():
        wanted["report"] = lambda key: create_link_artifact(
            report.resolve().as_uri(), link_text=f"report of {config.name}", key=key, description=str(report))
    created = []
    for what, create in wanted.items():
        key = artifact_key(config.name, what)
        try:
            create(key)
            created.append(key)
        except Exception as error:  # noqa: BLE001 - the API may refuse or be gone; the run's results stand
            logger.warning("artifact %s not created: %s", key, describe(error))
    return created
