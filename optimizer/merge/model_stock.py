"""Model Stock (Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models",
ECCV 2024): how far to move from the base toward the specialists' average, read off the angle
between their task vectors, with nothing to tune.

Fine-tuned weights of one base scatter around a centre; the closer their task vectors point the
same way (cos θ → 1), the more their average is that centre, and the further to go from the base.
For k task vectors with mean pairwise cosine cos θ, the paper's interpolation ratio is

    t = k·cos θ / (1 + (k − 1)·cos θ),    merged = θ₀ + t · mean(τₘ)   (= t·mean(θₘ) + (1 − t)·θ₀).

The angle is measured per tensor, or per output row with ``filter_wise`` (a 1-D tensor is then
one row). Where a task vector is zero (cos taken as 0) or 1 + (k − 1)·cos θ vanishes, t is 0: the
base is kept rather than amplifying opposing updates. These conventions are mergekit's, so its
``model_stock`` rebuilds the same tensors; the paper's per-layer reading is ``filter_wise: false``.
The search's weights and densities do not apply: the method has no coefficients, and studies run
it as a baseline (``model_stock``) beside the searched method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from optimizer.errors import ConfigError
from optimizer.merge._precision import work_dtype
from optimizer.merge._registry import MergeMethod, register
from optimizer.merge.plan import ModelParams

_EPS = 1e-6


def merge_model_stock(
    name: str,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: Mapping[str, object],
    generator: torch.Generator,
) -> torch.Tensor:
    k = len(deltas)
    if k < 2:
        raise ConfigError("model_stock needs at least two specialists: it reads the angle between their task vectors")
    if not base.is_floating_point():
        return base.clone()
    work = work_dtype(base)
    rows = base.dim() >= 2 and bool(options["filter_wise"])
    flat = [tau.to(work).reshape(base.shape[0], -1) if rows else tau.to(work).reshape(1, -1) for tau in deltas]
    norms = [tau.norm(dim=-1) for tau in flat]
    cosines = [
        ((flat[i] * flat[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=_EPS)).clamp(-1, 1)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    cos = torch.stack(cosines).mean(0)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < _EPS
    t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, torch.ones_like(cos), denominator))
    mean = torch.stack(flat).mean(0)
    merged = base.to(work).reshape(mean.shape) + t.unsqueeze(-1) * mean
    return merged.reshape(base.shape).to(base.dtype)


MODEL_STOCK = register(
    MergeMethod(
        name="model_stock",
        merge=merge_model_stock,
        summary="move from the base toward the specialists' average by their angle (Jang et al., 2024)",
        uses_weight=False,
        options={"filter_wise": False},
        mergekit="model_stock",
    )
)
