"""Multi-SLERP (Goddard, 2024; mergekit's ``multislerp``): a weighted mean of task vectors taken on
the sphere rather than in the plane, so that averaging directions does not shrink the result.

Linear averaging of N task vectors that point in different directions returns a vector shorter
than any of them — each specialist's change diluted by the others. Multi-SLERP keeps the length:
per tensor, with wₘ the (normalised) weights, nₘ = ‖τₘ‖ and uₘ = τₘ / nₘ,

1. the weighted mean direction c = Σ wₘ uₘ / ‖Σ wₘ uₘ‖;
2. each uₘ's tangent at c, tₘ = uₘ − (uₘ · c) c, and their weighted sum t = Σ wₘ tₘ;
3. back onto the sphere along t, d = c cos ‖t‖ + t sin ‖t‖ / ‖t‖;
4. merged = θ₀ + (Σ wₘ nₘ) · d.

Two models at weights (1 − s, s) follow the great circle between their directions, as SLERP does;
N models get one barycentric point. Where the weighted directions cancel (Σ wₘ uₘ = 0, e.g.
opposite task vectors at equal weights) there is no mean direction: mergeopt falls back to the
weighted linear sum (mergekit does so for two models and raises for more, which would fail the
trial), and where every weight is 0 it keeps the base. The search tunes each model's weight;
``normalize_weights`` (on, as in mergekit) makes the weights shares, so only their ratios matter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from optimizer.merge._precision import work_dtype
from optimizer.merge._registry import MergeMethod, number_option, register
from optimizer.merge.plan import ModelParams


def merge_multislerp(
    name: str,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: Mapping[str, object],
    generator: torch.Generator,
) -> torch.Tensor:
    if not base.is_floating_point() or not deltas:
        return base.clone()
    work = work_dtype(base)
    eps = number_option(options, "eps", 1e-8, "multislerp")
    weights = torch.tensor([p.weight for p in params], dtype=work, device=base.device)
    if bool(options.get("normalize_weights", True)):
        total = weights.sum()
        if total.abs() < 1e-12:
            return base.clone()  # no task vector has any weight
        weights = weights / total
    flat = torch.stack([tau.to(work).reshape(-1) for tau in deltas])  # (M, D)
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / (norms + eps)
    centre = (weights[:, None] * units).sum(0)
    length = centre.norm()
    if length < eps:  # the directions cancel: no mean direction to interpolate around
        merged = (weights[:, None] * flat).sum(0)
    else:
        centre = centre / length
        tangent = (weights[:, None] * (units - (units @ centre)[:, None] * centre)).sum(0)
        angle = tangent.norm() + eps
        merged = (centre * torch.cos(angle) + tangent * (torch.sin(angle) / angle)) * (weights * norms[:, 0]).sum()
    return (base.to(work) + merged.reshape(base.shape)).to(base.dtype)


MULTISLERP = register(
    MergeMethod(
        name="multislerp",
        merge=merge_multislerp,
        summary="weighted mean of task vectors on the sphere, keeping their length (Goddard, 2024)",
        options={"normalize_weights": True, "eps": 1e-8},
        mergekit="multislerp",
    )
)
