"""The README.md of an exported model: what it is, how it was found, how to rebuild it.

A merged model that travels without its study should still say which base and specialists went
in, with which coefficients, how it scored (search and, when measured, held-out), and the exact
commands that reproduce it, with mergeopt and, where the method exists there, with mergekit.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from statistics import mean

from optimizer.merge import get_method
from optimizer.merge.plan import MergePlan
from optimizer.report.coefficients import coefficient_grid

__all__ = ["model_card"]


def _coefficients(plan: MergePlan, num_layers: int) -> list[str]:
    grid = coefficient_grid(plan, num_layers)
    method = get_method(plan.method)
    lines = ["| model | weight λ (mean, min–max) | density (mean, min–max) |", "|---|---|---|"]
    for row, weights, densities in zip(grid.rows, grid.weight, grid.density, strict=True):
        w = f"{mean(weights):.3f} ({min(weights):.3f}–{max(weights):.3f})" if method.uses_weight else "–"
        d = f"{mean(densities):.3f} ({min(densities):.3f}–{max(densities):.3f})" if method.uses_density else "–"
        lines.append(f"| {row} | {w} | {d} |")
    options = ", ".join(f"`{k}={v}`" for k, v in sorted(plan.options.items()))
    if options:
        lines += ["", f"Method options: {options}."]
    return lines


def model_card(
    *,
    study: str,
    trial: int,
    label: str | None,
    plan: MergePlan,
    base: str,
    models: Mapping[str, str],
    num_layers: int,
    search: Mapping[str, float],
    held_out: Mapping[str, float] | None,
    storage_arg: str,
    no_mergekit: str | None,
) -> str:
    """The export's README. ``no_mergekit`` is why no mergekit.yaml is shipped (None when one is)."""
    method = get_method(plan.method)
    title = f"trial {trial} of study `{study}`" + (f" (baseline `{label}`)" if label else "")
    lines = [
        f"# Merged model: {title}",
        "",
        f"Built by mergeopt with **{plan.method}** — {method.summary}.",
        "",
        "## Models",
        "",
        f"- base: `{base}`",
        *(f"- specialist `{name}`: `{path}`" for name, path in models.items() if name in plan.models),
        "",
        "## Coefficients",
        "",
        *_coefficients(plan, num_layers),
        "",
        "The full per-scope plan is in `mergeopt.json` (`plan`).",
        "",
        "## Scores",
        "",
        "| task | search | held-out |",
        "|---|---|---|",
    ]
    for task, value in search.items():
        held = f"{held_out[task]:.4f}" if held_out and task in held_out else "not measured (run `mergeopt report`)"
        lines.append(f"| {task} | {value:.4f} | {held} |")
    lines += [
        "",
        "Search scores were measured on the examples the search optimised; held-out scores are the ones to trust.",
        "",
        "## Reproduce",
        "",
        "```",
        f"mergeopt export {storage_arg} --trial {trial} --out DIR",
    ]
    if no_mergekit is None:
        from optimizer.adapters import is_adapter

        # mergekit merges each adapter into a full model first, and needs a folder for those.
        cache = " --lora-merge-cache CACHE_DIR" if any(is_adapter(Path(p)) for p in models.values()) else ""
        lines += [f"mergekit-yaml mergekit.yaml DIR{cache}   # same tensors with mergekit (see mergekit.yaml)"]
    lines += ["```", ""]
    if no_mergekit is not None:
        lines += [
            f"{no_mergekit}, so no mergekit.yaml is shipped; `mergeopt.json` holds the",
            "complete plan, which `mergeopt export` rebuilds exactly.",
            "",
        ]
    return "\n".join(lines)
