"""The study: one Optuna objective per task, run (or resumed) until the requested trial count.

A trial asks the search space for a plan (or takes a baseline's plan), merges it in place in the
engine, and scores every task on its search split. The plan is stored with the trial (user attr
``plan``), so exports rebuild exactly what was scored. A trial that raises is recorded as FAIL
with its reason and the study goes on; a process killed mid-trial is recovered by the storage's
heartbeat on the next run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimizer.config import StudyConfig, config_from_json
from optimizer.engines.base import Engine
from optimizer.errors import ConfigError, MergeoptError
from optimizer.merge import MergePlan
from optimizer.search.baselines import baseline_plans
from optimizer.search.prepare import Prepared
from optimizer.search.storage import make_storage

__all__ = [
    "TrialFailed",
    "count_complete",
    "load_study",
    "make_sampler",
    "open_study",
    "run_trials",
    "study_config",
]

#: Fields whose change would make old trials mean something else: a resumed study must match.
_IDENTITY_FIELDS = ("base", "models", "method", "granularity", "group_size", "split_modules", "objectives")


class TrialFailed(Exception):
    """A candidate could not be built or scored; the trial is FAIL, the study continues."""


def make_sampler(config: StudyConfig, n_existing: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; its seed moves on with the study so a resume does not replay."""
    seed = config.search.seed + n_existing
    name = config.search.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.GPSampler(seed=seed)


def count_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _check_same_study(stored: StudyConfig, config: StudyConfig) -> None:
    a, b = stored.model_dump(), config.model_dump()
    for field in _IDENTITY_FIELDS:
        if a[field] != b[field]:
            raise ConfigError(
                f"study {config.name!r} already exists with a different {field!r}; its trials would not"
                " be comparable. Use a new study name, or restore the original config"
            )


def open_study(prepared: Prepared) -> optuna.Study:
    """Create the study, or load it if it exists (checking it is the same study)."""
    config = prepared.config
    storage = make_storage(config.storage_url())
    existing = None
    with contextlib.suppress(KeyError):  # KeyError: no such study yet
        existing = optuna.load_study(study_name=config.name, storage=storage)
    if existing is not None:
        stored = existing.user_attrs.get("config")
        if stored:
            _check_same_study(config_from_json(stored), config)
        n = len(existing.get_trials(deepcopy=False))
        study = optuna.load_study(study_name=config.name, storage=storage, sampler=make_sampler(config, n))
    else:
        study = optuna.create_study(
            study_name=config.name,
            storage=storage,
            directions=prepared.directions,
            sampler=make_sampler(config),
            load_if_exists=True,
        )
        study.set_metric_names([t.name for t in prepared.tasks])
        study.set_user_attr("config", config.to_json())
    if config.search.baselines:
        _ensure_baselines(study, prepared)
    return study


def _ensure_baselines(study: optuna.Study, prepared: Prepared) -> None:
    """Enqueue each baseline that has not run, is not queued, and is not running.

    Idempotent, so a study interrupted before its baselines finished gets them on resume, and a
    baseline whose worker was killed is left to the heartbeat's retry instead of doubled.
    """
    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    have = {t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False, states=live)}
    for label, plan in baseline_plans(prepared.space.models).items():
        if label not in have:
            study.enqueue_trial({}, user_attrs={"baseline": label, "plan": plan.to_dict()})


def load_study(storage_url: str, name: str | None = None) -> optuna.Study:
    """Open an existing study for reading (pareto, export); the only study if no name is given."""
    storage = make_storage(storage_url, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name is None:
        if len(names) != 1:
            raise ConfigError(
                f"storage {storage_url!r} holds {len(names)} studies ({', '.join(names) or 'none'});"
                " name one with --name"
            )
        name = names[0]
    if name not in names:
        raise ConfigError(f"no study {name!r} in {storage_url!r} (it has: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=storage)


def study_config(study: optuna.Study) -> StudyConfig:
    """The config a study was created with (stored in its user attrs)."""
    stored = study.user_attrs.get("config")
    if not stored:
        raise ConfigError(f"study {study.study_name!r} was not made by mergeopt (it has no stored config)")
    return config_from_json(stored)


@dataclass
class _Budget:
    """Stops the study at ``target`` COMPLETE trials or after too many failures in a row."""

    target: int
    max_failures: int
    failures_in_a_row: int = 0
    last_failure: str = ""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.failures_in_a_row += 1
            self.last_failure = str(trial.user_attrs.get("fail_reason", "unknown"))
        elif trial.state == TrialState.COMPLETE:
            self.failures_in_a_row = 0
        if count_complete(study) >= self.target or self.failures_in_a_row >= self.max_failures:
            study.stop()


def _objective(prepared: Prepared, engine: Engine) -> Callable[[optuna.Trial], list[float]]:
    def objective(trial: optuna.Trial) -> list[float]:
        stored = trial.user_attrs.get("plan")
        if stored is not None:
            plan = MergePlan.from_dict(stored)
        else:
            plan = prepared.space.suggest(trial)
            trial.set_user_attr("plan", plan.to_dict())
        try:
            t0 = time.perf_counter()
            engine.apply_plan(plan)
            t1 = time.perf_counter()
            values = []
            for task in prepared.tasks:
                value = task.score(engine, "search").value
                if not math.isfinite(value):
                    raise TrialFailed(f"objective {task.name!r} scored {value}; the merged model is degenerate")
                values.append(value)
            t2 = time.perf_counter()
        except TrialFailed as exc:
            trial.set_user_attr("fail_reason", str(exc))
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason) from exc
        trial.set_user_attr("seconds", {"merge": round(t1 - t0, 4), "score": round(t2 - t1, 4)})
        return values

    return objective


def run_trials(
    prepared: Prepared,
    study: optuna.Study,
    engine: Engine,
    target: int,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
) -> int:
    """Run until the study holds ``target`` COMPLETE trials; returns how many it holds."""
    if count_complete(study) >= target:
        return count_complete(study)
    budget = _Budget(target, prepared.config.search.max_consecutive_failures)
    study.optimize(
        _objective(prepared, engine),
        n_trials=None,
        catch=(TrialFailed,),
        callbacks=[budget, *(callbacks or [])],
        gc_after_trial=False,
        show_progress_bar=False,
    )
    if budget.failures_in_a_row >= budget.max_failures:
        raise MergeoptError(
            f"{budget.failures_in_a_row} trials failed in a row (last: {budget.last_failure}); stopping."
            " Completed trials are saved; fix the cause and run the same command to resume"
        )
    return count_complete(study)
