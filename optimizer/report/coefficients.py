"""A trial's merge coefficients laid out as model × layer grids (for the heatmap).

The plan is resolved exactly as the merge core resolves it (most specific scope per tensor), so
the grid shows what was merged, whatever the search granularity. Columns are ``embed``, each
decoder layer, ``head``; rows are models, split into ``model.attn`` / ``model.mlp`` only when the
two differ somewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from optimizer.merge.plan import MergePlan
from optimizer.models import TensorInfo, layer_key

__all__ = ["CoefficientGrid", "coefficient_grid"]


@dataclass(frozen=True)
class CoefficientGrid:
    rows: list[str]
    columns: list[str]
    weight: list[list[float]]
    density: list[list[float]]


def _value(plan: MergePlan, model: str, layer: int | None, kind: str) -> tuple[float, float]:
    info = TensorInfo(name="", layer=layer, kind=kind, role="")
    params = plan.for_tensor(info)[plan.models.index(model)]
    return params.weight, params.density


def coefficient_grid(plan: MergePlan, num_layers: int) -> CoefficientGrid:
    columns = ["embed", *(layer_key(i) for i in range(num_layers)), "head"]
    cells: list[tuple[int | None, tuple[str, ...]]] = [(None, ("embed",))]
    cells += [(i, ("attn", "mlp")) for i in range(num_layers)]
    cells += [(None, ("head",))]
    rows: list[str] = []
    weight: list[list[float]] = []
    density: list[list[float]] = []
    for model in plan.models:
        per_kind = {
            kind: [_value(plan, model, layer, kinds[0] if len(kinds) == 1 else kind) for layer, kinds in cells]
            for kind in ("attn", "mlp")
        }
        split = per_kind["attn"] != per_kind["mlp"]
        for kind in ("attn", "mlp") if split else ("attn",):
            rows.append(f"{model}.{kind}" if split else model)
            weight.append([w for w, _ in per_kind[kind]])
            density.append([d for _, d in per_kind[kind]])
    return CoefficientGrid(rows=rows, columns=columns, weight=weight, density=density)
