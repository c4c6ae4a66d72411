"""HILA-Merging (NCU 2026; ``docs/methods.md``): prune and weight units by measured importance.

Each attention head, shared KV head and MLP of each layer is a *unit*
(:func:`~optimizer.merge.hila._units.unit_slices`), and each specialist m has an importance
Iₘ,ᵤ for it: how much m's golden loss rises when its delta on u is removed. Per unit slice,

    θᵤ = θ₀,ᵤ + λ Σₘ kₘ,ᵤ · softmaxₘ∈kept(Iₘ,ᵤ / (T·sₘ)) · τₘ,ᵤ,

where kₘ,ᵤ = 1 keeps the pair when Iₘ,ᵤ / sₘ is at or above the q-quantile of model m's own
row, sₘ = mean |Iₘ,ᵤ| over m's units, and 0 prunes it.
Choices, and why:

* One quantile per model by default, each model's importances in units of its own mean: a
  specialist whose golden task is simply harder (larger losses, so importances an order larger
  everywhere) would otherwise keep nearly all its units at the others' expense, and that is a
  scale, not a measure of which model matters. Per-model quantiles scored better on both zoos
  (``benchmarks/README.md``): worst-task gain +0.85 against +0.67 after a search on the tiny zoo;
  on the real-model zoo, where one specialist's importances are 15-27× smaller than the others',
  a better worst task at every q tried. ``per_model: false`` is one global quantile over the
  whole table (there sₘ is s, the whole table's mean |I|): a model whose task vector matters
  little everywhere loses more units, and q → 1 keeps the single most important (model, unit)
  pair. Either way a unit all models lose is left at the base.
* T is in units of sₘ (or s), a mean absolute importance: raw importances are nats per golden
  token and range from 1e-4 (the zoo) to whole nats, so without s no one search range for T would
  fit every study. T → ∞ gives equal weights among kept models.
* Tensors no unit owns (embeddings, norms, lm_head, o_proj's bias) take λ·mean of the deltas,
  the T → ∞, q = 0 limit of the rule above, so those limits are plain λ-scaled averaging.
* ``params[m].weight`` (1 unless a plan sets it; HILA's search does not) scales τₘ everywhere.

The method's pieces, all in this folder: the units (``_units.py``), the importance measurement
on each specialist's golden answers (``_importance.py``), and here the coefficients, the merge and
:class:`ImportanceData`, the importance measured once per study and cached beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from optimizer.checkpoints import model_config, read_shapes
from optimizer.errors import ConfigError
from optimizer.merge._precision import work_dtype
from optimizer.merge._registry import Measured, MergeFn, MergeMethod, StudyData, StudyInputs, number_option, register
from optimizer.merge.hila._importance import Importance, importance_exact, importance_first_order
from optimizer.merge.hila._units import TensorSlice, Unit, remove_unit, unit_slices
from optimizer.merge.plan import ModelParams

__all__ = [
    "HILA",
    "HILA_DEFAULTS",
    "SEARCH_RANGES",
    "HilaMerge",
    "Importance",
    "ImportanceData",
    "TensorSlice",
    "Unit",
    "hila_coefficients",
    "hila_method",
    "importance_exact",
    "importance_first_order",
    "remove_unit",
    "unit_slices",
]

#: Defaults: prune the least important fifth of each model's units, mild weighting, plain λ.
HILA_DEFAULTS: Mapping[str, float | bool] = {"q": 0.2, "T": 1.0, "lambda": 1.0, "per_model": True}

#: Option → (low, high, log scale): the ranges a study searches q, T and λ over.
SEARCH_RANGES: Mapping[str, tuple[float, float, bool]] = {
    "q": (0.0, 0.8, False),
    "T": (0.1, 10.0, True),
    "lambda": (0.3, 1.5, False),
}


def hila_coefficients(
    importance: Mapping[str, Mapping[str, float]],
    models: Sequence[str],
    units: Sequence[str],
    *,
    q: float,
    T: float,
    per_model: bool = True,
) -> dict[str, tuple[float, ...]]:
    """Unit name → each model's coefficient (in ``models`` order) before λ: 0 where pruned.

    Kept models' coefficients sum to 1 per unit (a softmax), so λ alone sets the step size.
    ``per_model`` (the default): each model's importances in units of its own mean |I|, pruned at
    its own quantile; ``False``: the raw table, pruned at one quantile of all its entries.
    """
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"hila option q={q}: the pruning quantile must lie in [0, 1]")
    if not T > 0:
        raise ConfigError(f"hila option T={T}: the softmax temperature must be positive (inf: equal weights)")
    table = torch.tensor([[float(importance[m][u]) for u in units] for m in models], dtype=torch.float64)  # (M, U)
    if table.numel() == 0:
        return {}
    if not torch.isfinite(table).all():
        raise ConfigError("hila: the importance table holds a NaN or infinite value; measure importance again")
    if per_model:
        rows = table.abs().mean(dim=1, keepdim=True)
        table = table / torch.where(rows > 0, rows, 1.0)
        keep = table >= torch.quantile(table, q, dim=1, keepdim=True)
    else:
        keep = table >= torch.quantile(table.flatten(), q)  # strictly below the q-quantile: pruned
    scale = float(table.abs().mean()) or 1.0
    logits = torch.zeros_like(table) if math.isinf(T) else table / (scale * T)
    logits = logits.masked_fill(~keep, -math.inf)
    any_kept = keep.any(dim=0, keepdim=True)
    weights = torch.where(any_kept, torch.softmax(logits.masked_fill(~any_kept, 0.0), dim=0), 0.0)
    weights = weights.masked_fill(~keep, 0.0)
    return {u: tuple(float(w) for w in weights[:, i]) for i, u in enumerate(units)}


@dataclass(frozen=True)
class HilaMerge:
    """HILA over one importance table: a :data:`~optimizer.merge._registry.MergeFn`.

    ``models`` is the plan's model order (the merge fn receives deltas by position, not name).
    Options read: ``q``, ``T``, ``lambda``, ``per_model``.
    """

    importance: Mapping[str, Mapping[str, float]]
    models: tuple[str, ...]
    units: tuple[Unit, ...]
    _by_tensor: dict[str, list[tuple[str, TensorSlice]]] = field(init=False, repr=False, compare=False)
    _tables: dict[tuple[float, float, bool], dict[str, tuple[float, ...]]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        for m in self.models:
            if m not in self.importance:
                raise ConfigError(
                    f"hila: no importance for model {m!r} (have: {', '.join(self.importance) or 'none'});"
                    " measure importance for every model of the study"
                )
            missing = [u.name for u in self.units if u.name not in self.importance[m]]
            if missing:
                raise ConfigError(
                    f"hila: model {m!r} has no importance for unit {missing[0]!r} ({len(missing)} missing); the"
                    " importance file was measured on other units or another model: measure it again"
                )
        by_tensor: dict[str, list[tuple[str, TensorSlice]]] = {}
        for u in self.units:
            for s in u.slices:
                by_tensor.setdefault(s.tensor, []).append((u.name, s))
        object.__setattr__(self, "_by_tensor", by_tensor)

    def coefficients(self, q: float, T: float, per_model: bool = True) -> dict[str, tuple[float, ...]]:
        """:func:`hila_coefficients` of this table, computed once per (q, T, per_model) (every tensor asks)."""
        key = (float(q), float(T), bool(per_model))
        if key not in self._tables:
            names = [u.name for u in self.units]
            self._tables[key] = hila_coefficients(
                self.importance, self.models, names, q=key[0], T=key[1], per_model=key[2]
            )
        return self._tables[key]

    def __call__(
        self,
        name: str,
        base: torch.Tensor,
        deltas: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: Mapping[str, object],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Tensor ``name`` merged: per-unit pruning and weights where units own slices of it."""
        if len(deltas) != len(self.models):
            raise ConfigError(
                f"hila: tensor {name!r} has {len(deltas)} models but the importance is for"
                f" {len(self.models)} ({', '.join(self.models)}); bind hila to the plan's models, in order"
            )
        if not base.is_floating_point() or not deltas:
            return base.clone()
        lam, q, T = (number_option(options, key, float(HILA_DEFAULTS[key]), "hila") for key in ("lambda", "q", "T"))
        per_model = bool(options.get("per_model", HILA_DEFAULTS["per_model"]))
        work = work_dtype(base)
        b = base.to(work)
        scaled = [tau.to(work) * p.weight for tau, p in zip(deltas, params, strict=True)]
        merged = b + (lam / len(scaled)) * torch.stack(scaled).sum(0)  # units overwrite their slices below
        slices = self._by_tensor.get(name, [])
        if slices:
            table = self.coefficients(q, T, per_model)
            for unit, s in slices:
                if not s.fits(base.shape):
                    raise ConfigError(
                        f"hila: unit {unit} owns [{s.start}, {s.stop}) of dim {s.dim} of {name!r}, which has"
                        f" shape {tuple(base.shape)}; the units come from another model's config.json"
                    )
                idx = s.index()
                step = torch.zeros_like(b[idx])
                for c, tau in zip(table[unit], scaled, strict=True):
                    if c:
                        step.add_(tau[idx], alpha=c)
                merged[idx] = b[idx] + lam * step
        return merged.to(base.dtype)


class ImportanceData(StudyData):
    """Each specialist's unit importances, measured exactly on its own golden answers."""

    kind = "importance"

    def _golden(self, inputs: StudyInputs) -> dict[str, list[dict[str, str]]]:
        # A model without golden answers is left out here and named by importance_exact's check.
        return {m: rows for m in inputs.models.names if (rows := inputs.golden(m))}

    def key(self, inputs: StudyInputs) -> object:
        return self._golden(inputs)

    def measure(self, inputs: StudyInputs) -> Measured:
        golden = self._golden(inputs)
        inputs.say("measuring head and MLP importance on golden data (one loss per unit and specialist)")
        table = importance_exact(inputs.models, golden)
        return {m: {u: torch.tensor(v, dtype=torch.float64) for u, v in row.items()} for m, row in table.items()}

    def bind(self, data: Mapping[str, Mapping[str, torch.Tensor]], base: Path) -> MergeFn:
        """From the study's data file: model → unit name → 0-d importance tensor."""
        importance = {m: {u: float(t) for u, t in row.items()} for m, row in data.items()}
        units = unit_slices(model_config(base), read_shapes(base))
        return HilaMerge(importance, tuple(data), tuple(units))


HILA = register(
    MergeMethod(
        name="hila",
        merge=None,
        summary="head/MLP-importance pruning and softmax weights from golden-data loss (HILA-Merging, 2026)",
        uses_weight=False,
        options=HILA_DEFAULTS,
        mergekit=None,
        study_data=ImportanceData(),
        searchable=SEARCH_RANGES,
    )
)


def hila_method(
    importance: Mapping[str, Mapping[str, float]], units: Sequence[Unit], *, models: Sequence[str] | None = None
) -> MergeMethod:
    """The ``hila`` record bound to an importance table (model → unit name → Iₘ,ᵤ) and its units.

    ``models`` is the plan's model order; by default the table's own order (as
    :func:`~optimizer.merge.hila._importance.importance_exact` writes it: the ModelSet's order).
    """
    order = tuple(models) if models is not None else tuple(importance)
    return replace(HILA, merge=HilaMerge(importance, order, tuple(units)))
