"""Normalized gain: how much of each specialist's advantage a merged model keeps.

Raw scores are not comparable across tasks (exact match on one, NLL on another, different
ceilings), so choosing between front members needs one common scale. For task t with base score
b_t and specialist score s_t (both held-out), a model scoring x_t has normalized gain

    g_t = (x_t − b_t) / (s_t − b_t)

1 means "as good as the specialist", 0 "no better than the base"; the ratio is direction-free, so
minimized metrics (NLL) need no special case. The specialist of a task is the model the objective
names (``specialist:`` in the config), else the model with the task's name, else the specialist
that scores best on it. Base and specialist scores come from the study's baseline trials when
they exist, and are otherwise scored once from their plans and cached in the study.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from objectives.tasks import score_tasks
from optimizer.engines.base import Engine
from optimizer.search.baselines import baseline_plans
from optimizer.search.pareto import held_out_scores
from optimizer.search.prepare import Prepared

__all__ = ["References", "normalized_gain", "references"]

_PLAN_CACHE = "held_out_plans"  # study user attr: label → held-out scores of baselines without a trial


@dataclass(frozen=True)
class References:
    """Held-out base score and specialist score per task, and which specialist that is."""

    base: dict[str, float]
    specialist: dict[str, float]
    specialist_of: dict[str, str]

    def gain(self, task: str, value: float) -> float:
        return normalized_gain(value, self.base[task], self.specialist[task])


def normalized_gain(value: float, base: float, specialist: float) -> float:
    """(value − base) / (specialist − base); NaN when the specialist is no better than the base."""
    span = specialist - base
    if span == 0 or math.isnan(span):
        return math.nan
    return (value - base) / span


def _baseline_trials(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    found: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        label = t.user_attrs.get("baseline")
        if label and label not in found:
            found[str(label)] = t
    return found


def _scores_by_label(
    study: optuna.Study, prepared: Prepared, engine_factory: Callable[[], Engine]
) -> dict[str, dict[str, float]]:
    """Held-out scores of the base and every specialist, keyed by baseline label."""
    models = tuple(prepared.config.models)
    wanted = ["base", *(f"specialist:{m}" for m in models)]
    trials = _baseline_trials(study)
    with_trial = [trials[label] for label in wanted if label in trials]
    by_number = held_out_scores(study, with_trial, prepared, engine_factory)
    out = {label: by_number[trials[label].number] for label in wanted if label in trials}
    missing = [label for label in wanted if label not in out]
    if missing:
        cache: dict[str, dict[str, float]] = dict(study.user_attrs.get(_PLAN_CACHE, {}))
        plans = baseline_plans(models)
        todo = [label for label in missing if label not in cache]
        if todo:
            engine = engine_factory()
            for label in todo:
                engine.apply_plan(plans[label])
                results = score_tasks(engine, prepared.tasks, "held_out")
                cache[label] = {task.name: r.value for task, r in zip(prepared.tasks, results, strict=True)}
                study.set_user_attr(_PLAN_CACHE, cache)
        out.update({label: cache[label] for label in missing})
    return out


def _specialist_for(
    task: str, named: str | None, models: tuple[str, ...], scores: Mapping[str, Mapping[str, float]], sign: float
) -> str:
    if named:
        return named
    if task in models:
        return task
    return max(models, key=lambda m: sign * scores[f"specialist:{m}"][task])


def references(study: optuna.Study, prepared: Prepared, engine_factory: Callable[[], Engine]) -> References:
    """Base and specialist held-out scores per task (scoring only what is not cached)."""
    scores = _scores_by_label(study, prepared, engine_factory)
    models = tuple(prepared.config.models)
    named = {o.name: o.specialist for o in prepared.config.objectives}
    base: dict[str, float] = {}
    spec: dict[str, float] = {}
    spec_of: dict[str, str] = {}
    for task in prepared.tasks:
        sign = 1.0 if task.direction == "maximize" else -1.0
        model = _specialist_for(task.name, named.get(task.name), models, scores, sign)
        spec_of[task.name] = model
        base[task.name] = scores["base"][task.name]
        spec[task.name] = scores[f"specialist:{model}"][task.name]
    return References(base=base, specialist=spec, specialist_of=spec_of)
