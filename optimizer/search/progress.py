"""What a person watching a long search sees: trials done/total, best per objective, front size, ETA.

On a terminal it is a live rich progress bar; in a log file (no TTY) it is one plain line per
trial, so overnight logs stay readable with ``tail``. :func:`study_status` is the same view of a
study from outside any worker (``mergeopt status``): states, failures grouped by reason,
throughput, the workers seen in the trials' owner attrs, and an ETA.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from optimizer.search import attrs
from optimizer.search.front import front_trials
from optimizer.search.owners import owner_alive
from optimizer.search.study import FINISHED, count_finished

__all__ = ["FailureGroup", "SearchProgress", "StudyStatus", "WorkerSeen", "study_status"]


def _summary(study: optuna.Study) -> tuple[str, int]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return "no complete trial yet", 0
    names = study.metric_names or [f"obj{i}" for i in range(len(study.directions))]
    parts = []
    for i, (name, direction) in enumerate(zip(names, study.directions, strict=True)):
        pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
        parts.append(f"{name} {pick(t.values[i] for t in complete):.3f}")
    front = len(front_trials(study, complete))
    return "best " + ", ".join(parts) + f" | front {front}", front


class SearchProgress:
    """An Optuna callback that shows progress towards ``target`` finished trials (complete or rejected early)."""

    def __init__(self, study: optuna.Study, target: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.target = target
        self.start_done = count_finished(study)
        self.t0 = time.monotonic()
        self.live = self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(_summary(study)[0], total=target, completed=self.start_done)

    def __enter__(self) -> SearchProgress:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        done = count_finished(study)
        text, _ = _summary(study)
        if self.live:
            self.progress.update(self.task, completed=done, description=text)
            return
        label = trial.user_attrs.get(attrs.BASELINE)
        what = f"baseline {label}" if label else "search"
        state = trial.state.name.lower()
        if trial.state == TrialState.FAIL:
            state += f" ({trial.user_attrs.get(attrs.FAIL_REASON, 'no reason recorded')})"
        rejected = trial.user_attrs.get(attrs.REJECTED)
        if trial.state == TrialState.PRUNED and isinstance(rejected, dict):
            state = (
                f"rejected early (dominated by trial {rejected.get('dominated_by')}"
                f" after {rejected.get('examples')}/{rejected.get('of')} examples)"
            )
        elapsed = time.monotonic() - self.t0
        new = max(done - self.start_done, 1)
        eta = elapsed / new * max(self.target - done, 0)
        self.console.print(
            f"trial {trial.number} [{what}] {state} | {done}/{self.target} done | {text} | eta {eta:.0f}s",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


# -- a study seen from outside: mergeopt status ------------------------------------------------


@dataclass(frozen=True)
class FailureGroup:
    """Failed trials that failed the same way: ``reason`` is the first one's, verbatim."""

    kind: str  # candidate | memory | engine | interrupted | worker | unknown
    reason: str
    trials: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.trials)


@dataclass(frozen=True)
class WorkerSeen:
    """A process that ran trials of the study (from each trial's ``owner`` attr)."""

    host: str
    pid: int
    trials: int
    complete: int
    failed: int
    last_seen: datetime
    active: bool  # runs a trial now, and is alive


@dataclass(frozen=True)
class StudyStatus:
    name: str
    states: dict[str, int]
    target: int | None
    failures: list[FailureGroup]
    front: int
    baselines_done: int
    baselines_total: int
    window_hours: float
    rate_window: float | None  # finished trials per hour in the last window_hours
    rate_overall: float | None  # ... from the first trial's start to the last completion
    workers: list[WorkerSeen]

    @property
    def remaining(self) -> int | None:
        finished = sum(self.states.get(s.name, 0) for s in FINISHED)
        return None if self.target is None else max(self.target - finished, 0)

    @property
    def rate_for_eta(self) -> float | None:
        """The recent rate while there is one (a study that sped up or slowed down), else the overall."""
        return self.rate_window or self.rate_overall or None

    @property
    def eta_hours(self) -> float | None:
        rate = self.rate_for_eta
        if self.remaining is None or rate is None:
            return None
        return self.remaining / rate


def _failure_key(kind: str, reason: str) -> tuple[str, str]:
    # Group "worker (host pid 123) stopped" with "worker (host pid 456) stopped", and OOMs by size.
    return kind, re.sub(r"\d+(\.\d+)?", "#", reason)


def _failures(trials: list[FrozenTrial]) -> list[FailureGroup]:
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    groups: dict[tuple[str, str], list[tuple[int, str, str]]] = defaultdict(list)
    for t in trials:
        if t.state != TrialState.FAIL:
            continue
        kind, reason = t.user_attrs.get(attrs.FAIL_KIND), t.user_attrs.get(attrs.FAIL_REASON)
        if reason is None and t.number in retried:  # failed by Optuna's heartbeat, which sets no reason
            kind, reason = "worker", "its worker stopped mid-trial (heartbeat expired); retried"
        kind, reason = str(kind or "unknown"), str(reason or "no reason recorded")
        groups[_failure_key(kind, reason)].append((t.number, kind, reason))
    out = [FailureGroup(m[0][1], m[0][2], tuple(n for n, _, _ in m)) for m in groups.values()]
    return sorted(out, key=lambda g: (-g.count, g.kind, g.reason))


def _stamp(dt: datetime | None) -> float | None:
    # RDB storages keep naive local times, the journal aware UTC ones; timestamps compare both.
    return None if dt is None else dt.timestamp()


def _workers(trials: list[FrozenTrial]) -> list[WorkerSeen]:
    seen: dict[tuple[str, int, object], list[FrozenTrial]] = defaultdict(list)
    for t in trials:
        owner = t.user_attrs.get(attrs.OWNER)
        if isinstance(owner, dict) and "pid" in owner:
            seen[(str(owner.get("host", "?")), int(owner["pid"]), owner.get("pid_start"))].append(t)
    out = []
    for (host, pid, _), owned in seen.items():
        beats = [float(t.user_attrs[attrs.OWNER].get("beat", 0.0)) for t in owned]
        beats += [s for t in owned if (s := _stamp(t.datetime_complete)) is not None]
        out.append(
            WorkerSeen(
                host=host,
                pid=pid,
                trials=len(owned),
                complete=sum(t.state == TrialState.COMPLETE for t in owned),
                failed=sum(t.state == TrialState.FAIL for t in owned),
                last_seen=datetime.fromtimestamp(max(beats)),
                active=any(t.state == TrialState.RUNNING and owner_alive(t) for t in owned),
            )
        )
    return sorted(out, key=lambda w: (w.host, w.pid))


def study_status(
    study: optuna.Study, target: int | None, *, window_hours: float = 1.0, now: float | None = None
) -> StudyStatus:
    """Everything ``mergeopt status`` shows, read from the storage alone (no models, no engine)."""
    now = time.time() if now is None else now
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    finished = [t for t in trials if t.state in FINISHED]  # a rejected candidate is throughput too
    ends = sorted(s for t in finished if (s := _stamp(t.datetime_complete)) is not None)
    starts = [s for t in trials if (s := _stamp(t.datetime_start)) is not None]
    rate_window = rate_overall = None
    if ends and starts:
        first = min(starts)
        span = max(ends[-1] - first, 1.0)
        rate_overall = len(ends) / (span / 3600)
        window = min(window_hours * 3600, max(now - first, 1.0))
        rate_window = sum(e >= now - window for e in ends) / (window / 3600)
    labels = {t.user_attrs[attrs.BASELINE] for t in trials if attrs.BASELINE in t.user_attrs}
    done = {t.user_attrs[attrs.BASELINE] for t in complete if attrs.BASELINE in t.user_attrs}
    return StudyStatus(
        name=study.study_name,
        states=dict(states),
        target=target,
        failures=_failures(trials),
        front=len(front_trials(study, complete)),
        baselines_done=len(done),
        baselines_total=len(labels),
        window_hours=window_hours,
        rate_window=rate_window,
        rate_overall=rate_overall,
        workers=_workers(trials),
    )
