"""HILA-Merging (NCU 2026; METHODS.md seed 4): prune and weight units by measured importance.

Each attention head, shared KV head and MLP of each layer is a *unit*
(:func:`optimizer.analysis.importance.unit_slices`), and each specialist m has an importance
Iₘ,ᵤ for it: how much m's golden loss rises when its delta on u is removed. Per unit slice,

    θᵤ = θ₀,ᵤ + λ Σₘ kₘ,ᵤ · softmaxₘ∈kept(Iₘ,ᵤ / (T·s)) · τₘ,ᵤ,

where kₘ,ᵤ = 1 keeps the pair when Iₘ,ᵤ is at or above the q-quantile of *all* (model, unit)
importances and 0 prunes it, and s = mean |Iₘ,ᵤ| over the table. Choices, and why:

* One global quantile, not one per model: a model whose task vector matters little everywhere
  should lose more units than one that matters everywhere, and q → 1 keeps the single most
  important (model, unit) pair, which makes q an interpretable knob. A unit all models lose is
  left at the base.
* T is in units of s, the table's mean absolute importance: raw importances are nats per golden
  token and range from 1e-4 (the zoo) to whole nats, so without s no one search range for T would
  fit every study. T → ∞ gives equal weights among kept models.
* Tensors no unit owns (embeddings, norms, lm_head, o_proj's bias) take λ·mean of the deltas,
  the T → ∞, q = 0 limit of the rule above, so those limits are plain λ-scaled averaging.
* ``params[m].weight`` (1 unless a plan sets it; HILA's search does not) scales τₘ everywhere.

Importance is measured once per study, so HILA is a :class:`MergeMethod` bound to it
(:func:`hila_method`); the registered ``hila`` record has none and says what to do when called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from optimizer.errors import ConfigError
from optimizer.merge._precision import work_dtype
from optimizer.merge._registry import MergeFn, MergeMethod, register
from optimizer.merge.plan import ModelParams

if TYPE_CHECKING:
    # Only the type: the merge core must not import the analysis package when methods register.
    from optimizer.analysis.importance import TensorSlice, Unit

__all__ = ["HILA", "HILA_DEFAULTS", "SEARCH_RANGES", "HilaMerge", "hila_coefficients", "hila_method"]

#: Defaults: prune the least important fifth of (model, unit) pairs, mild weighting, plain λ.
HILA_DEFAULTS: Mapping[str, float] = {"q": 0.2, "T": 1.0, "lambda": 1.0}

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
) -> dict[str, tuple[float, ...]]:
    """Unit name → each model's coefficient (in ``models`` order) before λ: 0 where pruned.

    Kept models' coefficients sum to 1 per unit (a softmax), so λ alone sets the step size.
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
    """HILA bound to one importance table; :meth:`for_tensor` gives each tensor's MergeFn.

    ``models`` is the plan's model order (the merge fn receives deltas by position, not name).
    Options read: ``q``, ``T``, ``lambda``.
    """

    importance: Mapping[str, Mapping[str, float]]
    models: tuple[str, ...]
    units: tuple[Unit, ...]
    _by_tensor: dict[str, list[tuple[str, TensorSlice]]] = field(init=False, repr=False, compare=False)
    _tables: dict[tuple[float, float], dict[str, tuple[float, ...]]] = field(
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

    def coefficients(self, q: float, T: float) -> dict[str, tuple[float, ...]]:
        """:func:`hila_coefficients` of this table, computed once per (q, T) (every tensor asks)."""
        key = (float(q), float(T))
        if key not in self._tables:
            names = [u.name for u in self.units]
            self._tables[key] = hila_coefficients(self.importance, self.models, names, q=key[0], T=key[1])
        return self._tables[key]

    def for_tensor(self, name: str) -> MergeFn:
        """The MergeFn of tensor ``name``: per-unit pruning and weights where units own slices."""
        slices = self._by_tensor.get(name, [])

        def merge(
            base: torch.Tensor,
            deltas: Sequence[torch.Tensor],
            params: Sequence[ModelParams],
            options: Mapping[str, object],
            generator: torch.Generator,
        ) -> torch.Tensor:
            if len(deltas) != len(self.models):
                raise ConfigError(
                    f"hila: tensor {name!r} has {len(deltas)} models but the importance is for"
                    f" {len(self.models)} ({', '.join(self.models)}); bind hila to the plan's models, in order"
                )
            if not base.is_floating_point() or not deltas:
                return base.clone()
            lam, q, T = _option(options, "lambda"), _option(options, "q"), _option(options, "T")
            work = work_dtype(base)
            b = base.to(work)
            scaled = [tau.to(work) * p.weight for tau, p in zip(deltas, params, strict=True)]
            merged = b + (lam / len(scaled)) * torch.stack(scaled).sum(0)  # units overwrite their slices below
            if slices:
                table = self.coefficients(q, T)
                for unit, s in slices:
                    if base.dim() <= s.dim or base.shape[s.dim] < s.stop:
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

        return merge

    def __call__(
        self,
        base: torch.Tensor,
        deltas: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: Mapping[str, object],
        generator: torch.Generator,
    ) -> torch.Tensor:
        raise ConfigError("hila needs the tensor's name to find its units: merge through HilaMerge.for_tensor(name)")


def _option(options: Mapping[str, object], key: str) -> float:
    value = options.get(key, HILA_DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"hila option {key}={value!r}: must be a number")
    return float(value)


class _Unbound:
    """The registered record's merge: HILA without importance cannot merge anything."""

    def __call__(
        self,
        base: torch.Tensor,
        deltas: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: Mapping[str, object],
        generator: torch.Generator,
    ) -> torch.Tensor:
        raise ConfigError(
            "hila needs each specialist's head/MLP importance measured first: generate golden data"
            " (`mergeopt golden CONFIG`), measure importance (optimizer.analysis.importance.importance_exact"
            " or importance_first_order) and merge with optimizer.merge.hila.hila_method(importance, units)"
        )


HILA = register(
    MergeMethod(
        name="hila",
        merge=_Unbound(),
        summary="head/MLP-importance pruning and softmax weights from golden-data loss (HILA-Merging, 2026)",
        uses_weight=False,
        options=HILA_DEFAULTS,
        mergekit=None,
        needs="importance",
        bind=lambda data, base: _bind(data, base),
        searchable=SEARCH_RANGES,
    )
)


def _bind(data: Mapping[str, Mapping[str, torch.Tensor]], base: Path) -> MergeMethod:
    """From the study's data file: model → unit name → 0-d importance tensor."""
    from optimizer.analysis.importance import unit_slices
    from optimizer.models import load_config, read_shapes

    importance = {m: {u: float(t) for u, t in row.items()} for m, row in data.items()}
    return hila_method(importance, unit_slices(load_config(base), read_shapes(base)), models=tuple(data))


def hila_method(
    importance: Mapping[str, Mapping[str, float]], units: Sequence[Unit], *, models: Sequence[str] | None = None
) -> MergeMethod:
    """The ``hila`` record bound to an importance table (model → unit name → Iₘ,ᵤ) and its units.

    ``models`` is the plan's model order; by default the table's own order (as
    :func:`~optimizer.analysis.importance.importance_exact` writes it: the ModelSet's order).
    """
    order = tuple(models) if models is not None else tuple(importance)
    return replace(HILA, merge=HilaMerge(importance, order, tuple(units)))
