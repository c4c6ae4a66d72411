"""Write a candidate's parameters (and its plan) to the database in one transaction.

Optuna stores each ``suggest_*`` at once, in a transaction of its own: on SQLite every parameter
is a commit, i.e. a journal write and an fsync. A per-layer search suggests dozens of parameters
per candidate, and those commits were the larger half of the study loop's own cost
(``benchmarks/trial_overhead.py``, ``bookkeeping``). Nothing reads a candidate's parameters from
the database before the candidate is complete — the trial object keeps its own copy, and other
workers only sample from finished trials or from the liar's view of running ones — so
:func:`one_commit` holds the writes of one candidate's suggestions and writes them together when
the block ends, through Optuna's own row writers.

Only an RDB storage (SQLite, PostgreSQL, MySQL) behind Optuna's cache is batched; any other
storage (a journal file, a test double) is written call by call as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from sqlalchemy.exc import IntegrityError

__all__ = ["one_commit"]


@contextlib.contextmanager
def one_commit(study: optuna.Study) -> Iterator[None]:
    """Within the block, parameters and user attrs set from this thread reach the database together.

    They are written when the block ends without an exception, in one transaction; if the block
    raises, nothing it set is written (the trial fails, and a half-written candidate would only
    mislead). Writes from other threads (a progress display, Optuna's heartbeat) pass straight
    through. Blocks do not nest: an inner block on the same storage writes call by call.
    """
    storage = study._storage
    backend = getattr(storage, "_backend", None)
    if not isinstance(storage, _CachedStorage) or not isinstance(backend, RDBStorage) or _shadowed(storage):
        yield
        return
    owner = threading.get_ident()
    params: list[tuple[int, str, float, BaseDistribution]] = []
    attrs: list[tuple[int, str, Any]] = []
    set_param, set_attr = storage.set_trial_param, storage.set_trial_user_attr

    def held_param(trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution) -> None:
        if threading.get_ident() != owner:
            return set_param(trial_id, param_name, param_value_internal, distribution)
        params.append((trial_id, param_name, param_value_internal, distribution))

    def held_attr(trial_id: int, key: str, value: Any) -> None:
        if threading.get_ident() != owner:
            return set_attr(trial_id, key, value)
        attrs.append((trial_id, key, value))

    storage.set_trial_param = held_param  # type: ignore[method-assign]
    storage.set_trial_user_attr = held_attr  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, ours in (("set_trial_param", held_param), ("set_trial_user_attr", held_attr)):
            if vars(storage).get(name) is ours:  # still ours: the class's method shows through again
                delattr(storage, name)
    if params or attrs:
        _write(storage, backend, params, attrs)


def _shadowed(storage: _CachedStorage) -> bool:
    return "set_trial_param" in vars(storage) or "set_trial_user_attr" in vars(storage)


def _write(
    storage: _CachedStorage,
    backend: RDBStorage,
    params: list[tuple[int, str, float, BaseDistribution]],
    attrs: list[tuple[int, str, Any]],
) -> None:
    """One transaction doing what the cache's per-call methods do, in call order per kind."""
    known: dict[str, tuple[int, BaseDistribution | None, BaseDistribution]] = {}
    for trial_id, name, _value, distribution in params:
        # Like the cache: the study's first distribution of a name is the one the new must match.
        study_id, _number = storage._trial_id_to_study_id_and_number[trial_id]
        known[name] = (study_id, storage._studies[study_id].param_distribution.get(name), distribution)
    try:
        # No autoflush: each row writer's lookup query would otherwise send the rows added
        # before it one INSERT at a time; at commit they go out together.
        with _create_scoped_session(backend.scoped_session) as session, session.no_autoflush:
            for trial_id, name, value, distribution in params:
                previous = known[name][1]
                backend._set_trial_param_without_commit(session, trial_id, name, value, distribution, previous)
            for trial_id, key, value in attrs:
                backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)
    except IntegrityError:  # a row already there (a racing writer): Optuna's per-call writes skip it
        for trial_id, name, value, distribution in params:
            storage.set_trial_param(trial_id, name, value, distribution)
        for trial_id, key, value in attrs:
            storage.set_trial_user_attr(trial_id, key, value)
        return
    with storage._lock:
        for name, (study_id, previous, distribution) in known.items():
            if previous is None:
                storage._studies[study_id].param_distribution.setdefault(name, distribution)
