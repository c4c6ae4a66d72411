"""Read a study's trials once per candidate, not once per parameter.

TPE samples parameters one at a time (its default, independent mode) and asks the storage for
all trials at every ``suggest_*`` call; with the constant liar it uses by default, Optuna's trial
cache is bypassed, so every call is a fresh database read. (GP and NSGA-II sample a candidate's
parameters together and random sampling reads nothing: for them the snapshot changes nothing.)
A per-layer search asks for dozens of parameters per candidate: with 36 on SQLite the loop's own
cost was 270 ms per trial, 143 ms with the snapshot (``benchmarks/trial_overhead.py``).

Within one candidate's suggestions nothing the sampler looks at changes, except what other
workers write in those few milliseconds — and a sampler never sees those consistently anyway
(they may land a moment later). So :func:`trials_snapshot` serves every read during one
candidate's suggestions from a single read taken at the first one.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Container, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["trials_snapshot"]


@contextlib.contextmanager
def trials_snapshot(study: optuna.Study) -> Iterator[None]:
    """Within the block, ``study``'s storage answers ``get_all_trials`` from one read.

    The read is taken lazily (a candidate that suggests nothing reads nothing) and dropped when
    the block ends; the storage itself is untouched outside the block, and other threads (Optuna's
    heartbeat, a progress display) keep reading the database as before. Blocks on one storage
    nest, but must not interleave across threads (the study loop opens them from one thread).
    """
    storage = study._storage
    read = storage.get_all_trials  # the storage's own method (or whoever wraps it already)
    shadowed = "get_all_trials" in vars(storage)
    taken: dict[int, list[FrozenTrial]] = {}
    owner = threading.get_ident()

    def get_all_trials(
        study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        if threading.get_ident() != owner:
            return read(study_id, deepcopy=deepcopy, states=states)
        if study_id not in taken:
            taken[study_id] = read(study_id, deepcopy=False)
        trials = taken[study_id]
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    storage.get_all_trials = get_all_trials  # type: ignore[method-assign]
    try:
        yield
    finally:
        if vars(storage).get("get_all_trials") is get_all_trials:  # still ours: put back what was there
            if shadowed:
                storage.get_all_trials = read  # type: ignore[method-assign]
            else:
                del storage.get_all_trials  # the class's method shows through again
