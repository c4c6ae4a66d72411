"""TPE's split of the study into good and bad trials: once per candidate, not once per parameter.

TPE in its default (independent) mode samples a candidate's parameters one at a time, and for
each one it first splits every finished trial into "below" (the good ones) and "above": for
several objectives a non-dominated sort with a hypervolume tie-break, over the whole study. Within
one candidate's suggestions that split is the same every time — the trials do not change
(:mod:`optimizer.search.snapshot` serves them from one read) and the split draws no random
numbers — but it is recomputed for every parameter, and it grows with the study. In a per-layer
search (36 parameters) the split was most of the loop's growth with the trial count
(``benchmarks/trial_overhead.py``, ``scaling``). :func:`split_once` computes it once per
candidate; the sampled values are the same as without it, draw for draw (tested).

Optuna's split is a private module function (``optuna.samplers._tpe.sampler._split_trials``).
A wrapper is put in its place once, and only memoizes inside a :func:`split_once` block of the
calling thread; elsewhere (other threads, other code) it calls Optuna's function straight
through. If the function is missing or has another signature (a later Optuna), nothing is
replaced and every split is computed as before: slower, never different.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

from optuna.trial import FrozenTrial

try:
    from optuna.samplers._tpe import sampler as _tpe
except ImportError:  # pragma: no cover - a future Optuna
    _tpe = None  # type: ignore[assignment]

__all__ = ["split_once"]

#: The parameters of Optuna's split this module was written against (Optuna 5.0).
_SIGNATURE = ("study", "trials", "n_below")
_Split = tuple[list[FrozenTrial], list[FrozenTrial]]

_active = threading.local()  # .memo: the current block's splits, absent outside a block
_install_lock = threading.Lock()
_installed = False  # whether Optuna's split is wrapped (once per process)


def _original() -> Callable[..., _Split] | None:
    """Optuna's split function if it has the expected shape, else None."""
    split = getattr(_tpe, "_split_trials", None)
    if split is None:
        return None
    try:
        params = tuple(inspect.signature(split).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a future Optuna
        return None
    return split if params == _SIGNATURE else None


def _install() -> bool:
    """Put the memoizing wrapper in place of Optuna's split (once per process); False if unknown."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        split = _original()
        if split is None:
            return False

        def memoized(study: Any, trials: list[FrozenTrial], n_below: int) -> _Split:
            memo: dict[tuple, _Split] | None = getattr(_active, "memo", None)
            if memo is None:
                return split(study, trials, n_below)
            # The split depends on the trials' values, constraints and intermediate values, all
            # fixed once a trial has finished, and on which trials are still running, whose
            # parameters (the Parzen estimators' input) only ever grow: a trial is identified by
            # its number, state and number of parameters, exact even without a snapshot.
            key = (id(study), n_below, tuple((t.number, t.state, len(t.params)) for t in trials))
            found = memo.get(key)
            if found is None:
                found = memo[key] = split(study, trials, n_below)
            below, above = found
            return list(below), list(above)  # fresh lists: a caller may reorder its own

        _tpe._split_trials = memoized  # type: ignore[union-attr]
        _installed = True
        return True


@contextlib.contextmanager
def split_once() -> Iterator[None]:
    """Within the block, this thread's TPE computes each distinct split of the trials once.

    Meant around one candidate's suggestions; the memo is dropped when the block ends, so the
    next candidate sees the study as it is then. Blocks nest (the inner one has its own memo).
    """
    if not _install():
        yield
        return
    outer = getattr(_active, "memo", None)
    _active.memo = {}
    try:
        yield
    finally:
        if outer is None:
            del _active.memo
        else:
            _active.memo = outer
