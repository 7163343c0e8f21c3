"""The report in a real headless Chromium (Debian's `chromium`, driven by Playwright through its executable path):
no console errors, no network, every chart drawn with data, the per-layer inspector switches task, and a model
named like a script shows as text without running."""

from __future__ import annotations

import shutil

import pytest
from report_fixture import XSS, shared_run

from reports.report import write_report

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-extensions",
                 "--disable-component-update", "--no-first-run", "--disable-default-apps"]


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("Debian's chromium is not installed: run scripts/setup.sh (as root it installs it)")
    return found


@pytest.fixture(scope="module")
def page_of_report(tiny_family, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    report = write_report(shared_run(tmp_path_factory, tiny_family))
    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.as_uri(), wait_until="load")
        page.wait_for_function("document.querySelectorAll('.plot').length > 0 && Array.from("
                               "document.querySelectorAll('.plot')).every(p => p.classList.contains('js-plotly-plot'))",
                               timeout=30_000)
        yield page, problems, requests
        browser.close()


# _fullData: the traces as plotly drew them (numeric arrays arrive base64-packed and are decoded there).
TRACES_WITH_DATA = """plot => plot._fullData.length > 0 && plot._fullData.some(t => t.visible === true &&
    ['x', 'y', 'z'].some(k => t[k] && t[k].length > 0))"""


def test_report_renders_offline_without_errors_and_every_chart_has_data(page_of_report):
    page, problems, requests = page_of_report
    assert problems == []
    assert all(url.startswith(("file://", "data:")) for url in requests), requests
    plots = page.query_selector_all(".plot")
    assert len(plots) == 8
    for plot in plots:
        chart = plot.evaluate("p => p.parentElement.dataset.chart")
        assert plot.evaluate(TRACES_WITH_DATA), f"chart {chart} is drawn without data"
        assert plot.query_selector("svg.main-svg") is not None, f"chart {chart} has no SVG"


def test_inspector_switches_task(page_of_report):
    page, problems, _ = page_of_report
    plot = page.query_selector("[data-chart=inspector] .plot")
    title = "p => p.layout.title.text"
    first = plot.evaluate(title)
    options = page.eval_on_selector_all("[data-chart=inspector] select option", "os => os.map(o => o.textContent)")
    assert first.startswith(options[0])
    page.select_option("[data-chart=inspector] select", index=2)
    page.wait_for_function("t => document.querySelector('[data-chart=inspector] .plot').layout.title.text !== t",
                           arg=first)
    assert plot.evaluate(title).startswith(options[2])
    assert plot.evaluate(TRACES_WITH_DATA)
    legend = plot.evaluate("p => p.data.filter(t => t.showlegend !== false).map(t => t.name)")
    assert len(legend) == 5, "one legend entry (curve) per model"
    assert problems == []


def test_markup_in_names_is_shown_as_text_and_never_run(page_of_report):
    page, problems, _ = page_of_report
    assert XSS in page.text_content("#findings")  # the ranking of merges
    assert "<b>bold</b>" in page.inner_text("header")
    ticks = page.eval_on_selector_all("[data-chart=behaviour] .xtick text", "ts => ts.map(t => t.textContent)")
    assert XSS in ticks
    assert page.evaluate("document.querySelectorAll('script').length") == 3
    assert not any("alert" in p for p in problems)
