"""Studies: create one, join one, or open one to read; what a study is made of and who may join.

A study is created once (its baselines enqueued exactly once, its config and the models'
fingerprint stored), joined by any number of processes with the same config and the same models
on disk, and opened by commands that read it (``pareto``, ``report``, ``export``...) from nothing
but its storage. Running its trials is :mod:`optimizer.search.trials`; running it to a target is
:mod:`optimizer.search.run`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from optimizer.config import StudyConfig, config_from_json
from optimizer.errors import ConfigError
from optimizer.fingerprint import check_fingerprint, models_fingerprint
from optimizer.search import attrs
from optimizer.search._interrupts import Interrupts
from optimizer.search.baselines import baseline_plans
from optimizer.search.overrides import study_overrides, with_study_overrides
from optimizer.search.owners import fail_stale_running
from optimizer.search.prepare import Prepared, measured, prepare
from optimizer.search.storage import display_url, make_storage, study_url

__all__ = [
    "FINISHED",
    "count_complete",
    "count_finished",
    "join_study",
    "load_study",
    "located",
    "make_sampler",
    "open_existing",
    "open_study",
    "study_config",
    "wait_for_config",
]

#: Fields whose change would make old trials mean something else: a resumed study must match.
_IDENTITY_FIELDS = ("base", "models", "method", "granularity", "group_size", "split_modules", "objectives")
#: How long a joining process waits for the creator to finish setting a new study up.
SETUP_WAIT_SECONDS = 60.0


def make_sampler(config: StudyConfig, n_existing: int = 0, salt: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; its seed moves on with the study so a resume does not replay.

    ``salt`` (a worker's pid) keeps workers that join at the same moment from drawing the same
    candidates. TPE runs with Optuna's default constant liar: running trials count as bad, so
    parallel workers spread out.
    """
    seed = config.search.seed + n_existing + salt
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


#: Trial states that used up a share of the budget: scored, or rejected early (PRUNED).
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards the target: complete, or rejected early."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _check_same_study(stored: StudyConfig, config: StudyConfig) -> None:
    a, b = stored.model_dump(), config.model_dump()
    for field in _IDENTITY_FIELDS:
        if a[field] != b[field]:
            raise ConfigError(
                f"study {config.name!r} already exists with a different {field!r}; its trials would not"
                " be comparable. Use a new study name, or restore the original config"
            )


def open_study(
    prepared: Prepared,
    *,
    storage_url: str | None = None,
    name: str | None = None,
    create: bool = True,
    salt: int = 0,
) -> tuple[optuna.Study, Prepared]:
    """Create the study, or join it if it exists: same config, same models on disk.

    Returns the study and ``prepared`` with its final search space: the study's own layer
    overrides (from a contribution analysis) included, so nothing later rebuilds the space.

    Any number of processes may call this at once on a new study. Exactly one of them creates
    it (the storage's unique study name decides: the others get DuplicatedStudyError) and only
    that one enqueues the baselines, so they are enqueued exactly once; it stores the config
    last, and the others wait for the config before they use the study. Every check (config,
    models' fingerprint) runs before this process writes anything to an existing study.

    ``storage_url`` and ``name`` default to the config's; ``create=False`` joins only (workers);
    ``salt`` moves the sampler's seed so that workers started together do not propose the same
    candidates.
    """
    study = _open(prepared, storage_url=storage_url, name=name, create=create, salt=salt)
    return study, with_study_overrides(study, prepared)


def _open(prepared: Prepared, *, storage_url: str | None, name: str | None, create: bool, salt: int) -> optuna.Study:
    config = prepared.config
    name = name or config.name
    url = storage_url or config.storage_url()
    storage = make_storage(url, create=create)
    fingerprint = models_fingerprint(prepared.models.base, prepared.models.specialists)
    if _find(storage, name) is None:
        if not create:
            raise ConfigError(
                f"no study {name!r} in {display_url(url)!r}; start it with `mergeopt search CONFIG` first"
            )
        with Interrupts() as interrupts:  # a Ctrl-C waits until the new study is fully set up
            created = _create(prepared, storage, name, fingerprint)
        interrupts.check()
        if created:
            return optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(config, 0, salt))
    study = optuna.load_study(study_name=name, storage=storage)
    _check_same_study(config_from_json(wait_for_config(study)), config)
    stored = study.user_attrs.get(attrs.MODELS_FINGERPRINT)
    if stored:
        paths = {"base": prepared.models.base, **prepared.models.specialists}
        check_fingerprint(stored, fingerprint, paths, name)
    fail_stale_running(study)  # journal storages have no heartbeat: retry trials of dead workers
    n = len(study.get_trials(deepcopy=False))
    return optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(config, n, salt))


def _find(storage: optuna.storages.BaseStorage, name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def _create(prepared: Prepared, storage: optuna.storages.BaseStorage, name: str, fingerprint: dict[str, str]) -> bool:
    """Create and set up the study; False if another process created it first.

    Setup order matters: the config goes last, because joiners take "has a config" to mean "is set
    up" (baselines enqueued, fingerprint stored).
    """
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=prepared.directions)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # set_metric_names
        study.set_metric_names([t.name for t in prepared.tasks])
    study.set_user_attr(attrs.MODELS_FINGERPRINT, fingerprint)
    if prepared.config.search.baselines:
        for label, plan in baseline_plans(prepared.space.models).items():
            study.enqueue_trial({}, user_attrs={attrs.BASELINE: label, attrs.PLAN: plan.to_dict()})
    study.set_user_attr(attrs.CONFIG, prepared.config.to_json())
    return True


def wait_for_config(study: optuna.Study, timeout: float = SETUP_WAIT_SECONDS) -> str:
    """The study's stored config (JSON), waiting while its creator may still be setting it up.

    A mergeopt study gets its config before any trial runs, so a study with a finished trial and
    no config was not made by mergeopt: that is refused at once, and only a study without finished
    trials is waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        stored = study.user_attrs.get(attrs.CONFIG)
        if stored:
            return stored
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        if finished or time.monotonic() > deadline:
            raise ConfigError(
                f"study {study.study_name!r} has no mergeopt config: it was not made by mergeopt, or the"
                " process creating it stopped before storing it; use another study name"
            )
        time.sleep(0.25)


def load_study(storage_url: str, name: str | None = None) -> optuna.Study:
    """Open an existing study for reading (pareto, export); the only study if no name is given."""
    storage = make_storage(storage_url, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name is None:
        if len(names) != 1:
            raise ConfigError(
                f"storage {display_url(storage_url)!r} holds {len(names)} studies ({', '.join(names) or 'none'});"
                " name one with --name"
            )
        name = names[0]
    if name not in names:
        raise ConfigError(f"no study {name!r} in {display_url(storage_url)!r} (it has: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=storage)


def study_config(study: optuna.Study) -> StudyConfig:
    """The config a study was created with (stored in its user attrs)."""
    stored = study.user_attrs.get(attrs.CONFIG)
    if not stored:
        raise ConfigError(f"study {study.study_name!r} was not made by mergeopt (it has no stored config)")
    return config_from_json(stored)


def located(config: StudyConfig, url: str) -> StudyConfig:
    """The stored config, pointed at the storage actually opened.

    A stored config usually names no storage (the default is ``studies/<name>/`` under the
    directory the search ran from); the study's files (cached Grams, golden data) live beside the
    storage that was opened, whatever directory a later command runs from.
    """
    return config if config.storage else config.model_copy(update={"storage": url})


def open_existing(
    study: str, name: str | None = None, say: Callable[[str], None] = lambda _: None
) -> tuple[optuna.Study, Prepared]:
    """An existing study, from what a user types (its folder, .db or .log file, or a storage URL),
    with its stored config validated here and its final search space: what ``pareto``, ``report``,
    ``pick`` and ``analyze`` read."""
    url = study_url(study)
    opened = load_study(url, name)
    config = located(study_config(opened), url)
    return opened, measured(prepare(config, layer_overrides=study_overrides(opened)), say)


def join_study(storage: str, name: str, say: Callable[[str], None] = lambda _: None) -> tuple[optuna.Study, Prepared]:
    """Join a running study as one more worker: its config comes from the study, its models must be
    here, unchanged. Nothing is written until every check has passed."""
    url = study_url(storage)
    config = located(config_from_json(wait_for_config(load_study(url, name))), url)
    prepared = measured(prepare(config), say)
    return open_study(prepared, storage_url=url, name=name, create=False, salt=os.getpid())
