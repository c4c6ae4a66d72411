"""Task arithmetic (Ilharco et al., ICLR 2023): W = θ₀ + Σₘ λₘ τₘ.

The generalized form in :mod:`optimizer.merge._generalized` also covers this (no sparsification,
no consensus); this file is the plain, fastest path because it is the method most studies start
from and the one the merge-core benchmark measures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from optimizer.merge._registry import MergeMethod, number_option, register
from optimizer.merge.plan import ModelParams


def merge_task_arithmetic(
    name: str,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: Mapping[str, object],
    generator: torch.Generator,
) -> torch.Tensor:
    scale = number_option(options, "lambda", 1.0, "task_arithmetic")
    merged: torch.Tensor | None = None
    for p, tau in zip(params, deltas, strict=True):
        if p.weight == 0.0:
            continue
        if merged is None:  # the first add writes the output: no separate copy of the base
            merged = torch.add(base, tau, alpha=p.weight * scale)
        else:
            merged.add_(tau, alpha=p.weight * scale)
    return base.clone() if merged is None else merged


def _coefficients(params: Sequence[ModelParams], options: Mapping[str, object]) -> tuple[float, list[float]]:
    scale = number_option(options, "lambda", 1.0, "task_arithmetic")
    return 1.0, [p.weight * scale for p in params]


TASK_ARITHMETIC = register(
    MergeMethod(
        name="task_arithmetic",
        merge=merge_task_arithmetic,
        linear_in_deltas=_coefficients,
        summary="base plus scaled task vectors (Ilharco et al., 2023)",
        options={"lambda": 1.0},
        mergekit="task_arithmetic",
    )
)
