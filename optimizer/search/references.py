"""A study's references on held-out data: the base's score and each task's specialist's score.

Normalized gain (:mod:`optimizer.gain`) measures every merge against these. The specialist of a
task is the one the config states (:meth:`optimizer.config.StudyConfig.stated_specialist`), else
the specialist that scores best on it. The scores come from the study's baseline trials where they
exist, else from their plans, scored once and cached in the study (:mod:`optimizer.search.held_out`).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from optimizer.engines.base import Engine
from optimizer.gain import normalized_gain
from optimizer.search import attrs
from optimizer.search.baselines import baseline_plans
from optimizer.search.held_out import held_out_scores, plan_scores
from optimizer.search.prepare import Prepared

__all__ = ["References", "references"]


@dataclass(frozen=True)
class References:
    """Held-out base score and specialist score per task, and which specialist that is."""

    base: dict[str, float]
    specialist: dict[str, float]
    specialist_of: dict[str, str]

    def gain(self, task: str, value: float) -> float:
        return normalized_gain(value, self.base[task], self.specialist[task])


def _baseline_trials(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    found: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        label = t.user_attrs.get(attrs.BASELINE)
        if label and label not in found:
            found[str(label)] = t
    return found


def _scores_by_label(study: optuna.Study, prepared: Prepared, engine: Engine) -> dict[str, dict[str, float]]:
    """Held-out scores of the base and every specialist, keyed by baseline label."""
    models = tuple(prepared.config.models)
    wanted = ["base", *(f"specialist:{m}" for m in models)]
    trials = _baseline_trials(study)
    with_trial = [trials[label] for label in wanted if label in trials]
    by_number = held_out_scores(study, with_trial, prepared, engine)
    out = {label: by_number[trials[label].number] for label in wanted if label in trials}
    plans = baseline_plans(models)
    out.update(plan_scores(study, {label: plans[label] for label in wanted if label not in out}, prepared, engine))
    return out


def references(study: optuna.Study, prepared: Prepared, engine: Engine) -> References:
    """Base and specialist held-out scores per task (scoring only what is not cached)."""
    scores = _scores_by_label(study, prepared, engine)
    models = tuple(prepared.config.models)
    base: dict[str, float] = {}
    spec: dict[str, float] = {}
    spec_of: dict[str, str] = {}
    for task in prepared.tasks:
        sign = 1.0 if task.direction == "maximize" else -1.0
        signed = {m: sign * scores[f"specialist:{m}"][task.name] for m in models}
        model = prepared.config.stated_specialist(task.name) or max(models, key=signed.__getitem__)
        spec_of[task.name] = model
        base[task.name] = scores["base"][task.name]
        spec[task.name] = scores[f"specialist:{model}"][task.name]
    return References(base=base, specialist=spec, specialist_of=spec_of)
