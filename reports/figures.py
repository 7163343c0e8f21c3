"""Plotly figures of the report, one builder per chart, each a pure function of the run's tables.

A builder returns a `Chart`: one figure, or several that the reader picks among with <select> menus (figure per
task, per feature, per view); the page's script swaps them with Plotly.react. A builder returns None when its
tables lack the data, and the report says what is missing instead.

Every string in the frames given to these builders is already HTML-escaped (`reports.report.escaped`): plotly
renders labels as pseudo-HTML (<b>, <br>, entities), so a model named `<script>` must reach it as `&lt;script&gt;`
to be shown as text. Choice labels built here are therefore `Markup` (escaped once, never twice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
import polars as pl
from markupsafe import Markup
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from probing.inspect import best_layer, curves
from reports.findings import KIND_LABELS, SIGNIFICANT

RELATION_COLORS = {"better": "#2ca02c", "between": "#7f9fbf", "worse": "#d62728", "unresolved": "#d0d0d0",
                   "undecided": "#f2d8a7"}
PALETTE = qualitative.Plotly + qualitative.D3 + qualitative.Dark24
HEATMAP_ROWS = 60  # beyond this a heatmap is unreadable on a laptop: keep the rows with the strongest |r|
HEATMAP_COLUMNS = 40  # the same for columns (a 1280 px wide page)
# One model's norm carried on a pair row: not a similarity between the two models.
NOT_PAIRWISE = ("param_norm_a", "param_norm_b")


@dataclass
class Choice:
    """One <select>: its label and its options as (value, text, optgroup or None)."""

    label: str
    options: list[tuple[str, Markup, Markup | None]]
    selected: str = "0"  # the option the chart opens on


@dataclass
class Chart:
    """A figure, or figures keyed by the joined values ("i|j") of the chart's selects."""

    id: str
    title: str
    figures: dict[str, go.Figure]
    choices: list[Choice] = field(default_factory=list)
    note: str = ""


def _layout(fig: go.Figure, height: int, **extra) -> go.Figure:
    fig.update_layout(**{"height": height, "margin": dict(l=60, r=20, t=50, b=60), "font": dict(size=12), **extra})
    return fig


def _array(values) -> np.ndarray:
    """Float64 (None -> NaN), unrounded: plotly packs numeric arrays as base64 float64, and similarity values
    differ in the fifth decimal (weight cosines of a fine-tuned family are all ~0.9999)."""
    return np.asarray(values, dtype=float)


def _colors(names: list[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _options(texts: list[str], groups: list[str | None] | None = None) -> list[tuple[str, Markup, Markup | None]]:
    groups = groups or [None] * len(texts)
    return [(str(i), Markup(text), None if group is None else Markup(group))
            for i, (text, group) in enumerate(zip(texts, groups))]


def ordered(names, order: list[str]) -> list[str]:
    """`names` in the run's model order (parents as configured, then merges), unknown names last, sorted."""
    names = set(names)
    return [n for n in order if n in names] + sorted(names - set(order))


def lineage(outcomes: pl.DataFrame | None) -> pl.DataFrame | None:
    """One row per merge: model, method, parent_a, parent_b."""
    if outcomes is None:
        return None
    return outcomes.select("model", "method", "parent_a", "parent_b").unique().sort("model")


# ------------------------------------------------------------------------------------------------- behaviour

def _behaviour_panel(fig: go.Figure, rows: pl.DataFrame, merges: pl.DataFrame | None, order: list[str],
                     method_colors: dict[str, str], position: tuple[int, int], legend: bool) -> None:
    models = ordered(rows["model"], order)
    value = dict(zip(rows["model"], rows["value"]))
    stderr = dict(zip(rows["model"], rows["stderr"]))
    merge_of = {} if merges is None else {r["model"]: r for r in merges.iter_rows(named=True)}
    row, col = position
    bands = [(m, [value.get(p) for p in (merge_of[m]["parent_a"], merge_of[m]["parent_b"]) if p is not None])
             for m in models if m in merge_of]
    bands = [(m, ps) for m, ps in bands if ps and all(v is not None for v in ps)]
    if bands:
        low = [min(ps) for _, ps in bands]
        fig.add_trace(go.Bar(
            x=[m for m, _ in bands], base=_array(low), y=_array([max(ps) - lo for (_, ps), lo in zip(bands, low)]),
            marker=dict(color="rgba(31,119,180,0.18)", line=dict(width=1, color="rgba(31,119,180,0.45)")),
            name="parents' range",
            legendgroup="range", showlegend=legend,
            customdata=[", ".join(f"{p} {value[p]:.3f}" for p in (merge_of[m]["parent_a"], merge_of[m]["parent_b"])
                                  if p is not None) for m, _ in bands],
            hovertemplate="%{x}'s parents: %{customdata}<extra></extra>"), row=row, col=col)
    groups = {"parent": [m for m in models if m not in merge_of]}
    for m in models:
        if m in merge_of:
            groups.setdefault(merge_of[m]["method"], []).append(m)
    for group, names in groups.items():
        if not names:
            continue
        errors = [stderr.get(n) for n in names]
        fig.add_trace(go.Scatter(
            x=names, y=_array([value[n] for n in names]), mode="markers", name=group, legendgroup=group,
            showlegend=legend, marker=dict(size=9, color="#444" if group == "parent" else method_colors[group],
                                           symbol="diamond" if group == "parent" else "circle"),
            error_y=dict(type="data", array=_array(errors),
                         thickness=1, width=3),
            hovertemplate="%{x}: %{y:.3f}<extra>" + group + "</extra>"), row=row, col=col)
    fig.update_xaxes(categoryorder="array", categoryarray=models, row=row, col=col)


def behaviour_chart(behavior: pl.DataFrame | None, outcomes: pl.DataFrame | None, order: list[str]) -> Chart | None:
    """Paper Fig 2: every model's score per task (± stderr), each merge over the shaded range of its parents."""
    if behavior is None:
        return None
    behavior = behavior.filter(pl.col("value").is_not_null() & pl.col("value").is_not_nan())
    if behavior.is_empty():
        return None
    merges = lineage(outcomes)
    methods = sorted(merges["method"].unique()) if merges is not None else []
    method_colors = _colors(methods)
    tasks = behavior.filter(pl.col("level") == "task")
    selections = [(f"tasks of {g}", tasks.filter(pl.col("group") == g)) for g in sorted(tasks["group"].drop_nulls()
                                                                                         .unique())]
    selections += [("tasks without a group", tasks.filter(pl.col("group").is_null()))]
    selections += [("group aggregates", behavior.filter(pl.col("level") == "group"))]
    figures, labels = {}, []
    for label, rows in selections:
        if rows.is_empty():
            continue
        panels = rows.select("task", "metric", "filter").unique(maintain_order=True).sort("task", "metric")
        cols = min(3, panels.height)
        n_rows = -(-panels.height // cols)
        titles = [f"{p['task']} · {p['metric']}" + ("" if p["filter"] in (None, "none") else f" ({p['filter']})")
                  for p in panels.iter_rows(named=True)]
        height = 120 + 300 * n_rows
        fig = make_subplots(rows=n_rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.06,
                            vertical_spacing=120 / height)  # room for tilted model names and the next title
        for i, panel in enumerate(panels.iter_rows(named=True)):
            subset = rows.filter((pl.col("task") == panel["task"]) & (pl.col("metric") == panel["metric"])
                                 & (pl.col("filter").eq_missing(panel["filter"])))
            _behaviour_panel(fig, subset, merges, order, method_colors, (i // cols + 1, i % cols + 1), legend=i == 0)
        fig.update_xaxes(tickangle=35, tickfont=dict(size=10))
        fig.update_annotations(font_size=12)
        _layout(fig, height, barmode="overlay")
        figures[str(len(labels))] = fig
        labels.append(label)
    return Chart("behaviour", "Behaviour per task", figures, [Choice("show", _options(labels))],
                 note="Diamonds: parents. Dots: merges, coloured by method, with ±1 stderr. The shaded bar is the "
                      "range between the merge's two parents on that task.")


# ------------------------------------------------------------------------------------------ merge vs parents

def relation_chart(outcomes: pl.DataFrame | None, order: list[str]) -> Chart | None:
    """Paper Figs 3-4, 6-7: per merge, how many task comparisons put it above, between or below its parents, and
    how many the tests cannot resolve."""
    if outcomes is None:
        return None
    rows = outcomes.filter(pl.col("level") == "task") if "level" in outcomes.columns else outcomes
    if rows.is_empty():
        return None
    kinds = [k for k in KIND_LABELS if k in set(rows["kind"])] + sorted(set(rows["kind"]) - set(KIND_LABELS))
    counts = (rows.with_columns(pl.col("relation").fill_null("undecided"))
              .group_by("kind", "model", "relation").len())
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[KIND_LABELS.get(k, k) for k in kinds],
                        shared_yaxes=False, horizontal_spacing=0.08)
    for col, kind in enumerate(kinds, 1):
        of_kind = counts.filter(pl.col("kind") == kind)
        models = ordered(of_kind["model"], order)
        for relation, color in RELATION_COLORS.items():
            got = dict(of_kind.filter(pl.col("relation") == relation).select("model", "len").iter_rows())
            if not got and relation == "undecided":
                continue
            fig.add_trace(go.Bar(x=models, y=[got.get(m, 0) for m in models], name=relation, marker_color=color,
                                 legendgroup=relation, showlegend=col == 1,
                                 hovertemplate="%{x}: %{y} " + relation + "<extra></extra>"), row=1, col=col)
    fig.update_yaxes(title_text="comparisons (task × metric)", col=1)
    fig.update_xaxes(tickangle=35)
    _layout(fig, 460, barmode="stack")
    return Chart("relations", "Merge vs both parents: better / between / worse / unresolved", {"": fig},
                 note="better = above the better parent, worse = below the weaker parent, between = below the "
                      "better AND above the weaker one, each beyond the noise of the comparison (paired CI "
                      "excludes 0); unresolved = the tests cannot tell the merge from a parent; undecided = a "
                      "score is missing (see the outcomes table's reason).")


# ---------------------------------------------------------------------------------------------- internals

def probe_views(probes: pl.DataFrame) -> pl.DataFrame:
    """Per (model, task, phenomenon): headline probe score at the best layer, at the last layer, and layer mean."""
    phenomena = probes.select("task", "phenomenon").unique()
    return (curves(probes).group_by("model", "task", maintain_order=True).agg(  # one order: the same sums each run
        pl.col("value").get(best_layer()).alias("best layer"), pl.col("value").last().alias("last layer"),
        pl.col("value").mean().alias("mean over layers")).join(phenomena, on="task"))


def competence_chart(probes: pl.DataFrame | None, order: list[str]) -> Chart | None:
    """Paper Fig 5: probe competence per phenomenon (mean of its tasks) for every model, at a chosen view."""
    if probes is None or probes.is_empty():
        return None
    views = probe_views(probes)
    per_phenomenon = views.group_by("model", "phenomenon").agg(
        pl.col("best layer", "last layer", "mean over layers").mean())
    models = ordered(per_phenomenon["model"], order)
    phenomena = sorted(per_phenomenon["phenomenon"].unique())
    figures, labels = {}, []
    for view in ("mean over layers", "best layer", "last layer"):
        grid = {(r["model"], r["phenomenon"]): r[view] for r in per_phenomenon.iter_rows(named=True)}
        z = _array([[grid.get((m, p), np.nan) for p in phenomena] for m in models])
        fig = go.Figure(go.Heatmap(z=z, x=phenomena, y=models, colorscale="Viridis", zmin=0, zmax=1,
                                   text=[[f"{v:.2f}" if np.isfinite(v) else "" for v in row] for row in z],
                                   texttemplate="%{text}", colorbar=dict(title="score"),
                                   hovertemplate="%{y} · %{x}: %{z:.3f}<extra></extra>"))
        _layout(fig, 140 + 28 * len(models), yaxis=dict(autorange="reversed"))
        figures[str(len(labels))] = fig
        labels.append(view)
    return Chart("competence", "Competence per phenomenon", figures, [Choice("view", _options(labels))],
                 note="Headline probe metric (macro-F1; Pearson r for regression), mean over seeds and over the "
                      "phenomenon's tasks. The best layer is chosen on the probes' dev split and scored on test "
                      "(on test, optimistic, only for runs whose probes recorded no dev scores).")


def _inspector_figure(task_rows: pl.DataFrame, models: list[str], colors: dict[str, str]) -> go.Figure:
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.68, 0.32], vertical_spacing=0.06,
                        subplot_titles=["score per layer (dashed: control task)", "selectivity (score − control)"])
    for model in models:
        rows = task_rows.filter(pl.col("model") == model).sort("layer")
        if rows.is_empty():
            continue
        layer, value = rows["layer"].to_numpy(), _array(rows["value"])
        err = _array(rows["stderr"].fill_null(0.0))
        color = colors[model]
        common = dict(legendgroup=model, line=dict(color=color))
        fig.add_trace(go.Scatter(
            x=np.concatenate([layer, layer[::-1]]), y=np.concatenate([value + err, (value - err)[::-1]]),
            mode="lines", fill="toself", fillcolor=color, opacity=0.15, line=dict(width=0), hoverinfo="skip",
            legendgroup=model, showlegend=False), row=1, col=1)
        fig.add_trace(go.Scatter(x=layer, y=value, mode="lines", name=model, customdata=err,
                                 hovertemplate=f"{model} L%{{x}}: %{{y:.3f}} ± %{{customdata:.3f}}<extra></extra>",
                                 **common), row=1, col=1)
        if rows["control_value"].is_not_null().any():
            fig.add_trace(go.Scatter(x=layer, y=_array(rows["control_value"].fill_null(np.nan)), mode="lines",
                                     showlegend=False, hovertemplate=f"{model} control L%{{x}}: %{{y:.3f}}"
                                                                     "<extra></extra>",
                                     legendgroup=model, line=dict(color=color, dash="dash", width=1)), row=1, col=1)
            fig.add_trace(go.Scatter(x=layer, y=_array(rows["selectivity"].fill_null(np.nan)), mode="lines",
                                     showlegend=False, hovertemplate=f"{model} selectivity L%{{x}}: %{{y:.3f}}"
                                                                     "<extra></extra>", **common), row=2, col=1)
        dev = _array(rows["dev"].fill_null(np.nan)) if "dev" in rows.columns else np.full(len(value), np.nan)
        best = int(np.nanargmax(dev)) if np.isfinite(dev).any() else int(np.nanargmax(value))
        fig.add_trace(go.Scatter(
            x=[layer[best], layer[-1]], y=[value[best], value[-1]], mode="markers", showlegend=False,
            legendgroup=model, marker=dict(color=color, size=[12, 9], symbol=["star", "square"],
                                           line=dict(color="white", width=1)),
            customdata=["best layer", "last layer"],
            hovertemplate=f"{model} %{{customdata}} L%{{x}}: %{{y:.3f}}<extra></extra>"), row=1, col=1)
    layers = task_rows["layer"].n_unique()
    fig.update_xaxes(tick0=0, dtick=max(1, -(-layers // 16)))
    fig.update_xaxes(title_text="layer (0 = embeddings)", row=2, col=1)
    return _layout(fig, 640, hovermode="closest")


def _most_layered(curve: pl.DataFrame, tasks: list[str]) -> str:
    """The task whose score gains most from layer 0 (the embeddings) to its best layer, mean over models: the
    inspector opens on it rather than on whichever sorts first (a task flat from layer 0 shows no computation)."""
    gain = (pl.col("value").max() - pl.col("value").first()).alias("gain")
    best = dict(curve.sort("layer").group_by("model", "task").agg(gain).group_by("task").agg(
        pl.col("gain").mean()).iter_rows())
    return max(tasks, key=lambda task: (best.get(task) or 0.0, -tasks.index(task)))


def inspector_chart(probes: pl.DataFrame | None, order: list[str]) -> Chart | None:
    """Per-layer probe inspection: per task, every model's layer curve, control curve, error band, selectivity;
    the best layer (star) and last layer (square) marked."""
    if probes is None or probes.is_empty():
        return None
    curve = curves(probes)
    if curve.is_empty():
        return None
    models = ordered(curve["model"], order)
    colors = _colors(models)
    tasks = curve.join(probes.select("task", "phenomenon").unique(), on="task").select(
        "phenomenon", "task", "metric").unique().sort("phenomenon", "task")
    figures = {}
    for i, row in enumerate(tasks.iter_rows(named=True)):
        fig = _inspector_figure(curve.filter(pl.col("task") == row["task"]), models, colors)
        fig.update_layout(title=dict(text=f"{row['task']} ({row['phenomenon']}) · {row['metric']}", x=0))
        figures[str(i)] = fig
    options = _options(tasks["task"].to_list(), tasks["phenomenon"].to_list())
    opening = str(tasks["task"].to_list().index(_most_layered(curve, tasks["task"].to_list())))
    return Chart("inspector", "Per-layer probe inspection", figures, [Choice("task", options, opening)],
                 note="Mean over probe seeds; the band is ±1 bootstrap stderr over test items. Star: best layer "
                      "(chosen on dev, scored on test); square: last layer (the seed paper's view). Click a legend "
                      "entry to hide a model, double-click to show only it.")


# ------------------------------------------------------------------------------------------- correlations

def _correlation_label(frame: pl.DataFrame, name: str) -> pl.Expr:
    """`x` / `y` with its kind and level (and the y metric) when the table records them."""
    parts = [pl.col(name)]
    if f"{name}_metric" in frame.columns:
        parts.append(pl.when(pl.col(f"{name}_metric").is_not_null())
                     .then(pl.lit(" · ") + pl.col(f"{name}_metric")).otherwise(pl.lit("")))
    if f"{name}_kind" in frame.columns:
        parts.append(pl.when(pl.col(f"{name}_kind").is_not_null())
                     .then(pl.lit(" [") + pl.col(f"{name}_kind") + pl.lit("]")).otherwise(pl.lit("")))
    return pl.concat_str(parts).alias(f"{name}_label")


def correlation_frame(correlations: pl.DataFrame) -> pl.DataFrame:
    """The correlations table with its optional columns filled in and display labels for x and y."""
    frame = correlations
    for column, default in (("family", None), ("view", None), ("layer", None)):
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(default, pl.String if column != "layer" else pl.Int64).alias(column))
    frame = frame.with_columns(pl.col("family").fill_null(pl.col("method")))
    return frame.with_columns(_correlation_label(frame, "x"), _correlation_label(frame, "y"))


def _significance(q: np.ndarray) -> list[str]:
    return ["**" if v < 0.01 else "*" if v < SIGNIFICANT else "" for v in np.nan_to_num(q, nan=1.0)]


def _strongest(rows: pl.DataFrame, column: str, limit: int) -> tuple[pl.DataFrame, int]:
    """Rows of the `limit` values of `column` with the largest max |r|, and how many values were left out."""
    strength = rows.group_by(column).agg(pl.col("r").abs().max().alias("s")).sort("s", descending=True,
                                                                                  nulls_last=True)
    keep = strength.head(limit)[column]
    return rows.filter(pl.col(column).is_in(keep.implode())), max(0, strength.height - limit)


def _heatmap(rows: pl.DataFrame, x_col: str, y_col: str, x_title: str, y_title: str,
             cap_columns: bool = True) -> tuple[go.Figure, int]:
    """r as colour in [-1, 1], '*' for q < 0.05 and '**' for q < 0.01; only the strongest rows (and columns),
    returning how many were left out."""
    rows, dropped = _strongest(rows, y_col, HEATMAP_ROWS)
    if cap_columns:
        rows, dropped_columns = _strongest(rows, x_col, HEATMAP_COLUMNS)
        dropped += dropped_columns
    ys = sorted(rows[y_col].unique())
    xs = sorted(rows[x_col].unique())
    cells = {(r[y_col], r[x_col]): r for r in rows.iter_rows(named=True)}
    grid = lambda key: [[(cells.get((y, x)) or {}).get(key) for x in xs] for y in ys]  # noqa: E731
    z, q = _array(grid("r")), _array(grid("q"))
    marks = [_significance(row) for row in q]
    hover = [[f"n={n} q={'–' if not np.isfinite(qv) else f'{qv:.3g}'}" + (f" ({why})" if why else "")
              for n, qv, why in zip(*row)] for row in zip(grid("n"), q, grid("reason"))]
    fig = go.Figure(go.Heatmap(z=z, x=xs, y=ys, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True,
                               text=marks, texttemplate="%{text}", customdata=hover, colorbar=dict(title="r"),
                               hovertemplate="%{y}<br>%{x}<br>r=%{z:.3f} %{customdata}<extra></extra>"))
    _layout(fig, min(1400, max(380, 180 + 22 * len(ys))), xaxis=dict(title=x_title, tickangle=35, automargin=True),
            yaxis=dict(title=y_title, automargin=True, autorange="reversed"))
    return fig, dropped


def correlation_chart(correlations: pl.DataFrame | None) -> Chart | None:
    """Paper Fig 8, with significance: r per (x, y) pair within each family of tests (views other than per layer)."""
    if correlations is None or correlations.is_empty():
        return None
    frame = correlation_frame(correlations).filter(pl.col("view").fill_null("") != "per_layer")
    figures, labels, notes = {}, [], []
    for family in sorted(frame["family"].unique()):
        fig, dropped = _heatmap(frame.filter(pl.col("family") == family), "y_label", "x_label", "y (outcome)",
                                "x (predictor)")
        figures[str(len(labels))] = fig
        labels.append(family)
        if dropped:
            notes.append(f"{family}: {dropped} weaker rows or columns not drawn")
    if not figures:
        return None
    return Chart("correlations", "Correlations", figures, [Choice("family of tests", _options(labels))],
                 note="Colour: r. * q < 0.05, ** q < 0.01 (Benjamini–Hochberg within the family). "
                      + "; ".join(notes))


def layer_correlation_chart(correlations: pl.DataFrame | None) -> Chart | None:
    """Where in depth an x tracks a y: r per layer for every per-layer pair of a family."""
    if correlations is None or correlations.is_empty():
        return None
    frame = correlation_frame(correlations).filter(pl.col("view") == "per_layer")
    if frame.is_empty():
        return None
    frame = frame.with_columns(pl.concat_str("x_label", pl.lit(" ~ "), "y_label").alias("pair"),
                               pl.col("layer").cast(pl.String).alias("layer_label"))
    figures, labels = {}, []
    for family in sorted(frame["family"].unique()):
        rows = frame.filter(pl.col("family") == family)
        fig, _ = _heatmap(rows, "layer", "pair", "layer", "x ~ y", cap_columns=False)
        fig.update_xaxes(tick0=0, dtick=max(1, -(-rows["layer"].n_unique() // 16)))
        figures[str(len(labels))] = fig
        labels.append(family)
    return Chart("layer-correlations", "Correlations per layer", figures, [Choice("family of tests",
                                                                                  _options(labels))],
                 note=f"Rows: x ~ y pairs (the {HEATMAP_ROWS} strongest per family). * q < 0.05, ** q < 0.01.")


# ------------------------------------------------------------------------------------- selector features

def shown_similarity(similarity: pl.DataFrame) -> pl.DataFrame:
    """The similarity rows a chart shows: of the functional summaries over layers/tokens only the mean, and
    per-head rows as their layer's (charts average the heads)."""
    if "stat" in similarity.columns:
        similarity = similarity.filter(pl.col("stat").is_null() | (pl.col("stat") == "mean"))
    if "scope" in similarity.columns:
        similarity = similarity.with_columns(
            pl.when(pl.col("scope") == "head").then(pl.lit("layer")).otherwise(pl.col("scope")).alias("scope"))
    return similarity


def selector_features(similarity: pl.DataFrame, merges: pl.DataFrame) -> pl.DataFrame:
    """Per merge: its global-scope features as `relation: source feature` (parent pair, parent group, merge vs
    parents' mean) — the candidate pre-merge / post-merge signals."""
    similarity = shown_similarity(similarity)
    glob = similarity.filter(pl.col("scope") == "global") if "scope" in similarity.columns else similarity
    source = pl.col("source") + pl.lit(" ") if "source" in glob.columns else pl.lit("")
    glob = glob.with_columns(pl.concat_str(source, pl.col("feature")).alias("name"))
    pairs = pl.concat([glob, glob.rename({"model_a": "model_b", "model_b": "model_a"})], how="diagonal_relaxed")
    pair = merges.join(pairs, left_on=["parent_a", "parent_b"], right_on=["model_a", "model_b"]).select(
        "model", pl.lit("parents: ") + pl.col("name"), "value")
    group = merges.join(glob.filter(pl.col("model_b").is_null()), left_on="model", right_on="model_a").select(
        "model", pl.lit("merge: ") + pl.col("name"), "value")
    versus = pl.concat([merges.join(pairs, left_on=["model", p], right_on=["model_a", "model_b"]).select(
        "model", "name", "value") for p in ("parent_a", "parent_b")])
    versus = versus.group_by("model", "name").agg(pl.col("value").mean()).select(
        "model", pl.lit("merge vs parents: ") + pl.col("name"), "value")
    for frame in (pair, group, versus):
        frame.columns = ["model", "feature", "value"]
    # Pre-merge signals (the parents') first, then what only the merged weights show.
    return pl.concat([f.filter(pl.col("value").is_finite()).sort("feature", "model") for f in (pair, group, versus)])


OUTCOME_MEASURES = {"gap_closed": "mean gap closed", "merge_gain": "mean merge gain",
                    "normalized": "mean normalized score"}


def selector_chart(similarity: pl.DataFrame | None, outcomes: pl.DataFrame | None) -> Chart | None:
    """Selector features vs merge outcomes, one point per merge (mean over its task comparisons): a row per
    outcome measure, a column per view (behaviour, internals)."""
    if similarity is None or outcomes is None or similarity.is_empty() or outcomes.is_empty():
        return None
    merges = lineage(outcomes)
    features = selector_features(similarity, merges)
    if features.is_empty():
        return None
    rows = outcomes.filter(pl.col("level") == "task") if "level" in outcomes.columns else outcomes
    measures = [m for m in OUTCOME_MEASURES if m in rows.columns]
    per_merge = rows.group_by("model", "kind").agg(
        [pl.col(m).filter(pl.col(m).is_finite()).mean() for m in measures]).join(merges, on="model")
    methods = sorted(merges["method"].unique())
    colors = _colors(methods)
    names = features["feature"].unique(maintain_order=True).to_list()
    kinds = [k for k in KIND_LABELS if k in set(per_merge["kind"])]
    figures = {}
    for i, name in enumerate(names):
        x_of = dict(features.filter(pl.col("feature") == name).select("model", "value").iter_rows())
        fig = make_subplots(rows=len(measures), cols=len(kinds), shared_xaxes=True, vertical_spacing=0.08,
                            horizontal_spacing=0.08, column_titles=[KIND_LABELS[k] for k in kinds])
        for row, measure in enumerate(measures, 1):
            for col, kind in enumerate(kinds, 1):
                data = per_merge.filter((pl.col("kind") == kind) & pl.col("model").is_in(list(x_of)))
                for method in methods:
                    part = data.filter(pl.col("method") == method)
                    fig.add_trace(go.Scatter(
                        x=_array([x_of[m] for m in part["model"]]), y=_array(part[measure].fill_null(np.nan)),
                        mode="markers", name=method, legendgroup=method, showlegend=(row, col) == (1, 1),
                        marker=dict(size=10, color=colors[method]), text=part["model"].to_list(),
                        hovertemplate="%{text}: x=%{x:.6g}, y=%{y:.3f}<extra></extra>"), row=row, col=col)
            fig.update_yaxes(title_text=OUTCOME_MEASURES[measure], row=row, col=1)
        fig.update_xaxes(title_text=name, row=len(measures))
        figures[str(i)] = _layout(fig, 140 + 230 * len(measures))
    return Chart("selectors", "Selector features vs merge outcomes", figures, [Choice("feature", _options(names))],
                 note="One point per merge: x = the feature (global scope; 'parents' = between its two parents, "
                      "'merge' = the merge's own group feature, 'merge vs parents' = mean over its parents), "
                      "y = the outcome averaged over its task comparisons.")


# ------------------------------------------------------------------------------------------- similarity

def _scope_label(scope: str | None, layer: int | None) -> str:
    return f"layer {layer}" if scope == "layer" else "whole model"


def similarity_chart(similarity: pl.DataFrame | None, order: list[str]) -> Chart | None:
    """Model × model heatmaps per feature (weights and functional), a slider over the whole model and each layer."""
    if similarity is None or similarity.is_empty():
        return None
    rows = shown_similarity(similarity).filter(pl.col("model_b").is_not_null()
                                               & ~pl.col("feature").is_in(NOT_PAIRWISE) & pl.col("value").is_finite())
    for column in ("source", "scope", "module"):
        if column not in rows.columns:
            rows = rows.with_columns(pl.lit(None, pl.String).alias(column))
    rows = rows.filter(pl.col("scope").fill_null("global") != "module")
    # Per-head rows (functional attention features) are averaged to one value per layer.
    rows = rows.group_by("source", "feature", "scope", "layer", "model_a", "model_b").agg(pl.col("value").mean())
    if rows.is_empty():
        return None
    models = ordered(pl.concat([rows["model_a"], rows["model_b"]]), order)
    keys = rows.select("source", "feature").unique().sort("source", "feature", nulls_last=True)
    figures, labels = {}, []
    for key in keys.iter_rows(named=True):
        subset = rows.filter(pl.col("source").eq_missing(key["source"]) & (pl.col("feature") == key["feature"]))
        scopes = subset.select("scope", "layer").unique().sort("layer", nulls_last=False)
        fig = go.Figure()
        steps = []
        # One colour scale for all layers (comparable across depth), another for the whole model (other units
        # for distances and norms).
        is_layer = pl.col("scope") == "layer"
        ranges = {kind: (float(part["value"].min()), float(part["value"].max()))
                  for kind, part in (("layer", subset.filter(is_layer)), ("whole", subset.filter(~is_layer)))
                  if not part.is_empty()}
        for i, scope in enumerate(scopes.iter_rows(named=True)):
            part = subset.filter(pl.col("scope").eq_missing(scope["scope"])
                                 & pl.col("layer").eq_missing(scope["layer"]))
            grid = {}
            for r in part.iter_rows(named=True):
                grid[(r["model_a"], r["model_b"])] = grid[(r["model_b"], r["model_a"])] = r["value"]
            z = _array([[grid.get((a, b), np.nan) for b in models] for a in models])
            zmin, zmax = ranges["layer" if scope["scope"] == "layer" else "whole"]
            fig.add_trace(go.Heatmap(z=z, x=models, y=models, visible=i == 0, colorscale="Viridis", zmin=zmin,
                                     zmax=zmax, colorbar=dict(title="value"),
                                     hovertemplate="%{y} × %{x}: %{z:.6g}<extra></extra>"))
            label = _scope_label(scope["scope"], scope["layer"])
            steps.append(dict(method="update", label=label.replace("layer ", "L"),
                              args=[{"visible": [j == i for j in range(scopes.height)]},
                                    {"title.text": f"{key['feature']} · {label}"}]))
        below = 20 + 4 * max(len(m) for m in models)  # room for the tilted model names under the heatmap
        sliders = [dict(active=0, steps=steps, currentvalue=dict(prefix="scope: "), pad=dict(t=below))] \
            if len(steps) > 1 else []
        _layout(fig, 260 + 30 * len(models) + below, sliders=sliders, margin=dict(l=60, r=20, t=50, b=below + 90),
                title=dict(text=steps[0]["args"][1]["title.text"], x=0),
                xaxis=dict(tickangle=35), yaxis=dict(autorange="reversed"))
        figures[str(len(labels))] = fig
        labels.append(f"{key['source']}: {key['feature']}" if key["source"] else key["feature"])
    return Chart("similarity", "Similarity between models", figures, [Choice("feature", _options(labels))],
                 note="Weights: streamed over the checkpoints (layer = decoder layer); functional: from the captured "
                      "activations. Drag the slider for a layer; the colour scale is fixed across layers.")
