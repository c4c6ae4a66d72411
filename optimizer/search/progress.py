"""What a person watching a long search sees: trials done/total, best per objective, front size, ETA.

On a terminal it is a live rich progress bar; in a log file (no TTY) it is one plain line per
trial, so overnight logs stay readable with ``tail``.
"""

from __future__ import annotations

import time

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from optimizer.search.study import count_complete

__all__ = ["SearchProgress"]


def _summary(study: optuna.Study) -> tuple[str, int]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return "no complete trial yet", 0
    names = study.metric_names or [f"obj{i}" for i in range(len(study.directions))]
    parts = []
    for i, (name, direction) in enumerate(zip(names, study.directions, strict=True)):
        pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
        parts.append(f"{name} {pick(t.values[i] for t in complete):.3f}")
    front = len(study.best_trials)
    return "best " + ", ".join(parts) + f" | front {front}", front


class SearchProgress:
    """An Optuna callback that shows progress towards ``target`` COMPLETE trials."""

    def __init__(self, study: optuna.Study, target: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.target = target
        self.start_done = count_complete(study)
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
        done = count_complete(study)
        text, _ = _summary(study)
        if self.live:
            self.progress.update(self.task, completed=done, description=text)
            return
        label = trial.user_attrs.get("baseline")
        what = f"baseline {label}" if label else "search"
        state = trial.state.name.lower()
        if trial.state == TrialState.FAIL:
            state += f" ({trial.user_attrs.get('fail_reason', 'no reason recorded')})"
        elapsed = time.monotonic() - self.t0
        new = max(done - self.start_done, 1)
        eta = elapsed / new * max(self.target - done, 0)
        self.console.print(
            f"trial {trial.number} [{what}] {state} | {done}/{self.target} done | {text} | eta {eta:.0f}s",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
