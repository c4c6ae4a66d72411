"""Early rejection: dominated candidates stop after a share of the examples, survivors score as before."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from objectives.metrics import MetricResult, combine, make_metric
from optimizer.config import EarlyRejectionConfig
from optimizer.search.early_rejection import dominated_by, optimistic_bound
from optimizer.zoo import default_zoo_dir
from tests._cli import run_cli, write_config, zoo_config

# -- the rule, on numbers -------------------------------------------------------------------------


def test_an_all_miss_start_is_not_taken_as_certain() -> None:
    """8 misses of 64: the full score could still be well above 0, and never above 1."""
    bound = optimistic_bound(MetricResult(0.0, [0.0] * 8), 64, maximize=True, binary=True, z=2.0)
    assert 0.2 < bound < 1.0
    # More evidence, tighter bound; the whole split leaves no doubt.
    tighter = optimistic_bound(MetricResult(0.0, [0.0] * 32), 64, maximize=True, binary=True, z=2.0)
    assert tighter < bound
    assert optimistic_bound(MetricResult(0.25, [1.0, 0.0, 0.0, 0.0]), 4, maximize=True, binary=True, z=2.0) == 0.25


def test_minimized_scores_are_bounded_from_below() -> None:
    seen = MetricResult(2.0, [1.5, 2.5, 2.0, 2.0])
    assert optimistic_bound(seen, 40, maximize=False, binary=False, z=2.0) < 2.0


def test_dominated_needs_one_trial_better_everywhere() -> None:
    front = [(3, [0.9, 0.2]), (7, [0.2, 0.9])]
    both = [True, True]
    assert dominated_by([0.5, 0.5], front, both) is None  # each front trial loses on one task
    assert dominated_by([0.5, 0.1], front, both) == 3
    assert dominated_by([0.9, 0.2], front, both) is None  # equal is not dominated


def test_stages_must_grow_within_the_split() -> None:
    with pytest.raises(ValueError, match="increasing shares"):
        EarlyRejectionConfig(stages=[0.5, 0.25])
    with pytest.raises(ValueError, match="increasing shares"):
        EarlyRejectionConfig(stages=[1.0])


def test_golden_nll_of_parts_combines_to_the_whole(zoo) -> None:
    """Scores of disjoint parts combine to exactly the whole split's (token-weighted NLL too)."""
    import json

    from optimizer.checkpoints import ModelSet
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.merge import MergePlan

    zoo_dir = default_zoo_dir()
    lines = (zoo_dir / "tasks" / "sort" / "search.jsonl").read_text().splitlines()[:20]
    examples = [json.loads(line) for line in lines]
    engine = HFEngine(ModelSet(zoo_dir / "base", {}))
    engine.apply_plan(MergePlan("task_arithmetic", ()))
    for name in ("nll", "exact_match"):
        metric = make_metric(name, max_tokens=14)
        whole = metric.score(engine, examples)
        parts = combine([metric.score(engine, examples[:7]), metric.score(engine, examples[7:])])
        assert parts.value == pytest.approx(whole.value, rel=1e-6, abs=1e-9)


# -- a study with early rejection, as a user runs it ---------------------------------------------


def _trials(db: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=None, storage=f"sqlite:///{db}").get_trials()


def test_study_rejects_dominated_candidates_and_scores_survivors_in_full(zoo, tmp_path: Path) -> None:
    config = zoo_config(
        "early",
        limit=48,
        search={"trials": 16, "seed": 0, "early_rejection": {"stages": [0.25, 0.5]}},
        weight={"low": 0.0, "high": 3.0},  # wide: many candidates are plainly broken
    )
    path = write_config(tmp_path / "study.yaml", config)
    proc = run_cli("search", str(path), cwd=tmp_path, check=True)
    db = tmp_path / "studies" / "early" / "study.db"
    trials = _trials(db)
    states = [t.state for t in trials]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = {t.number: t for t in trials if t.state == optuna.trial.TrialState.COMPLETE}

    # The budget counts rejected candidates: 16 finished trials, nothing left running or failed.
    assert len(trials) == 16 and set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert pruned, "with weights up to 3, some candidates should be plainly dominated"
    # The progress log says which trial dominated each rejected candidate.
    log = proc.stdout + proc.stderr
    assert all(f"trial {t.number} [search] rejected early (dominated by trial" in log for t in pruned)
    # Baselines (enqueued) are the references: always scored in full.
    assert all("baseline" not in t.user_attrs for t in pruned)
    for t in pruned:
        info = t.user_attrs["rejected"]
        assert info["examples"] < info["of"] == 3 * 48
        winner = complete[info["dominated_by"]]  # a completed trial, named
        assert winner.number < t.number
        assert all(v >= b for v, b in zip(winner.values, info["bounds"], strict=True))
        assert any(v > b for v, b in zip(winner.values, info["bounds"], strict=True))

    # Survivors were scored on the full split: the same numbers as the plain scorer gives.
    from optimizer.config import load_config
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.merge import MergePlan
    from optimizer.search.prepare import prepare

    prepared = prepare(load_config(path))
    engine = HFEngine(prepared.models)
    survivor = max((t for t in complete.values() if "baseline" not in t.user_attrs), key=lambda t: t.number)
    engine.apply_plan(MergePlan.from_dict(survivor.user_attrs["plan"]))
    assert [task.score(engine, "search").value for task in prepared.tasks] == pytest.approx(survivor.values)

    # The study's readers take the PRUNED trials in stride: `status` counts them, `pareto` runs.
    status = run_cli("status", str(db), cwd=tmp_path, check=True).stdout
    assert "PRUNED" in status
    run_cli("pareto", str(db), cwd=tmp_path, check=True)
