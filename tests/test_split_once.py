"""TPE splits the study into good and bad trials once per candidate, and still draws what Optuna draws.

TPE (independent mode, the default) re-splits every finished trial at each ``suggest_*``; with 36
parameters per candidate that split was most of the study loop's growth over a long study. The
study loop computes it once per candidate; these tests check, on a real per-layer search space and
a three-objective study with a running trial (the constant liar's input), that the draws do not
change and that the split is indeed computed once.
"""

from __future__ import annotations

import copy
import random
import threading

import optuna
import pytest
from optuna.samplers._tpe import sampler as tpe

from optimizer.config import config_from_dict
from optimizer.search._optuna import split_once, trials_snapshot
from optimizer.search.space import SearchSpace

MODELS = {"rev": "/m/rev", "sort": "/m/sort", "rot": "/m/rot"}
CONFIG = {
    "name": "s",
    "base": "/m/base",
    "models": MODELS,
    "method": "ties",
    "granularity": "layer",
    "objectives": [{"name": n, "data": f"/d/{n}", "metric": "exact_match"} for n in MODELS],
}


def _scores(number: int, params: dict[str, float]) -> list[float]:
    """Three conflicting, slightly noisy objectives: each task wants its own model's weights up."""
    noise = random.Random(number)
    total = sum(v for k, v in params.items() if k.endswith(".weight"))
    return [
        sum(v for k, v in params.items() if k.startswith(f"{m}.") and k.endswith(".weight"))
        - 0.3 * total
        + 0.05 * noise.random()
        for m in MODELS
    ]


def _study(seed: int) -> optuna.Study:
    return optuna.create_study(directions=["maximize"] * 3, sampler=optuna.samplers.TPESampler(seed=seed))


@pytest.fixture
def split_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the splits TPE really computes (Optuna's split of the finished trials)."""
    calls: list[int] = []
    real = tpe._split_complete_trials

    def counted(*args: object) -> object:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(tpe, "_split_complete_trials", counted)
    return calls


def test_a_candidate_is_drawn_with_one_split_and_equals_optunas_own_draw(split_calls: list[int]) -> None:
    space = SearchSpace(config_from_dict(CONFIG), num_layers=4)
    n_params = len(space.distributions())
    assert n_params >= 24
    ours, alone = _study(seed=3), _study(seed=3)
    for study in (ours, alone):
        space.suggest(study.ask())  # another worker's candidate, still running: the constant liar's input

    for number in range(1, 41):
        before = len(split_calls)
        trial = ours.ask()
        with trials_snapshot(ours), split_once():
            plan = space.suggest(trial)
        ours_splits = len(split_calls) - before

        before = len(split_calls)
        reference = alone.ask()
        expected = space.suggest(reference)
        alone_splits = len(split_calls) - before

        assert plan.to_dict() == expected.to_dict(), f"trial {number}"
        if number > 10:  # after TPE's random start-up trials
            assert (ours_splits, alone_splits) == (1, n_params), f"trial {number}"
        values = _scores(number, trial.params)
        ours.tell(trial, values)
        alone.tell(reference, values)


def test_outside_a_block_and_in_other_threads_every_split_is_computed(split_calls: list[int]) -> None:
    """The memo lives for one block of one thread: the next candidate (a later block) sees trials
    finished meanwhile, and a thread without a block is untouched."""
    space = SearchSpace(config_from_dict(CONFIG), num_layers=4)
    n_params = len(space.distributions())
    study = _study(seed=0)
    for number in range(12):
        trial = study.ask()
        space.suggest(trial)
        study.tell(trial, _scores(number, trial.params))

    split_calls.clear()
    space.suggest(study.ask())
    assert len(split_calls) == n_params  # no block: as Optuna does it

    split_calls.clear()
    with split_once():
        other = threading.Thread(target=lambda: space.suggest(study.ask()))
        other.start()
        other.join()
    assert len(split_calls) == n_params  # another thread, during a block of this one

    split_calls.clear()
    for _ in range(2):  # two candidates, one block each: one split each
        with split_once():
            space.suggest(study.ask())
    assert len(split_calls) == 2


def test_a_block_memoizes_only_equal_inputs(split_calls: list[int]) -> None:
    """Within one block, another worker's running trial that gains a parameter, or finishes,
    makes a different split: the memo is exact even where the trials are read afresh."""
    study = _study(seed=0)
    for number in range(6):
        trial = study.ask(fixed_distributions={"x": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(trial, [number % 3, number % 2, -number])
    running = study.ask()
    trials = copy.deepcopy(study.get_trials(deepcopy=False))
    with split_once():
        first = tpe._split_trials(study, trials, 2)
        again = tpe._split_trials(study, trials, 2)
        assert len(split_calls) == 1 and first == again
        running.suggest_float("x", 0, 1)  # the running trial gains a parameter: a new input
        grown = tpe._split_trials(study, study.get_trials(deepcopy=False), 2)
        assert len(split_calls) == 2
        assert [t.params for t in grown[1] if t.number == running.number] == [running.params]
        study.tell(running, [5.0, 5.0, 5.0])  # the running trial finishes: a new input
        changed = tpe._split_trials(study, study.get_trials(deepcopy=False), 2)
    assert len(split_calls) == 3
    assert running.number in [t.number for t in changed[0]]  # now the best: below, not above
