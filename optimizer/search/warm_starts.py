"""Trials that come from analyses rather than the sampler: warm starts and Hi-Merging's log.

The contribution analysis proposes plans (conflicting layers dropped or halved); Hi-Merging's
unattended procedure scores plans on its way. Both land in the study as ordinary trials, as
parameters where the search space can express the plan (so the sampler learns from them), else
as fixed plans, and each is labelled so a report tells them apart from sampled trials.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState

from optimizer.search.prepare import Prepared

__all__ = ["enqueue_warm_starts", "record_hi_merging"]


def enqueue_warm_starts(study: optuna.Study, prepared: Prepared, analysis, conflicts) -> list[str]:
    """Enqueue the analysis's warm starts not already run or queued; returns the labels enqueued."""
    from optimizer.analysis.contributions import params_for_space

    config = prepared.config
    options = {**config.options, "seed": config.search.seed}
    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    have = {t.user_attrs.get("warm_start") for t in study.get_trials(deepcopy=False, states=live)}
    done = []
    for label, plan in analysis.warm_start_plans(config.method, options=options, conflicts=conflicts).items():
        if label in have:
            continue
        params = params_for_space(plan, prepared.space)
        if params is not None:
            study.enqueue_trial(params, user_attrs={"warm_start": label})
        else:
            study.enqueue_trial({}, user_attrs={"warm_start": label, "plan": plan.to_dict()})
        done.append(label)
    return done


def record_hi_merging(study: optuna.Study, prepared: Prepared, result) -> int:
    """Store every plan Hi-Merging scored as a COMPLETE trial; returns how many were added."""
    from optimizer.analysis.contributions import params_for_space

    dists = prepared.space.distributions()
    names = [t.name for t in prepared.tasks]
    added = 0
    for ev in result.evaluations:
        values = [ev.values[n] for n in names]
        if not all(math.isfinite(v) for v in values):
            continue
        params = params_for_space(ev.plan, prepared.space) or {}
        attrs = {"plan": ev.plan.to_dict(), "hi_merging": f"{ev.stage}: {ev.label}"}
        if ev.plan == result.plan:
            attrs["hi_merging_choice"] = True
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions={k: dists[k] for k in params}, values=values, user_attrs=attrs
            )
        )
        added += 1
    study.set_user_attr(
        "hi_merging",
        {"score": result.score, "plan": result.plan.to_dict(), "analyses": [a.to_dict() for a in result.analyses]},
    )
    return added
