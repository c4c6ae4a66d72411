"""Interactive twins of the report's plots (plotly HTML): hover a point to see its trial.

All figures share one ``plotly.min.js`` written beside them, so the report folder works offline
and each HTML file stays small.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from optimizer.report.coefficients import CoefficientGrid
from optimizer.report.rows import ReportRow

__all__ = ["front_html", "heatmap_html", "hypervolume_html"]


def _hover(row: ReportRow, tasks: Sequence[str]) -> str:
    lines = [row.name]
    lines += [
        f"{t}: held-out {row.held_out[t]:.3f} (search {row.search[t]:.3f}, gain {row.gain[t]:.2f})" for t in tasks
    ]
    return "<br>".join(lines)


def _write(fig: go.Figure, path: Path) -> None:
    fig.write_html(path, include_plotlyjs="directory", full_html=True)


def front_html(rows: Sequence[ReportRow], tasks: Sequence[str], path: Path) -> None:
    groups = (
        ("front (searched)", "#1f77b4", [r for r in rows if not r.label]),
        ("baseline", "#d62728", [r for r in rows if r.label]),
    )
    if len(tasks) < 2:
        fig = go.Figure(go.Bar(x=[r.name for r in rows], y=[r.held_out[tasks[0]] for r in rows]))
    else:
        fig = go.Figure()
        for name, color, chosen in groups:
            fig.add_trace(
                go.Splom(
                    dimensions=[{"label": t, "values": [r.held_out[t] for r in chosen]} for t in tasks],
                    text=[_hover(r, tasks) for r in chosen],
                    hoverinfo="text",
                    name=name,
                    marker={"color": color, "size": 8},
                    diagonal_visible=False,
                    showupperhalf=len(tasks) > 2,
                )
            )
    fig.update_layout(title="Pareto front, held-out scores", height=300 + 150 * len(tasks))
    _write(fig, path)


def hypervolume_html(history: Sequence[tuple[int, float]], path: Path) -> None:
    fig = go.Figure(go.Scatter(x=[n for n, _ in history], y=[hv for _, hv in history], line_shape="hv"))
    fig.update_layout(title="Hypervolume over trials (search scores)", xaxis_title="trial", yaxis_title="hypervolume")
    _write(fig, path)


def heatmap_html(
    grid: CoefficientGrid, title: str, path: Path, *, fields: tuple[str, ...] = ("weight", "density")
) -> None:
    panels = [(f, v) for f, v in (("weight", grid.weight), ("density", grid.density)) if f in fields]
    fig = make_subplots(rows=len(panels), cols=1, subplot_titles=[f for f, _ in panels])
    for i, (_, values) in enumerate(panels, start=1):
        fig.add_trace(
            go.Heatmap(z=values, x=grid.columns, y=grid.rows, colorscale="Viridis", showscale=i == 1), row=i, col=1
        )
    fig.update_layout(title=title, height=250 + 80 * len(grid.rows) * len(panels))
    _write(fig, path)
