"""The study: one Optuna objective per task, run (or resumed, or joined) until a trial count.

A trial asks the search space for a plan (or takes a baseline's plan), merges it in place in the
engine, and scores every task on its search split. The plan is stored with the trial (user attr
``plan``), so exports rebuild exactly what was scored. A trial that raises is recorded as FAIL
with its reason and the study goes on; a process killed mid-trial is recovered by the storage's
heartbeat (or, on a journal, by the owner check) and its trial retried. Several processes may run
one study at once: ``mergeopt search`` on each, or ``mergeopt worker`` to join a running study.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from objectives.tasks import score_tasks
from optimizer.config import StudyConfig, config_from_json
from optimizer.engines.base import Engine
from optimizer.engines.supervisor import EngineSupervisor, classify, first_line
from optimizer.errors import ConfigError, MergeoptError
from optimizer.merge import MergePlan
from optimizer.search.baselines import baseline_plans
from optimizer.search.early_rejection import Rejected, StagedScorer
from optimizer.search.fingerprint import check_fingerprint, models_fingerprint
from optimizer.search.front import front_trials
from optimizer.search.one_commit import one_commit
from optimizer.search.prepare import Prepared
from optimizer.search.snapshot import trials_snapshot
from optimizer.search.split_once import split_once
from optimizer.search.storage import (
    display_url,
    fail_stale_running,
    make_storage,
    mark_owner,
    recover_stale,
    requeue,
)

__all__ = [
    "CONFIG_ATTR",
    "FINGERPRINT_ATTR",
    "Interrupted",
    "TrialFailed",
    "count_complete",
    "count_finished",
    "load_study",
    "make_sampler",
    "open_study",
    "run_trials",
    "study_config",
    "wait_for_config",
]

#: Fields whose change would make old trials mean something else: a resumed study must match.
_IDENTITY_FIELDS = ("base", "models", "method", "granularity", "group_size", "split_modules", "objectives")
#: Study user attrs: the config (stored last by the creator: "set up") and the models' fingerprint.
CONFIG_ATTR = "config"
FINGERPRINT_ATTR = "models_fingerprint"
#: How long a joining process waits for the creator to finish setting a new study up.
SETUP_WAIT_SECONDS = 60.0
#: The least time between two beats of a running trial's owner (each is a storage write; a
#: journal worker is judged dead only after STALE_SECONDS without one, on another machine).
BEAT_SECONDS = 60.0
#: How often a worker with nothing to start looks again (the last trials are others' to finish).
POLL_SECONDS = 2.0


class TrialFailed(Exception):
    """A candidate could not be built or scored; the trial is FAIL, the study continues."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the storage was left consistent; ``trial`` is the number cut short, if any."""

    def __init__(self, trial: int | None):
        super().__init__()
        self.trial = trial


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
) -> optuna.Study:
    """Create the study, or join it if it exists: same config, same models on disk.

    Any number of processes may call this at once on a new study. Exactly one of them creates
    it (the storage's unique study name decides: the others get DuplicatedStudyError) and only
    that one enqueues the baselines, so they are enqueued exactly once; it stores the config
    last, and the others wait for the config before they use the study. Every check (config,
    models' fingerprint) runs before this process writes anything to an existing study.

    ``storage_url`` and ``name`` default to the config's; ``create=False`` joins only (workers);
    ``salt`` moves the sampler's seed so that workers started together do not propose the same
    candidates.
    """
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
        with _Interrupts() as interrupts:  # a Ctrl-C waits until the new study is fully set up
            created = _create(prepared, storage, name, fingerprint)
        interrupts.check()
        if created:
            return optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(config, 0, salt))
    study = optuna.load_study(study_name=name, storage=storage)
    _check_same_study(config_from_json(wait_for_config(study)), config)
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
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
    study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
    if prepared.config.search.baselines:
        for label, plan in baseline_plans(prepared.space.models).items():
            study.enqueue_trial({}, user_attrs={"baseline": label, "plan": plan.to_dict()})
    study.set_user_attr(CONFIG_ATTR, prepared.config.to_json())
    return True


def wait_for_config(study: optuna.Study, timeout: float = SETUP_WAIT_SECONDS) -> str:
    """The study's stored config (JSON), waiting while its creator may still be setting it up.

    A mergeopt study gets its config before any trial runs, so a study with a finished trial and
    no config was not made by mergeopt: that is refused at once, and only a study without finished
    trials is waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        stored = study.user_attrs.get(CONFIG_ATTR)
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
    stored = study.user_attrs.get("config")
    if not stored:
        raise ConfigError(f"study {study.study_name!r} was not made by mergeopt (it has no stored config)")
    return config_from_json(stored)


@dataclass
class _Budget:
    """Counts this worker's failed trials in a row; too many stop it (the cause is not the candidates)."""

    max_failures: int
    failures_in_a_row: int = 0
    last_failure: str = ""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.failures_in_a_row += 1
            self.last_failure = str(trial.user_attrs.get("fail_reason", "unknown"))
        elif trial.state == TrialState.COMPLETE:
            self.failures_in_a_row = 0

    def check(self) -> None:
        if self.failures_in_a_row >= self.max_failures:
            raise MergeoptError(
                f"{self.failures_in_a_row} trials failed in a row (last: {self.last_failure}); stopping."
                " Completed trials are saved; fix the cause and run the same command to resume"
            )


class _Interrupts:
    """Ctrl-C that never lands inside a storage write.

    SIGINT raises KeyboardInterrupt at once while this worker merges, scores, starts an engine or
    waits: that is where its time goes, and nothing there is half written. Anywhere else (Optuna
    asking for a trial, telling its result, writing attrs) the signal is noted and raised at the
    next safe point, so no trial is left half recorded. Inert outside the main thread, where no
    signal arrives anyway.
    """

    def __init__(self) -> None:
        self.pending = False
        self._open = 0
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: object) -> None:
        self.pending = True
        if self._open:
            raise KeyboardInterrupt

    def check(self) -> None:
        """A safe point: raise a Ctrl-C that arrived while it could not be raised."""
        if self.pending:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        """A block a Ctrl-C may interrupt at once."""
        self.check()
        self._open += 1
        try:
            yield
        finally:
            self._open -= 1


@dataclass
class _Current:
    """The trial this worker runs now (its number), for the cleanup after a Ctrl-C."""

    number: int | None = None


def _fail(trial: optuna.Trial, kind: str, reason: str) -> None:
    trial.set_user_attr("fail_kind", kind)
    trial.set_user_attr("fail_reason", reason)


def _objective(
    prepared: Prepared, engine: EngineSupervisor, interrupts: _Interrupts, current: _Current
) -> Callable[[optuna.Trial], list[float]]:
    rejection = prepared.config.search.early_rejection
    staged = (
        StagedScorer(prepared.tasks, rejection, prepared.config.search.seed)
        if rejection is not None and rejection.enabled
        else None
    )

    def score_all(trial: optuna.Trial, enqueued: bool) -> list[float]:
        def beat() -> None:
            mark_owner(trial, min_interval=BEAT_SECONDS)  # long trials stay visibly alive

        if staged is not None and not enqueued:  # baselines and retries are always scored in full
            front = [(t.number, t.values) for t in front_trials(trial.study)]
            with interrupts.allowed():
                return staged.score(engine, front, on_stage=beat)
        with interrupts.allowed():
            values = [result.value for result in score_tasks(engine, prepared.tasks, "search")]
        beat()
        return values

    def objective(trial: optuna.Trial) -> list[float]:
        current.number = trial.number
        stored = trial.user_attrs.get("plan")
        # The owner first, on its own: a worker killed while it picks the parameters must be
        # seen as dead at once, not STALE_SECONDS after the trial's start.
        mark_owner(trial)  # lets a later worker on a journal storage tell a dead owner's trial
        if stored is not None:
            plan = MergePlan.from_dict(stored)
        else:
            # One storage read, one split of the trials (TPE) and one write per candidate, not
            # one of each per parameter.
            with trials_snapshot(trial.study), split_once(), one_commit(trial.study):
                plan = prepared.space.suggest(trial)
                trial.set_user_attr("plan", plan.to_dict())
        try:
            t0 = time.perf_counter()
            with interrupts.allowed():
                engine.apply_plan(plan)
            t1 = time.perf_counter()
            try:
                values = score_all(trial, enqueued=stored is not None)
            except Rejected as rejected:
                t2 = time.perf_counter()
                engine.record(None)
                trial.set_user_attr("rejected", rejected.details)
                trial.set_user_attr("seconds", {"merge": round(t1 - t0, 4), "score": round(t2 - t1, 4)})
                raise optuna.TrialPruned(str(rejected)) from None
            for task, value in zip(prepared.tasks, values, strict=True):
                if not math.isfinite(value):
                    raise FloatingPointError(f"objective {task.name!r} scored {value}; the merged model is degenerate")
            t2 = time.perf_counter()
        except KeyboardInterrupt:
            _fail(trial, "interrupted", "interrupted")
            raise
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            if interrupts.pending:  # e.g. the engine's own processes got the terminal's Ctrl-C too
                _fail(trial, "interrupted", "interrupted")
                raise KeyboardInterrupt from exc
            kind = classify(exc)
            reason = {"candidate": "", "memory": "out of memory: ", "engine": "engine error: "}[kind]
            reason += str(exc).splitlines()[0][:300] if kind == "candidate" else first_line(exc)
            engine.record(kind, reason)
            _fail(trial, kind, reason)
            raise TrialFailed(reason) from exc
        engine.record(None)
        trial.set_user_attr("seconds", {"merge": round(t1 - t0, 4), "score": round(t2 - t1, 4)})
        return values

    return objective


def _counts(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials; a candidate rejected early (PRUNED) used its share of the
    budget like a complete one, so the target counts both."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    done = sum(t.state in FINISHED for t in trials)
    return done, len(trials) - done


def _retry_waiting(study: optuna.Study) -> bool:
    """Whether a dead or interrupted worker's trial waits for its retry.

    A worker runs it even past the target: two workers that overshoot the target can reach it
    while a dead worker's trial is still RUNNING, and its candidate would otherwise be left
    queued in a study that looks finished.
    """
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return any("failed_trial" in t.system_attrs for t in waiting)


def _release(study: optuna.Study, current: _Current) -> int | None:
    """After a Ctrl-C: leave this worker's trial FAIL ("interrupted") with a retry enqueued.

    Returns the interrupted trial's number, or None if no trial of ours was cut short (the Ctrl-C
    came between trials, or after the trial's result was recorded).
    """
    if current.number is None:
        return None
    [trial] = [t for t in study.get_trials(deepcopy=False) if t.number == current.number]
    if trial.state == TrialState.RUNNING:  # defensive: the deferral above should make this impossible
        study._storage.set_trial_user_attr(trial._trial_id, "fail_kind", "interrupted")
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "interrupted")
        study.tell(trial.number, state=TrialState.FAIL)
        [trial] = [t for t in study.get_trials(deepcopy=False) if t.number == current.number]
    if trial.state != TrialState.FAIL or trial.user_attrs.get("fail_kind") != "interrupted":
        return None
    requeue(study, trial, max_retry=None)  # not the candidate's fault: always worth a retry
    return trial.number


def run_trials(
    prepared: Prepared,
    study: optuna.Study,
    engine: Engine | EngineSupervisor,
    target: int,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
    *,
    poll_seconds: float = POLL_SECONDS,
) -> int:
    """Run trials until the study holds ``target`` finished trials (COMPLETE, or PRUNED by early
    rejection); returns how many COMPLETE trials it holds.

    Any number of processes may run this on one study. Each starts a trial only while COMPLETE
    plus RUNNING trials fall short of ``target``; otherwise it waits, retrying dead workers'
    trials meanwhile, in case a running trial fails. So the study ends with at least ``target``
    complete trials, and two workers that look at the same moment overshoot it by one; a dead
    worker's trial that is found (on this machine at once, elsewhere after the heartbeat's grace
    period) while a worker is still here is retried, even past the target.

    A failed candidate (NaN/Inf, out of memory, engine error) is FAIL with its reason (user attrs
    ``fail_reason``, ``fail_kind``) and the study goes on; repeated engine errors restart the
    engine (see :mod:`optimizer.engines.supervisor`). On Ctrl-C the running trial becomes FAIL
    ("interrupted") with a retry enqueued, and KeyboardInterrupt is raised with the storage
    consistent: no trial of this process is left RUNNING.
    """
    supervisor = engine if isinstance(engine, EngineSupervisor) else EngineSupervisor.around(engine)
    budget = _Budget(prepared.config.search.max_consecutive_failures)
    current = _Current()
    with _Interrupts() as interrupts:
        objective = _objective(prepared, supervisor, interrupts, current)
        try:
            while True:
                recover_stale(study)
                with trials_snapshot(study):  # both questions answered from one read
                    complete, running = _counts(study)
                    # A queued retry of a dead worker's trial is run even past the target.
                    enough = complete + running >= target and not _retry_waiting(study)
                if enough and complete >= target:
                    break
                budget.check()
                if enough:  # others run the last trials; wait in case one fails
                    with interrupts.allowed():
                        time.sleep(poll_seconds)
                    continue
                with interrupts.allowed():  # engine start or restart, between trials
                    if supervisor.needs_restart:
                        supervisor.restart()
                    else:
                        supervisor()
                current.number = None
                study.optimize(
                    objective,
                    n_trials=1,
                    catch=(TrialFailed,),
                    callbacks=[budget, *(callbacks or [])],
                    gc_after_trial=False,
                    show_progress_bar=False,
                )
                interrupts.check()
        except KeyboardInterrupt:
            raise Interrupted(_release(study, current)) from None
    return count_complete(study)
