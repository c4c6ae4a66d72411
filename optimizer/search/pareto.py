"""The Pareto front across tasks, with each member re-scored on held-out data.

Search scores come from a few examples and are optimistically biased (the sampler chose the
trials that did well on exactly those), so the front is always shown next to held-out scores.
Held-out scores are cached in the study (user attr ``held_out``) so showing the front twice
does not re-score it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from objectives.tasks import score_tasks
from optimizer.engines.base import Engine
from optimizer.merge import MergePlan
from optimizer.search.front import front_trials
from optimizer.search.prepare import Prepared

__all__ = ["FrontMember", "front_members", "held_out_scores"]


@dataclass(frozen=True)
class FrontMember:
    number: int
    label: str  # baseline label, or "" for a searched trial
    search: dict[str, float]
    held_out: dict[str, float]


def held_out_scores(
    study: optuna.Study,
    trials: list[FrozenTrial],
    prepared: Prepared,
    engine_factory: Callable[[], Engine],
) -> dict[int, dict[str, float]]:
    """Held-out score per task for each trial; scores only what is not cached yet."""
    cache: dict[str, dict[str, float]] = dict(study.user_attrs.get("held_out", {}))
    missing = [t for t in trials if str(t.number) not in cache]
    if missing:
        engine = engine_factory()  # started only when something needs scoring
        for trial in missing:
            engine.apply_plan(MergePlan.from_dict(trial.user_attrs["plan"]))
            results = score_tasks(engine, prepared.tasks, "held_out")
            cache[str(trial.number)] = {task.name: r.value for task, r in zip(prepared.tasks, results, strict=True)}
            study.set_user_attr("held_out", cache)  # saved per member: an interrupt keeps the rest
    return {t.number: cache[str(t.number)] for t in trials}


def front_members(study: optuna.Study, prepared: Prepared, engine_factory: Callable[[], Engine]) -> list[FrontMember]:
    trials = front_trials(study)
    held = held_out_scores(study, trials, prepared, engine_factory)
    names = study.metric_names or [t.name for t in prepared.tasks]
    return [
        FrontMember(
            number=t.number,
            label=str(t.user_attrs.get("baseline", "")),
            search=dict(zip(names, t.values, strict=True)),
            held_out=held[t.number],
        )
        for t in trials
    ]
