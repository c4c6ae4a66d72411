"""``report.html`` (self-contained: styles and PNGs inline) and ``report.md`` from the rows.

The HTML needs no network and no other file to show its tables and images, so it can be mailed
or attached to a model card; its links to the interactive plots work while it sits in the report
folder. Each number cell carries its full-precision value in ``data-value``, which keeps the page
checkable against ``front.json``.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from optimizer.report.rows import ReportRow
from optimizer.search.references import References

__all__ = ["ReportContext", "render_html", "render_markdown"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left}
tr.pick{background:#fff3c4} tr.baseline{color:#8a1c1c}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
code{background:#f5f5f5;padding:1px 4px}
"""


@dataclass(frozen=True)
class ReportContext:
    """What the renderers need besides the rows."""

    study: str
    tasks: list[str]
    metrics: list[str]
    method: str
    granularity: str
    counts: Mapping[str, int]  # trials by state
    refs: References
    pick: int | None  # the balanced member's trial number
    heatmap_trial: int | None
    images: Mapping[str, Path]  # title → PNG path
    interactive: Mapping[str, str]  # title → relative HTML path
    commands: Sequence[str]


def _cell(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return '<td data-value="nan">–</td>'
    return f'<td data-value="{value!r}">{value:.{digits}f}</td>'


def _rows_table(rows: Sequence[ReportRow], ctx: ReportContext) -> str:
    head = ["trial", "label", "front"]
    head += [f"{t} held-out" for t in ctx.tasks] + [f"{t} gain" for t in ctx.tasks] + ["min gain"]
    head += [f"{t} search" for t in ctx.tasks]
    out = ['<table id="front"><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cls = "pick" if r.number == ctx.pick else "baseline" if r.label else ""
        cells = [
            f"<td>{r.number}</td>",
            f'<td class="l">{html.escape(r.label)}</td>',
            f"<td>{'✓' if r.on_front else ''}</td>",
        ]
        cells += [_cell(r.held_out[t]) for t in ctx.tasks] + [_cell(r.gain[t], 2) for t in ctx.tasks]
        cells += [_cell(r.min_gain, 2)] + [_cell(r.search[t]) for t in ctx.tasks]
        out.append(f'<tr class="{cls}" data-trial="{r.number}">' + "".join(cells) + "</tr>")
    return "\n".join([*out, "</table>"])


def _refs_table(ctx: ReportContext) -> str:
    out = [
        '<table id="references"><tr><th class="l">task</th><th>metric</th><th>base</th>'
        '<th class="l">specialist</th><th>specialist score</th></tr>'
    ]
    for t, metric in zip(ctx.tasks, ctx.metrics, strict=True):
        out.append(
            f'<tr><td class="l">{html.escape(t)}</td><td>{html.escape(metric)}</td>{_cell(ctx.refs.base[t])}'
            f'<td class="l">{html.escape(ctx.refs.specialist_of[t])}</td>{_cell(ctx.refs.specialist[t])}</tr>'
        )
    return "\n".join([*out, "</table>"])


def _params_table(rows: Sequence[ReportRow]) -> str:
    names = sorted({p for r in rows for p in r.params})
    out = ['<table id="params"><tr><th>trial</th>' + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"]
    for r in rows:
        cells = "".join(_cell(r.params[n]) if n in r.params else "<td></td>" for n in names)
        out.append(f"<tr><td>{r.number}</td>{cells}</tr>")
    return "\n".join([*out, "</table>"])


def _img(path: Path, title: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'


def render_html(rows: Sequence[ReportRow], ctx: ReportContext) -> str:
    counts = ", ".join(f"{n} {state.lower()}" for state, n in ctx.counts.items() if n)
    pick = next((r for r in rows if r.number == ctx.pick), None)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>mergeopt report: {html.escape(ctx.study)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>mergeopt report: {html.escape(ctx.study)}</h1>",
        f"<p>Method <b>{html.escape(ctx.method)}</b>, granularity <b>{html.escape(ctx.granularity)}</b>;"
        f" trials: {counts}.</p>",
        "<p>Every front member and baseline is re-scored on the <b>held-out</b> split; search scores are shown for "
        "comparison (they are measured on the examples the search optimised, so they are optimistic). "
        "Normalized gain = (merged − base) / (specialist − base) on held-out data:"
        " 1 is the specialist, 0 the base.</p>",
        "<h2>Reference scores (held-out)</h2>",
        _refs_table(ctx),
        "<h2>Front and baselines</h2>",
    ]
    if pick is not None:
        parts.append(
            f"<p>Balanced choice (highest worst-task gain): <b>{html.escape(pick.name)}</b>,"
            f" min gain {pick.min_gain:.2f}"
            " (highlighted).</p>"
        )
    parts.append(_rows_table(rows, ctx))
    parts.append("<h2>Plots</h2>")
    for title, path in ctx.images.items():
        link = ctx.interactive.get(title)
        extra = f' — <a href="{html.escape(link)}">interactive</a>' if link else ""
        parts.append(f"<h3>{html.escape(title)}{extra}</h3>{_img(path, title)}")
    parts += [
        "<h2>Parameters</h2><details><summary>searched coefficients per trial</summary>",
        _params_table(rows),
        "</details>",
    ]
    parts.append("<h2>Reproduce</h2><pre>" + html.escape("\n".join(ctx.commands)) + "</pre></body></html>")
    return "\n".join(parts)


def _md_num(value: float, digits: int = 3) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def render_markdown(rows: Sequence[ReportRow], ctx: ReportContext) -> str:
    lines = [f"# mergeopt report: {ctx.study}", "", f"Method `{ctx.method}`, granularity `{ctx.granularity}`.", ""]
    lines += [
        "## Reference scores (held-out)",
        "",
        "| task | metric | base | specialist | specialist score |",
        "|---|---|---|---|---|",
    ]
    for t, m in zip(ctx.tasks, ctx.metrics, strict=True):
        lines.append(
            f"| {t} | {m} | {_md_num(ctx.refs.base[t])} | {ctx.refs.specialist_of[t]}"
            f" | {_md_num(ctx.refs.specialist[t])} |"
        )
    head = [
        "trial",
        "label",
        "front",
        *(f"{t} held-out" for t in ctx.tasks),
        *(f"{t} gain" for t in ctx.tasks),
        "min gain",
    ]
    lines += ["", "## Front and baselines", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        star = " **(balanced pick)**" if r.number == ctx.pick else ""
        cells = [f"{r.number}{star}", r.label, "yes" if r.on_front else ""]
        cells += (
            [_md_num(r.held_out[t]) for t in ctx.tasks]
            + [_md_num(r.gain[t], 2) for t in ctx.tasks]
            + [_md_num(r.min_gain, 2)]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""]
    for title, path in ctx.images.items():
        lines.append(f"![{title}]({path.name})")
    lines += ["", "## Reproduce", "", "```", *ctx.commands, "```", ""]
    return "\n".join(lines)
