"""The study's Pareto front across tasks, read without copying the study.

Optuna's ``study.best_trials`` deep-copies every trial of the study before it looks for the front:
577 ms for a per-layer study of 1000 trials, against 13 ms here (``benchmarks/trial_overhead.py``,
``scaling``). The progress line, early rejection and ``mergeopt status`` ask for the front after
every trial, so an overnight search slowed down as it went. :func:`front_trials` reads the
trials without a copy (callers only read them) and finds the same set: among the complete
trials that meet their constraints (if a trial has any), those no other one dominates, ties kept
(tested against ``best_trials``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

__all__ = ["front_trials", "losses", "nondominated"]


def nondominated(values: np.ndarray) -> np.ndarray:
    """A mask of the rows of ``values`` (one row per trial; lower is better in every column) that
    no other row dominates. Equal rows share their fate.

    The distinct rows are taken in lexicographic order, and the first row left is always on the
    front (a row that dominated it would come before it); it is marked, and every row not better
    than it somewhere is dropped, until no row is left: one vectorized pass per front member.
    """
    rows, inverse = np.unique(values, axis=0, return_inverse=True)  # sorted lexicographically
    on_front = np.zeros(len(rows), dtype=bool)
    left = np.arange(len(rows))
    while left.size:
        top = left[0]
        on_front[top] = True
        left = left[(rows[left] < rows[top]).any(axis=1)]
    return on_front[inverse.reshape(-1)]


def losses(study: optuna.Study, trials: Sequence[FrozenTrial]) -> np.ndarray:
    """The trials' values as losses (Optuna's convention: maximized objectives negated), a row each."""
    signs = np.array([-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in study.directions])
    return np.array([t.values for t in trials], dtype=float).reshape(len(trials), len(signs)) * signs


def front_trials(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> list[FrozenTrial]:
    """The complete trials on the study's Pareto front, by trial number (not copies: do not modify).

    ``trials``: the study's trials when the caller has read them already (one read for both).
    """
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    complete = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE and all(c <= 0 for c in t.constraints.values())),
        key=lambda t: t.number,
    )
    if not complete:
        return []
    mask = nondominated(losses(study, complete))
    return [t for t, keep in zip(complete, mask, strict=True) if keep]
