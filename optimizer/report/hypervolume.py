"""Hypervolume of the search front after each completed trial: is the study still improving?

Computed on search scores (the held-out split is scored for front members only), in Optuna's
loss convention (maximized objectives negated). The reference point is each objective's worst
completed value, moved out by 1 % of its range, so every trial that is on a front contributes
and the curve is comparable across the whole study. A flat tail says more trials of the same
search will not help; a rising one says the budget was too small.
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.trial import TrialState

from optimizer.search._optuna import compute_hypervolume
from optimizer.search.front import losses

__all__ = ["hypervolume_history", "reference_point"]


def _losses(study: optuna.Study) -> tuple[list[int], np.ndarray]:
    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    return [t.number for t in trials], losses(study, trials)


def reference_point(losses: np.ndarray) -> np.ndarray:
    """Worst loss per objective plus 1 % of its range (a fixed step where the range is 0)."""
    worst, best = losses.max(axis=0), losses.min(axis=0)
    span = np.where(worst > best, worst - best, 1.0)
    return worst + 0.01 * span


def _dominated(point: np.ndarray, front: np.ndarray) -> bool:
    return bool(front.size) and bool(np.any(np.all(front <= point, axis=1)))


def hypervolume_history(study: optuna.Study) -> list[tuple[int, float]]:
    """``(trial number, hypervolume of the front of the trials completed up to it)``, in order."""
    numbers, losses = _losses(study)
    if not numbers:
        return []
    ref = reference_point(losses)
    front = np.empty((0, losses.shape[1]))
    history: list[tuple[int, float]] = []
    hv = 0.0
    for number, point in zip(numbers, losses, strict=True):
        if not _dominated(point, front):
            keep = ~np.all(point <= front, axis=1)  # drop members the new point dominates
            front = np.vstack([front[keep], point])
            hv = float(compute_hypervolume(front, ref, assume_pareto=True))
        history.append((number, hv))
    return history
