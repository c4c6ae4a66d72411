"""SCE (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024): Select, Calculate, Erase.

Per tensor, with the task vectors τₘ stacked:

1. **Select**: keep the ``select_topk`` share of entries where the models disagree most (largest
   variance of τₘ across models, among entries whose variance is not zero); the rest are zeroed in
   every task vector. At 1.0 nothing is dropped.
2. **Calculate**: one weight per model for this matrix, its mean squared (selected) task vector,
   normalised to sum to 1 (equal weights where every task vector is zero).
3. **Erase**: elect each entry's sign from the sum Σ τₘ (a zero sum elects +) and drop the entries
   of the other sign, as TIES does; merged = θ₀ + Σ wₘ·τₘ / Σ wₘ over the entries that remain.

The method has no per-model coefficients: the weights come from the task vectors themselves, so the
search tunes only ``select_topk`` (the paper's 0.1 lies in its range). The conventions (population
variance, ⌊share · nonzero⌋ entries, a 1e-6 floor under the divisor) are mergekit's, so its
``sce`` rebuilds the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from optimizer.merge._precision import work_dtype
from optimizer.merge._registry import MergeMethod, number_option, register
from optimizer.merge.plan import ModelParams

_EPS = 1e-6


def _select(taus: torch.Tensor, share: float) -> torch.Tensor:
    """0/1 mask of the ``share`` of entries whose values vary most across the models."""
    if share <= 0:
        return torch.zeros_like(taus[0])
    variance = taus.var(dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance).item() * share)
    mask = torch.zeros_like(variance)
    if k:
        mask.view(-1)[variance.abs().view(-1).topk(k).indices] = 1
    return mask


def merge_sce(
    name: str,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: Mapping[str, object],
    generator: torch.Generator,
) -> torch.Tensor:
    if not deltas or not base.is_floating_point():
        return base.clone()
    work = work_dtype(base)
    taus = torch.stack([tau.to(work) for tau in deltas])
    share = number_option(options, "select_topk", 1.0, "sce")
    if share < 1:
        taus = taus * _select(taus, share)
    energy = taus.square().reshape(len(deltas), -1).mean(dim=1)
    total = float(energy.sum())
    weights = energy / total if abs(total) >= _EPS else torch.full_like(energy, 1 / len(deltas))
    elected = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0).to(work)
    kept = (taus.sign() == elected).to(work) * weights.view(-1, *([1] * base.dim()))
    merged = (taus * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=_EPS)
    return (base.to(work) + merged).to(base.dtype)


SCE = register(
    MergeMethod(
        name="sce",
        merge=merge_sce,
        summary="keep high-variance entries, weight models by their energy, erase sign conflicts (Wan et al., 2024)",
        uses_weight=False,
        options={"select_topk": 1.0},
        searchable={"select_topk": (0.05, 1.0, False)},
        mergekit="sce",
    )
)
