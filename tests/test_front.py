"""The Pareto front the progress line, early rejection, status, pareto and report show: Optuna's set,
read without Optuna's copy of the whole study."""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.trial import TrialState

from optimizer.search.front import front_trials


def _study(directions: list[str], n: int, seed: int, levels: int) -> optuna.Study:
    """``n`` finished trials whose values take ``levels`` distinct levels per objective (few levels:
    many ties and exact duplicates, as baselines and coarse exact-match scores give), plus one
    running and one failed trial, which are never on a front."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=directions)
    rng = random.Random(seed)
    for _ in range(n):
        study.tell(study.ask(), [rng.randrange(levels) / levels for _ in directions])
    study.tell(study.ask(), state=TrialState.FAIL)
    study.ask()
    return study


@pytest.mark.parametrize(
    "directions",
    [["maximize"] * 3, ["minimize", "maximize"], ["maximize", "minimize", "maximize", "minimize"], ["maximize"]],
)
@pytest.mark.parametrize("levels", [3, 16, 1000])
def test_the_front_is_optunas_best_trials_in_trial_order(directions: list[str], levels: int) -> None:
    for seed in range(5):
        study = _study(directions, n=150, seed=seed, levels=levels)
        expected = [t.number for t in sorted(study.best_trials, key=lambda t: t.number)]
        assert [t.number for t in front_trials(study)] == expected, f"seed {seed}"


def test_an_empty_study_has_an_empty_front() -> None:
    study = optuna.create_study(directions=["maximize", "maximize"])
    assert front_trials(study) == []
    study.ask()
    assert front_trials(study) == []


def test_the_front_is_read_without_copying_the_trials() -> None:
    """What made the old front slow: Optuna's ``best_trials`` deep-copies every trial first."""
    study = _study(["maximize"] * 3, n=40, seed=0, levels=16)
    stored = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert all(t is stored[t.number] for t in front_trials(study))


def test_trials_that_break_their_constraints_are_not_on_the_front() -> None:
    study = optuna.create_study(directions=["maximize", "maximize"])
    rng = random.Random(1)
    for number in range(60):
        trial = study.ask()
        trial.set_constraint("budget", 1.0 if number % 3 == 0 else -1.0)  # every third one infeasible
        x = rng.randrange(8)
        study.tell(trial, [x, 7 - x])  # all on one trade-off line: every feasible trial is on the front
    expected = [t.number for t in sorted(study.best_trials, key=lambda t: t.number)]
    front = front_trials(study)
    assert [t.number for t in front] == expected
    assert front and all(t.number % 3 for t in front)
