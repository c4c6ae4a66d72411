"""Linear merge ("model soup", Wortsman et al. 2022): a weighted mean of the models' weights.

W = Σₘ wₘ θₘ / Σₘ wₘ. With ``normalize`` off the weights are used as given (W = Σ wₘ θₘ).
Written in delta form, θ₀ + Σ wₘ τₘ / Σ wₘ, which is the same tensor when normalized and lets
every method share one input (the task vectors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from optimizer.merge._registry import MergeMethod, register
from optimizer.merge.plan import ModelParams


def merge_linear(
    name: str,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: Mapping[str, object],
    generator: torch.Generator,
) -> torch.Tensor:
    weights = [p.weight for p in params]
    total = sum(weights)
    if options["normalize"]:
        if abs(total) < 1e-12:
            # Every model switched off for this tensor: the mean is undefined, keep the base.
            return base.clone()
        merged = base.clone()
        for w, tau in zip(weights, deltas, strict=True):
            merged.add_(tau, alpha=w / total)
        return merged
    # Unnormalized: Σ wₘ θₘ = (Σ wₘ) θ₀ + Σ wₘ τₘ.
    merged = base * total
    for w, tau in zip(weights, deltas, strict=True):
        merged.add_(tau, alpha=w)
    return merged


def _coefficients(params: Sequence[ModelParams], options: Mapping[str, object]) -> tuple[float, list[float]]:
    """merge_linear's arithmetic as coefficients of θ₀ and of each τₘ."""
    weights = [p.weight for p in params]
    total = sum(weights)
    if not options["normalize"]:
        return total, weights
    if abs(total) < 1e-12:
        return 1.0, [0.0] * len(weights)
    return 1.0, [w / total for w in weights]


LINEAR = register(
    MergeMethod(
        name="linear",
        merge=merge_linear,
        linear_in_deltas=_coefficients,
        summary="weighted mean of the models (Wortsman et al., 2022)",
        options={"normalize": True},
        mergekit="linear",
    )
)
