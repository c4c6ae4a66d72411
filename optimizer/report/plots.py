"""Static plots (PNG, matplotlib): the front, hypervolume over trials, a trial's coefficients.

PNGs go into ``report.html`` (inline) and ``report.md``; interactive twins are in
:mod:`optimizer.report.interactive`. The front is drawn on held-out scores (what a choice should
rest on), with baselines marked and named so a member's position reads against them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt

from optimizer.report.coefficients import CoefficientGrid
from optimizer.report.rows import ReportRow

__all__ = ["plot_front", "plot_heatmap", "plot_hypervolume"]

_FRONT = {"color": "#1f77b4", "marker": "o", "s": 36, "label": "front (searched)"}
_BASELINE = {"color": "#d62728", "marker": "s", "s": 36, "label": "baseline"}


def _scatter(ax, rows: Sequence[ReportRow], x: str, y: str, *, annotate: bool) -> None:
    for style, pick in ((_FRONT, lambda r: not r.label), (_BASELINE, lambda r: bool(r.label))):
        chosen = [r for r in rows if pick(r)]
        ax.scatter([r.held_out[x] for r in chosen], [r.held_out[y] for r in chosen], **style, alpha=0.85)
        if annotate:
            for r in chosen:
                text = r.label or str(r.number)
                ax.annotate(text, (r.held_out[x], r.held_out[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.grid(alpha=0.3)


def plot_front(rows: Sequence[ReportRow], tasks: Sequence[str], metrics: Sequence[str], path: Path) -> None:
    """Two tasks: one scatter. More: the matrix of pairs. One: held-out score per trial."""
    if len(tasks) == 1:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [r.label or str(r.number) for r in rows]
        ax.bar(labels, [r.held_out[tasks[0]] for r in rows], color=["#d62728" if r.label else "#1f77b4" for r in rows])
        ax.set_ylabel(f"{tasks[0]} held-out {metrics[0]}")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    elif len(tasks) == 2:
        fig, ax = plt.subplots(figsize=(6.5, 5))
        _scatter(ax, rows, tasks[0], tasks[1], annotate=True)
        ax.set_xlabel(f"{tasks[0]} held-out {metrics[0]}")
        ax.set_ylabel(f"{tasks[1]} held-out {metrics[1]}")
        ax.legend(fontsize=8)
    else:
        k = len(tasks)
        fig, axes = plt.subplots(k, k, figsize=(2.6 * k, 2.6 * k), squeeze=False)
        for i, j in itertools.product(range(k), range(k)):
            ax = axes[i][j]
            if i == j:
                ax.axis("off")
                ax.text(0.5, 0.5, f"{tasks[i]}\n({metrics[i]})", ha="center", va="center", fontsize=11)
                continue
            _scatter(ax, rows, tasks[j], tasks[i], annotate=k <= 3)
            ax.tick_params(labelsize=7)
            if i == k - 1:
                ax.set_xlabel(tasks[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(tasks[i], fontsize=9)
        handles, labels = axes[0][1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle("Pareto front, held-out scores (baselines in red)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_hypervolume(history: Sequence[tuple[int, float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.step([n for n, _ in history], [hv for _, hv in history], where="post", color="#2ca02c")
    ax.set_xlabel("trial number")
    ax.set_ylabel("hypervolume (search scores)")
    ax.set_title("Hypervolume of the front over trials", fontsize=11)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(
    grid: CoefficientGrid, title: str, path: Path, *, fields: tuple[str, ...] = ("weight", "density")
) -> None:
    """One panel per coefficient the method uses (``fields``), model rows × layer columns."""
    panels = [(f, v) for f, v in (("weight", grid.weight), ("density", grid.density)) if f in fields]
    width = max(5.0, 0.7 * len(grid.columns) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 1.0 + 1.1 * len(grid.rows) * len(panels)), squeeze=False)
    for ax, (field, values) in zip(axes[:, 0], panels, strict=True):
        image = ax.imshow(values, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=7, rotation=45)
        ax.set_yticks(range(len(grid.rows)), grid.rows, fontsize=8)
        ax.set_title("weight λ" if field == "weight" else field, fontsize=10)
        for (i, row), j in itertools.product(enumerate(values), range(len(grid.columns))):
            ax.text(j, i, f"{row[j]:.2f}", ha="center", va="center", fontsize=6, color="white")
        fig.colorbar(image, ax=ax, fraction=0.03)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
