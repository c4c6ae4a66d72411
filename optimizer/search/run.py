"""Run a study to its target: the one loop ``mergeopt search`` and ``mergeopt worker`` share.

Progress on screen (a live bar on a terminal, a line per trial in a log), then trials until the
study holds the target; a method's once-per-study stage (Hi-Merging's unattended procedure) runs
first. A Ctrl-C leaves the storage consistent and surfaces as :class:`Interrupted` (the interrupted
trial's number, queued again); an engine that keeps failing and cannot be restarted surfaces as one
:class:`~optimizer.errors.MergeoptError` line that says how to resume.
"""

from __future__ import annotations

import optuna

from optimizer.engines.supervisor import EngineRestartFailed, EngineSupervisor
from optimizer.errors import MergeoptError
from optimizer.search._interrupts import Interrupted
from optimizer.search.prepare import Prepared
from optimizer.search.progress import SearchProgress
from optimizer.search.trials import run_trials

__all__ = ["Interrupted", "quiet_optuna", "run_until"]


def quiet_optuna() -> None:
    """Our progress line (with each failure's reason) replaces Optuna's per-trial log and tracebacks."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def run_until(study: optuna.Study, prepared: Prepared, target: int, engine: EngineSupervisor, *, resume: str) -> int:
    """Run ``study`` to ``target`` finished trials with ``engine``; returns the COMPLETE count.

    ``resume`` is the command that picks the run up again, quoted when the engine cannot be
    restarted. A Ctrl-C raises :class:`Interrupted` with the storage consistent.
    """
    try:
        with SearchProgress(study, target) as progress:
            return run_trials(prepared, study, engine, target, callbacks=[progress])
    except EngineRestartFailed as exc:
        raise MergeoptError(f"{exc} with: {resume}") from None
