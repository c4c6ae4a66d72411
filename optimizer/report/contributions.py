"""How a contribution analysis is shown: a two-panel heatmap (PNG) and a terminal table.

The heatmap puts α (each layer alone) beside β (each layer merged) on one colour scale centred
at 0, so a conflict reads as a cell that is blue or white on the left and red on the right; the
conflicts themselves are outlined. matplotlib is imported only when a plot is drawn, and through
its object API (no pyplot), so drawing never changes the process's backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from optimizer.merge.hi_merging import ContributionAnalysis

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["contribution_heatmap", "contribution_table", "write_contribution_files"]

_ANNOTATE_MAX_CELLS = 200  # beyond this the numbers overlap and the colours say enough


def contribution_heatmap(
    analysis: ContributionAnalysis,
    path: Path,
    *,
    threshold: float = 0.0,
    margin: float = 0.0,
    title: str | None = None,
) -> Path:
    """Write α and β (model × layer) side by side as a PNG; conflicts are outlined in black."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    models, layers = analysis.models, analysis.layers
    panels = {
        "α: layer alone": np.array([[analysis.alpha[m][layer] for layer in layers] for m in models], dtype=float),
        "β: layer merged (1/N)": np.array([[analysis.beta[m][layer] for layer in layers] for m in models], dtype=float),
    }
    finite = [abs(v) for data in panels.values() for v in data.ravel() if math.isfinite(v)]
    limit = max(finite, default=0.0) or 1e-6  # one symmetric scale for both panels: 0 is white
    cmap = colormaps["RdBu"].with_extremes(bad="#bbbbbb")  # red = hurts, blue = helps, grey = NaN
    conflicts = analysis.conflicts(threshold, margin=margin)

    width = min(3.0 + 0.5 * len(layers), 14.0)
    fig = Figure(figsize=(2 * width + 1.0, 1.6 + 0.5 * len(models)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    image = None
    for ax, (name, data) in zip(axes, panels.items(), strict=True):
        image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(layers)), layers, rotation=90 if len(layers) > 12 else 0, fontsize=8)
        ax.set_yticks(range(len(models)), [f"{m} ({analysis.task_of[m]})" for m in models], fontsize=8)
        if data.size <= _ANNOTATE_MAX_CELLS:
            for (i, j), value in np.ndenumerate(data):
                text = "nan" if math.isnan(value) else f"{value:+.2f}"
                dark = math.isfinite(value) and abs(value) > 0.6 * limit  # white on deep red / blue
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
        for model, layer in conflicts:
            i, j = models.index(model), layers.index(layer)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.2))
    assert image is not None  # two panels, always drawn
    fig.colorbar(image, ax=list(axes), shrink=0.9, label="Δ own-task score vs base")
    fig.suptitle(
        title
        or f"Layer contributions, higher is better ({len(conflicts)} conflicts outlined: {_rule(threshold, margin)})",
        fontsize=11,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def contribution_table(analysis: ContributionAnalysis, *, threshold: float = 0.0, margin: float = 0.0) -> Table:
    """One row per model × layer: α, β, β − α, and for conflicts the model cut back (culprit)."""
    from rich.table import Table

    table = Table(
        title=f"Layer contributions on {analysis.split} ({analysis.probes} probes, {analysis.seconds:.1f}s;"
        f" conflict: {_rule(threshold, margin)})"
    )
    for name in ("model", "task", "layer"):
        table.add_column(name, justify="left")
    for name in ("α", "β", "β − α"):
        table.add_column(name, justify="right")
    table.add_column("conflict → cut back")
    for m in analysis.models:
        for layer in analysis.layers:
            a, b = analysis.alpha[m][layer], analysis.beta[m][layer]
            flag = ""
            if analysis.is_conflict(m, layer, threshold, margin=margin):
                flag = f"[bold red]yes[/] → {analysis.culprit(m, layer)}.{layer}"
            table.add_row(m, analysis.task_of[m], layer, f"{a:+.4f}", f"{b:+.4f}", f"{b - a:+.4f}", flag)
        table.add_section()
    return table


def _rule(threshold: float, margin: float) -> str:
    """The conflict rule as the reader should see it, with the numbers filled in."""
    first = "β < α" if margin == 0 else f"β < α − {margin:g}"
    return f"{first} and β < {threshold:g}"


def write_contribution_files(
    analysis: ContributionAnalysis, folder: Path, *, threshold: float = 0.0, margin: float = 0.0
) -> tuple[Path, Path]:
    """``contributions.json`` (the record) and ``contributions.png`` (the heatmap) in ``folder``."""
    from optimizer.atomic import write_text

    folder.mkdir(parents=True, exist_ok=True)
    data = write_text(folder / "contributions.json", analysis.to_json())
    png = contribution_heatmap(analysis, folder / "contributions.png", threshold=threshold, margin=margin)
    return data, png
