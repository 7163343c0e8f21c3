"""The HTML report: charts from every table, escaping, findings, missing tables, the CLI, atomic writes."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from collections import defaultdict

import polars as pl
import pytest
from report_fixture import TASKS, XSS, shared_run

from flows.cli import main
from reports import findings
from reports.report import ReportError, write_report

CHARTS = {"behaviour", "relations", "competence", "inspector", "correlations", "layer-correlations", "selectors",
          "similarity"}


@pytest.fixture(scope="module")
def report_run(tiny_family, tmp_path_factory):
    return shared_run(tmp_path_factory, tiny_family)


@pytest.fixture()
def run_copy(report_run, tmp_path):
    return shutil.copytree(report_run, tmp_path / "run", ignore=shutil.ignore_patterns("models", "report"))


def embedded_figures(html: str) -> dict:
    block = re.search(r'<script type="application/json" id="report-figures">(.*?)</script>', html, re.S).group(1)
    assert "<" not in block and ">" not in block and "&" not in block
    return json.loads(block)


def test_report_has_every_chart_with_data_and_plotly_once(report_run):
    path = write_report(report_run)
    assert path == report_run / "report" / "index.html" and oct(path.stat().st_mode & 0o777) == "0o644"
    html = path.read_text()
    assert html.count("<script") == 3 and not re.search(r"<script[^>]*\bsrc=|<link", html), "all inline"
    assert html.count("Plotly.register") == 1, "plotly.js embedded once"
    figures = embedded_figures(html)["charts"]
    assert set(figures) == CHARTS
    for chart, variants in figures.items():
        for key, figure in variants.items():
            assert figure["data"], f"{chart} {key} has no traces"
    inspector = figures["inspector"]
    assert len(inspector) == 3  # one figure per probing task
    titles = {f["layout"]["title"]["text"].split(" ")[0] for f in inspector.values()}
    assert titles == set(TASKS)
    # it opens on the task that gains most from layer 0 to its best layer (mean over models), not the first sorted
    probes = pl.read_parquet(report_run / "tables" / "probes.parquet").filter(
        pl.col("metric").is_in(["macro_f1", "pearson"])).group_by("model", "task", "layer").agg(pl.col("value").mean())
    gains = probes.sort("layer").group_by("model", "task").agg(pl.col("value").max() - pl.col("value").first())
    opening = gains.group_by("task").agg(pl.col("value").mean()).sort("value")["task"][-1]
    assert re.search(rf'<option value="\d+" selected>{re.escape(opening)}</option>', html)
    similarity = {f["layout"]["title"]["text"]: f for f in figures["similarity"].values()}
    assert "cka · layer 0" in similarity, "functional similarity (per layer only) has its own heatmaps"
    steps = [s["label"] for s in similarity["cosine · whole model"]["layout"]["sliders"][0]["steps"]]
    assert steps == ["whole model", "L0", "L1", "L2"]  # weights: the whole model, then each decoder layer


def test_every_text_from_data_or_config_is_escaped(report_run):
    html = write_report(report_run).read_text()
    assert XSS not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown as text in the findings and config
    figures = embedded_figures(html)["charts"]
    behaviour_x = {x for f in figures["behaviour"].values() for t in f["data"] for x in t.get("x") or []}
    # plotly renders pseudo-HTML: the name reaches it entity-escaped, and it displays the entities as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in behaviour_x


def _mean(values):
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def test_findings_match_a_hand_computation(report_run):
    outcomes = pl.read_parquet(report_run / "tables" / "outcomes.parquet")
    tasks = [r for r in outcomes.to_dicts() if r["level"] == "task"]
    by_kind = defaultdict(lambda: defaultdict(list))
    for r in tasks:
        by_kind[r["kind"]][r["model"]].append(r)
    ranking = findings.merge_ranking(outcomes)
    for kind, merges in by_kind.items():
        expected = max(merges, key=lambda m: _mean(r["normalized"] for r in merges[m]))
        assert ranking[kind][0]["model"] == expected
        assert ranking[kind][0]["normalized"] == pytest.approx(_mean(r["normalized"] for r in merges[expected]))
        gaps = [r["gap_closed"] for r in merges[expected]
                if r["gap_closed"] is not None and math.isfinite(r["gap_closed"])]
        assert ranking[kind][0]["gap_closed"] == pytest.approx(statistics.median(gaps))
        relations = [r["relation"] for r in merges[expected]]
        assert (ranking[kind][0]["better"], ranking[kind][0]["worse"]) == (relations.count("better"),
                                                                           relations.count("worse"))
    resolved = {r["kind"]: r for r in findings.resolved_comparisons(outcomes)}
    for kind in by_kind:
        relations = [r["relation"] for r in tasks if r["kind"] == kind]
        assert resolved[kind]["total"] == len(relations)
        assert resolved[kind]["resolved"] == sum(relations.count(r) for r in ("better", "worse", "between"))
        assert resolved[kind]["unresolved"] == relations.count("unresolved")

    correlations = pl.read_parquet(report_run / "tables" / "correlations.parquet")
    significant = findings.significant_correlations(correlations, limit=1000)
    by_hand = [r for r in correlations.to_dicts() if r["q"] == r["q"] and r["q"] < 0.05]
    assert len(significant) == len(by_hand) > 0
    assert [abs(r["r"]) for r in significant] == sorted((abs(r["r"]) for r in by_hand), reverse=True)
    tally = {r["family"]: r for r in findings.correlation_tally(correlations)}
    nan_family = tally["competence|layer_mean|pearson"]
    assert nan_family["undefined"] == 1 and nan_family["reasons"] == ["x is constant"]
    assert sum(r["tests"] for r in tally.values()) == correlations.height
    assert sum(r["significant"] + r["not_significant"] + r["undefined"] for r in tally.values()) == correlations.height


def test_findings_open_with_the_known_answer_then_primary_then_what_changed(report_run):
    """The config declares b worse than base on noun_number: the known answer leads, from the changes table that
    tests every model alike; then the primary analyses, what changed, and the exploratory rest."""
    html = write_report(report_run).read_text()
    order = [html.index(f'id="{anchor}"') for anchor in ("known-answer", "primary", "what-changed")]
    order.append(html.index("Best merge per view"))
    order.append(html.index("Exploratory correlations"))
    assert order == sorted(order)
    known = html[order[0]:order[1]]
    assert "b: declared worse than base on noun_number" in known and "False positives:" in known
    changed = pl.read_parquet(report_run / "tables" / "changes.parquet")
    assert set(changed.filter(pl.col("comparison") == "base")["model"]) == {"a", "b", "a+b/linear", XSS}
    assert html[order[2]:order[3]].count("vs base (base)") == 4


def test_missing_and_empty_tables_are_reported_not_fatal(run_copy):
    (run_copy / "tables" / "correlations.parquet").unlink()
    probes = pl.read_parquet(run_copy / "tables" / "probes.parquet")
    probes.head(0).write_parquet(run_copy / "tables" / "probes.parquet")
    html = write_report(run_copy).read_text()
    assert "tables/correlations.parquet does not exist" in html
    assert "Not shown: missing: probes (tables/probes.parquet has no rows)" in html
    assert set(embedded_figures(html)["charts"]) == {"behaviour", "relations", "selectors", "similarity"}


def test_report_without_outcomes_still_shows_behaviour(run_copy):
    (run_copy / "tables" / "outcomes.parquet").unlink()
    (run_copy / "config.yaml").write_text("name: [unclosed\n")
    html = write_report(run_copy).read_text()
    figures = embedded_figures(html)["charts"]
    assert {"behaviour", "similarity", "inspector"} <= set(figures) and "relations" not in figures
    assert "config.yaml is not valid YAML" in html


def test_cli_report_prints_path_and_bad_run_dirs_exit_2(run_copy, tmp_path, capsys):
    assert main(["report", str(run_copy)]) == 0
    assert capsys.readouterr().out.strip() == str(run_copy / "report" / "index.html")

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and "\n" not in err

    empty = tmp_path / "empty"
    (empty / "tables").mkdir(parents=True)
    assert main(["report", str(empty)]) == 2
    assert "every table is missing or empty" in capsys.readouterr().err

    (run_copy / "tables" / "behavior.parquet").write_bytes(b"not parquet")
    assert main(["report", str(run_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "behavior.parquet" in err and "\n" not in err


def test_a_failed_render_leaves_the_previous_report(run_copy, monkeypatch):
    path = write_report(run_copy)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("chart failed")

    monkeypatch.setattr("reports.figures.similarity_chart", broken)
    with pytest.raises(RuntimeError):
        write_report(run_copy)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["index.html"], "no temp file left behind"


def test_report_error_names_the_run_dir(tmp_path):
    with pytest.raises(ReportError, match=str(tmp_path)):
        write_report(tmp_path)


def test_run_ends_by_printing_the_report_path(run_copy, tiny_family, tmp_path, capsys, monkeypatch):
    import yaml

    import flows.pipeline

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "base": "base",
                                      "models": [{"name": n, "source": str(p)} for n, p in tiny_family.items()]}))
    report = write_report(run_copy)
    monkeypatch.setattr(flows.pipeline, "merge_eval", lambda config_path, run_dir: str(run_copy))
    assert main(["run", str(config), "--run-dir", str(run_copy)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {report}"
