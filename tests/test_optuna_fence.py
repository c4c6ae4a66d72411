"""The installed Optuna still has every private shape mergeopt's fast paths use.

Each fast path (``optimizer/search/_optuna.py``) switches itself off on an Optuna it does not
recognise, so a study only gets slower. This test makes that a CI failure instead: it exercises
every fast path on the installed Optuna and fails if any of them switched itself off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna

from optimizer.search import _optuna
from optimizer.search.storage import make_storage


def _objective(trial: optuna.Trial) -> tuple[float, float]:
    x, y = trial.suggest_float("x", 0.0, 1.0), trial.suggest_float("y", 0.0, 1.0)
    return x + y, (1 - x) * (1 + y)


def test_no_fast_path_is_off_on_the_installed_optuna(tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 'f.db'}")
    study = optuna.create_study(
        study_name="f", storage=storage, directions=["minimize", "minimize"], sampler=optuna.samplers.TPESampler(seed=0)
    )
    study.optimize(_objective, n_trials=12)  # enough finished trials for TPE to split them
    for _ in range(3):
        trial = study.ask()
        with _optuna.trials_snapshot(study), _optuna.split_once(), _optuna.one_commit(study):
            values = _objective(trial)
        study.tell(trial, values)
    points = np.array([t.values for t in study.best_trials])
    _optuna.compute_hypervolume(points, points.max(axis=0) + 1.0)
    assert _optuna.disabled() == {}, f"Optuna {optuna.__version__}: fast paths off: {_optuna.disabled()}"
    stored = optuna.load_study(study_name="f", storage=make_storage(f"sqlite:///{tmp_path / 'f.db'}"))
    assert len(stored.trials) == 15 and all(set(t.params) == {"x", "y"} for t in stored.trials)


def test_own_hypervolume_matches_optunas() -> None:
    """The fallback used where Optuna's hypervolume is unusable gives Optuna's numbers."""
    from optuna._hypervolume import compute_hypervolume as optunas

    rng = np.random.default_rng(0)
    for dims in (2, 3, 4):
        points = rng.random((25, dims))
        ref = np.ones(dims) * 1.1
        assert abs(_optuna._own_hypervolume(points, ref) - optunas(points, ref)) < 1e-9
