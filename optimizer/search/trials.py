"""Running a study's trials: one Optuna objective per task, failures recorded, workers recovered.

A trial asks the search space for a plan (or takes a baseline's plan), merges it in place in the
engine, and scores every task on its search split. The plan is stored with the trial (user attr
``plan``), so exports rebuild exactly what was scored. A trial that raises is recorded as FAIL
with its reason and the study goes on; a process killed mid-trial is recovered by the storage's
heartbeat (or, on a journal, by the owner check) and its trial retried. Several processes may run
one study at once: ``mergeopt search`` on each, or ``mergeopt worker`` to join a running study.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from objectives.tasks import score_tasks
from optimizer.engines.base import Engine
from optimizer.engines.supervisor import EngineSupervisor, classify, first_line
from optimizer.errors import MergeoptError
from optimizer.merge import MergePlan
from optimizer.search import attrs
from optimizer.search._interrupts import Interrupted, Interrupts
from optimizer.search._optuna import one_commit, split_once, storage_of, trial_id, trials_snapshot
from optimizer.search.early_rejection import Rejected, StagedScorer
from optimizer.search.front import front_trials
from optimizer.search.owners import mark_owner, recover_stale, requeue
from optimizer.search.prepare import Prepared
from optimizer.search.study import FINISHED, count_complete

__all__ = ["BEAT_SECONDS", "POLL_SECONDS", "Interrupted", "TrialFailed", "run_trials"]

#: The least time between two beats of a running trial's owner (each is a storage write; a
#: journal worker is judged dead only after STALE_SECONDS without one, on another machine).
BEAT_SECONDS = 60.0
#: How often a worker with nothing to start looks again (the last trials are others' to finish).
POLL_SECONDS = 2.0


class TrialFailed(Exception):
    """A candidate could not be built or scored; the trial is FAIL, the study continues."""


@dataclass
class _Budget:
    """Counts this worker's failed trials in a row; too many stop it (the cause is not the candidates)."""

    max_failures: int
    failures_in_a_row: int = 0
    last_failure: str = ""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.failures_in_a_row += 1
            self.last_failure = str(trial.user_attrs.get(attrs.FAIL_REASON, "unknown"))
        elif trial.state == TrialState.COMPLETE:
            self.failures_in_a_row = 0

    def check(self) -> None:
        if self.failures_in_a_row >= self.max_failures:
            raise MergeoptError(
                f"{self.failures_in_a_row} trials failed in a row (last: {self.last_failure}); stopping."
                " Completed trials are saved; fix the cause and run the same command to resume"
            )


@dataclass
class _Current:
    """The trial this worker runs now (its number), for the cleanup after a Ctrl-C."""

    number: int | None = None


def _fail(trial: optuna.Trial, kind: str, reason: str) -> None:
    trial.set_user_attr(attrs.FAIL_KIND, kind)
    trial.set_user_attr(attrs.FAIL_REASON, reason)


def _objective(
    prepared: Prepared, engine: EngineSupervisor, interrupts: Interrupts, current: _Current
) -> Callable[[optuna.Trial], list[float]]:
    rejection = prepared.config.search.early_rejection
    staged = StagedScorer(prepared.tasks, rejection, prepared.config.search.seed) if rejection else None

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
        stored = trial.user_attrs.get(attrs.PLAN)
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
                trial.set_user_attr(attrs.PLAN, plan.to_dict())
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
                trial.set_user_attr(attrs.REJECTED, rejected.details)
                trial.set_user_attr(attrs.SECONDS, {"merge": round(t1 - t0, 4), "score": round(t2 - t1, 4)})
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
        trial.set_user_attr(attrs.SECONDS, {"merge": round(t1 - t0, 4), "score": round(t2 - t1, 4)})
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
        storage_of(study).set_trial_user_attr(trial_id(trial), attrs.FAIL_KIND, "interrupted")
        storage_of(study).set_trial_user_attr(trial_id(trial), attrs.FAIL_REASON, "interrupted")
        study.tell(trial.number, state=TrialState.FAIL)
        [trial] = [t for t in study.get_trials(deepcopy=False) if t.number == current.number]
    if trial.state != TrialState.FAIL or trial.user_attrs.get(attrs.FAIL_KIND) != "interrupted":
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
    with Interrupts() as interrupts:
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
