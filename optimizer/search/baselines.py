"""Reference points every study starts with, enqueued as labelled trials.

A search result means little without them: the front is read against the base, each
specialist alone, and the merges people try first (uniform average, task arithmetic, TIES with
its paper's defaults). Baseline trials carry their own plan (user attr ``plan``) and no search
parameters, so they may use another method than the study's.
"""

from __future__ import annotations

from collections.abc import Sequence

from optimizer.merge import MergePlan, ModelParams, method_names
from optimizer.merge.plan import base_plan, specialist_plan

__all__ = ["baseline_plans"]


def _uniform(models: Sequence[str], weight: float, density: float = 1.0) -> dict[str, ModelParams]:
    return {m: ModelParams(weight=weight, density=density) for m in models}


def baseline_plans(models: Sequence[str]) -> dict[str, MergePlan]:
    """Label → plan, in the order they are enqueued."""
    models = tuple(models)
    plans = {
        "base": base_plan(models),
        "uniform_average": MergePlan("linear", models, _uniform(models, 1.0)),
        "task_arithmetic_1.0": MergePlan("task_arithmetic", models, _uniform(models, 1.0)),
        "task_arithmetic_0.5": MergePlan("task_arithmetic", models, _uniform(models, 0.5)),
    }
    if "ties" in method_names():
        # TIES paper defaults: keep the top 20 % of each task vector, λ = 1.
        plans["ties_defaults"] = MergePlan("ties", models, _uniform(models, 1.0, density=0.2))
    for m in models:
        plans[f"specialist:{m}"] = specialist_plan(models, m)
    if len(models) >= 2 and "model_stock" in method_names():
        # Parameter-free (it reads the angle between the task vectors): last, so the earlier
        # baselines keep their trial numbers in studies made before it existed.
        plans["model_stock"] = MergePlan("model_stock", models, {})
    return plans
