"""The Pareto front across tasks, with each member re-scored on held-out data.

Search scores come from a few examples and are optimistically biased (the sampler chose the
trials that did well on exactly those), so the front is always shown next to held-out scores
(scored once per member and cached in the study: :mod:`optimizer.search.held_out`).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from optimizer.engines.base import Engine
from optimizer.search import attrs
from optimizer.search.front import front_trials
from optimizer.search.held_out import held_out_scores
from optimizer.search.prepare import Prepared

__all__ = ["FrontMember", "front_members"]


@dataclass(frozen=True)
class FrontMember:
    number: int
    label: str  # baseline label, or "" for a searched trial
    search: dict[str, float]
    held_out: dict[str, float]


def front_members(study: optuna.Study, prepared: Prepared, engine: Engine) -> list[FrontMember]:
    """Every front member with its search and held-out scores, by trial number."""
    trials = front_trials(study)
    held = held_out_scores(study, trials, prepared, engine)
    names = study.metric_names or [t.name for t in prepared.tasks]
    return [
        FrontMember(
            number=t.number,
            label=str(t.user_attrs.get(attrs.BASELINE, "")),
            search=dict(zip(names, t.values, strict=True)),
            held_out=held[t.number],
        )
        for t in trials
    ]
