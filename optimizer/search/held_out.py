"""Held-out scores of a study's plans, scored once and cached in the study.

Search scores come from the examples the sampler optimised against and flatter; every choice a
user makes (``pareto``, ``report``, ``pick``, the demo's export) rests on held-out scores. Scoring
is what costs, so each plan is scored once per study and the result cached in the study's user
attrs: per trial under ``held_out`` and, for reference plans that have no trial (a study without
baselines), per label under ``held_out_plans``. The cache is written after every plan, so an
interrupted report keeps what it scored.
"""

from __future__ import annotations

from collections.abc import Mapping

import optuna
from optuna.trial import FrozenTrial

from objectives.tasks import score_tasks
from optimizer.engines.base import Engine
from optimizer.merge import MergePlan
from optimizer.search import attrs
from optimizer.search.prepare import Prepared

__all__ = ["held_out_scores", "plan_scores"]


def _cached(
    study: optuna.Study, attr: str, plans: Mapping[str, MergePlan], prepared: Prepared, engine: Engine
) -> dict[str, dict[str, float]]:
    """Key → task → held-out score for each of ``plans``, scoring only the keys ``attr`` lacks."""
    cache: dict[str, dict[str, float]] = dict(study.user_attrs.get(attr, {}))
    for key, plan in plans.items():
        if key in cache:
            continue
        engine.apply_plan(plan)  # a lazy engine starts here, when something needs scoring
        results = score_tasks(engine, prepared.tasks, "held_out")
        cache[key] = {task.name: r.value for task, r in zip(prepared.tasks, results, strict=True)}
        study.set_user_attr(attr, cache)  # saved per plan: an interrupt keeps the rest
    return {key: cache[key] for key in plans}


def held_out_scores(
    study: optuna.Study, trials: list[FrozenTrial], prepared: Prepared, engine: Engine
) -> dict[int, dict[str, float]]:
    """Held-out score per task for each trial (by number), from the plan it stored."""
    plans = {str(t.number): MergePlan.from_dict(t.user_attrs[attrs.PLAN]) for t in trials}
    scores = _cached(study, attrs.HELD_OUT, plans, prepared, engine)
    return {t.number: scores[str(t.number)] for t in trials}


def plan_scores(
    study: optuna.Study, plans: Mapping[str, MergePlan], prepared: Prepared, engine: Engine
) -> dict[str, dict[str, float]]:
    """Held-out score per task for labelled plans that have no trial of their own."""
    return _cached(study, attrs.HELD_OUT_PLANS, plans, prepared, engine)
