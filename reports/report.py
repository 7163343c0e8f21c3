"""`RUN_DIR/report/index.html` from the run's tables alone: no model is loaded and Prefect is not needed.

One self-contained page that works offline: plotly.js is embedded once, every figure's JSON sits in one
<script type="application/json"> block that a small inline script renders (and swaps when a menu changes).
Every text from configs or data is escaped: jinja2 autoescapes the page, strings reach plotly HTML-escaped
(it renders pseudo-HTML), and the embedded JSON escapes `<`, `>` and `&` so no data can close its script tag.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import plotly.io as pio
import polars as pl
import yaml
from jinja2 import Environment, PackageLoader
from markupsafe import Markup
from plotly.offline import get_plotlyjs

from reports import changes as changes_module
from reports import figures, findings, known, power, primary
from runstore.atomic import atomic_path, is_temp_name
from runstore.cache import cache_key, cached_outputs, code_version, content_digest
from runstore.errors import UserError
from runstore.tables import read_table

TEMPLATE = "plotly_white"
TABLES = ("behavior", "probes", "similarity", "outcomes", "correlations", "changes")
TABLE_ROLES = {
    "behavior": "behaviour scores (lm-eval)",
    "probes": "layerwise probe scores",
    "similarity": "weight and functional similarity between models",
    "outcomes": "merge vs parents",
    "correlations": "correlation stage",
    "changes": "what changed: every model against base, every merge against its parents",
}


SECTIONS = {"behaviour": "Behaviour", "relations": "Merge vs parents", "competence": "Competence",
            "inspector": "Probe inspector", "correlations": "Correlations", "layer-correlations": "Per layer r",
            "selectors": "Selector features", "similarity": "Similarity"}


class ReportError(UserError):
    """RUN_DIR is not a run directory with tables, or one of its tables cannot be read."""


@dataclass
class RunTables:
    """The run's tables that have rows, and a line for each that is missing or empty."""

    root: Path
    tables: dict[str, pl.DataFrame]
    missing: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> pl.DataFrame | None:
        return self.tables.get(name)


def load_tables(run_dir: Path) -> RunTables:
    run_dir = Path(run_dir)
    folder = run_dir / "tables"
    if not folder.is_dir():
        raise ReportError(f"{run_dir}: no tables/ folder (not a merge-eval run directory; run `merge-eval run`)")
    tables, missing = {}, {}
    for name in TABLES:
        path = folder / f"{name}.parquet"
        if not path.is_file():
            missing[name] = f"tables/{name}.parquet does not exist"
            continue
        try:
            frame = pl.read_parquet(path)
        except Exception as error:  # polars raises several types for a damaged file; all mean "unreadable"
            raise ReportError(f"{path}: cannot read it as parquet ({type(error).__name__}: {error})") from None
        if frame.is_empty():
            missing[name] = f"tables/{name}.parquet has no rows"
        else:
            tables[name] = frame
    if not tables:
        raise ReportError(f"{run_dir}: every table is missing or empty ({', '.join(TABLES)}); nothing to report")
    return RunTables(run_dir, tables, missing)


def read_failures(run_dir: Path) -> list[dict]:
    """failures.parquet's rows (model, stage, reason): the models a run left out; none when the run wrote no such
    table (it predates the table)."""
    frame = read_table(Path(run_dir) / "tables", "failures")
    return [] if frame is None else frame.select("model", "stage", "reason").to_dicts()


def escaped(frame: pl.DataFrame | None) -> pl.DataFrame | None:
    """Every string column HTML-escaped (&, <, >, quotes), for plotly, which renders labels as pseudo-HTML."""
    if frame is None:
        return None
    text = pl.col(pl.String)
    for raw, entity in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"), ("'", "&#x27;")):
        text = text.str.replace_all(raw, entity, literal=True)
    return frame.with_columns(text)


def read_config(run_dir: Path) -> tuple[dict | None, str | None]:
    """config.yaml as a dict and its text; (None, None) when absent. A broken file is shown, not fatal."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None, None
    text = path.read_text()
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return None, text
    return (loaded if isinstance(loaded, dict) else None), text


def model_order(config: dict | None, tables: RunTables) -> list[str]:
    """Parents in config order, then merges in the outcomes table's order of lineage (by parents, then method)."""
    parents = [m.get("name") for m in (config or {}).get("models", []) if isinstance(m, dict)]
    outcomes = tables.get("outcomes")
    merges = [] if outcomes is None else (
        outcomes.select("model", "parent_a", "parent_b").unique().sort("parent_a", "parent_b", "model")["model"]
        .to_list())
    return [str(p) for p in parents if p is not None] + [m for m in merges if m not in parents]


def stage_timings(run_dir: Path) -> list[dict]:
    """What the run directory records of wall time: per merge (manifest.json) and per behaviour scoring (raw
    lm-eval JSON). Probing and similarity record none; the tables' write times are listed beside."""
    run_dir = Path(run_dir)
    sources = (("merge", run_dir / "models", "manifest.json", ()),
               ("behaviour (lm-eval, when first scored)", run_dir / "tables" / "behavior_raw", "*.json",
                ("merge_eval",)))
    rows = []
    for stage, folder, pattern, path in sources:
        seconds = [s for s in (_wall_seconds(p, path) for p in sorted(folder.rglob(pattern))) if s is not None]
        if seconds:
            rows.append({"stage": stage, "items": len(seconds), "total_s": sum(seconds), "max_s": max(seconds)})
    return rows


def _wall_seconds(path: Path, keys: tuple[str, ...]) -> float | None:
    """`wall_seconds` under `keys` in a JSON file; None when the file or the number is not there."""
    try:
        found = json.loads(path.read_text())
        for key in keys:
            found = found.get(key, {})
        seconds = found.get("wall_seconds")
    except (OSError, ValueError, AttributeError):
        return None
    return float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None


def table_files(run: RunTables) -> list[dict]:
    listed = []
    for name in TABLES:
        path = run.root / "tables" / f"{name}.parquet"
        frame = run.get(name)
        listed.append({"name": name, "role": TABLE_ROLES[name], "rows": None if frame is None else frame.height,
                       "written": datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime(
                           "%Y-%m-%d %H:%M:%S UTC") if path.is_file() else None,
                       "missing": run.missing.get(name)})
    return listed


@contextmanager
def no_default_template():
    """Figures built without plotly's default template: copying it into every figure is most of their build
    time and of their JSON (the page applies TEMPLATE once)."""
    default = pio.templates.default
    pio.templates.default = None
    try:
        yield
    finally:
        pio.templates.default = default


def build_charts(run: RunTables, order: list[str]) -> tuple[dict[str, figures.Chart | None], dict[str, str]]:
    """Every chart in page order, and what each section lacks (as a line) when its chart is None."""
    with no_default_template():
        return _build_charts(run, order)


def _build_charts(run: RunTables, order: list[str]) -> tuple[dict[str, figures.Chart | None], dict[str, str]]:
    t = {name: escaped(run.get(name)) for name in TABLES}
    order = escaped(pl.DataFrame({"model": order}, schema={"model": pl.String}))["model"].to_list()
    charts = {
        "behaviour": figures.behaviour_chart(t["behavior"], t["outcomes"], order),
        "relations": figures.relation_chart(t["outcomes"], order),
        "competence": figures.competence_chart(t["probes"], order),
        "inspector": figures.inspector_chart(t["probes"], order),
        "correlations": figures.correlation_chart(t["correlations"]),
        "layer-correlations": figures.layer_correlation_chart(t["correlations"]),
        "selectors": figures.selector_chart(t["similarity"], t["outcomes"]),
        "similarity": figures.similarity_chart(t["similarity"], order),
    }
    needs = {"behaviour": ["behavior"], "relations": ["outcomes"], "competence": ["probes"],
             "inspector": ["probes"], "correlations": ["correlations"], "layer-correlations": ["correlations"],
             "selectors": ["similarity", "outcomes"], "similarity": ["similarity"]}
    lacking = {}
    for name, chart in charts.items():
        if chart is None:
            gone = [f"{n} ({run.missing[n]})" for n in needs[name] if n in run.missing]
            lacking[name] = ("missing: " + "; ".join(gone)) if gone else "the tables hold no rows this chart uses"
    return charts, lacking


def figures_json(charts: dict[str, figures.Chart | None]) -> Markup:
    """All figures as one JSON object {"template": plotly template, "charts": {chart id: {key: figure}}}, safe
    inside a <script> element. The template travels once and the page applies it to every figure."""
    payload = {"template": pio.templates[TEMPLATE].to_plotly_json(),
               "charts": {chart.id: {key: json.loads(pio.to_json(fig, validate=False, remove_uids=True))
                                     for key, fig in chart.figures.items()}
                          for chart in charts.values() if chart is not None}}
    text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    # JSON allows \u escapes in strings, and these three are the only characters that can end a <script>.
    return Markup(text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e"))


def number(value, digits: int = 3) -> str:
    """A table cell: fixed digits, '–' for a missing or undefined number."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(run: RunTables) -> str:
    config, config_text = read_config(run.root)
    order = model_order(config, run)
    charts, lacking = build_charts(run, order)
    outcomes, correlations, changes = run.get("outcomes"), run.get("correlations"), run.get("changes")
    probes = run.get("probes")
    phenomenon_of = {} if probes is None else dict(probes.select("task", "phenomenon").unique().iter_rows())
    answers = [known.known_answer(effect, changes, correlations, outcomes, phenomenon_of)
               for effect in known.known_effects(config)]
    environment = Environment(loader=PackageLoader("reports", "templates"), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True)
    environment.filters["num"] = number
    provenance = (config or {}).get("_provenance") or {}
    return environment.get_template("report.html.j2").render(
        title=(config or {}).get("name") or run.root.name, description=(config or {}).get("description"),
        run_dir=str(run.root), generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        charts=charts, sections=SECTIONS, lacking=lacking, missing=run.missing, failures=read_failures(run.root),
        ranking=findings.merge_ranking(outcomes) if outcomes is not None else {},
        resolved=findings.resolved_comparisons(outcomes) if outcomes is not None else [],
        significant=findings.significant_correlations(correlations) if correlations is not None else [],
        known_answers=answers, primary=findings.primary_summary(correlations) if correlations is not None else [],
        changed=findings.what_changed(changes) if changes is not None else [], bands=changes_module.BANDS,
        min_distinct=power.MIN_DISTINCT, power=power.POWER,
        tally=findings.correlation_tally(correlations) if correlations is not None else [],
        kind_labels=findings.KIND_LABELS, alpha=findings.SIGNIFICANT,
        provenance=provenance, config_text=config_text, config_broken=config_text is not None and config is None,
        timings=stage_timings(run.root), table_files=table_files(run),
        plotly_js=Markup(get_plotlyjs()), figures_json=figures_json(charts))


def report_inputs(run_dir: Path) -> list[Path]:
    """Every file the report reads: the tables, the raw behaviour results, merge manifests, config.yaml."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / "tables").rglob("*") if p.is_file() and not is_temp_name(p.name)]
    found += [p for p in (run_dir / "models").rglob("manifest.json") if p.is_file()] + [run_dir / "config.yaml"]
    return sorted(p for p in found if p.is_file())


def write_report(run_dir: Path, cache_dir: Path | None = None) -> Path:
    """(Re)write RUN_DIR/report/index.html atomically from RUN_DIR/tables; returns its path. With a `cache_dir`,
    only when what the report reads (`report_inputs`) or its code changed since it was last written."""
    root = Path(run_dir)
    target = root / "report" / "index.html"

    def make() -> None:
        run = load_tables(root)
        with atomic_path(target) as temp:
            temp.write_text(render(run), encoding="utf-8")

    here = Path(__file__).parent
    key = cache_key("report", code_version(__file__, figures.__file__, findings.__file__, known.__file__,
                                           primary.__file__, power.__file__, changes_module.__file__,
                                           here / "templates"),
                    content_digest(report_inputs(root), root=root))
    cached_outputs(cache_dir, "report", key, [target], make)
    return target
