"""Apply a MergePlan tensor by tensor: the loop every engine runs.

Engines own the weights; this module only turns (base tensor, task vectors, plan) into merged
tensors, one at a time, so an engine can stream layers and write each result straight into its
model without holding a second merged copy.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence

import torch

from optimizer.errors import ConfigError
from optimizer.families import LLAMA, Family
from optimizer.low_rank import Delta, LowRankDelta, all_zero, combine, dense_all
from optimizer.merge._registry import MergeMethod, get_method
from optimizer.merge.plan import MergePlan
from optimizer.models import describe

__all__ = ["iter_merged", "merge_state_dict", "merge_tensor", "resolved_options", "task_vectors"]


def task_vectors(
    base: Mapping[str, torch.Tensor], specialists: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, list[torch.Tensor]]:
    """τₘ = θₘ − θ₀ for every tensor, computed once per engine (never per trial)."""
    return {name: [s[name] - b for s in specialists] for name, b in base.items()}


def resolved_options(method: MergeMethod, plan: MergePlan) -> dict[str, object]:
    """The method's defaults overlaid with the plan's options."""
    return {**method.options, **plan.options}


def _generator(plan: MergePlan, name: str) -> torch.Generator:
    # Seeded by (plan seed, tensor name): the same plan always draws the same masks, whatever
    # order the engine visits tensors in.
    seed = int(plan.options.get("seed", 0))
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return gen


def merge_tensor(
    plan: MergePlan,
    name: str,
    base: torch.Tensor,
    deltas: Sequence[Delta],
    method: MergeMethod | None = None,
    options: Mapping[str, object] | None = None,
    family: Family = LLAMA,
) -> torch.Tensor:
    """The merged value of one tensor under ``plan`` (``family`` places it in its block)."""
    method = method or get_method(plan.method)
    if method.merge is None:
        kind = method.study_data.kind if method.study_data is not None else "study data"
        raise ConfigError(
            f"merge method {method.name!r} needs its {kind} measured first; run it through a study"
            " (`mergeopt search`), or bind it with optimizer.merge.study_data.bind"
        )
    options = options if options is not None else resolved_options(method, plan)
    if all_zero(deltas):
        # Only adapters, none of which adapts this tensor: every method merges zero task vectors
        # to the base, so skip expanding N zero tensors (an embedding's worth each).
        return base.clone()
    params = plan.for_tensor(describe(name, family))
    if method.linear_in_deltas is not None and any(isinstance(d, LowRankDelta) for d in deltas):
        # A weighted sum of task vectors: adapters' factors go into one stacked matmul, unexpanded.
        base_coef, coefs = method.linear_in_deltas(params, options)
        return combine(base, deltas, base_coef, coefs)
    # Adapters' task vectors are held as factors: expanded here, for this one tensor only.
    return method.merge(name, base, dense_all(deltas), params, options, _generator(plan, name))


def iter_merged(
    plan: MergePlan,
    base: Mapping[str, torch.Tensor],
    deltas: Mapping[str, Sequence[Delta]],
    method: MergeMethod | None = None,
    family: Family = LLAMA,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` for every tensor of the base, in checkpoint order.

    ``method`` overrides the registry's entry for ``plan.method`` (a method bound to study data).
    """
    method = method or get_method(plan.method)
    options = resolved_options(method, plan)
    for name, b in base.items():
        yield name, merge_tensor(plan, name, b, deltas[name], method, options, family)


def merge_state_dict(
    plan: MergePlan,
    base: Mapping[str, torch.Tensor],
    deltas: Mapping[str, Sequence[Delta]],
    method: MergeMethod | None = None,
    family: Family = LLAMA,
) -> dict[str, torch.Tensor]:
    """A whole merged state dict (for exports and tests; engines prefer ``iter_merged``)."""
    return dict(iter_merged(plan, base, deltas, method, family))
